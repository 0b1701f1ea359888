"""What a measured persistent trace says: per-node stages, per-kind stream rates, hand-over costs.

The persistent kernel stamps every task with `%globaltimer` three times (ns, one clock for the whole
GPU): *start* (its SM picked the row, before its waits), *ready* (its waits were met) and *end*
(its signal was given). With the task rows that ran (waits, signal) and the bytes each task moves
(the tile pass's figure), a launch's tasks say, per task kind (opcode):

- **run**: ready -> end, the body; **stream rate**: the kind's bytes over its run time (GB/s per
  SM), and its share of the copy bandwidth's per-SM share measured in the same run;
- **wait**: start -> ready;
- **hand-over**: a producer's end -> its consumer's ready, for each task that was still waiting
  when its last producer finished (the latency of one dependency, signal to seen);
- **fixed cost**: start -> ready of the tasks whose inputs were all written before they started
  (fetching the row, the poll that finds the counters met, a gated body's pre-wait work);
- **warm / cold run**: the run time of the tasks that follow a task of the same node on their SM
  (its body is still in the SM's instruction cache) and of those that follow another kind's task
  (the body may have been evicted). Their gap bounds what a cold body costs; other differences
  between the two sets show too (the later splits of a full-attention node on an SM are mostly the
  empty ones past the keys).

`benchmarks/e2e.py` writes these figures for every persistent step it measures (`run_from_step`),
`benchmarks/trace_stages.py --stats` for a stored Chrome trace (`run_from_trace`); `stages` is the
per-node stage table of `benchmarks/trace_stages.py`.
"""

from __future__ import annotations

import collections
import gzip
import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tilert.abi import FIELD, OPCODE_NAMES, OPCODES, WAITS
from tilert.ir.graph import Graph
from tilert.kernels import moe
from tilert.passes.tile import OpTiles, moe_expert_work

# the kinds that stream weights from HBM, first in the report: linears (GEMV), the LM head, the
# MoE router and the expert tasks
STREAM_KINDS = ("LINEAR_FP8", "LINEAR_BF16", "LINEAR_MXFP4", "MOE_GATE_UP", "MOE_DOWN", "MOE_ROUTER", "LM_HEAD_GEMM")


class TraceError(ValueError):
    """A trace that does not fit the task table it is read with."""


def read_trace(path: str | Path) -> dict[str, Any]:
    """A Chrome trace file (.json or .json.gz) as a dict with 'traceEvents'."""
    raw = Path(path).read_bytes()
    d = json.loads(gzip.decompress(raw) if str(path).endswith(".gz") else raw)
    return d if isinstance(d, dict) else {"traceEvents": d}


def task_events(trace: dict[str, Any]) -> list[dict[str, Any]]:
    """The trace's task events (waits and metadata left out)."""
    return [e for e in trace["traceEvents"]
            if e.get("ph") == "X" and e.get("cat") != "WAIT" and "node" in e.get("args", {})]  # fmt: skip


def load(path: str | Path) -> list[dict[str, Any]]:
    """The task events of a trace file."""
    return task_events(read_trace(path))


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


def format_stages(rows: list[dict[str, Any]]) -> str:
    out = []
    for r in rows:
        ops = r["opcodes"].items()
        parts = " | ".join(f"{k} {v['tasks']}x med {v['median_us']:.1f} max {v['max_us']:.1f}" for k, v in ops)
        out.append(f"{r['node']:5d} {r['name'][:18]:18s} start {r['start_us']:9.1f} span {r['span_us']:6.1f}  {parts}")
    return "\n".join(out)


