"""EagerBackend: the engine's StepBackend on one GPU (fused graphs, kernels, optional CUDA graphs)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from tilert.engine.api import register_backend
from tilert.engine.backend import PREFILL_CHUNK, GraphBackend
from tilert.ir.graph import Graph
from tilert.models.binding import bind_params
from tilert.models.config import ModelConfig
from tilert.runtime.eager.runtime import EagerRuntime, GraphCaptureError

log = logging.getLogger(__name__)

REWRITE_UNTIL = "fuse_residual"  # the rewriting prefix of the pipeline; analysis passes are not needed to run


def compile_for_gpu(g: Graph, max_seq: int, world: int = 1) -> list[Graph]:
    """Shard (world ranks) and fuse a step graph: the graphs the eager runtime executes."""
    from tilert.passes import PassContext, run_passes
    from tilert.passes.manager import passes_until

    return run_passes(g, PassContext(world=world, max_seq=max_seq), passes_until(REWRITE_UNTIL))


class EagerBackend(GraphBackend):
    """Runs the target and drafter step graphs of a model on one GPU (world size 1)."""

    prefill_chunk = PREFILL_CHUNK

    def __init__(
        self,
        cfg: ModelConfig,
        weights: Mapping[str, torch.Tensor],
        *,
        max_seq: int = 1024,
        device: str = "cuda",
        cuda_graph: bool = False,
        use_kernels: bool = True,
    ) -> None:
        super().__init__(cfg, weights, max_seq)
        self.cuda_graph = cuda_graph
        self.world, self.rank = 1, 0  # a distributed subclass runs one rank of `world`
        self.runtime = EagerRuntime({}, device=device, use_kernels=use_kernels)
        self.uncaptured: dict[str, str] = {}  # graphs whose capture failed (host syncs), and why

    def _prepare(self, g: Graph) -> Graph:
        fused = compile_for_gpu(g, self.max_seq, self.world)[self.rank]
        self.runtime.params.update(self._device_params(bind_params(fused, self.weights, {}), self.runtime.device))
        return fused

    def _execute(self, g: Graph, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        B = g.values[g.by_role("input")[0].name].shape[0]
        capture = self.cuda_graph and B <= PREFILL_CHUNK and g.name not in self.uncaptured
        try:
            out = self.runtime.run(g, inputs, capture=capture)
        except GraphCaptureError as e:  # an op of this shape syncs with the host: run it launch by launch
            self.uncaptured[g.name] = str(e)
            log.warning("%s", e)
            out = self.runtime.run(g, inputs, capture=False)
        return {k: v if k == "features" else v.cpu() for k, v in out.items()}

    def execute_on(self, g: Graph, inputs: dict[str, torch.Tensor], states: dict[str, torch.Tensor]) -> dict[str, Any]:
        """One step of a prepared graph with `states` as its KV caches (another runtime's tensors:
        the persistent backend runs the shapes its bodies do not take here), uncaptured."""
        saved, self.runtime.states = self.runtime.states, states
        try:
            out = self.runtime.run(g, inputs, capture=False)
        finally:
            self.runtime.states = saved
        return {k: v if k == "features" else v.cpu() for k, v in out.items()}

    def reset(self) -> None:
        self.runtime.reset()

    # per-sequence KV caches for the Engine (not with CUDA graphs: a captured graph binds its caches)
    def new_cache(self) -> dict[str, torch.Tensor]:
        if self.cuda_graph:
            raise ValueError("the eager backend with CUDA graphs serves one sequence at a time")
        return {}

    def use_cache(self, cache: dict[str, torch.Tensor]) -> None:
        self.runtime.states = cache


@register_backend("eager")
def _eager_factory(
    cfg: ModelConfig,
    weights: Mapping[str, torch.Tensor],
    *,
    max_seq: int,
    world: int = 1,
    device: str = "cuda",
    plan: Any = None,
) -> EagerBackend:
    if world != 1:
        raise ValueError("the eager backend runs world size 1 per process (use torchrun for more ranks)")
    if not torch.cuda.is_available():
        raise ValueError("backend 'eager' needs a CUDA GPU; none is visible (use backend='reference')")
    return EagerBackend(cfg, weights, max_seq=max_seq, device=device if device != "cpu" else "cuda")
