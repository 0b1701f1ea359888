"""Python reference VM for task tables: the same table the persistent kernel runs, on torch.

SMs advance in round-robin; a task whose wait is unmet blocks its SM. If no SM can move, the
table deadlocks and the VM raises (the GPU kernel reports the same through its error flag).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from tilert.runtime.persistent.tasks import COL_ARGS, COL_ID, COL_OP, COL_SIGNAL, COL_WAIT, NARGS, NONE, OpcodeTable


class DeadlockError(RuntimeError):
    """No SM can make progress: a wait can never be satisfied."""


def run_table(
    table: torch.Tensor,
    opcodes: OpcodeTable,
    bodies: Mapping[str, Callable[[list[int]], Any]],
    counters: torch.Tensor,
    epoch: int,
    order: list[int] | None = None,
) -> list[tuple[int, int]]:
    """Execute every row; returns the (sm, task_id) order in which tasks ran."""
    rows = table.tolist()
    S, Q = len(rows), len(rows[0]) if rows else 0
    pc = [0] * S
    ran: list[tuple[int, int]] = []
    sms = order or list(range(S))
    while True:
        progressed = False
        for s in sms:
            while pc[s] < Q:
                row = rows[s][pc[s]]
                op = row[COL_OP]
                if op == 0:
                    pc[s] += 1
                    continue
                waits = [(row[COL_WAIT + 2 * i], row[COL_WAIT + 2 * i + 1]) for i in range(2)]
                if any(c != NONE and int(counters[c]) < n * epoch for c, n in waits):
                    break
                bodies[opcodes.names[op]](row[COL_ARGS : COL_ARGS + NARGS])
                if row[COL_SIGNAL] != NONE:
                    counters[row[COL_SIGNAL]] += 1
                ran.append((s, row[COL_ID]))
                pc[s] += 1
                progressed = True
                break  # round-robin: one task per SM per turn
        if all(p >= Q for p in pc):
            return ran
        if not progressed:
            stuck = [(s, rows[s][pc[s]][COL_ID]) for s in range(S) if pc[s] < Q]
            raise DeadlockError(f"task table deadlocks: blocked (sm, task) = {stuck[:8]}")
