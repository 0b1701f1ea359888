"""Per-node stage table of a measured persistent trace (what a layer's critical path is made of).

The persistent kernel's trace (`tilert.profile.timeline.measured_trace(step)`, written by `benchmarks/e2e.py
--trace-dir` and `ncu_step.py run --trace`) has one event per task: its node, opcode, start and
duration (waits are separate `wait` events). For each node in a range this prints when its first
task started, its span (first start to last end) and, per opcode, the task count and the median
and largest task time: a stage whose span is much longer than its largest task is queueing behind
other work; a span close to one task's time is latency-bound.

    python benchmarks/trace_stages.py benchmarks/results/trace-persistent-decode.B1-nvidia-h200.json.gz --nodes 340 356
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import statistics
from pathlib import Path
from typing import Any


def load(path: str) -> list[dict[str, Any]]:
    """The trace's task events (waits and metadata left out)."""
    raw = Path(path).read_bytes()
    d = json.loads(gzip.decompress(raw) if path.endswith(".gz") else raw)
    events = d["traceEvents"] if isinstance(d, dict) else d
    return [e for e in events if e.get("ph") == "X" and e.get("cat") != "WAIT" and "node" in e.get("args", {})]


def stages(events: list[dict[str, Any]], lo: int = 0, hi: int | None = None) -> list[dict[str, Any]]:
    """One row per node in [lo, hi), in order of first task start: name, start, span (us) and per
    opcode (tasks, median, max) task times."""
    by_node: dict[int, list[dict[str, Any]]] = collections.defaultdict(list)
    for e in events:
        n = e["args"]["node"]
        if n >= lo and (hi is None or n < hi):
            by_node[n].append(e)
    rows = []
    for n, es in by_node.items():
        start, end = min(e["ts"] for e in es), max(e["ts"] + e["dur"] for e in es)
        ops: dict[str, list[float]] = collections.defaultdict(list)
        for e in es:
            ops[e["cat"]].append(e["dur"])
        per_op = {k: {"tasks": len(v), "median_us": statistics.median(v), "max_us": max(v)} for k, v in ops.items()}
        rows.append({"node": n, "name": es[0]["name"], "start_us": start, "span_us": end - start, "opcodes": per_op})
    return sorted(rows, key=lambda r: r["start_us"])


def format_rows(rows: list[dict[str, Any]]) -> str:
    out = []
    for r in rows:
        ops = r["opcodes"].items()
        parts = " | ".join(f"{k} {v['tasks']}x med {v['median_us']:.1f} max {v['max_us']:.1f}" for k, v in ops)
        out.append(f"{r['node']:5d} {r['name'][:18]:18s} start {r['start_us']:9.1f} span {r['span_us']:6.1f}  {parts}")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--nodes", type=int, nargs=2, default=None, metavar=("LO", "HI"), help="node range [LO, HI)")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    a = ap.parse_args()
    lo, hi = a.nodes if a.nodes else (0, None)
    rows = stages(load(a.trace), lo, hi)
    print(json.dumps(rows, indent=1) if a.json else format_rows(rows))


if __name__ == "__main__":
    main()
