"""Building task tables in the plan's row format (tilert/abi.py: the compiler-runtime contract).

A row is `TASK_FIELDS` int32s: opcode, op, c0, c1, c2 (the body's coordinates), then WAITS x
(counter, count, expected): before the body, counters counter .. counter+count-1 must each reach
expected * epoch (epoch = 1, 2, ... per launch, so counters are never reset); then signal (the
counter the task adds 1 to, release) and cost_ns. Queues are padded with NOP rows. The compiler's
scheduler writes these tables for whole decode steps; `Task` and `list_schedule` here build them
for hand-written persistent programs (and tests).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tilert.abi import FIELD, NONE, OPCODES, TASK_FIELDS, WAITS

WIDTH = len(TASK_FIELDS)


@dataclass(frozen=True)
class Task:
    opcode: str  # a key of tilert.abi.OPCODES
    coords: tuple[int, ...] = ()  # (op, c0, c1, c2)
    waits: tuple[tuple[int, int, int], ...] = ()  # (first counter, count, expected per epoch)
    signal: int = NONE
    cost_ns: int = 1000

    def __post_init__(self) -> None:
        if self.opcode not in OPCODES:
            raise KeyError(f"task kind '{self.opcode}' has no opcode in tilert.abi.OPCODES")
        if len(self.coords) > 4:
            raise ValueError(f"task {self.opcode} has {len(self.coords)} coordinates; rows hold 4 (op, c0, c1, c2)")
        if len(self.waits) > WAITS:
            raise ValueError(f"task {self.opcode} waits on {len(self.waits)} counter ranges; rows hold {WAITS}")

    def row(self) -> list[int]:
        r = [0] * WIDTH
        r[FIELD["opcode"]] = OPCODES[self.opcode]
        r[FIELD["op"] : FIELD["op"] + len(self.coords)] = list(self.coords)
        for i in range(WAITS):
            c, n, e = self.waits[i] if i < len(self.waits) else (NONE, 0, 0)
            r[FIELD[f"wait{i}_counter"]], r[FIELD[f"wait{i}_count"]], r[FIELD[f"wait{i}_expected"]] = c, n, e
        r[FIELD["signal"]] = self.signal
        r[FIELD["cost_ns"]] = self.cost_ns
        return r


def nop_row() -> list[int]:
    return Task("NOP").row()


def build_table(queues: Sequence[Sequence[Task]]) -> torch.Tensor:
    """Per-SM queues -> int32 [num_sms, max_len, WIDTH], padded with NOP rows."""
    n = max(1, max((len(q) for q in queues), default=0))
    rows = [[t.row() for t in q] + [nop_row()] * (n - len(q)) for q in queues]
    return torch.tensor(rows, dtype=torch.int32)


def list_schedule(tasks: Sequence[Task], num_sms: int) -> list[list[Task]]:
    """Static list scheduling: tasks in dependency order, each to the SM that frees up first.

    Tasks must come in a topological order of their counters (producers first); a consumer is
    placed no earlier than its producers finish, so queues cannot deadlock.
    """
    free = [(0.0, s) for s in range(num_sms)]
    heapq.heapify(free)
    done_at: dict[int, float] = {}
    queues: list[list[Task]] = [[] for _ in range(num_sms)]
    for t in tasks:
        ready = max((done_at.get(c + k, 0.0) for c, n, _ in t.waits for k in range(n)), default=0.0)
        at, s = heapq.heappop(free)
        end = max(at, ready) + t.cost_ns
        queues[s].append(t)
        if t.signal != NONE:
            done_at[t.signal] = max(done_at.get(t.signal, 0.0), end)
        heapq.heappush(free, (end, s))
    return queues
