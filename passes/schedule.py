"""schedule: tile tasks -> a dependency graph at tile granularity -> static per-SM queues.

Dependencies are counters: every stage chunk (see tile.py) has one counter; a task signals its
chunk's counter when its tile is written; a task waits on a range of consecutive counters
(`count` counters from `counter`, each reaching `expected` tasks per step; the GPU compares with
step x expected, so counters never need a reset). A task reading only some columns waits only
on the chunks holding them (a split-K slice of o_proj waits for its heads' attention; the down
projection of a slot group waits for that group's gate/up tiles only).

List scheduling (O(tasks log tasks)): priority = bottom level (longest cost path to the end of
the step), each task goes to the SM that frees up first, starting when its inputs are written.
Queues keep scheduling order, which is a topological order, so the persistent kernel cannot
deadlock. Tasks waiting on more than WAITS ranges get BARRIER tasks in front.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any

import numpy as np

from tilert.abi import OPCODES, TASK_FIELDS, WAITS
from tilert.ir.graph import Graph
from tilert.passes.cost_model import task_seconds
from tilert.passes.tile import OpTiles, structure_key

NONE = -1


@dataclass
class Schedule:
    table: np.ndarray  # int32 [sms, max_len, len(TASK_FIELDS)], padded with NOP rows
    counter_expected: np.ndarray  # int32 [counters]: tasks signalling each counter per step
    makespan_s: float
    busy_s: float  # sum of task times
    tasks: int
    op_seconds: list[float]  # per node: its tasks' summed time (eager model input)
    op_longest: list[float]
    done_before: list[int]  # per node: bitset of nodes surely complete before any of its tasks starts

    @property
    def occupancy(self) -> float:
        return self.busy_s / max(1e-12, self.makespan_s * self.table.shape[0])


def _flatten(g: Graph, tiles: list[OpTiles], ctx: Any) -> dict[str, Any]:
    """Global stages/counters and per-task (opcode, op, coords, seconds, stage, chunk, waits)."""
    prod = {o: (i, j) for i, n in enumerate(g.nodes) for j, o in enumerate(n.outputs)}
    st_base, st_chunks, st_cols, st_op, counters = [], [], [], [], 0
    op_stage0 = []
    for i, t in enumerate(tiles):
        op_stage0.append(len(st_base))
        for s in t.stages:
            st_op.append(i)
            st_base.append(counters)
            st_chunks.append(s.chunks)
            st_cols.append(s.chunk_cols)
            counters += s.chunks
    tasks: list[list[Any]] = []  # [opcode, op, coords, secs, stage, chunk, waits]
    full: list[set[int]] = []  # per op: producers every first-stage task waits on completely
    spec = ctx.gpu
    for i, (n, t) in enumerate(zip(g.nodes, tiles)):
        full.append(set())
        for si, s in enumerate(t.stages):
            gs = op_stage0[i] + si
            code = OPCODES[s.opcode] if s.opcode in OPCODES else OPCODES["OP_GENERIC"]
            for k in range(len(s)):
                waits: dict[int, tuple[int, int]] = {}
                for r in s.reads[k]:
                    if r.src < 0:
                        ws = op_stage0[i] + (-r.src - 1)
                        lo, hi = (0, st_chunks[ws]) if r.lo is None else (r.lo, r.hi)
                    else:
                        src = prod.get(n.inputs[r.src])
                        if src is None:
                            continue
                        ws = op_stage0[src[0]] + tiles[src[0]].out_stage[src[1]]
                        cols = st_cols[ws]
                        if r.lo is None or not cols:
                            lo, hi = 0, st_chunks[ws]
                        else:
                            lo, hi = r.lo // cols, min(st_chunks[ws], -(-r.hi // cols))
                    old = waits.get(ws)
                    waits[ws] = (min(lo, old[0]), max(hi, old[1])) if old else (lo, hi)
                if si == 0:
                    whole = {st_op[w] for w, (lo, hi) in waits.items() if lo == 0 and hi >= st_chunks[w]}
                    full[-1:] = [full[-1] & whole] if k else [whole]
                secs = task_seconds(spec, s.nbytes[k], s.flops[k], s.comm[k], s.collective)
                tasks.append([code, i, s.coords[k], secs, gs, s.chunk[k], sorted(waits.items())])
    return {"tasks": tasks, "st_base": st_base, "st_chunks": st_chunks, "counters": counters, "full": full}


def _barriers(f: dict[str, Any], spec: Any) -> None:
    """Give tasks with more than WAITS wait ranges BARRIER tasks that collect the extra ones."""
    out = []
    for t in f["tasks"]:
        while len(t[6]) > WAITS:
            head, rest = t[6][:WAITS], t[6][WAITS:]
            gs = len(f["st_base"])
            f["st_base"].append(f["counters"])
            f["st_chunks"].append(1)
            f["counters"] += 1
            out.append([OPCODES["BARRIER"], t[1], (0, 0, 0), spec.task_overhead_s, gs, 0, head])
            t[6] = [(gs, (0, 1))] + rest
        out.append(t)
    f["tasks"] = out


def list_schedule(f: dict[str, Any], sms: int) -> tuple[list[list[int]], list[float], float]:
    tasks, st_chunks = f["tasks"], f["st_chunks"]
    nt, ns = len(tasks), len(st_chunks)
    chunk_tasks: list[dict[int, list[int]]] = [{} for _ in range(ns)]
    for ti, t in enumerate(tasks):
        chunk_tasks[t[4]].setdefault(t[5], []).append(ti)
    # bottom levels, in reverse creation order (creation order is topological)
    succ_chunk: list[dict[int, float]] = [{} for _ in range(ns)]
    succ_all = [0.0] * ns
    bl = [0.0] * nt
    for ti in range(nt - 1, -1, -1):
        t = tasks[ti]
        bl[ti] = t[3] + max(succ_chunk[t[4]].get(t[5], 0.0), succ_all[t[4]])
        for ws, (lo, hi) in t[6]:
            if lo == 0 and hi >= st_chunks[ws]:
                succ_all[ws] = max(succ_all[ws], bl[ti])
            else:
                d = succ_chunk[ws]
                for c in range(lo, hi):
                    d[c] = max(d.get(c, 0.0), bl[ti])
    # dependency counts at chunk / whole-stage level
    left_chunk = [{c: len(v) for c, v in d.items()} for d in chunk_tasks]
    left_stage = [sum(d.values()) for d in left_chunk]
    fin_chunk: list[dict[int, float]] = [{} for _ in range(ns)]
    fin_stage = [0.0] * ns
    wait_chunk: list[dict[int, list[int]]] = [{} for _ in range(ns)]
    wait_stage: list[list[int]] = [[] for _ in range(ns)]
    need = [0] * nt
    ready_at = [0.0] * nt
    for ti, t in enumerate(tasks):
        for ws, (lo, hi) in t[6]:
            if lo == 0 and hi >= st_chunks[ws]:
                wait_stage[ws].append(ti)
                need[ti] += 1
            else:
                for c in range(lo, hi):
                    if c in left_chunk[ws]:
                        wait_chunk[ws].setdefault(c, []).append(ti)
                        need[ti] += 1
    ready = [(-bl[ti], ti) for ti in range(nt) if need[ti] == 0]
    heapq.heapify(ready)
    free = [(0.0, s) for s in range(sms)]
    queues: list[list[int]] = [[] for _ in range(sms)]
    finish = [0.0] * nt

    def release(lst: list[int], at: float) -> None:
        for u in lst:
            ready_at[u] = max(ready_at[u], at)
            need[u] -= 1
            if need[u] == 0:
                heapq.heappush(ready, (-bl[u], u))

    done = 0
    while ready:
        _, ti = heapq.heappop(ready)
        t0, sm = heapq.heappop(free)
        start = max(t0, ready_at[ti])
        finish[ti] = end = start + tasks[ti][3]
        heapq.heappush(free, (end, sm))
        queues[sm].append(ti)
        done += 1
        s, c = tasks[ti][4], tasks[ti][5]
        fin_chunk[s][c] = max(fin_chunk[s].get(c, 0.0), end)
        fin_stage[s] = max(fin_stage[s], end)
        left_chunk[s][c] -= 1
        left_stage[s] -= 1
        if left_chunk[s][c] == 0:
            release(wait_chunk[s].pop(c, []), fin_chunk[s][c])
        if left_stage[s] == 0:
            release(wait_stage[s], fin_stage[s])
            wait_stage[s] = []
    if done != nt:
        raise RuntimeError(f"schedule: {nt - done} tasks never became ready (dependency cycle)")
    return queues, finish, max(finish, default=0.0)


def encode(f: dict[str, Any], queues: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Fixed-width int32 rows (TASK_FIELDS), one queue per SM, padded with NOP (opcode 0)."""
    tasks, base = f["tasks"], f["st_base"]
    expected = np.zeros(f["counters"], np.int32)
    for t in tasks:
        expected[base[t[4]] + t[5]] += 1
    width = len(TASK_FIELDS)
    table = np.zeros((len(queues), max(1, max(len(q) for q in queues)), width), np.int32)
    table[:, :, TASK_FIELDS.index("signal")] = NONE
    for sm, q in enumerate(queues):
        for k, ti in enumerate(q):
            code, op, (c0, c1, c2), secs, gs, chunk, waits = tasks[ti]
            row = [code, op, c0, c1, c2]
            for w in range(WAITS):
                if w < len(waits):
                    ws, (lo, hi) = waits[w]
                    row += [base[ws] + lo, hi - lo, int(expected[base[ws] + lo])]
                else:
                    row += [NONE, 0, 0]
            row += [base[gs] + chunk, int(secs * 1e9)]
            table[sm, k, : len(row)] = row
    return table, expected