def stage_gaps(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Where a step's time goes stage by stage: a stage is one opcode of one node (its tasks), taken
    in node order; its gap is its first task's ready time minus the latest end of every stage before
    it (a hand-over on the critical path; negative where it overlaps an earlier stage), its span its
    first ready to its last end. One row per (node kind, opcode) over the step, largest total first:
    stages, median span, median task time, median gap, and the sum of span + gap in ms (positive
    gaps and spans of stages that run side by side count once each: a ranking, not a partition)."""
    groups: dict[tuple[int, str], list[dict[str, Any]]] = collections.defaultdict(list)
    for e in events:
        groups[(e["args"]["node"], e["cat"])].append(e)
    acc: dict[tuple[str, str], list[tuple[float, float, float]]] = collections.defaultdict(list)
    latest = None
    for node, cat in sorted(groups, key=lambda k: (k[0], min(e["ts"] for e in groups[k]))):
        es = groups[(node, cat)]
        ready, end = min(e["ts"] for e in es), max(e["ts"] + e["dur"] for e in es)
        gap = 0.0 if latest is None else ready - latest
        acc[(es[0]["name"], cat)].append((end - ready, statistics.median(e["dur"] for e in es), gap))
        latest = end if latest is None else max(latest, end)
    rows = [{"kind": k, "opcode": c, "stages": len(v), "span_us": statistics.median(x[0] for x in v),
             "task_us": statistics.median(x[1] for x in v), "gap_us": statistics.median(x[2] for x in v),
             "total_ms": sum(x[0] + x[2] for x in v) / 1e3} for (k, c), v in acc.items()]  # fmt: skip
    return sorted(rows, key=lambda r: -r["total_ms"])


def format_stage_gaps(rows: list[dict[str, Any]]) -> str:
    out = [f"{'node kind':22} {'opcode':15} {'stages':>6} {'span':>7} {'task':>7} {'gap':>7} {'span+gap ms':>11}"]
    for r in rows:
        out.append(f"{r['kind'][:22]:22} {r['opcode'][:15]:15} {r['stages']:6d} {r['span_us']:7.2f} "
                   f"{r['task_us']:7.2f} {r['gap_us']:7.2f} {r['total_ms']:11.3f}")  # fmt: skip
    return "\n".join(out)


@dataclass
class RunTasks:
    """One persistent launch as it ran: the task rows per SM and the kernel's stamps (ns, -1 where a
    slot holds no task)."""

    table: np.ndarray  # int32 [sms, slots, TASK_FIELDS]
    start: np.ndarray  # int64 [sms, slots]
    ready: np.ndarray
    end: np.ndarray

    @property
    def used(self) -> np.ndarray:
        return (self.table[:, :, FIELD["opcode"]] != 0) & (self.start >= 0)


def run_from_step(step: Any) -> RunTasks:
    """A PersistentStep's last launch (its trace buffer: start, end, ready per task)."""
    import torch

    if step.trace.is_cuda:
        torch.cuda.synchronize(step.device)
    tr = step.trace.cpu().numpy().astype(np.int64)
    used = step.table[:, :, FIELD["opcode"]] != 0
    start, end, ready = (np.where(used, tr[:, :, i], -1) for i in (0, 1, 2))
    return RunTasks(step.table, start, np.maximum(ready, start), end)


def _identity(row: np.ndarray) -> tuple[int, ...]:
    return tuple(int(x) for x in row[: FIELD["c2"] + 1])  # opcode, op, c0, c1, c2


def run_from_trace(trace: dict[str, Any], table: np.ndarray) -> RunTasks:
    """A stored trace (`measured_trace`'s format: one event per task with its SM, slot, node, opcode
    and tile; ready..end, and `wait_us` before it) with the rows of `table`, the compiled task table.
    A row is taken by the task's identity (opcode, node, tile), so a table whose scheduler placed the
    same tasks elsewhere still gives every task its waits and signal; tasks of the same identity
    (BARRIERs of one node) pair up in slot order."""
    evs = task_events(trace)
    if not evs:
        raise TraceError("the trace has no task events")
    rows: dict[tuple[int, ...], list[np.ndarray]] = collections.defaultdict(list)
    for s in range(table.shape[0]):
        for k in range(table.shape[1]):
            if table[s, k, FIELD["opcode"]] != 0:
                rows[_identity(table[s, k])].append(table[s, k])
    sms = max(int(e["tid"]) for e in evs) + 1
    slots = max(int(e["args"]["slot"]) for e in evs) + 1
    out = np.zeros((sms, slots, table.shape[2]), np.int32)
    out[:, :, FIELD["signal"]] = -1
    start, ready, end = (np.full((sms, slots), -1, np.int64) for _ in range(3))
    for e in sorted(evs, key=lambda e: (e["tid"], e["args"]["slot"])):
        code = OPCODES.get(e["cat"])
        key = (code, int(e["args"]["node"]), *(int(c) for c in e["args"].get("tile", (0, 0, 0))))
        if code is None or not rows.get(key):
            raise TraceError(f"task {e['cat']} node {e['args']['node']} tile {e['args'].get('tile')} of the trace is "
                             "not in the task table (compiled for another graph or tiling?)")  # fmt: skip
        s, k = int(e["tid"]), int(e["args"]["slot"])
        out[s, k] = rows[key].pop(0)
        # timestamps in us with ns resolution: round back to integer ns
        ready[s, k] = round(e["ts"] * 1e3)
        end[s, k] = round((e["ts"] + e["dur"]) * 1e3)
        start[s, k] = ready[s, k] - round(e["args"].get("wait_us", 0.0) * 1e3)
    left = sum(len(v) for v in rows.values())
    if left:
        raise TraceError(f"{left} tasks of the table are not in the trace")
    return RunTasks(out, start, ready, end)


