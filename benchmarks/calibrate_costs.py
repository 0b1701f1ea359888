"""Fit the persistent cost model's per-kind task costs to stored measured traces, derive the H100's,
and check the model against the stored measured steps.

Each stored trace (the persistent kernel's %globaltimer stamps of one step of rank 0) is paired with
the task table and the tile pass's work the compiler gives the same step today
(`tilert.profile.calibration.trace_run`); `fit_task_costs` turns the tasks into one `TaskCost` per
opcode, printed in `tilert/gpu_specs.py`'s notation. Each trace contributes the kinds listed with it
(TRACES): a trace from before a body changed does not speak for the new body. The H100 table is
fitted the same way to the H100 traces (TRACES_H100) for every kind but the expert tasks, whose
per-task items those by-token traces do not record: theirs are the H200's with the HBM-stream rates
scaled by one factor (`h100_expert_scale`) that balances the errors on the stored H100 steps. Then
every measured step (MEASURED_H200's and MEASURED_H100's files) is predicted with the table that
`tilert/gpu_specs.py` holds (or, with --use-fit, the fitted one) and compared.

    python benchmarks/calibrate_costs.py               # fit, derive the H100 factor, check both GPUs
    python benchmarks/calibrate_costs.py --check-only  # the check alone (a few s a step)
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tilert.gpu_specs import GPUS, H100, H200, GpuSpec, scaled_stream  # noqa: E402
from tilert.kernels import switches  # noqa: E402
from tilert.models.config import load_config  # noqa: E402
from tilert.profile.calibration import (  # noqa: E402
    STAGE_QUANTILE,
    MeasuredStep,
    fit_task_costs,
    format_task_costs,
    measured_steps,
    predicted_step_ms,
    task_cost,
    task_samples,
    trace_meta,
    trace_run,
)
from tilert.profile.timeline import simulate  # noqa: E402
from tilert.profile.trace_analysis import analyse, format_analysis, read_trace  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
EXPERTS = ("MOE_GATE_UP", "MOE_DOWN")
# the kinds whose pooled tasks give "*", the cost of a kind no trace holds (its HBM stream at LINEAR_FP8's rate)
GENERIC = ("OP_CONCAT", "OP_EMBED", "OP_SILU_MUL", "ALL_REDUCE", "ALL_GATHER", "MOE_REDUCE", "ATTN_COMBINE")


class StoredTrace(NamedTuple):
    file: str
    commit: str  # the commit the trace was measured at
    layers: int | None  # the model cut to its first N layers (None: all)
    world: int
    tokens: int
    routed: int  # local experts every MoE layer ran (pinned routing)
    kinds: tuple[str, ...] | None  # the opcodes it calibrates (None: all)
    skip: tuple[str, ...] = ()  # ... except these


# H200, rank 0 of mimo-v2.5-pro. The full-scale traces (solo collectives, pinned routing: one active
# local expert) were measured at bed55f8; the router's body changed after them (e4ee79a folds the
# pre-MoE RMSNorm into it), so its costs come from the 4-layer traces at 9edca69 (every rank on its
# own H200, pinned routing at world 4: five active local experts), which also give the expert tasks
# at B=1 with five times the items (the per-item cost apart from the task's constant). Their
# collectives are real peer-memory ones (the launch skew of the ranks is in them) and stay out. The
# 4-layer B=8 trace's expert tasks stay out too: with 10 items a task they took 24.6 us an item
# (gate/up) against 8.3 us with 2 items at full scale; at that rate the full-scale step with routing
# by token (6.5 active experts, 13 items a task) would take over 40 ms, and it measured 16.35 ms.
TRACES = (
    StoredTrace("trace-persistent-decode.B1-nvidia-h200.json.gz", "bed55f8", None, 8, 1, 1, None, ("MOE_ROUTER",)),
    StoredTrace("trace-persistent-verify.B8-nvidia-h200.json.gz", "bed55f8", None, 8, 8, 1, None, ("MOE_ROUTER",)),
    StoredTrace("trace-persistent-4layers-4ranks.B1.rank0-h200.json.gz", "9edca69", 4, 4, 1, 5,
                ("MOE_ROUTER", *EXPERTS)),
    StoredTrace("trace-persistent-4layers-4ranks.B8.rank0-h200.json.gz", "9edca69", 4, 4, 8, 5, ("MOE_ROUTER",)),
)  # fmt: skip
# The H200 steps the model is checked against: the last full-scale run before the step's design was
# frozen (e62ce6d: B=1 and B=8 with pinned routing) and routing by token (81c16da, B=8).
MEASURED_H200 = ("e2e-nvidia-h200.json", "e2e-random-routing-B8-81c16da-nvidia-h200.json")
# H100, rank 0 of mimo-v2.5-pro at world 8, solo collectives, routing by token, at 337f7ea (the
# streaming linear and expert bodies, `benchmarks/step_variants.py`'s base variant): B=1 (0.91
# active local experts a layer) and B=8 (6.97). The expert kinds stay out of the fit (their tasks'
# items follow each layer's routing, which the trace does not record).
TRACES_H100 = (
    StoredTrace("trace-step.B1-nvidia-h100-80gb-hbm3.json.gz", "523c528", None, 8, 1, 1, None, EXPERTS),
    StoredTrace("trace-step.B8-nvidia-h100-80gb-hbm3.json.gz", "523c528", None, 8, 8, 7, None, EXPERTS),
)  # fmt: skip
# The measured H100 steps the check reads; the last holds the defaults of 941f2c7 (the CTA-wide wait,
# the expert down tiling 2.2.5), which the table (fitted to warp-0 traces) has not seen.
MEASURED_H100 = ("e2e-nvidia-h100-80gb-hbm3.json", "step-variants-down-early-nvidia-h100-80gb-hbm3.json",
                 "step-variants-defaults-941f2c7-nvidia-h100-80gb-hbm3.json")
MAX_SEQ, CONTEXT, WORLD = 4160, 4096, 8  # benchmarks/e2e.py's defaults
# step-variants files whose rows record no switches: the trace of their first variant's step says them
SWITCHES_FROM_TRACE = {
    "step-variants-down-early-nvidia-h100-80gb-hbm3.json": "trace-step.B1-nvidia-h100-80gb-hbm3.json.gz",
}


def steps_of(results: Path, file: str) -> list[Any]:
    """The measured steps of a result file (calibration.measured_steps), switches as SWITCHES_FROM_TRACE says."""
    trace = SWITCHES_FROM_TRACE.get(file)
    sw = trace_meta(read_trace(results / trace)).get("switches") if trace else None
    return measured_steps(results / file, sw)


def trace_samples(model: str, results: Path, t: StoredTrace) -> tuple[list[dict[str, Any]], Any, Any, Any]:
    cfg = load_config(model)
    cfg = cfg.first_layers(t.layers) if t.layers else cfg
    rank, run, work = trace_run(read_trace(results / t.file), cfg, t.tokens, t.world, MAX_SEQ, CONTEXT, t.routed)
    return task_samples(run, work), rank, run, work


def fit(model: str, results: Path, verbose: bool, traces: tuple[StoredTrace, ...] = TRACES,
        gpu: str = "H200") -> dict[str, dict[str, float]]:  # fmt: skip
    samples = []
    for t in traces:
        xs, _, run, work = trace_samples(model, results, t)
        xs = [x for x in xs if (t.kinds is None or x["opcode"] in t.kinds) and x["opcode"] not in t.skip]
        print(f"{t.file} (at {t.commit}): {len(xs)} tasks of {len({x['opcode'] for x in xs})} kinds", flush=True)
        if verbose:
            print(format_analysis(analyse(run, work, None)))
        samples += xs
    fits = fit_task_costs(samples)
    generic = fit_task_costs([dict(x, opcode="*") for x in samples if x["opcode"] in GENERIC])["*"]
    fits["*"] = dict(generic, stream_bytes_per_s=fits["LINEAR_FP8"]["stream_bytes_per_s"])
    print(f"{gpu} task costs, {STAGE_QUANTILE:.0%} quantile of each kind's tasks:")
    print(format_task_costs(fits))
    return fits


def simulated_ms(rank: Any, run: Any, work: Any, spec: GpuSpec) -> float:
    """The stored run's own table (its queues as measured) simulated with `spec`'s task costs."""
    from tilert.abi import FIELD, OPCODE_NAMES, TASK_FIELDS
    from tilert.passes.cost_model import task_time

    table = run.table.copy()
    for s, k in zip(*table[:, :, FIELD["opcode"]].nonzero()):
        code = OPCODE_NAMES[int(table[s, k, FIELD["opcode"]])]
        busy = task_time(spec, code, work.nbytes[s, k], work.stream[s, k], work.flops[s, k]).busy
        table[s, k, FIELD["cost_ns"]] = round(busy * 1e9)
    start, end = simulate(table, rank.schedule.counter_expected, TASK_FIELDS, spec=spec)
    return (int(end.max()) - int(start[start >= 0].min())) / 1e6


def quantile_check(model: str, results: Path) -> None:
    """Each full-scale trace's own table simulated with costs fitted to the two full-scale traces
    alone, at the median and at STAGE_QUANTILE, against the trace's measured span."""
    full = [t for t in TRACES if t.layers is None]
    got = [trace_samples(model, results, t) for t in full]
    samples = [x for xs, *_ in got for x in xs]
    for q in (0.5, STAGE_QUANTILE):
        fits = fit_task_costs(samples, q=q)
        spec = dataclasses.replace(H200, tasks={**H200.tasks, **{k: task_cost(v) for k, v in fits.items()}}).solo()
        for t, (_, rank, run, work) in zip(full, got):
            span = (int(run.end[run.used].max()) - int(run.start[run.used].min())) / 1e6
            sim = simulated_ms(rank, run, work, spec)
            print(f"quantile {q}: {t.file}: measured span {span:.3f} ms, its table simulated {sim:.3f} ms "
                  f"({sim / span - 1:+.1%})", flush=True)  # fmt: skip


