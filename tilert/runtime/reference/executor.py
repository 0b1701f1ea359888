"""Reference executor: interprets graphs node by node with each op kind's torch reference.

It runs one graph (one rank) or N rank graphs of the same structure in lockstep, so collectives
see every rank's inputs (simulated ranks on the CPU). State (KV caches) lives in the executor,
in float32, and persists across calls; graphs of different token counts share it by name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from tilert.ir.graph import Graph, IRError
from tilert.ir.registry import get_op


class RankContext:
    """What a reference sees of the world: its rank, the world size, peers' inputs for collectives."""

    def __init__(self, rank: int, world: int, envs: Sequence[dict[str, Any]], inputs: Sequence[str]) -> None:
        self.rank, self.world = rank, world
        self._envs, self._inputs = envs, inputs

    def peers(self, i: int) -> list[Any]:
        return [env[self._inputs[i]] for env in self._envs]


def run_graphs(graphs: Sequence[Graph], envs: Sequence[dict[str, Any]]) -> None:
    """Execute rank graphs in lockstep; each env holds inputs, params and state and gains every value."""
    n = len(graphs[0].nodes)
    for g in graphs[1:]:
        if [x.op for x in g.nodes] != [x.op for x in graphs[0].nodes]:
            raise IRError(f"rank graph '{g.name}' does not have the same op sequence as '{graphs[0].name}'")
    for i in range(n):
        for r, (g, env) in enumerate(zip(graphs, envs)):
            node = g.nodes[i]
            opdef = get_op(node.op)
            ctx = RankContext(r, len(graphs), envs, node.inputs)
            try:
                outs = opdef.reference(ctx, *(env[x] for x in node.inputs), **node.a.kwargs())
            except KeyError as e:
                raise IRError(f"node {i} ({node.op}) in '{g.name}': value {e} was not provided") from None
            if len(outs) != len(node.outputs):
                raise IRError(f"node {i} ({node.op}) returned {len(outs)} outputs, expected {len(node.outputs)}")
            env.update(zip(node.outputs, outs))


def bind_env(g: Graph, inputs: Mapping[str, Any], params: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """Graph inputs (checked against their declared shapes, moved to `device`) and params by name."""
    env: dict[str, Any] = {}
    for v in g.by_role("input"):
        if v.name not in inputs:
            raise ValueError(f"graph '{g.name}' needs input '{v.name}' ({v.dtype.name}{list(v.shape)})")
        t = torch.as_tensor(inputs[v.name], device=device)
        if tuple(t.shape) != v.shape:
            raise ValueError(f"input '{v.name}' has shape {list(t.shape)}, graph expects {list(v.shape)}")
        env[v.name] = t
    for v in g.by_role("param"):
        if v.name not in params:
            raise ValueError(f"param '{v.name}' is not bound")
        env[v.name] = params[v.name]
    return env


class ReferenceExecutor:
    """Holds per-rank params and state; runs graphs of one model on torch (CPU by default)."""

    def __init__(self, params: Sequence[Mapping[str, Any]] | Mapping[str, Any], device: str = "cpu") -> None:
        self.params = [dict(params)] if isinstance(params, Mapping) else [dict(p) for p in params]
        self.world = len(self.params)
        self.device = torch.device(device)
        self.states: list[dict[str, torch.Tensor]] = [{} for _ in range(self.world)]

    def _state(self, rank: int, g: Graph) -> dict[str, torch.Tensor]:
        st = self.states[rank]
        for v in g.by_role("state"):
            if v.name not in st:
                st[v.name] = torch.zeros(v.shape, dtype=torch.float32, device=self.device)
            elif tuple(st[v.name].shape) != v.shape:
                raise IRError(f"state '{v.name}' is {list(st[v.name].shape)} here but {list(v.shape)} in '{g.name}'")
        return st

    def reset(self) -> None:
        self.states = [{} for _ in range(self.world)]

    def run(self, graphs: Graph | Sequence[Graph], inputs: Mapping[str, torch.Tensor]) -> list[dict[str, Any]]:
        """Run one step; returns each rank's graph outputs by name."""
        graphs = [graphs] * self.world if isinstance(graphs, Graph) else list(graphs)
        if len(graphs) != self.world:
            raise ValueError(f"{len(graphs)} graphs for {self.world} ranks")
        envs = []
        for r, g in enumerate(graphs):
            env = bind_env(g, inputs, self.params[r], self.device)
            env.update(self._state(r, g))
            envs.append(env)
        run_graphs(graphs, envs)
        return [{o: env[o] for o in g.outputs} for g, env in zip(graphs, envs)]
