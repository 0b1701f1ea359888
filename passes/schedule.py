"""schedule: tile tasks -> a dependency graph at tile granularity -> static per-SM queues.

Dependencies are counters: every stage chunk (see tile.py) has one counter; a task signals its
chunk's counter when its tile is written; a task waits on a range of consecutive counters
(`count` counters from `counter`, each reaching `expected` tasks per step; the GPU compares with
step x expected, so counters never need a reset). A task reading only some columns waits only
on the chunks holding them (a split-K slice of o_proj waits for its heads' attention; the down
projection of a slot group waits for that group's gate/up tiles only).

List scheduling (O(tasks log tasks)) with the cost model's task times (cost_model.task_time: a
task's SM time, its fixed cost and its hand-over latency): priority = bottom level (longest path to
the end of the step), each task goes to the SM that frees up first and is ready when that SM has
fetched it and its last input has been seen (cost_model.task_ready).
A stage with a tail (tile.Stage.tail: the top-k that the router's last-arriving task runs) gives
its last scheduled task the tail's time too (in its row's cost_ns: replays of the table see it).
Queues keep scheduling order, which is a topological order, so the persistent kernel cannot
deadlock. Tasks waiting on more than WAITS ranges get BARRIER tasks in front.

SM groups (TILERT_PIN, `task_group`): with TILERT_PIN=swa the sliding-window attention splits (and
MOE_TOPK tasks) go to SMs of their own (as many as the widest such stage has tasks), which run
nothing else, so their bodies stay in those SMs' instruction cache; with TILERT_PIN=moe the MoE's
router, expert and reduce tasks also get a group, half of the SMs left, and every other task the
other half. Measured slower than one pool at full scale (docs/passes.md), so off by default.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any

import numpy as np

from tilert.abi import OPCODES, TASK_FIELDS, WAITS
from tilert.ir.graph import Graph, Node
from tilert.kernels import switches
from tilert.passes.cost_model import task_ready, task_time
from tilert.passes.tile import OpTiles, structure_key

NONE = -1


@dataclass
class Task:
    """One task while scheduling: its row's identity, its stage's counter chunk, its waits (global
    stage -> chunk range) and its cost model times (s, cost_model.task_time)."""

    opcode: int
    op: int
    coords: tuple[int, int, int]
    busy: float  # SM time when its inputs are already there: fixed + run
    stage: int
    chunk: int
    waits: list[tuple[int, tuple[int, int]]]
    fixed: float  # SM free -> ready, inputs there
    handover: float  # last input written -> ready
    group: int = 0  # the SM group that runs it (task_group)


GENERAL, PINNED, MOE_GROUP = 0, 1, 2  # SM groups (sm_groups)
MOE_KINDS = ("MOE_ROUTER", "MOE_GATE_UP", "MOE_DOWN", "MOE_REDUCE")


def task_group(node: Node, opcode: str, pin: str) -> int:
    """The SM group of a task of `node` with this opcode under TILERT_PIN=`pin`: PINNED for the
    split tasks of sliding-window attention nodes and MOE_TOPK tasks ("swa", "moe"), MOE_GROUP for
    the MoE's other tasks ("moe"), else GENERAL."""
    if pin == "none":
        return GENERAL
    if opcode == "MOE_TOPK" or (opcode == "ATTN_SPLIT" and node.op == "attention_block" and node.a.window > 0):
        return PINNED
    return MOE_GROUP if pin == "moe" and opcode in MOE_KINDS else GENERAL


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
    """Global stages/counters and the tasks (`Task`), in creation order (a topological order)."""
    prod = {o: (i, j) for i, n in enumerate(g.nodes) for j, o in enumerate(n.outputs)}
    st_base, st_chunks, st_cols, st_op, counters = [], [], [], [], 0
    st_tail: list[float] = []  # per stage: the run time of its tail (Stage.tail), after its last task
    op_stage0 = []
    spec = ctx.gpu
    pin = switches.pin_choice()
    for i, t in enumerate(tiles):
        op_stage0.append(len(st_base))
        for s in t.stages:
            st_op.append(i)
            st_base.append(counters)
            st_chunks.append(s.chunks)
            st_cols.append(s.chunk_cols)
            st_tail.append(0.0 if s.tail is None else task_time(spec, s.tail[0], s.tail[1], 0.0, s.tail[2]).run)
            counters += s.chunks
    tasks: list[Task] = []
    full: list[set[int]] = []  # per op: producers every first-stage task waits on completely
    for i, (n, t) in enumerate(zip(g.nodes, tiles)):
        full.append(set())
        for si, s in enumerate(t.stages):
            gs = op_stage0[i] + si
            name = s.opcode if s.opcode in OPCODES else "OP_GENERIC"
            code = OPCODES[name]
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
                tt = task_time(spec, name, s.nbytes[k], s.stream[k], s.flops[k], s.comm[k], s.collective)
                tasks.append(Task(code, i, s.coords[k], tt.busy, gs, s.chunk[k], sorted(waits.items()), tt.fixed,
                                  tt.handover, task_group(n, name, pin)))  # fmt: skip
    return {"tasks": tasks, "st_base": st_base, "st_chunks": st_chunks, "st_tail": st_tail, "counters": counters,
            "full": full}  # fmt: skip