def h100_expert_scale(model: str, results: Path, h200: GpuSpec, h100_fits: dict[str, dict[str, float]],
                      lo: float = 0.3, hi: float = 1.5) -> float:  # fmt: skip
    """The factor on the H200's expert-task HBM-stream rates that, beside the H100's own fitted
    kinds, balances the model's errors on the stored H100 steps at their measured routing
    (bisection: a smaller factor slows every prediction)."""
    cfg = load_config(model)
    steps = [m for f in MEASURED_H100 for m in steps_of(results, f)]
    own = {k: task_cost(v) for k, v in h100_fits.items()}

    def err(s: float) -> list[float]:
        experts = scaled_stream({k: h200.tasks[k] for k in EXPERTS}, s)
        spec = dataclasses.replace(H100, tasks={**own, **experts}).solo()
        return [math.log(predicted(cfg, m, spec, m.routed) / m.persistent_ms) for m in steps]

    for _ in range(10):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(err(mid)) > 0 else (lo, mid)
    s = round((lo + hi) / 2, 3)
    print(f"H100 expert stream scale {s}: model / measured {[round(math.exp(e), 3) for e in err(s)]}", flush=True)
    return s


def predicted(cfg: Any, m: MeasuredStep, spec: GpuSpec, routed: float | None) -> float:
    """The model's step for a measured one, built under the switches it ran under."""
    with switches.applied(m.switches):
        return predicted_step_ms(cfg, m.tokens, WORLD, spec, MAX_SEQ, CONTEXT, routed)


