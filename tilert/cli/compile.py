"""`python -m tilert compile`: run the pass pipeline on a model's step graphs and write a Plan.

Compiles the decode step (B=1), the DFlash verify step (B=block), the drafter step and, with
--batch N, the mixed-sequence steps continuous batching runs (B = 1..16 rows of up to N sequences,
over a KV cache pool of N + 1 slots; `mixed.B<rows>`) for N ranks, writes DIR/plan.json (+ rank
graphs and int32 task tables as .npy, opcodes.h) and DIR/report.md, and prints a summary (--json).
Every user error is a ValueError subclass with a one-line message (the CLI turns it into exit code 2).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from tilert.abi import opcode_header
from tilert.engine.backend import BATCH_ROWS
from tilert.gpu_specs import GIB, GpuSpec, gpu_spec
from tilert.ir.graph import Graph
from tilert.ir.registry import get_op
from tilert.kernels.common import toolchain_reason
from tilert.models.builder import build_step_graph
from tilert.models.config import load_config
from tilert.models.drafter import build_drafter_graph
from tilert.passes.cost_model import eager_seconds, floor_seconds, op_cost
from tilert.passes.manager import PIPELINE, PassContext, run_passes
from tilert.passes.plan_memory import check_fits
from tilert.passes.report import write_report
from tilert.plan import Plan, RankPlan, StepPlan, save_array, save_plan
from tilert.progress import bars_enabled, configure_logging, progress
from tilert.runtime.eager.precompile import precompile

log = logging.getLogger("tilert.compile")


class CompileError(ValueError):
    """A bad compile option; the message names it."""


def add_compile_parser(subparsers: Any) -> None:
    p = subparsers.add_parser("compile", help="compile step graphs into a per-rank tile-task plan")
    p.add_argument("--model", default="mimo-v2.5-pro", help="shipped model name")
    p.add_argument("--config", default=None, help="path to a config.json of this family (overrides --model)")
    p.add_argument("--gpus", type=int, default=8, help="ranks (GPUs of one node)")
    p.add_argument("--out", required=True, help="plan directory to write")
    p.add_argument("--max-seq", type=int, default=65536, help="KV cache capacity per sequence (tokens)")
    p.add_argument("--context", type=int, default=None, help="KV length the step time is predicted at "
                   "(default: min(max-seq, 8192))")  # fmt: skip
    p.add_argument("--accept-len", type=float, default=None,
                   help="mean tokens per DFlash verify step (default 6.3, at most the block size)")  # fmt: skip
    p.add_argument("--block", type=int, default=None, help="verify block size (default: the drafter's, else 8)")
    p.add_argument("--gpu", default="h200", help="target GPU spec (tilert/gpu_specs.py)")
    p.add_argument("--batch", type=int, default=0,
                   help="also the mixed steps of continuous batching for up to N concurrent sequences")  # fmt: skip
    p.add_argument("--batch-rows", default=None,
                   help="row counts of the mixed steps, e.g. 1,2,4,8,16 (default 1..16)")  # fmt: skip
    p.add_argument("--dump-ir", default=None, help="write the IR after every pass into this directory")
    p.add_argument("--print-after", default=None, help="print the IR after this pass")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bars or info messages (also: TILERT_QUIET=1)")
    p.add_argument(
        "--kernels",
        action="store_true",
        help="also build every TileLang kernel the plan launches (sm_90a, no GPU needed) into OUT/kernels",
    )
    p.set_defaults(fn=run_compile)


def _context(args: argparse.Namespace) -> int:
    return args.context if args.context is not None else min(args.max_seq, 8192)


def _check(args: argparse.Namespace, block: int) -> None:
    if args.gpus < 1 or args.gpus > 8:
        raise CompileError(f"--gpus must be in 1..8 (one node), got {args.gpus}")
    if args.max_seq < block + 1:
        raise CompileError(f"--max-seq {args.max_seq} must exceed the block size {block}")
    if block < 1:
        raise CompileError(f"--block must be >= 1, got {block}")
    if not 0 < args.accept_len <= block:
        raise CompileError(f"--accept-len must be in (0, block={block}], got {args.accept_len}")
    if args.context is not None and not 0 <= args.context <= args.max_seq:
        raise CompileError(f"--context must be in [0, --max-seq], got {args.context}")
    if getattr(args, "batch", 0) < 0:
        raise CompileError(f"--batch must be >= 0 (concurrent sequences), got {args.batch}")


def batch_rows(spec: str | None) -> tuple[int, ...]:
    """--batch-rows as sorted row counts in 1..PREFILL_CHUNK (default: all of them)."""
    if spec is None:
        return BATCH_ROWS
    try:
        rows = sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError:
        raise CompileError(f"--batch-rows must be comma-separated integers, got {spec!r}") from None
    if not rows or rows[0] < 1 or rows[-1] > BATCH_ROWS[-1]:
        raise CompileError(f"--batch-rows must be in 1..{BATCH_ROWS[-1]}, got {spec!r}")
    return tuple(rows)


def _steps(cfg: Any, block: int, max_seq: int, batch: int = 0, rows: tuple[int, ...] = ()) -> list[tuple[str, Graph]]:
    steps = [("decode.B1", build_step_graph(cfg, tokens=1, max_seq=max_seq, mode="decode"))]
    steps.append((f"verify.B{block}", build_step_graph(cfg, tokens=block, max_seq=max_seq, mode="verify")))
    if cfg.dflash is not None:  # context rows per draft: at most one block of newly verified tokens
        steps.append(("drafter", build_drafter_graph(cfg, context=block, max_seq=max_seq)))
    for b in rows if batch else ():  # a pool of batch sequence slots + the scratch slot padding rows write
        steps.append((f"mixed.B{b}", build_step_graph(cfg, tokens=b, max_seq=max_seq, slots=batch + 1)))
    return steps


def predict(spec: GpuSpec, g: Graph, sched: Any, context: int) -> dict[str, float]:
    eager = eager_graphs = 0.0
    for n, longest in zip(g.nodes, sched.op_longest):
        c, coll = op_cost(g, n, context), get_op(n.op).collective and int(g.meta.get("world", 1)) > 1
        eager += eager_seconds(spec, c, longest, coll, graphs=False)
        eager_graphs += eager_seconds(spec, c, longest, coll, graphs=True)
    return {
        "persistent_ms": (sched.makespan_s + spec.graph_launch_s) * 1e3,
        "eager_ms": eager * 1e3,
        "eager_cuda_graph_ms": eager_graphs * 1e3,
        "floor_ms": floor_seconds(spec, g, context) * 1e3,
        "launches_eager": len(g.nodes),
    }


def _compile_step(name: str, g: Graph, args: argparse.Namespace, spec: GpuSpec, out: Path, written: dict) -> tuple:
    log.info("compile %s: %d ops, %d rank(s)", name, len(g.nodes), args.gpus)
    with progress(total=len(PIPELINE), desc=f"compile {name}", unit="pass") as bar:

        def on_pass(msg: str) -> None:  # the pass manager logs one line per pass: a bar step on a terminal
            if bars_enabled():
                bar.update(1)
            else:
                log.info(msg)

        ctx = PassContext(
            gpu=spec, world=args.gpus, max_seq=args.max_seq, context_len=_context(args), log=on_pass,
            dump_ir=Path(args.dump_ir) / name if args.dump_ir else None, print_after=args.print_after,
        )  # fmt: skip
        graphs = run_passes(g, ctx)
    ranks, mems = [], []
    for gr in graphs:
        r = int(gr.meta.get("rank", 0))
        sched, mem = ctx.results["schedule"][r], ctx.results["plan_memory"][r]
        gfile = f"graphs/{name}.r{r}.json"
        (out / gfile).write_text(gr.to_json())
        tfile = save_array(out, f"tasks/{name}.r{r}.npy", sched.table, written)
        cfile = save_array(out, f"tasks/{name}.counters.r{r}.npy", sched.counter_expected, written)
        bufs = {k: list(v) for k, v in mem.buffers.items()}
        ranks.append(RankPlan(r, gfile, tfile, cfile, bufs, mem.as_dict()))
        mems.append(mem)
    s0 = ctx.results["schedule"][0]
    step = StepPlan(name, int(g.meta["tokens"]), ranks, s0.tasks, graphs[0].op_counts(),
                    predict(spec, graphs[0], s0, ctx.context), round(s0.occupancy, 4))  # fmt: skip
    return step, graphs, mems, ctx.timings


def run_compile(args: argparse.Namespace) -> int:
    configure_logging(getattr(args, "quiet", False))
    t0 = time.perf_counter()
    cfg = load_config(args.config or args.model)
    spec = gpu_spec(args.gpu)
    block = args.block or (cfg.dflash.block_size if cfg.dflash else 8)
    if args.accept_len is None:
        args.accept_len = min(6.3, float(block))
    _check(args, block)
    out = Path(args.out)
    for d in ("graphs", "tasks"):
        (out / d).mkdir(parents=True, exist_ok=True)
    written: dict = {}
    steps, finals, mems = {}, {}, {}
    batch = getattr(args, "batch", 0)
    rows = batch_rows(getattr(args, "batch_rows", None)) if batch else ()
    for name, g in _steps(cfg, block, args.max_seq, batch, rows):
        steps[name], finals[name], mems[name], _ = _compile_step(name, g, args, spec, out, written)
    memory = _memory_per_rank(finals, mems)
    check_fits(spec, f"{cfg.name} on {args.gpus} GPU(s) (all steps)", memory)
    plan = Plan(cfg.name, spec.name, args.gpus, args.max_seq, _context(args), steps, memory["total"], memory)
    summary = _summary(plan, finals, args, block)
    if batch:  # what the Engine's continuous batching reads back (tilert.engine.api)
        summary["batch"] = {"slots": batch, "rows": list(rows),
                            "predicted_step_ms": {str(b): _r(plan.steps[f"mixed.B{b}"].predicted["persistent_ms"])
                                                  for b in rows}}  # fmt: skip
    if args.kernels:
        summary["kernels_built"] = build_kernels(finals, out / "kernels")
    plan.extra["summary"] = summary
    (out / "opcodes.h").write_text(opcode_header())
    save_plan(plan, out)
    write_report(out / "report.md", plan, summary, spec)
    log.info("wrote %s/plan.json and %s/report.md in %.1f s", out, out, time.perf_counter() - t0)
    if args.json:
        print(json.dumps(summary, indent=1))
    else:
        s = summary
        print(f"{cfg.name} on {args.gpus}x {spec.name}: {s['bytes_per_rank'] / GIB:.1f} GiB/rank, "
              f"step {s['predicted_step_ms']} ms (floor {s['floor_step_ms']}), "
              f"{s['projected_tokens_per_s']:.0f} tok/s/user at accept length {args.accept_len}")  # fmt: skip
    return 0


def build_kernels(finals: dict[str, list[Graph]], cache: Path) -> int:
    """Compile the kernels of every rank graph into `cache` (TileLang's disk cache: reruns are cheap)."""
    reason = toolchain_reason()
    if reason:
        raise CompileError(f"--kernels: cannot build TileLang kernels here: {reason}")
    cache.mkdir(parents=True, exist_ok=True)
    old = os.environ.get("TILERT_KERNEL_CACHE")
    os.environ["TILERT_KERNEL_CACHE"] = str(cache.resolve())
    try:  # keep stdout for the --json summary: the toolchain prints to stdout
        with contextlib.redirect_stdout(sys.stderr):
            return precompile([g for gs in finals.values() for g in gs], log=lambda m: log.info("  kernel %s", m))
    finally:
        if old is None:
            os.environ.pop("TILERT_KERNEL_CACHE", None)
        else:
            os.environ["TILERT_KERNEL_CACHE"] = old


def _memory_per_rank(finals: dict[str, list[Graph]], mems: dict[str, list[Any]]) -> dict[str, int]:
    """Weights and KV caches shared by name across steps; activations: the largest step; tables: all."""
    params: dict[str, int] = {}
    states: dict[tuple[str, int], int] = {}
    for graphs in finals.values():
        for v in graphs[0].by_role("param"):
            params[v.name] = v.nbytes
        for v in graphs[0].by_role("state"):  # a mixed step's pool of slots is memory of its own
            states[v.name, len(v.shape)] = v.nbytes
    m = {
        "weights": sum(params.values()),
        "kv_cache": sum(states.values()),
        "activations": max(ms[0].activations for ms in mems.values()),
        "counters": sum(ms[0].counters for ms in mems.values()),
        "task_table": sum(ms[0].task_table for ms in mems.values()),
    }
    m["total"] = sum(m.values())
    return m


def _summary(plan: Plan, finals: dict[str, list[Graph]], args: argparse.Namespace, block: int) -> dict[str, Any]:
    dec, ver = plan.steps["decode.B1"], plan.steps[f"verify.B{block}"]
    dra = plan.steps.get("drafter")
    kinds = sorted({k for s in plan.steps.values() for k in s.fused_kernels if k in _FUSED})
    draft_ms = dra.predicted["persistent_ms"] if dra else 0.0
    cycle = ver.predicted["persistent_ms"] + draft_ms
    return {
        "model": plan.model,
        "gpu": plan.gpu,
        "ranks": plan.world,
        "max_seq": plan.max_seq,
        "context": plan.context,
        "block": block,
        "fused_kernels": kinds,
        "unfused_dequant_ops": sum(s.fused_kernels.get("dequant", 0) for s in plan.steps.values()),
        "ops_per_rank": {k: sum(s.fused_kernels.values()) for k, s in plan.steps.items()},
        "tasks_per_rank": {
            "1": dec.tasks_per_rank,
            str(block): ver.tasks_per_rank,
            **({"drafter": dra.tasks_per_rank} if dra else {}),
        },  # fmt: skip
        "occupancy": {"1": dec.occupancy, str(block): ver.occupancy},
        "bytes_per_rank": plan.bytes_per_rank,
        "memory_per_rank": plan.memory_per_rank,
        "predicted_step_ms": {"1": _r(dec.predicted["persistent_ms"]), str(block): _r(ver.predicted["persistent_ms"])},
        "floor_step_ms": {"1": _r(dec.predicted["floor_ms"]), str(block): _r(ver.predicted["floor_ms"])},
        "eager_step_ms": {"1": _r(dec.predicted["eager_ms"]), str(block): _r(ver.predicted["eager_ms"])},
        "eager_cuda_graph_step_ms": {
            "1": _r(dec.predicted["eager_cuda_graph_ms"]),
            str(block): _r(ver.predicted["eager_cuda_graph_ms"]),
        },  # fmt: skip
        "drafter_step_ms": _r(draft_ms),
        "accept_len": args.accept_len,
        "projected_tokens_per_s": _r(args.accept_len / cycle * 1e3 if dra else 1e3 / dec.predicted["persistent_ms"]),
        "plain_decode_tokens_per_s": _r(1e3 / dec.predicted["persistent_ms"]),
        "tokens_per_s_formula": "accept_len / (verify step + drafter step)",
    }


def _r(x: float) -> float:
    return round(x, 4) if math.isfinite(x) else x


_FUSED = {
    "linear_bf16", "linear_fp8", "linear_mxfp4", "expert_matmul_fp8", "expert_matmul_mxfp4", "fused_moe_bf16",
    "fused_moe_fp8", "fused_moe_mxfp4", "attention_block", "lm_head_argmax", "lm_head_accept",
    "all_reduce_residual",
}  # fmt: skip

__all__ = ["CompileError", "add_compile_parser", "run_compile"]
