"""Step backends: what the decode loop needs from a runtime.

A backend runs the target's step graph (B tokens at given positions, optionally with DFlash
acceptance) and the drafter's graph. The reference backend interprets graphs on the CPU; GPU
runtimes implement the same two methods.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import torch

from tilert.ir.graph import Graph
from tilert.models.binding import bind_params
from tilert.models.builder import build_step_graph
from tilert.models.config import ModelConfig
from tilert.models.drafter import build_drafter_graph
from tilert.runtime.reference import ReferenceExecutor


class StepBackend(Protocol):
    cfg: ModelConfig
    max_seq: int

    def target_step(self, tokens: torch.Tensor, positions: torch.Tensor, mode: str = "decode") -> dict[str, Any]:
        """Outputs: logits [B, V], next_tokens i32[B], features [B, F] (if a drafter), accept i32[B+1] (verify)."""
        ...

    def draft_step(
        self,
        block_tokens: torch.Tensor,
        block_positions: torch.Tensor,
        ctx_features: torch.Tensor,
        ctx_positions: torch.Tensor,
    ) -> torch.Tensor:
        """The drafted block i32[B] (anchor first)."""
        ...

    def reset(self) -> None: ...


PREFILL_CHUNK = 16  # rows of a GPU prefill step: the most the MoE and LM-head bodies take at once


def prefill_plan(n: int, start: int, max_seq: int, chunk: int) -> list[tuple[int, int, int]]:
    """How a GPU backend runs a prompt of n tokens at positions start.. as steps of compiled shapes:
    (offset, real rows, step rows) per step. Every step has `chunk` rows or 1: a short last chunk is
    padded with rows at the positions after it (their KV entries lie past the prompt, where later
    steps overwrite them, as with rejected drafts), or, where that padding would run past the cache
    (max_seq), its rows go one by one. So any prompt length runs on two compiled step shapes."""
    if n < 1:
        raise ValueError(f"a prefill needs at least one token, got {n}")
    steps, i = [], 0
    while i < n:
        rest = n - i
        if rest >= chunk:
            steps.append((i, chunk, chunk))
            i += chunk
        elif rest > 1 and start + i + chunk <= max_seq:
            steps.append((i, rest, chunk))
            i += rest
        else:
            steps.append((i, 1, 1))
            i += 1
    return steps


def request_shapes(n: int, max_seq: int, block: int | None, chunk: int = PREFILL_CHUNK) -> set[tuple[int, str]]:
    """The (tokens, mode) step shapes a request with an n-token prompt makes a GPU backend compile:
    its prefill steps, a decode step, and with a DFlash block size the verify step."""
    shapes = {(rows, "decode") for _, _, rows in prefill_plan(n, 0, max_seq, chunk)} | {(1, "decode")}
    return shapes | ({(block, "verify")} if block else set())


class GraphBackend:
    """What every runtime's backend shares: the step graphs per shape, built (and prepared) once.

    Subclasses say how a built graph is prepared (`_prepare`: shard/compile and bind weights) and
    run (`_execute`: one step, outputs of the first rank). `prefill_chunk` (GPU backends): a
    multi-token decode step (a prefill) runs as steps of that many rows (`prefill_plan`), so every
    prompt length uses the same compiled shapes; None runs it as one step of any size.
    """

    prefill_chunk: int | None = None
    kv_element_bytes = 2  # GPU runtimes keep KV caches in bf16

    def __init__(self, cfg: ModelConfig, weights: Mapping[str, torch.Tensor], max_seq: int) -> None:
        self.cfg, self.weights, self.max_seq = cfg, weights, max_seq
        self._prepared: dict[tuple, Any] = {}

    def kv_bytes_per_sequence(self) -> int:
        """Bytes of one sequence's KV caches in this process: the state values of the target and
        drafter graphs (a backend that runs one rank of `world`, i.e. has a `rank`, holds 1/world)."""
        from tilert.engine.memory import state_bytes

        graphs = {"target": build_step_graph(self.cfg, tokens=1, max_seq=self.max_seq)}
        if self.cfg.dflash is not None:
            graphs["drafter"] = build_drafter_graph(self.cfg, context=1, max_seq=self.max_seq)
        total = state_bytes(graphs, self.kv_element_bytes)
        return total // max(1, getattr(self, "world", 1)) if hasattr(self, "rank") else total

    def _prepare(self, g: Graph) -> Any:
        raise NotImplementedError

    def _execute(self, prepared: Any, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        raise NotImplementedError

    def _get(self, key: tuple, build: Any) -> Any:
        if key not in self._prepared:
            self._prepared[key] = self._prepare(build())
        return self._prepared[key]

    def target_step(self, tokens: torch.Tensor, positions: torch.Tensor, mode: str = "decode") -> dict[str, Any]:
        B = int(tokens.shape[0])
        chunk = self.prefill_chunk
        if mode == "decode" and chunk and B > 1 and B != chunk:
            return self._prefill(tokens, positions, chunk)
        return self._step(tokens, positions, mode)

    def _prefill(self, tokens: torch.Tensor, positions: torch.Tensor, chunk: int) -> dict[str, Any]:
        """A multi-token decode step as prefill_plan's steps; outputs of the real rows, concatenated."""
        pos = positions.to(torch.int32)
        if not bool((pos[1:] - pos[:-1] == 1).all()):
            raise ValueError("a prefill's positions must be consecutive")
        outs: dict[str, list[torch.Tensor]] = {}
        for off, real, rows in prefill_plan(int(tokens.shape[0]), int(pos[0]), self.max_seq, chunk):
            t = tokens[off : off + real]
            if rows > real:  # padding rows: copies of the last token at the positions after it
                t = torch.cat([t, t[-1:].expand(rows - real)])
            out = self._step(t, pos[off] + torch.arange(rows, dtype=torch.int32), "decode")
            for k, v in out.items():
                outs.setdefault(k, []).append(v[:real].clone())  # a replayed graph reuses its outputs
        return {k: torch.cat(v) for k, v in outs.items()}

    def _step(self, tokens: torch.Tensor, positions: torch.Tensor, mode: str) -> dict[str, Any]:
        B = int(tokens.shape[0])
        prepared = self._get(
            ("target", B, mode), lambda: build_step_graph(self.cfg, tokens=B, max_seq=self.max_seq, mode=mode)
        )
        return self._execute(prepared, {"tokens": tokens.to(torch.int32), "positions": positions.to(torch.int32)})

    def draft_step(
        self,
        block_tokens: torch.Tensor,
        block_positions: torch.Tensor,
        ctx_features: torch.Tensor,
        ctx_positions: torch.Tensor,
    ) -> torch.Tensor:
        C = int(ctx_features.shape[0])
        prepared = self._get(("drafter", C), lambda: build_drafter_graph(self.cfg, context=C, max_seq=self.max_seq))
        inputs = {
            "block_tokens": block_tokens.to(torch.int32),
            "block_positions": block_positions.to(torch.int32),
            "ctx_features": ctx_features,
            "ctx_positions": ctx_positions.to(torch.int32),
        }
        return self._execute(prepared, inputs)["draft"]


class ReferenceBackend(GraphBackend):
    """Runs step graphs on the reference executor; `world` > 1 runs sharded rank graphs in lockstep."""

    kv_element_bytes = 4  # the reference executor keeps state in float32

    def __init__(
        self,
        cfg: ModelConfig,
        weights: Mapping[str, torch.Tensor],
        *,
        max_seq: int = 1024,
        world: int = 1,
        device: str = "cpu",
    ) -> None:
        super().__init__(cfg, weights, max_seq)
        self.world = world
        self.executor = ReferenceExecutor([{} for _ in range(world)], device=device)
        self.device = torch.device(device)

    def _prepare(self, g: Graph) -> list[Graph]:
        graphs = [g] if self.world == 1 else _shard(g, self.world)
        self._bind(graphs)
        return graphs

    def _bind(self, graphs: list[Graph]) -> None:
        for r, gr in enumerate(graphs):
            bind_params(gr, self.weights, self.executor.params[r])

    def _execute(self, graphs: list[Graph], inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        return self.executor.run(graphs, inputs)[0]

    def reset(self) -> None:
        self.executor.reset()


def _shard(graph: Graph, world: int) -> list[Graph]:
    from tilert.passes import shard_for_ranks

    return shard_for_ranks(graph, world)
