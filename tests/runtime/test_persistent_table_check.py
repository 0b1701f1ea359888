"""PersistentStep refuses a task table that does not fit its node programs (no GPU: the check runs
on the host before anything is built): a task whose opcode the node's bodies lack, and, for an
`exact` program (the fused MoE), a stage of the program the table has no task of. Both arise when
the table and the step program are built under different build switches (TILERT_MOE_TOPK)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from tilert.abi import FIELD, OPCODE_NAMES
from tilert.engine.persistent import compile_step
from tilert.kernels import moe, switches
from tilert.models.builder import build_step_graph
from tilert.models.config import load_config
from tilert.runtime.persistent.megakernel import PersistentError
from tilert.runtime.persistent.program import NodeProgram
from tilert.runtime.persistent.step import PersistentStep


def _table(place: str) -> tuple:
    with switches.applied({moe.TOPK_ENV: place}):
        return compile_step(build_step_graph(load_config("tiny"), tokens=1, max_seq=64, mode="decode"), 64, 1)


def _programs(g, table: np.ndarray, moe_stages: tuple[str, ...]) -> list[NodeProgram]:
    """Node programs whose opcodes are what the table holds, the MoE nodes' `moe_stages` (exact)."""
    ops, nodes = table[:, :, FIELD["opcode"]], table[:, :, FIELD["op"]]
    out = []
    for i, n in enumerate(g.nodes):
        names = tuple(sorted({OPCODE_NAMES[int(c)] for c in ops[(nodes == i) & (ops != 0)]} - {"BARRIER"}))
        fused = n.op.startswith("fused_moe_")
        out.append(NodeProgram((), [], dict, opcodes=moe_stages if fused else names, exact=fused))
    return out


def _check(g, sched, programs: list[NodeProgram]) -> None:
    PersistentStep._check_table(SimpleNamespace(g=g, programs=programs), sched.table, sched.counter_expected)


def test_matching_tables_pass() -> None:
    for place in moe.TOPK_PLACES:
        g, sched = _table(place)
        _check(g, sched, _programs(g, sched.table, moe.tiling(1, 64, 32, 4, 2, topk=place).stages))


def test_a_table_without_the_topk_task_its_program_runs_is_refused() -> None:
    g, sched = _table("router")
    with pytest.raises(PersistentError, match=r"fused_moe_mxfp4\): the table has no MOE_TOPK task"):
        _check(g, sched, _programs(g, sched.table, moe.tiling(1, 64, 32, 4, 2, topk="task").stages))


def test_a_topk_task_the_program_has_no_body_for_is_refused() -> None:
    g, sched = _table("task")
    with pytest.raises(PersistentError, match="task MOE_TOPK on node"):
        _check(g, sched, _programs(g, sched.table, moe.tiling(1, 64, 32, 4, 2, topk="router").stages))


def test_a_queue_with_a_gap_is_refused() -> None:
    """The kernel's loop ends at a queue's first NOP: a task after one would never run."""
    g, sched = _table("router")
    table = sched.table.copy()
    q = int(np.argmax((table[:, :, FIELD["opcode"]] != 0).sum(1)))  # the longest queue
    table[q, 1:] = table[q, :-1].copy()
    table[q, 0] = 0  # a NOP row in front of its tasks
    table[q, 0, FIELD["signal"]] = -1
    programs = _programs(g, sched.table, moe.tiling(1, 64, 32, 4, 2, topk="router").stages)
    with pytest.raises(PersistentError, match=f"SM queue {q} has a NOP at slot 0 before a task"):
        PersistentStep._check_table(SimpleNamespace(g=g, programs=programs), table, sched.counter_expected)
