"""A measured persistent trace: the per-node stage table (what a layer's critical path is made of) or,
with --stats, the per-kind stream rates and hand-over costs.

The persistent kernel's trace (`tilert.profile.timeline.measured_trace(step)`, written by `benchmarks/e2e.py
--trace-dir` and `ncu_step.py run --trace`) has one event per task: its node, opcode, start and
duration (waits are separate `wait` events). For each node in a range this prints when its first
task started, its span (first start to last end) and, per opcode, the task count and the median
and largest task time: a stage whose span is much longer than its largest task is queueing behind
other work; a span close to one task's time is latency-bound.

    python benchmarks/trace_stages.py benchmarks/results/trace-persistent-decode.B1-nvidia-h200.json.gz --nodes 340 356

--gaps ranks the stage kinds (one opcode of one node kind) by span plus the gap before them: the
hand-overs and tails on the step's critical path (`trace_analysis.stage_gaps`).

--stats compiles the step the trace measured (rank 0 of MODEL at WORLD ranks: the trace's own record
where e2e.py wrote one, else the flags), pairs every task with its row (waits, signal) and the tile
pass's bytes, and prints `tilert.profile.trace_analysis.analyse`: per kind the run, wait, fixed and
hand-over times and the stream rate in GB/s per SM (docs/profiling.md says how to read it).

    python benchmarks/trace_stages.py benchmarks/results/trace-persistent-verify.B8-nvidia-h200.json.gz --stats \\
        --routed-experts 1 --copy-bandwidth 4.19e12
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tilert.models.config import load_config  # noqa: E402
from tilert.profile.calibration import trace_meta, trace_run  # noqa: E402
from tilert.profile.trace_analysis import (  # noqa: E402
    analyse,
    format_analysis,
    format_stage_gaps,
    format_stages,
    read_trace,
    stage_gaps,
    stages,
    task_events,
)


def stats(trace: dict[str, Any], a: argparse.Namespace) -> dict[str, Any]:
    """The trace's per-kind figures (`analyse`), with the step it measured: the trace's record, or the
    flags where it has none (a flag given overrides the record)."""
    meta = trace_meta(trace)

    def pick(flag: Any, key: str, default: Any) -> Any:
        return flag if flag is not None else meta.get(key, default)

    model, tokens = pick(a.model, "model", None), pick(a.tokens, "tokens", None)
    if model is None or tokens is None:
        raise SystemExit("the trace does not say which step it measured: give --model and --tokens")
    cfg = load_config(model)
    layers = pick(a.layers, "layers", None)
    cfg = cfg.first_layers(layers) if layers and layers < cfg.num_hidden_layers else cfg
    world, max_seq = pick(a.world, "world", 8), pick(a.max_seq, "max_seq", 4160)
    context = pick(a.context, "context", max_seq - 64)
    routed = pick(a.routed_experts, "active_experts", None)
    _, run, work = trace_run(trace, cfg, tokens, world, max_seq, context, routed)
    out = analyse(run, work, pick(a.copy_bandwidth, "copy_bandwidth_Bps", None))
    out["step"] = {"model": model, "tokens": tokens, "world": world, "layers": layers, "max_seq": max_seq,
                   "context": context, "routed_experts": "uniform routing's expectation" if routed is None
                   else routed if not isinstance(routed, dict) else "per MoE node, as measured"}  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("trace")
    ap.add_argument("--nodes", type=int, nargs=2, default=None, metavar=("LO", "HI"), help="node range [LO, HI)")
    ap.add_argument("--json", action="store_true", help="print the rows (or the --stats figures) as JSON")
    ap.add_argument("--stats", action="store_true", help="per-kind stream rates and hand-over costs")
    ap.add_argument("--gaps", action="store_true", help="per stage kind: span, task time and the gap before it")
    ap.add_argument("--model", default=None, help="--stats: the model (default: the trace's)")
    ap.add_argument("--tokens", type=int, default=None, help="--stats: query tokens of the step (default: the trace's)")
    ap.add_argument("--world", type=int, default=None, help="--stats: ranks of the plan (default: the trace's, or 8)")
    ap.add_argument("--layers", type=int, default=None, help="--stats: the model cut to its first N layers")
    ap.add_argument("--max-seq", type=int, default=None, help="--stats: default the trace's, or e2e.py's 4160")
    ap.add_argument("--context", type=int, default=None, help="--stats: KV context (default: max-seq - 64)")
    ap.add_argument("--routed-experts", type=float, default=None,
                    help="--stats: local experts every MoE layer ran (pinned routing: 1; default: the trace's "
                         "record, or uniform routing's expectation)")  # fmt: skip
    ap.add_argument(
        "--copy-bandwidth",
        type=float,
        default=None,
        help="--stats: copy bandwidth in B/s (read + write) for the per-SM share (default: the trace's)",
    )
    a = ap.parse_args()
    trace = read_trace(a.trace)
    if a.stats:
        out = stats(trace, a)
        print(json.dumps(out, indent=1) if a.json else format_analysis(out))
        return
    if a.gaps:
        gaps = stage_gaps(task_events(trace))
        print(json.dumps(gaps, indent=1) if a.json else format_stage_gaps(gaps))
        return
    lo, hi = a.nodes if a.nodes else (0, None)
    rows = stages(task_events(trace), lo, hi)
    print(json.dumps(rows, indent=1) if a.json else format_stages(rows))


if __name__ == "__main__":
    main()
