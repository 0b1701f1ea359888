"""Per-SM task timelines as Chrome / Perfetto trace JSON (chrome://tracing, ui.perfetto.dev).

One track (tid) per SM; one complete event ("ph": "X") per task, named by its op kind, with the
opcode, node index and tile coordinates in args. Timestamps come either from `simulate()` (the
schedule's predicted times: each SM runs its queue in order; a task starts when its SM is free
and every counter it waits on has all its signals) or from the persistent kernel's measured
per-task start/ready/end clocks: both go through the same `trace_json()`. With ready stamps (the
moment a task's waits were met) each task's event spans ready..end and its wait is a separate
"wait" event before it, so a slow body and a late dependency look different.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tilert.abi import FIELD, OPCODE_NAMES, TASK_FIELDS
from tilert.gpu_specs import GpuSpec
from tilert.passes.cost_model import task_ready
from tilert.runtime.persistent.step import PersistentStep


class TimelineError(ValueError):
    """A task table that cannot run (a wait that is never satisfied) or mismatched timestamps."""


def _fields(task_fields: Sequence[str]) -> dict[str, int]:
    return {f: i for i, f in enumerate(task_fields)}


def simulate(
    table: np.ndarray,
    expected: np.ndarray,
    task_fields: Sequence[str],
    progress: Callable[[int, int], None] | None = None,
    spec: GpuSpec | None = None,
    stamps: bool = False,
) -> tuple[np.ndarray, ...]:
    """Predicted start/end (ns) per table slot [sms, max_len] (-1 for NOP padding) from cost_ns, the
    task's SM time. With `spec`, as the schedule pass predicts it: a task is ready when its SM has
    fetched it and its last input has been seen (its kind's fixed and hand-over times,
    `cost_model.task_ready`), and ends its run (cost_ns less the fixed time) later; without, it
    starts when its SM is free and its inputs are written. `start`: the ready time less the fixed
    one, or when the SM came free if that was later. With `stamps`: (start, ready, end) as the
    persistent kernel stamps them (start: its SM came free and picked the row)."""
    F = _fields(task_fields)
    waits = sorted({f.split("_")[0] for f in task_fields if f.startswith("wait")})
    sms, L, _ = table.shape
    start = np.full((sms, L), -1, np.int64)
    end = np.full((sms, L), -1, np.int64)
    picked = np.full((sms, L), -1, np.int64)
    ready_at = np.full((sms, L), -1, np.int64)
    count = np.zeros(len(expected), np.int64)
    ready = np.zeros(len(expected), np.int64)  # time of the latest signal so far
    head = [0] * sms
    free = [0] * sms
    n_live = [int((table[s, :, F["opcode"]] != 0).sum()) for s in range(sms)]
    total, done = sum(n_live), 0
    while done < total:
        moved = False
        for s in range(sms):
            while head[s] < L:
                row = table[s, head[s]]
                if row[F["opcode"]] == 0:  # NOP padding ends the queue
                    head[s] = L
                    break
                inputs: int | None = None
                ok = True
                for w in waits:
                    c, n = int(row[F[f"{w}_counter"]]), int(row[F[f"{w}_count"]])
                    if c < 0 or n == 0:
                        continue
                    if (count[c : c + n] < expected[c : c + n]).any():
                        ok = False
                        break
                    inputs = max(inputs or 0, int(ready[c : c + n].max()))
                if not ok:
                    break
                busy = max(1, int(row[F["cost_ns"]]))
                fixed = handover = 0
                if spec is not None:
                    c = spec.task_cost(OPCODE_NAMES.get(int(row[F["opcode"]]), "*"))
                    fixed, handover = round(c.fixed_s * 1e9), round(c.handover_s * 1e9)
                t_ready = int(task_ready(fixed, handover, free[s], inputs))
                t0, t1 = max(free[s], t_ready - fixed), t_ready + max(1, busy - fixed)
                start[s, head[s]], end[s, head[s]] = t0, t1
                picked[s, head[s]], ready_at[s, head[s]] = free[s], t_ready
                free[s] = t1
                sig = int(row[F["signal"]])
                if sig >= 0:
                    count[sig] += 1
                    ready[sig] = max(ready[sig], t1)
                head[s] += 1
                done += 1
                moved = True
                if progress and done % 20000 == 0:
                    progress(done, total)
        if not moved:
            raise TimelineError(f"schedule deadlocks: {total - done} of {total} tasks can never start")
    return (picked, ready_at, end) if stamps else (start, end)


def trace_json(
    table: np.ndarray,
    start_ns: np.ndarray,
    end_ns: np.ndarray,
    task_fields: Sequence[str],
    op_names: Sequence[str],
    opcode_names: dict[int, str],
    *,
    process: str = "rank 0",
    pid: int = 0,
    meta: dict[str, Any] | None = None,
    ready_ns: np.ndarray | None = None,
    probes_ns: np.ndarray | None = None,
) -> dict[str, Any]:
    """The Chrome trace dict: one track per SM, one 'X' event per task (timestamps in µs); with
    `ready_ns`, the task's event starts when its waits were met, after a 'wait' event; with
    `probes_ns` [sms, tasks, P] (a step built with TILERT_PROBES=on), each task's args hold
    `probes_us`: its body's phase stamps in µs after the task's start of run (null: not reached)."""
    shapes = [start_ns.shape, end_ns.shape] + ([] if ready_ns is None else [ready_ns.shape])
    if any(sh != table.shape[:2] for sh in shapes):
        raise TimelineError(f"timestamps {shapes} do not match the task table {table.shape[:2]}")
    F = _fields(task_fields)
    t_min = int(start_ns[start_ns >= 0].min()) if (start_ns >= 0).any() else 0
    ev: list[dict[str, Any]] = [{"ph": "M", "pid": pid, "name": "process_name", "args": {"name": process}}]
    for s in range(table.shape[0]):
        ev.append({"ph": "M", "pid": pid, "tid": s, "name": "thread_name", "args": {"name": f"SM {s:03d}"}})
        ev.append({"ph": "M", "pid": pid, "tid": s, "name": "thread_sort_index", "args": {"sort_index": s}})
        for k in range(table.shape[1]):
            row = table[s, k]
            if row[F["opcode"]] == 0 or start_ns[s, k] < 0:
                continue
            op = int(row[F["op"]])
            code = opcode_names.get(int(row[F["opcode"]]), str(int(row[F["opcode"]])))
            t0, t1 = int(start_ns[s, k]), int(end_ns[s, k])
            args = {"opcode": code, "node": op, "tile": [int(row[F["c0"]]), int(row[F["c1"]]), int(row[F["c2"]])],
                    "slot": k}  # fmt: skip
            if ready_ns is not None:
                tr = min(max(int(ready_ns[s, k]), t0), t1)
                args["wait_us"] = (tr - t0) / 1e3
                if tr > t0:
                    ev.append({"ph": "X", "pid": pid, "tid": s, "name": "wait", "cat": "WAIT", "ts": (t0 - t_min) / 1e3,
                               "dur": (tr - t0) / 1e3, "args": {"node": op, "slot": k}})  # fmt: skip
                t0 = tr
            if probes_ns is not None:
                args["probes_us"] = [round((int(v) - t0) / 1e3, 3) if v > 0 else None for v in probes_ns[s, k]]
            ev.append({
                "ph": "X", "pid": pid, "tid": s,
                "name": op_names[op] if 0 <= op < len(op_names) else code,
                "cat": code,
                "ts": (t0 - t_min) / 1e3,
                "dur": max(0, t1 - t0) / 1e3,
                "args": args,
            })  # fmt: skip
    return {"traceEvents": ev, "displayTimeUnit": "ns", "otherData": meta or {}}


def measured_trace(step: PersistentStep, process: str = "rank 0 (measured)", meta: dict[str, Any] | None = None
                   ) -> dict[str, Any]:  # fmt: skip
    """Chrome/Perfetto trace of a PersistentStep's last launch: one track per SM, one event per task,
    from the kernel's own %globaltimer stamps (a 'wait' event until the task's waits are met, then
    the task until its signal). `meta` joins the trace's otherData (what the step was: model, world,
    routing..., read back by `calibration.trace_meta`), as do the build switches the step was built
    under (`PersistentStep.switches`: the calibration rebuilds its table under them)."""
    torch.cuda.synchronize(step.device)
    tr = step.trace.cpu().numpy()
    table = step.table
    used = table[:, :, FIELD["opcode"]] != 0
    start = np.where(used, tr[:, :, 0], -1)
    end = np.where(used, tr[:, :, 1], -1)
    ready = np.where(used, tr[:, :, 2], -1)
    names = [n.op for n in step.g.nodes]
    return trace_json(table, start, end, TASK_FIELDS, names, OPCODE_NAMES, process=process, pid=1,
                      meta={"source": "persistent kernel %globaltimer", "graph": step.g.name,
                            "switches": dict(step.switches), **(meta or {})},
                      ready_ns=ready, probes_ns=tr[:, :, 3:] if tr.shape[2] > 3 else None)  # fmt: skip


def probe_medians(trace: dict[str, Any], by: str = "opcode") -> dict[str, list[float | None]]:
    """Median phase stamps (µs after the start of run) per opcode, or per node name with by="node",
    of a measured trace whose step was built with TILERT_PROBES=on (empty without probes): slot k's
    median over the tasks that reached probe k (None where none did)."""
    if by not in ("opcode", "node"):
        raise ValueError(f"probe_medians by {by!r}: expected 'opcode' or 'node'")
    groups: dict[str, list[list[float | None]]] = {}
    for e in trace["traceEvents"]:
        pr = e.get("args", {}).get("probes_us") if e.get("ph") == "X" else None
        if pr is not None:
            groups.setdefault(e["cat"] if by == "opcode" else e["name"], []).append(pr)
    out: dict[str, list[float | None]] = {}
    for key, rows in sorted(groups.items()):
        cols = [[r[k] for r in rows if r[k] is not None] for k in range(len(rows[0]))]
        out[key] = [round(float(np.median(c)), 3) if c else None for c in cols]
    return out


def write_trace(trace: dict[str, Any], path: str | Path) -> Path:
    p = Path(path)
    p.write_text(json.dumps(trace, separators=(",", ":")))
    return p
