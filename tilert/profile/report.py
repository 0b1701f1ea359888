"""`tilert profile`'s report: a model compiled with per-pass timing and IR sizes, the roofline
table/plot and the predicted (and, with --measure, measured) per-SM timeline of one rank."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from tilert.abi import OPCODE_NAMES, TASK_FIELDS
from tilert.gpu_specs import GPUS
from tilert.models.builder import build_step_graph
from tilert.passes.manager import PassContext
from tilert.profile.passes import compile_with_profile, format_pass_table
from tilert.profile.roofline import format_roofline, measure_persistent, measure_rows, plot_roofline, roofline_rows
from tilert.profile.timeline import simulate, trace_json, write_trace
from tilert.runtime.eager.synthetic import synthetic_params
from tilert.runtime.persistent.step import PersistentError


class ProfileError(ValueError):
    """A bad profile option (unknown step, rank out of range)."""


def profile_model(
    cfg: Any,
    world: int,
    *,
    rank: int = 0,
    gpu: str = "h200",
    max_seq: int = 4096,
    context: int | None = None,
    steps: list[str] | None = None,
    out: str | Path | None = None,
    top: int = 15,
    log: Any = None,
    measure: bool = False,
    device: str | None = None,
) -> dict[str, Any]:
    """Everything `tilert profile` reports, as a dict (plus 'text': the printed report)."""
    if gpu not in GPUS:
        raise ProfileError(f"unknown --gpu {gpu!r} (known: {', '.join(GPUS)})")
    if not 0 <= rank < world:
        raise ProfileError(f"--rank {rank} is outside [0, {world})")
    spec = GPUS[gpu]
    steps = steps or ["decode", "verify"]
    shapes = {"decode": (1, "decode")}
    if cfg.dflash is not None:
        shapes["verify"] = (cfg.dflash.block_size, "verify")
    for s in steps:
        if s not in shapes:
            raise ProfileError(f"unknown step {s!r} for '{cfg.name}' (choices: {', '.join(shapes)})")
    say = log or (lambda _m: None)
    outdir = Path(out) if out else None
    if outdir:
        outdir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"model": cfg.name, "world": world, "rank": rank, "gpu": gpu, "steps": {}}
    text: list[str] = []
    for step in steps:
        B, mode = shapes[step]
        tag = f"{step}.B{B}"
        say(f"profile: {tag}: building the step graph")
        g = build_step_graph(cfg, tokens=B, max_seq=max_seq, mode=mode)
        ctx = PassContext(gpu=spec, world=world, max_seq=max_seq, context_len=context)
        t0 = time.perf_counter()
        graphs, prows = compile_with_profile(g, ctx, tag, log=say)
        compile_s = time.perf_counter() - t0
        rg, sched = graphs[rank], ctx.results["schedule"][rank]
        krows = roofline_rows(rg, sched, spec, ctx.context)
        measured, pers_ms, pers_trace = None, None, None
        if measure:
            dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
            say(f"profile: {tag}: measuring {len(rg.nodes)} kernels on {dev}")
            params = synthetic_params(rg, device=dev)
            kv = min(ctx.context, max_seq - B)
            measured = measure_rows(krows, rg, dev, kv, world, params=params)
            if dev == "cuda":
                say(f"profile: {tag}: the step as one persistent launch")
                try:
                    pers_ms, pers_trace = measure_persistent(rg, sched, params, kv)
                except PersistentError as e:
                    say(f"profile: {tag}: no persistent measurement: {e}")
            del params
        say(f"profile: {tag}: simulating {sched.tasks} tasks on {sched.table.shape[0]} SMs")
        start, end = simulate(sched.table, sched.counter_expected, TASK_FIELDS,
                              progress=lambda d, n: say(f"  timeline {d}/{n} tasks"), spec=spec)  # fmt: skip
        sim_ms = (int(end.max()) - int(start[start >= 0].min())) / 1e6
        entry = {
            "compile_s": round(compile_s, 4),
            "passes": [r.__dict__ for r in prows],
            "kernels": [r.as_dict() for r in krows],
            "tasks": sched.tasks,
            "makespan_ms": sched.makespan_s * 1e3,
            "simulated_makespan_ms": sim_ms,
            "occupancy": sched.occupancy,
            "floor_ms": sum(r.floor_us for r in krows) / 1e3,
            "measured": measured,
            "measured_ms": sum(r.measured_us for r in krows) / 1e3 if measured else None,
            "persistent_measured_ms": pers_ms,
        }
        report["steps"][tag] = entry
        text += [f"== {cfg.name} {tag}, world {world}, rank {rank}, {gpu}: compiled in {compile_s:.2f} s", "",
                 format_pass_table(prows), "",
                 f"kernels (top {top} by {'measured' if measured else 'persistent'} time of {len(krows)}; "
                 f"sum of floors "
                 f"{entry['floor_ms']:.3f} ms, persistent makespan {entry['makespan_ms']:.3f} ms, "
                 f"simulated {sim_ms:.3f} ms, SM occupancy {sched.occupancy:.2f}):",
                 *([f"{measured}: {entry['measured_ms']:.3f} ms in all"] if measured else []),
                 *([f"measured as one persistent launch: {pers_ms:.3f} ms"] if pers_ms else []),
                 format_roofline(krows, top), ""]  # fmt: skip
        if outdir:
            op_names = [n.op for n in rg.nodes]
            meta = {"model": cfg.name, "step": tag, "world": world, "rank": rank, "gpu": gpu, "source": "predicted"}
            tr = trace_json(sched.table, start, end, TASK_FIELDS, op_names, OPCODE_NAMES, process=f"rank {rank} {tag}",
                            meta=meta)  # fmt: skip
            p = write_trace(tr, outdir / f"trace_{tag}.rank{rank}.json")
            if pers_trace is not None:
                mp = write_trace(pers_trace, outdir / f"trace_{tag}.rank{rank}.measured.json")
                text.append(f"wrote {mp} (the persistent kernel's own per-SM timeline)")
            why = plot_roofline(krows, spec, outdir / f"roofline_{tag}.png", f"{cfg.name} {tag} rank {rank} ({gpu})")
            text.append(f"wrote {p}" + (f"; {why}" if why else f" and {outdir / f'roofline_{tag}.png'}"))
            text.append("")
    if outdir:
        (outdir / "profile.json").write_text(json.dumps(report, indent=1))
        text.append(f"wrote {outdir / 'profile.json'}")
    report["text"] = "\n".join(text)
    return report
