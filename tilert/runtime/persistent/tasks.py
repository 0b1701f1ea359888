"""Tile tasks and per-SM task tables: the contract between the scheduler and the persistent kernel.

A task is one tile of one fused op. It is serialised (Hazy-style) as a fixed-width int32 row:

    [opcode, a0..a7, wait0, need0, wait1, need1, signal, task_id, 0]

`waitK`/`needK`: before the body runs, counter waitK must reach needK * epoch (epoch = 1, 2, ...
per launch, so counters are never reset). `signal`: the counter the task increments (release)
after its body. -1 means none. The opcode table is built once in Python (`OpcodeTable`); the
TileLang megakernel and the Python VM both read it, so the numbers exist in one place only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch

NARGS = 8
WIDTH = 16
NONE = -1
NOP = 0
COL_OP, COL_ARGS, COL_WAIT, COL_SIGNAL, COL_ID = 0, 1, 9, 13, 14


@dataclass(frozen=True)
class Task:
    op: str
    args: tuple[int, ...] = ()
    waits: tuple[tuple[int, int], ...] = ()  # (counter, count per epoch)
    signal: int = NONE
    cost: float = 1.0  # predicted time (any unit), for scheduling
    tid: int = 0

    def __post_init__(self) -> None:
        if len(self.args) > NARGS:
            raise ValueError(f"task {self.op} has {len(self.args)} args; rows hold {NARGS}")
        if len(self.waits) > 2:
            raise ValueError(f"task {self.op} waits on {len(self.waits)} counters; rows hold 2")


@dataclass
class OpcodeTable:
    """Opcode numbers by task kind; 0 is the no-op that pads queues."""

    names: list[str] = field(default_factory=lambda: ["nop"])

    def add(self, name: str) -> int:
        if name not in self.names:
            self.names.append(name)
        return self.names.index(name)

    def __getitem__(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"task kind '{name}' has no opcode (known: {', '.join(self.names)})") from None

    def to_dict(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.names)}


def serialize(task: Task, table: OpcodeTable) -> list[int]:
    row = [0] * WIDTH
    row[COL_OP] = table[task.op]
    row[COL_ARGS : COL_ARGS + len(task.args)] = list(task.args)
    waits = list(task.waits) + [(NONE, 0)] * (2 - len(task.waits))
    row[COL_WAIT : COL_WAIT + 4] = [waits[0][0], waits[0][1], waits[1][0], waits[1][1]]
    row[COL_SIGNAL] = task.signal
    row[COL_ID] = task.tid
    return row


def build_table(queues: Sequence[Sequence[Task]], table: OpcodeTable) -> torch.Tensor:
    """Per-SM queues -> int32 [num_sms, max_len, WIDTH], padded with no-op rows."""
    n = max(1, max((len(q) for q in queues), default=0))
    out = torch.zeros(len(queues), n, WIDTH, dtype=torch.int32)
    out[:, :, COL_WAIT] = NONE
    out[:, :, COL_WAIT + 2] = NONE
    out[:, :, COL_SIGNAL] = NONE
    for s, q in enumerate(queues):
        for i, t in enumerate(q):
            out[s, i] = torch.tensor(serialize(t, table), dtype=torch.int32)
    return out


def signal_counts(tasks: Iterable[Task], n_counters: int) -> list[int]:
    """How many tasks signal each counter (what a waiter on that counter should expect)."""
    counts = [0] * n_counters
    for t in tasks:
        if t.signal != NONE:
            counts[t.signal] += 1
    return counts


def assign_list_schedule(tasks: Sequence[Task], num_sms: int) -> list[list[Task]]:
    """Static list scheduling: tasks in dependency order, each to the SM that frees up first.

    Tasks must be given in a topological order of their counters (producers before consumers);
    a consumer is placed no earlier than its producers' finish time, so the queues cannot
    deadlock: every wait is on tasks placed earlier in the global order.
    """
    import heapq

    free = [(0.0, s) for s in range(num_sms)]
    heapq.heapify(free)
    done_at: dict[int, float] = {}
    queues: list[list[Task]] = [[] for _ in range(num_sms)]
    for t in tasks:
        ready = max((done_at.get(c, 0.0) for c, _ in t.waits), default=0.0)
        at, s = heapq.heappop(free)
        start = max(at, ready)
        end = start + t.cost
        queues[s].append(t)
        if t.signal != NONE:
            done_at[t.signal] = max(done_at.get(t.signal, 0.0), end)
        heapq.heappush(free, (end, s))
    return queues