@dataclass
class TaskWork:
    """What each task of a table moves and computes [sms, slots] (the tile pass's per-task figures):
    `nbytes` read + written, of which `stream` come from HBM (weights, the KV cache), and `flops`."""

    nbytes: np.ndarray
    stream: np.ndarray
    flops: np.ndarray


def task_work(g: Graph, tiles: list[OpTiles], table: np.ndarray, active: dict[int, int] | None = None) -> TaskWork:
    """The tile pass's bytes, HBM-stream bytes and flops of every task of `table`. A fused MoE's
    expert tasks (MOE_GATE_UP, MOE_DOWN) with `active[node]` local experts: the figures of the items
    and slots the task ran (`moe.MoeTiling`, `tile.moe_expert_work`), instead of the tile pass's
    expected value under uniform routing."""
    per: dict[tuple[int, ...], tuple[float, float, float]] = {}
    for i, t in enumerate(tiles):
        for st in t.stages:
            code = OPCODES.get(st.opcode, OPCODES["OP_GENERIC"])
            for k in range(len(st)):
                per[(code, i, *st.coords[k])] = (st.nbytes[k], st.stream[k], st.flops[k])
    out = np.zeros((3, *table.shape[:2]))
    for s, k in zip(*np.nonzero(table[:, :, FIELD["opcode"]])):
        key = _identity(table[s, k])
        code, op = OPCODE_NAMES[key[0]], key[1]
        if code in ("MOE_GATE_UP", "MOE_DOWN") and active and op in active:
            out[:, s, k] = _expert_work(g, op, code, key[2], int(active[op]))
        else:
            out[:, s, k] = per.get(key, (0.0, 0.0, 0.0))
    return TaskWork(*out)


def _expert_work(g: Graph, i: int, code: str, task: int, count: int) -> tuple[float, float, float]:
    """The work of expert task `task` of fused MoE node i when `count` local experts are active."""
    n = g.nodes[i]
    x, gu, dn = g.values[n.inputs[0]], g.values[n.inputs[3]], g.values[n.inputs[4]]
    geo = moe.tiling(x.shape[0], x.shape[1], dn.shape[2], n.a.n_local, n.a.top_k)
    if code == "MOE_GATE_UP":
        items = geo.gu_items(task, count)
        return moe_expert_work(code, geo, gu.nbytes / n.a.n_local, len(items), len(items))
    items = geo.down_items(task, count)
    return moe_expert_work(code, geo, dn.nbytes / n.a.n_local, len(items), len({it[0] for it in items}))


def _q(v: list[float], p: float) -> float:
    v = sorted(v)
    return v[min(len(v) - 1, int(p * len(v)))] if v else float("nan")


def _r(x: float, d: int = 3) -> float | None:
    return None if x != x else round(x, d)


def _last_signals(run: RunTasks) -> tuple[np.ndarray, np.ndarray]:
    """Per counter: the end of its last signal (-1: none) and that task's opcode."""
    T, used = run.table, run.used
    sig = T[:, :, FIELD["signal"]]
    top = max(int(sig.max()), *(int((T[:, :, FIELD[f"wait{w}_counter"]] + T[:, :, FIELD[f"wait{w}_count"]]).max())
                                for w in range(WAITS)))  # fmt: skip
    last_end = np.full(top + 1, -1, np.int64)
    last_code = np.zeros(top + 1, np.int64)
    for s, k in zip(*np.nonzero(used & (sig >= 0))):
        c = sig[s, k]
        if run.end[s, k] > last_end[c]:
            last_end[c], last_code[c] = run.end[s, k], T[s, k, FIELD["opcode"]]
    return last_end, last_code