def _barriers(f: dict[str, Any], spec: Any) -> None:
    """Give tasks with more than WAITS wait ranges BARRIER tasks that collect the extra ones."""
    out = []
    for t in f["tasks"]:
        while len(t.waits) > WAITS:
            head, rest = t.waits[:WAITS], t.waits[WAITS:]
            gs = len(f["st_base"])
            f["st_base"].append(f["counters"])
            f["st_chunks"].append(1)
            f["st_tail"].append(0.0)
            f["counters"] += 1
            bt = task_time(spec, "BARRIER", 0.0, 0.0, 0.0)
            out.append(Task(OPCODES["BARRIER"], t.op, (0, 0, 0), bt.busy, gs, 0, head, bt.fixed, bt.handover,
                            t.group))  # fmt: skip
            t.waits = [(gs, (0, 1))] + rest
        out.append(t)
    f["tasks"] = out


def sm_groups(tasks: list[Task], sms: int) -> list[list[int]]:
    """The SMs of each group (GENERAL, PINNED, MOE_GROUP): PINNED gets as many as the widest stage of
    pinned tasks has tasks, MOE_GROUP half of the rest, GENERAL the others. A group left without SMs
    (none of its tasks, or too few SMs to spare) sends its tasks to the GENERAL SMs."""
    width: dict[int, int] = {}
    for t in tasks:
        if t.group == PINNED:
            width[t.stage] = width.get(t.stage, 0) + 1
    p = max(width.values(), default=0)
    p = p if 0 < p <= sms - p else 0
    m = (sms - p) // 2 if any(t.group == MOE_GROUP for t in tasks) else 0
    return [list(range(p + m, sms)), list(range(p)), list(range(p, p + m))]


def list_schedule(f: dict[str, Any], sms: int) -> tuple[list[list[int]], list[float], float]:
    tasks, st_chunks = f["tasks"], f["st_chunks"]
    nt, ns = len(tasks), len(st_chunks)
    tail = f.get("st_tail") or [0.0] * ns
    chunk_tasks: list[dict[int, list[int]]] = [{} for _ in range(ns)]
    for ti, t in enumerate(tasks):
        chunk_tasks[t.stage].setdefault(t.chunk, []).append(ti)
    # bottom levels, in reverse creation order (creation order is topological); a consumer that
    # waits adds its hand-over and runs without its fixed cost
    succ_chunk: list[dict[int, float]] = [{} for _ in range(ns)]
    succ_all = [0.0] * ns
    bl = [0.0] * nt
    for ti in range(nt - 1, -1, -1):
        t = tasks[ti]
        bl[ti] = t.busy + tail[t.stage] + max(succ_chunk[t.stage].get(t.chunk, 0.0), succ_all[t.stage])
        path = bl[ti] + t.handover - t.fixed
        for ws, (lo, hi) in t.waits:
            if lo == 0 and hi >= st_chunks[ws]:
                succ_all[ws] = max(succ_all[ws], path)
            else:
                d = succ_chunk[ws]
                for c in range(lo, hi):
                    d[c] = max(d.get(c, 0.0), path)
    # dependency counts at chunk / whole-stage level
    left_chunk = [{c: len(v) for c, v in d.items()} for d in chunk_tasks]
    left_stage = [sum(d.values()) for d in left_chunk]
    fin_chunk: list[dict[int, float]] = [{} for _ in range(ns)]
    fin_stage = [0.0] * ns
    wait_chunk: list[dict[int, list[int]]] = [{} for _ in range(ns)]
    wait_stage: list[list[int]] = [[] for _ in range(ns)]
    need = [0] * nt
    ready_at: list[float | None] = [None] * nt  # when its last input is written (None: it waits on nothing)
    for ti, t in enumerate(tasks):
        for ws, (lo, hi) in t.waits:
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
    groups = sm_groups(tasks, sms)
    free_of = [[(0.0, s) for s in g] for g in groups]  # one heap per group
    queues: list[list[int]] = [[] for _ in range(sms)]
    finish = [0.0] * nt

    def release(lst: list[int], at: float) -> None:
        for u in lst:
            ready_at[u] = at if ready_at[u] is None else max(ready_at[u], at)
            need[u] -= 1
            if need[u] == 0:
                heapq.heappush(ready, (-bl[u], u))

    done = 0
    while ready:
        _, ti = heapq.heappop(ready)
        t = tasks[ti]
        free = free_of[t.group] or free_of[GENERAL]
        t0, sm = heapq.heappop(free)
        if tail[t.stage] and left_stage[t.stage] == 1:  # its stage's last task runs the tail (its row's cost too;
            # a schedule runs once per flattened table, so the tail is added once)
            t.busy += tail[t.stage]
        finish[ti] = end = task_ready(t.fixed, t.handover, t0, ready_at[ti]) + t.busy - t.fixed
        heapq.heappush(free, (end, sm))
        queues[sm].append(ti)
        done += 1
        s, c = t.stage, t.chunk
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
        expected[base[t.stage] + t.chunk] += 1
    width = len(TASK_FIELDS)
    table = np.zeros((len(queues), max(1, max(len(q) for q in queues)), width), np.int32)
    table[:, :, TASK_FIELDS.index("signal")] = NONE
    for sm, q in enumerate(queues):
        for k, ti in enumerate(q):
            t = tasks[ti]
            row = [t.opcode, t.op, *t.coords]
            for w in range(WAITS):
                if w < len(t.waits):
                    ws, (lo, hi) = t.waits[w]
                    row += [base[ws] + lo, hi - lo, int(expected[base[ws] + lo])]
                else:
                    row += [NONE, 0, 0]
            row += [base[t.stage] + t.chunk, int(t.busy * 1e9)]
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
        op_s[t.op] += t.busy
        op_long[t.op] = max(op_long[t.op], t.busy)
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
    key = ("schedule", structure_key(graph), switches.pin_choice())
    if key not in ctx.cache:
        ctx.cache[key] = schedule_graph(graph, ctx.results["tile"][int(graph.meta.get("rank", 0))], ctx)
    ctx.put("schedule", graph, ctx.cache[key])
    return graph