def check(model: str, gpu: str, results: Path, fits: dict | None) -> None:
    spec = GPUS[gpu]
    if fits:
        spec = dataclasses.replace(spec, tasks={**spec.tasks, **{k: task_cost(v) for k, v in fits.items()}})
    cfg = load_config(model)
    files = MEASURED_H200 if gpu == "h200" else MEASURED_H100
    for m in (m for f in files for m in steps_of(results, f)):
        file, commit, B, routing, routed, ms = m.file, m.commit, m.tokens, m.routing, m.routed, m.persistent_ms
        uniform, at = predicted(cfg, m, spec.solo(), None), predicted(cfg, m, spec.solo(), routed)
        print(f"{gpu} {file} ({commit}) B={B} routing {routing} ({routed} active): measured {ms:.2f} ms | predicted "
              f"{uniform:.2f} ms (uniform routing: measured / predicted {ms / uniform:.3f}), {at:.2f} ms at the "
              f"measured routing ({ms / at:.3f})", flush=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="mimo-v2.5-pro")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--check-only", action="store_true", help="no fit: check the tables gpu_specs.py holds")
    ap.add_argument("--use-fit", action="store_true", help="check with the fitted H200 table instead")
    ap.add_argument("--quantile-check", action="store_true", help="the traces' own tables at two quantiles")
    ap.add_argument("--verbose", action="store_true", help="print each trace's stream-rate / hand-over report")
    a = ap.parse_args()
    if a.quantile_check:
        quantile_check(a.model, a.results)
    fits = None
    if not a.check_only:
        fits = fit(a.model, a.results, a.verbose)
        h200 = dataclasses.replace(H200, tasks={**H200.tasks, **{k: task_cost(v) for k, v in fits.items()}})
        h100 = fit(a.model, a.results, a.verbose, TRACES_H100, "H100")
        h100_expert_scale(a.model, a.results, h200, h100)
    check(a.model, "h200", a.results, fits if a.use_fit else None)
    check(a.model, "h100", a.results, None)


if __name__ == "__main__":
    main()