def task_rows(run: RunTasks) -> list[dict[str, Any]]:
    """One row per task: SM, slot, opcode name, start/ready/end (ns) and, when the task was still
    waiting as its last producer finished, that producer's end and opcode (`dep_end`, `dep_code`;
    else -1 and None): the task's hand-over is ready - dep_end, otherwise its fixed cost is ready - start."""
    T = run.table
    last_end, last_code = _last_signals(run)
    rows = []
    for s, k in zip(*np.nonzero(run.used)):
        row = T[s, k]
        dep, dep_code = -1, 0
        for w in range(WAITS):
            c, n = int(row[FIELD[f"wait{w}_counter"]]), int(row[FIELD[f"wait{w}_count"]])
            if c >= 0 and n > 0:
                j = c + int(np.argmax(last_end[c : c + n]))
                if last_end[j] > dep:
                    dep, dep_code = int(last_end[j]), int(last_code[j])
        st = int(run.start[s, k])
        waited = dep > st
        rows.append({"sm": int(s), "slot": int(k), "opcode": OPCODE_NAMES.get(int(row[FIELD["opcode"]]), "?"),
                     "start": st, "ready": int(run.ready[s, k]), "end": int(run.end[s, k]),
                     "dep_end": dep if waited else -1,
                     "dep_code": OPCODE_NAMES.get(dep_code) if waited else None})  # fmt: skip
    return rows


def analyse(run: RunTasks, work: TaskWork, copy_bandwidth: float | None = None) -> dict[str, Any]:
    """The launch's figures per task kind (opcode) and for the whole step (times in us, JSON-ready):
    run, wait, fixed cost and hand-over times; for kinds that stream from HBM (weights; the KV cache
    for attention) the stream rate in GB/s per SM (the kind's stream bytes over its run time, and the
    median of the per-task rates) and its share of the copy bandwidth's per-SM share
    (`copy_bandwidth / SMs`, read + write, measured in the same run); the rate of all the bytes the
    tile pass counts (activations too) over the same time."""
    sms = run.table.shape[0]
    kinds: dict[str, dict[str, list[float]]] = collections.defaultdict(lambda: collections.defaultdict(list))
    pairs: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
    code, node = run.table[:, :, FIELD["opcode"]], run.table[:, :, FIELD["op"]]
    for t in task_rows(run):
        d = kinds[t["opcode"]]
        d["run"].append(t["end"] - t["ready"])
        s_, k_ = t["sm"], t["slot"]
        if k_ > 0 and run.used[s_, k_ - 1]:  # the task before it on its SM: the same node's, or another kind's
            if code[s_, k_ - 1] == code[s_, k_] and node[s_, k_ - 1] == node[s_, k_]:
                d["warm"].append(t["end"] - t["ready"])
            elif code[s_, k_ - 1] != code[s_, k_]:
                d["cold"].append(t["end"] - t["ready"])
        d["wait"].append(t["ready"] - t["start"])
        d["stream"].append(float(work.stream[t["sm"], t["slot"]]))
        d["bytes"].append(float(work.nbytes[t["sm"], t["slot"]]))
        if t["dep_end"] >= 0:
            d["handover"].append(t["ready"] - t["dep_end"])
            pairs[(t["dep_code"], t["opcode"])].append(t["ready"] - t["dep_end"])
        else:
            d["fixed"].append(t["ready"] - t["start"])
    share = copy_bandwidth / sms if copy_bandwidth else None
    per_kind: dict[str, Any] = {}
    order = sorted(kinds, key=lambda k: (k not in STREAM_KINDS, -sum(kinds[k]["run"])))
    for name in order:
        d = kinds[name]
        run_ns, wb, nb = sum(d["run"]), sum(d["stream"]), sum(d["bytes"])
        rates = [b / r for b, r in zip(d["stream"], d["run"]) if r > 0 and b > 0]
        rate = wb / run_ns if run_ns > 0 and wb > 0 else float("nan")  # bytes/ns = GB/s
        row: dict[str, Any] = {
            "tasks": len(d["run"]),
            "run_us_median": _r(statistics.median(d["run"]) / 1e3),
            "run_us_p90": _r(_q(d["run"], 0.9) / 1e3),
            "run_us_per_sm": _r(run_ns / 1e3 / sms, 2),
            "wait_us_median": _r(statistics.median(d["wait"]) / 1e3),
            "wait_us_per_sm": _r(sum(d["wait"]) / 1e3 / sms, 2),
            "stream_bytes_median": _r(statistics.median(d["stream"]), 0),
            "stream_GBps_per_sm": _r(rate, 2),
            "stream_GBps_per_sm_median": _r(statistics.median(rates), 2) if rates else None,
            "copy_share": _r(rate * 1e9 / share, 3) if share and rate == rate else None,
            "bytes_GBps_per_sm": _r(nb / run_ns, 2) if run_ns > 0 else None,
            "fixed_us_median": _r(statistics.median(d["fixed"]) / 1e3) if d["fixed"] else None,
            "fixed_tasks": len(d["fixed"]),
            "handover_us_median": _r(statistics.median(d["handover"]) / 1e3) if d["handover"] else None,
            "handover_us_p90": _r(_q(d["handover"], 0.9) / 1e3) if d["handover"] else None,
            "handover_tasks": len(d["handover"]),
            "run_us_warm_median": _r(statistics.median(d["warm"]) / 1e3) if d["warm"] else None,
            "warm_tasks": len(d["warm"]),
            "run_us_cold_median": _r(statistics.median(d["cold"]) / 1e3) if d["cold"] else None,
            "cold_tasks": len(d["cold"]),
        }
        per_kind[name] = row
    allh = [x for d in kinds.values() for x in d["handover"]]
    allf = [x for d in kinds.values() for x in d["fixed"]]
    first, last = int(run.start[run.used].min()), int(run.end[run.used].max())
    top = sorted(pairs.items(), key=lambda kv: -len(kv[1]))[:12]
    return {
        "sms": sms,
        "tasks": int(run.used.sum()),
        "span_us": _r((last - first) / 1e3, 2),
        "busy_us_per_sm": _r(sum(sum(d["run"]) for d in kinds.values()) / 1e3 / sms, 2),
        "wait_us_per_sm": _r(sum(sum(d["wait"]) for d in kinds.values()) / 1e3 / sms, 2),
        "copy_bandwidth_Bps": copy_bandwidth,
        "copy_share_per_sm_GBps": _r(share / 1e9, 2) if share else None,
        "handover_us_median": _r(statistics.median(allh) / 1e3) if allh else None,
        "handover_us_p90": _r(_q(allh, 0.9) / 1e3) if allh else None,
        "handover_tasks": len(allh),
        "fixed_us_median": _r(statistics.median(allf) / 1e3) if allf else None,
        "fixed_tasks": len(allf),
        "kinds": per_kind,
        "handover_pairs": [
            {"producer": p, "consumer": c, "tasks": len(v), "us_median": _r(statistics.median(v) / 1e3)}
            for (p, c), v in top
        ],
    }


