"""The pass pipeline: one list, run in order, the IR verifier after every pass, each pass timed.

A pass is `fn(graph, ctx) -> Graph | list[Graph]`, one file per pass. The manager runs it on
every rank graph (a pass that returns a list, like `shard`, turns one graph into N rank graphs).
Analysis passes (tile, schedule, plan_memory) return the graph unchanged and leave their result
in `ctx.results[pass name][rank]`. Registering a new pass = adding one line to PIPELINE.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tilert.gpu_specs import H200, GpuSpec
from tilert.ir.graph import Graph, IRError
from tilert.passes.fuse_attention import fuse_attention
from tilert.passes.fuse_linear import fuse_linear
from tilert.passes.fuse_lm_head import fuse_lm_head
from tilert.passes.fuse_moe import fuse_moe
from tilert.passes.fuse_norm import fuse_norm
from tilert.passes.fuse_residual import fuse_residual
from tilert.passes.infer_shapes import infer_shapes
from tilert.passes.plan_memory import plan_memory
from tilert.passes.schedule import schedule
from tilert.passes.shard import shard
from tilert.passes.tile import tile

PassFn = Callable[[Graph, "PassContext"], "Graph | list[Graph]"]


@dataclass(frozen=True)
class Pass:
    name: str
    fn: PassFn
    rewrites: bool = True  # False: analysis only (the graph comes back unchanged)


PIPELINE: list[Pass] = [
    Pass("infer_shapes", infer_shapes),  # re-infer every value; check shapes, dtypes, shardings
    Pass("shard", shard),  # 1 graph -> N rank graphs (heads / experts / vocab, + collectives)
    Pass("fuse_linear", fuse_linear),  # [dequant +] GEMM on a param -> linear_<fmt>, expert_matmul_<fmt>
    Pass("fuse_moe", fuse_moe),  # router .. combine (+ all_reduce) -> fused_moe_<fmt>
    Pass("fuse_attention", fuse_attention),  # rope + scale + kv_append + attention -> attention_block
    Pass("fuse_lm_head", fuse_lm_head),  # lm_head GEMM + (distributed) argmax (+ accept) -> lm_head_*
    Pass("fuse_norm", fuse_norm),  # rms_norm -> prologue of the GEMMs that read it
    Pass("fuse_residual", fuse_residual),  # residual add -> epilogue of its producer
    Pass("tile", tile, rewrites=False),  # fused op -> tile tasks (shapes per kind: TILE_CONFIG, TILE_RULES)
    Pass("schedule", schedule, rewrites=False),  # task DAG -> per-SM queues, int32 task rows
    Pass("plan_memory", plan_memory, rewrites=False),  # buffers, liveness, bytes per rank, fits?
]


@dataclass
class PassContext:
    """What passes may read (target, world size, step shape) and where they leave results."""

    gpu: GpuSpec = H200
    world: int = 1
    max_seq: int = 4096
    context_len: int | None = None  # KV length the cost model plans for (default: max_seq)
    routed_experts: float | None = None  # local experts a MoE layer's tokens route to (default: uniform routing's)
    dump_ir: Path | str | None = None  # write NN-pass[.rK].txt after every pass
    print_after: str | None = None  # print the IR after this pass (to stdout)
    log: Callable[[str], None] | None = None  # progress lines (pass names + timings)
    timings: list[tuple[str, float]] = field(default_factory=list)
    results: dict[str, dict[int, Any]] = field(default_factory=dict)
    cache: dict[Any, Any] = field(default_factory=dict)  # passes may memoise rank-invariant work here

    @property
    def context(self) -> int:
        return self.context_len if self.context_len is not None else self.max_seq

    def put(self, name: str, graph: Graph, value: Any) -> None:
        self.results.setdefault(name, {})[int(graph.meta.get("rank", 0))] = value


def run_passes(graph: Graph, ctx: PassContext, passes: Sequence[Pass] = PIPELINE) -> list[Graph]:
    """Run `passes` in order on `graph`; returns the rank graphs. Raises IRError naming the pass."""
    graphs = [graph.verify()]
    known = {p.name for p in passes}
    if ctx.print_after is not None and ctx.print_after not in known:
        raise IRError(f"--print-after: no pass named '{ctx.print_after}' (passes: {', '.join(sorted(known))})")
    for k, p in enumerate(passes, 1):
        t0 = time.perf_counter()
        out: list[Graph] = []
        for g in graphs:
            res = p.fn(g, ctx)
            out.extend(res if isinstance(res, list) else [res])
        if p.rewrites:
            for g in out:
                try:
                    g.verify()
                except IRError as e:
                    raise IRError(f"after pass '{p.name}': {e}") from None
        graphs = out
        dt = time.perf_counter() - t0
        ctx.timings.append((p.name, dt))
        if ctx.log:
            ctx.log(f"  {k:02d} {p.name:<15s} {dt * 1e3:8.1f} ms  {len(graphs)} graph(s), {len(graphs[0].nodes)} ops")
        if p.rewrites or ctx.print_after == p.name:
            _dump(graphs, k, p.name, ctx)
    return graphs


def _dump(graphs: list[Graph], k: int, name: str, ctx: PassContext) -> None:
    if ctx.dump_ir is not None:
        d = Path(ctx.dump_ir)
        d.mkdir(parents=True, exist_ok=True)
        for g in graphs:
            tag = f".r{g.meta.get('rank', 0)}" if len(graphs) > 1 else ""
            (d / f"{k:02d}-{name}{tag}.txt").write_text(g.to_text())
    if ctx.print_after == name:
        for g in graphs:
            sys.stdout.write(f"# after {name}: {g.name}\n{g.to_text()}")


def compile_graph(graph: Graph, ctx: PassContext, passes: Sequence[Pass] = PIPELINE) -> list[Graph]:
    """The whole pipeline on one step graph; results of analysis passes land in ctx.results."""
    return run_passes(graph, ctx, passes)


def passes_until(name: str, passes: Sequence[Pass] = PIPELINE) -> list[Pass]:
    """The pipeline prefix ending with pass `name` (for tests and tools)."""
    names = [p.name for p in passes]
    if name not in names:
        raise IRError(f"no pass named '{name}'")
    return list(passes[: names.index(name) + 1])
