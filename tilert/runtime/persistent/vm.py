"""Python reference VM for task tables: the same rows the persistent kernel runs, on torch.

SMs advance in round-robin; a task whose waits are unmet blocks its SM. If no SM can move, the
table deadlocks and the VM raises (the GPU kernel reports the same through its error flag).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from tilert.abi import FIELD, OPCODES, WAITS

NAMES = {v: k for k, v in OPCODES.items()}


class DeadlockError(RuntimeError):
    """No SM can make progress: a wait can never be satisfied."""


def _ready(row: list[int], counters: torch.Tensor, epoch: int) -> bool:
    for i in range(WAITS):
        c, n, e = (row[FIELD[f"wait{i}_{k}"]] for k in ("counter", "count", "expected"))
        if c >= 0 and any(int(counters[c + j]) < e * epoch for j in range(n)):
            return False
    return True


def run_table(
    table: torch.Tensor,
    bodies: Mapping[str, Callable[[list[int]], Any]],
    counters: torch.Tensor,
    epoch: int,
) -> list[tuple[int, list[int]]]:
    """Execute every row (bodies get (op, c0, c1, c2)); returns the (sm, coords) order they ran in."""
    rows = table.tolist()
    S, Q = len(rows), len(rows[0]) if rows else 0
    pc = [0] * S
    ran: list[tuple[int, list[int]]] = []
    while True:
        progressed = False
        for s in range(S):
            while pc[s] < Q and rows[s][pc[s]][FIELD["opcode"]] == OPCODES["NOP"]:
                pc[s] += 1
            if pc[s] >= Q or not _ready(rows[s][pc[s]], counters, epoch):
                continue
            row = rows[s][pc[s]]
            name = NAMES.get(row[FIELD["opcode"]])
            if name not in bodies:
                raise KeyError(f"unknown opcode {row[FIELD['opcode']]} ({name}) at sm {s}, task {pc[s]}")
            coords = row[FIELD["op"] : FIELD["op"] + 4]
            bodies[name](coords)
            if row[FIELD["signal"]] >= 0:
                counters[row[FIELD["signal"]]] += 1
            ran.append((s, coords))
            pc[s] += 1
            progressed = True
        if all(p >= Q for p in pc):
            return ran
        if not progressed:
            stuck = [(s, pc[s]) for s in range(S) if pc[s] < Q]
            raise DeadlockError(f"task table deadlocks: blocked (sm, slot) = {stuck[:8]}")