def schedule_graph(g: Graph, tiles: list[OpTiles], ctx: Any) -> Schedule:
    f = _flatten(g, tiles, ctx)
    _barriers(f, ctx.gpu)
    queues, finish, makespan = list_schedule(f, ctx.gpu.sms)
    table, expected = encode(f, queues)
    op_s = [0.0] * len(g.nodes)
    op_long = [0.0] * len(g.nodes)
    for t in f["tasks"]:
        op_s[t[1]] += t[3]
        op_long[t[1]] = max(op_long[t[1]], t[3])
    return Schedule(table, expected, makespan, sum(op_s), len(f["tasks"]), op_s, op_long, _done_before(g, f["full"]))


def _done_before(g: Graph, full: list[set[int]]) -> list[int]:
    """Nodes complete before node i starts: its fully-waited producers with all their ancestors
    (every consumer's tasks together read all of a producer's output, so a producer finishing
    implies its own producers finished)."""
    prod = g.producers()
    anc: list[int] = []
    for n in g.nodes:
        m = 0
        for x in n.inputs:
            p = prod.get(x)
            if p is not None:
                m |= anc[p] | (1 << p)
        anc.append(m)
    out = []
    for i in range(len(g.nodes)):
        m = 0
        for p in full[i]:
            m |= anc[p] | (1 << p)
        out.append(m)
    return out


def schedule(graph: Graph, ctx: Any) -> Graph:
    """Pass entry: ctx.results['schedule'][rank] (shared by ranks with the same structure)."""
    key = ("schedule", structure_key(graph))
    if key not in ctx.cache:
        ctx.cache[key] = schedule_graph(graph, ctx.results["tile"][int(graph.meta.get("rank", 0))], ctx)
    ctx.put("schedule", graph, ctx.cache[key])
    return graph
