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


class ReferenceBackend:
    """Runs step graphs on the reference executor; `world` > 1 runs sharded rank graphs in lockstep."""

    def __init__(
        self,
        cfg: ModelConfig,
        weights: Mapping[str, torch.Tensor],
        *,
        max_seq: int = 1024,
        world: int = 1,
        device: str = "cpu",
    ) -> None:
        self.cfg, self.weights, self.max_seq, self.world = cfg, weights, max_seq, world
        self._graphs: dict[tuple, list[Graph]] = {}
        self._params: list[dict[str, Any]] = [{} for _ in range(world)]
        self.executor = ReferenceExecutor(self._params, device=device)
        self.device = torch.device(device)

    def _rank_graphs(self, key: tuple, build: Any) -> list[Graph]:
        if key not in self._graphs:
            g = build()
            graphs = [g] if self.world == 1 else _shard(g, self.world)
            for r, gr in enumerate(graphs):
                bind_params(gr, self.weights, self.executor.params[r])
            self._graphs[key] = graphs
        return self._graphs[key]

    def target_step(self, tokens: torch.Tensor, positions: torch.Tensor, mode: str = "decode") -> dict[str, Any]:
        B = int(tokens.shape[0])
        graphs = self._rank_graphs(
            ("target", B, mode), lambda: build_step_graph(self.cfg, tokens=B, max_seq=self.max_seq, mode=mode)
        )
        return self.executor.run(graphs, {"tokens": tokens.to(torch.int32), "positions": positions.to(torch.int32)})[0]

    def draft_step(
        self,
        block_tokens: torch.Tensor,
        block_positions: torch.Tensor,
        ctx_features: torch.Tensor,
        ctx_positions: torch.Tensor,
    ) -> torch.Tensor:
        C = int(ctx_features.shape[0])
        graphs = self._rank_graphs(
            ("drafter", C), lambda: build_drafter_graph(self.cfg, context=C, max_seq=self.max_seq)
        )
        inputs = {
            "block_tokens": block_tokens.to(torch.int32),
            "block_positions": block_positions.to(torch.int32),
            "ctx_features": ctx_features,
            "ctx_positions": ctx_positions.to(torch.int32),
        }
        return self.executor.run(graphs, inputs)[0]["draft"]

    def reset(self) -> None:
        self.executor.reset()


def _shard(graph: Graph, world: int) -> list[Graph]:
    from tilert.passes import shard_for_ranks

    return shard_for_ranks(graph, world)
