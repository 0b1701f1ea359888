"""The eager runtime as engine backends: `EagerBackend` on one GPU (fused graphs, kernels, optional
CUDA graphs) and `DistEagerBackend`, one rank of a torch.distributed world per process (step graphs
compiled for the world, `compile_for_gpu(g, max_seq, world)[rank]`, this rank's weight slices bound
from the full checkpoint; every rank runs the same steps and gets the same next tokens, so each
rank's decode loop stays in lockstep)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch

from tilert.engine.backend import PREFILL_CHUNK, GraphBackend
from tilert.ir.graph import Graph
from tilert.models.binding import bind_params
from tilert.models.config import ModelConfig
from tilert.passes import PassContext, run_passes
from tilert.passes.manager import passes_until
from tilert.runtime.eager.distributed import DistContext, init_distributed
from tilert.runtime.eager.runtime import EagerRuntime, GraphCaptureError

log = logging.getLogger(__name__)

REWRITE_UNTIL = "fuse_residual"  # the rewriting prefix of the pipeline; analysis passes are not needed to run


def compile_for_gpu(g: Graph, max_seq: int, world: int = 1) -> list[Graph]:
    """Shard (world ranks) and fuse a step graph: the graphs the eager runtime executes."""
    return run_passes(g, PassContext(world=world, max_seq=max_seq), passes_until(REWRITE_UNTIL))


class EagerBackend(GraphBackend):
    """Runs the target and drafter step graphs of a model on one GPU (world size 1)."""

    prefill_chunk = PREFILL_CHUNK
    # an Engine batches on this backend only when asked (batching=True): every sequence then runs
    # through the mixed steps, and one DFlash user's round there took 21.7 ms against 20.2 ms on the
    # single-sequence programs (H100, docs/performance.md 2026-12-07)
    auto_batching = False

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

    def execute_on(self, g: Graph, inputs: dict[str, torch.Tensor], states: dict[str, torch.Tensor],
                   capture: bool = False) -> dict[str, Any]:  # fmt: skip
        """One step of a prepared graph with `states` as its KV caches (another runtime's tensors:
        the persistent backend runs the shapes its bodies do not take here; the mixed steps' pool),
        uncaptured unless `capture` (then `states` must stay the same tensors for later replays)."""
        saved, self.runtime.states = self.runtime.states, states
        try:
            out = self._execute(g, inputs) if capture else self.runtime.run(g, inputs, capture=False)
        finally:
            self.runtime.states = saved
        return {k: v if k == "features" else v.cpu() for k, v in out.items()}

    def _execute_pool(self, g: Graph, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        """A mixed step on the pool's caches (replayed from a CUDA graph with cuda_graph: the pool's
        tensors never change)."""
        return self.execute_on(g, inputs, self.__dict__.setdefault("pool_states", {}), capture=self.cuda_graph)

    def reset(self) -> None:
        self.runtime.reset()
        for t in self.__dict__.get("pool_states", {}).values():
            t.zero_()

    # per-sequence KV caches for the Engine (not with CUDA graphs: a captured graph binds its caches)
    def new_cache(self) -> dict[str, torch.Tensor]:
        if self.cuda_graph:
            raise ValueError("the eager backend with CUDA graphs serves one sequence at a time")
        return {}

    def use_cache(self, cache: dict[str, torch.Tensor]) -> None:
        self.runtime.states = cache


def eager_backend(cfg: ModelConfig, weights: Mapping[str, torch.Tensor], *, max_seq: int, world: int = 1,
                  device: str = "cuda", plan: Any = None) -> EagerBackend:  # fmt: skip
    """The Engine's "eager" backend (tilert.engine.api)."""
    if world != 1:
        raise ValueError("the eager backend runs world size 1 per process (use torchrun for more ranks)")
    if not torch.cuda.is_available():
        raise ValueError("backend 'eager' needs a CUDA GPU; none is visible (use backend='reference')")
    return EagerBackend(cfg, weights, max_seq=max_seq, device=device if device != "cpu" else "cuda")


class DistEagerBackend(EagerBackend):
    """EagerBackend for one rank of ctx.world (SPMD: every rank makes the same calls in order)."""

    # an Engine batches only when asked: which requests share a mixed step depends on when each
    # rank's worker admits them, and every rank must run the same step shapes
    auto_batching = False

    def __init__(
        self,
        cfg: ModelConfig,
        weights: Mapping[str, torch.Tensor],
        ctx: DistContext,
        *,
        max_seq: int = 1024,
        cuda_graph: bool = False,
        use_kernels: bool = True,
        state_dtype: torch.dtype = torch.bfloat16,
    ) -> None:
        if cuda_graph and ctx.device.type != "cuda":
            raise ValueError("CUDA graphs need device cuda")
        super().__init__(cfg, weights, max_seq=max_seq, device=str(ctx.device), cuda_graph=cuda_graph)
        ctx.kernels = use_kernels
        self.ctx = ctx
        self.world, self.rank = ctx.world, ctx.rank
        self.runtime = EagerRuntime({}, device=str(ctx.device), ctx=ctx, state_dtype=state_dtype)


def eager_dist_backend(cfg: ModelConfig, weights: Mapping[str, torch.Tensor], *, max_seq: int, world: int = 1,
                       device: str = "cuda", plan: Any = None) -> DistEagerBackend:  # fmt: skip
    """The Engine's "eager-dist" backend: the rank of this process (torchrun's env; world 1 without
    it); `world` 1 means "the launcher's"."""
    ctx = init_distributed(device)
    if world not in (1, ctx.world):
        raise ValueError(f"world={world} but this process is one of {ctx.world} ranks (torchrun --nproc-per-node)")
    return DistEagerBackend(cfg, weights, ctx, max_seq=max_seq)