def _cell(x: Any, width: int = 8, digits: int = 2) -> str:
    return f"{x:{width}.{digits}f}" if isinstance(x, (int, float)) else f"{'-':>{width}s}"


def format_analysis(a: dict[str, Any]) -> str:
    """The figures of `analyse` as a table: per kind (the streaming kinds first) the median run time,
    run and wait time per SM, the median stream bytes, the stream rate (GB/s per SM) and its share of
    the copy bandwidth's per-SM share, the median fixed cost and hand-over, the median warm and cold
    run; then the commonest producer -> consumer hand-overs."""
    share = f", copy bandwidth's share per SM {a['copy_share_per_sm_GBps']} GB/s" if a.get("copy_share_per_sm_GBps") \
        else ""  # fmt: skip
    out = [f"{a['tasks']} tasks on {a['sms']} SMs, span {a['span_us']} us; per SM: run {a['busy_us_per_sm']} us, "
           f"wait {a['wait_us_per_sm']} us{share}",
           f"hand-over (producer end -> consumer ready): median {a['handover_us_median']} us, p90 "
           f"{a['handover_us_p90']} us over {a['handover_tasks']} tasks; fixed (inputs already there): median "
           f"{a['fixed_us_median']} us over {a['fixed_tasks']} tasks",
           f"{'kind':15s} {'tasks':>6s} {'run med':>8s} {'run/SM':>8s} {'wait/SM':>8s} {'KB med':>8s} "
           f"{'GB/s/SM':>8s} {'share':>6s} {'fixed':>6s} {'handover':>8s} {'warm':>6s} {'cold':>6s}  "
           "(us; stream KB, GB/s per SM; warm / cold: run after the same node's / another kind's task)"]  # fmt: skip
    for name, k in a["kinds"].items():
        kb = k["stream_bytes_median"] / 1e3 if k["stream_bytes_median"] else None
        cells = [_cell(k["run_us_median"]), _cell(k["run_us_per_sm"], 8, 1), _cell(k["wait_us_per_sm"], 8, 1),
                 _cell(kb, 8, 1), _cell(k["stream_GBps_per_sm"], 8, 1), _cell(k["copy_share"], 6),
                 _cell(k["fixed_us_median"], 6), _cell(k["handover_us_median"]),
                 _cell(k.get("run_us_warm_median"), 6), _cell(k.get("run_us_cold_median"), 6)]  # fmt: skip
        out.append(f"{name:15s} {k['tasks']:6d} " + " ".join(cells))
    for p in a["handover_pairs"]:
        out.append(f"  hand-over {p['producer']} -> {p['consumer']}: {p['tasks']} tasks, median {p['us_median']} us")
    return "\n".join(out)
