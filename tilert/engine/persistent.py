"""The persistent runtime as an engine backend: one persistent launch per target step.

Each step shape (B tokens, decode or verify) is compiled by the full pipeline once; its rank
graph, task table and counters become a PersistentStep. The KV caches are shared by all of a
model's step programs, so a verify step and the decode steps after it see the same cache. DFlash
acceptance (lm_head_accept) runs inside the verify step's launch. The drafter's step is a persistent
program too, over the drafter's own KV caches, its context rows padded to a few compiled shapes
(`drafter_contexts`): drafter_runtime="persistent" (the default, DEFAULT_DRAFTER_RUNTIME; on an H100
mimo-v2.5-pro's drafter step takes 1.34 ms this way against 3.65 ms as an eager CUDA graph,
docs/performance.md); drafter_runtime="eager" (or TILERT_DRAFTER_RUNTIME=eager) runs it on the eager
runtime instead.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch

from tilert.engine.backend import PREFILL_CHUNK, GraphBackend
from tilert.engine.eager import EagerBackend
from tilert.gpu_specs import H200
from tilert.ir.graph import Graph
from tilert.kernels.common import KernelCompileError
from tilert.models.binding import bind_params
from tilert.models.builder import build_step_graph
from tilert.models.config import ModelConfig
from tilert.models.drafter import build_drafter_graph
from tilert.passes import PassContext, compile_graph
from tilert.runtime.eager.synthetic import meta_params
from tilert.runtime.persistent.program import kv_states
from tilert.runtime.persistent.step import MultiRankStep, PersistentError, PersistentStep

log = logging.getLogger(__name__)


def compile_step(g: Graph, max_seq: int, world: int = 1, rank: int = 0, sms: int | None = None) -> tuple[Graph, Any]:
    """The full pipeline for one step graph: (rank graph, its Schedule), scheduled over `sms` SM
    queues (default: the H200's 132)."""
    gpu = H200 if sms is None else dataclasses.replace(H200, sms=sms)
    ctx = PassContext(gpu=gpu, world=world, max_seq=max_seq)
    graphs = compile_graph(g, ctx)
    return graphs[rank], ctx.results["schedule"][rank]


def compile_ranks(g: Graph, max_seq: int, world: int, sms: int = 132, gpus: int = 1) -> tuple[list[Graph], list[Any]]:
    """Every rank's graph and Schedule for `world` ranks on `gpus` GPUs of `sms` SMs each (one GPU:
    sms // world SMs per rank; gpus = world: a whole GPU per rank)."""
    if world % gpus:
        raise ValueError(f"{world} ranks do not split evenly over {gpus} GPUs")
    ctx = PassContext(gpu=dataclasses.replace(H200, sms=sms * gpus // world), world=world, max_seq=max_seq)
    graphs = compile_graph(g, ctx)
    return graphs, [ctx.results["schedule"][r] for r in range(world)]


DRAFTER_RUNTIMES = ("persistent", "eager")
DEFAULT_DRAFTER_RUNTIME = "persistent"  # GPU tests: tests/runtime/test_drafter_persistent_gpu.py


class PersistentBackend(GraphBackend):
    """Target steps as one persistent launch each (world size 1); drafter steps too with
    drafter_runtime="persistent", on the eager runtime with "eager" (default: env
    TILERT_DRAFTER_RUNTIME, else DEFAULT_DRAFTER_RUNTIME)."""

    prefill_chunk = PREFILL_CHUNK
    # an Engine batches on this backend only when asked (batching=True): every sequence then runs
    # through the mixed steps, and one DFlash user's round there took 21.7 ms against 20.2 ms on the
    # single-sequence programs (H100, docs/performance.md 2026-12-07)
    auto_batching = False

    def __init__(self, cfg: ModelConfig, weights: Mapping[str, torch.Tensor], *, max_seq: int = 1024,
                 device: str = "cuda", sms: int | None = None, drafter_runtime: str | None = None) -> None:  # fmt: skip
        super().__init__(cfg, weights, max_seq)
        self.drafter_runtime = drafter_runtime or os.environ.get("TILERT_DRAFTER_RUNTIME", DEFAULT_DRAFTER_RUNTIME)
        if self.drafter_runtime not in DRAFTER_RUNTIMES:
            raise ValueError(f"unknown drafter runtime {self.drafter_runtime!r} (persistent | eager)")
        self.device = device
        # one SM queue per SM of this GPU (an H100 PCIe has 114): the step's CTAs are all resident
        self.sms = sms or torch.cuda.get_device_properties(torch.device(device)).multi_processor_count
        self.states: dict[str, torch.Tensor] = {}
        self.pool_states: dict[str, torch.Tensor] = {}  # the mixed steps' KV cache pool (open_pool)
        self.drafter_states: dict[str, torch.Tensor] = {}  # the persistent drafter steps' KV caches
        self._eager: Any = None
        self.fallbacks: list[str] = []  # step shapes that run on the eager runtime, and why

    def _prepare(self, g: Graph) -> Any:
        if g.meta.get("kind") == "drafter":
            if self.drafter_runtime == "eager":
                return ("eager", self._drafter_backend()._prepare(g))
            return self._prepare_drafter(g)
        pool = bool(g.meta.get("slots"))  # a mixed step: the KV cache pool, never swapped per sequence
        states = self.pool_states if pool else self.states
        rg, sched = compile_step(g, self.max_seq, sms=self.sms)
        params = self._device_params(bind_params(rg, self.weights, {}), self.device)
        try:
            step = PersistentStep(rg, sched.table, sched.counter_expected, params, self.device, states=states,
                                  num_sms=self.sms)  # fmt: skip
        except (PersistentError, KernelCompileError) as e:
            # a shape the persistent bodies do not take: this step runs on the eager runtime (same
            # KV caches), never a failed request
            self.fallbacks.append(f"{g.name}: {e}")
            log.warning("step %s runs on the eager runtime: %s", g.name, e)
            return ("eager-pool" if pool else "eager-target", self._drafter_backend()._prepare(g))
        if pool:
            return ("pool", step)
        step.use_states(self.states)  # caches this graph added join the current sequence's set
        return ("persistent", step)

    def _prepare_drafter(self, g: Graph) -> Any:
        """A drafter step as a persistent program over the drafter's caches (a shape its bodies do not
        take: on the eager runtime over the same caches)."""
        rg, sched = compile_step(g, self.max_seq, sms=self.sms)
        params = self._device_params(bind_params(rg, self.weights, {}), self.device)
        try:
            step = PersistentStep(rg, sched.table, sched.counter_expected, params, self.device,
                                  states=self.drafter_states, num_sms=self.sms)  # fmt: skip
        except (PersistentError, KernelCompileError) as e:
            self.fallbacks.append(f"{g.name}: {e}")
            log.warning("drafter step %s runs on the eager runtime: %s", g.name, e)
            return ("eager-drafter", self._drafter_backend()._prepare(g))
        return ("drafter", step)

    def drafter_contexts(self) -> tuple[int, ...]:
        """The context-row counts drafter steps are compiled for: the DFlash block (a verified block's
        rows) and the prefill chunk (a prompt's rows, in chunks)."""
        d = self.cfg.dflash
        return tuple(sorted({PREFILL_CHUNK, d.block_size if d is not None else PREFILL_CHUNK}))

    def draft_step(self, block_tokens: torch.Tensor, block_positions: torch.Tensor, ctx_features: torch.Tensor,
                   ctx_positions: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """As GraphBackend.draft_step, with C context rows as steps of the compiled context shapes: all
        but the last `drafter_contexts()[-1]` rows each (those steps only append their rows; their
        drafts are dropped), the last padded to the next shape with zero rows at the positions after
        the block's end, which no later step reads before its own rows overwrite them (cache index ==
        position, as a prefill chunk's padding)."""
        if self.drafter_runtime == "eager":
            return super().draft_step(block_tokens, block_positions, ctx_features, ctx_positions)
        sizes, C = self.drafter_contexts(), int(ctx_features.shape[0])
        pos = ctx_positions.to(torch.int32)
        off = 0
        while C - off > sizes[-1]:  # a long prompt's context: appended a chunk at a time
            end = off + sizes[-1]
            super().draft_step(block_tokens, block_positions, ctx_features[off:end], pos[off:end])
            off = end
        rows = next(s for s in sizes if s >= C - off)
        feats, pos = ctx_features[off:], pos[off:]
        if rows > C - off:
            pad = rows - (C - off)
            end = int(block_positions.max()) + 1
            feats = torch.cat([feats, feats.new_zeros(pad, feats.shape[1])])
            pos = torch.cat([pos.cpu(), torch.arange(end, end + pad, dtype=torch.int32)])
        return super().draft_step(block_tokens, block_positions, feats, pos)

    def draft_async(self, block_tokens: torch.Tensor, block_positions: torch.Tensor, ctx_features: torch.Tensor,
                    ctx_positions: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """A persistent drafter step enqueued without a host synchronisation when its context rows are
        a compiled context shape (a DFlash cycle's: the verify block's B rows); else `draft_step`."""
        if self.drafter_runtime == "eager" or int(ctx_features.shape[0]) not in self.drafter_contexts():
            return self.draft_step(block_tokens, block_positions, ctx_features, ctx_positions)
        return super().draft_async(block_tokens, block_positions, ctx_features, ctx_positions)

    def _execute_async(self, prepared: Any, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Launch a persistent program without waiting for it: its inputs are copied on the stream
        (device tensors from the previous step need no host round trip), its outputs cloned on the
        device before the next launch can overwrite its static buffers; its error word is read at
        `finish_async`. Other kinds (the eager drafter) run as `_execute`."""
        kind, p = prepared
        if kind not in ("persistent", "drafter"):
            return self._execute(prepared, inputs)
        p.launch(inputs)
        self.__dict__.setdefault("_launched", []).append(p)
        return {k: v.clone() for k, v in p.outputs().items()}

    def finish_async(self) -> None:
        launched, self._launched = self.__dict__.get("_launched", []), []
        if launched:
            torch.cuda.synchronize(self.device)
        for p in {id(p): p for p in launched}.values():
            p.check()

    def _drafter_backend(self) -> Any:
        if self._eager is None:
            self._eager = EagerBackend(self.cfg, self.weights, max_seq=self.max_seq, device=self.device)
        return self._eager

    def _execute(self, prepared: Any, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        kind, p = prepared
        if kind == "eager":
            return self._drafter_backend()._execute(p, inputs)
        if kind in ("eager-target", "eager-pool", "eager-drafter"):  # on the persistent steps' caches
            own = {"eager-target": self.states, "eager-pool": self.pool_states, "eager-drafter": self.drafter_states}
            states = kv_states(p, torch.device(self.device), own[kind])
            return self._drafter_backend().execute_on(p, inputs, states)
        out = p.run(inputs)  # static buffers: the next launch overwrites them, so copy out
        # features and logits stay on the device (a verify step's logits are megabytes; greedy decoding
        # reads none of them), the small integer outputs come to the host
        return {k: v.clone() if k in ("features", "logits") else v.cpu() for k, v in out.items()}

    def reset(self) -> None:
        for t in (*self.states.values(), *self.pool_states.values(), *self.drafter_states.values()):
            t.zero_()
        if self._eager is not None:
            self._eager.reset()

    # per-sequence KV caches for the Engine: swapping a sequence in rewrites the node tables' cache rows
    def new_cache(self) -> dict[str, Any]:
        return {"target": {}, "drafter": self._drafter_backend().new_cache() if self.drafter_runtime == "eager" else {}}

    def use_cache(self, cache: dict[str, Any]) -> None:
        if cache["target"] is self.states:
            return
        self.states = cache["target"]
        if self.drafter_runtime == "eager":
            self._drafter_backend().use_cache(cache["drafter"])
        else:
            self.drafter_states = cache["drafter"]
        for kind, p in self._prepared.values():
            if kind == "persistent":
                p.use_states(self.states)
            elif kind == "drafter":
                p.use_states(self.drafter_states)


def persistent_backend(cfg: ModelConfig, weights: Mapping[str, torch.Tensor], *, max_seq: int, world: int = 1,
                        device: str = "cuda", plan: Any = None) -> PersistentBackend:  # fmt: skip
    if world != 1:
        raise ValueError("the persistent backend runs world size 1 per process")
    if not torch.cuda.is_available():
        raise ValueError("backend 'persistent' needs a CUDA GPU; none is visible (use backend='reference')")
    return PersistentBackend(cfg, weights, max_seq=max_seq, device=device if device != "cpu" else "cuda")


def precompile(cfg: ModelConfig, tokens: int, mode: str, max_seq: int, world: int = 1,
               out_dir: str | None = None, peers: bool = False, gpus: int = 1, slots: int = 0) -> Any:  # fmt: skip
    """Build the step kernel for (tokens, mode) without weights or a GPU (meta tensors): fills the
    kernel cache, so a GPU run later only loads it, and fails here if a body does not compile.
    peers=False: rank 0 of `world` alone (solo collectives); True: every rank of a MultiRankStep,
    the ranks spread over `gpus` GPUs of 132 SMs (compile_ranks). slots > 0: the mixed step over a
    pool of that many cache slots (the Engine's pool has max_active + 1)."""
    g = build_step_graph(cfg, tokens=tokens, mode=mode, max_seq=max_seq, slots=slots)
    if peers:
        graphs, scheds = compile_ranks(g, max_seq, world, gpus=gpus)
        # one meta device stands for the gpus GPUs: their SMs together
        return MultiRankStep(graphs, scheds, [meta_params(rg) for rg in graphs], device="meta", num_sms=132 * gpus)
    return _meta_step(g, max_seq, world, out_dir)


def precompile_drafter(cfg: ModelConfig, context: int, max_seq: int, world: int = 1, out_dir: str | None = None) -> Any:
    """As `precompile`, for the drafter step with `context` context rows (PersistentBackend compiles
    `drafter_contexts()`: the DFlash block and the prefill chunk), rank 0 of `world` alone."""
    return _meta_step(build_drafter_graph(cfg, context=context, max_seq=max_seq), max_seq, world, out_dir)


def _meta_step(g: Graph, max_seq: int, world: int, out_dir: str | None) -> Any:
    rg, sched = compile_step(g, max_seq, world)
    return PersistentStep(rg, sched.table, sched.counter_expected, meta_params(rg), device="meta",
                          num_sms=sched.table.shape[0], out_dir=out_dir)  # fmt: skip
