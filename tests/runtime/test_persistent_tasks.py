"""Persistent runtime on the CPU: task rows (the plan's format), list scheduling, the Python VM,
the chain program. The GPU half (tests marked gpu) runs the same tables through the kernel."""

from __future__ import annotations

import pytest
import torch

from tilert.abi import FIELD, NONE, OPCODES, TASK_FIELDS
from tilert.runtime.persistent import chain
from tilert.runtime.persistent.tasks import WIDTH, Task, build_table, list_schedule
from tilert.runtime.persistent.vm import DeadlockError, run_table


def test_rows_follow_the_plan_format():
    t = build_table([[Task("LINEAR_MXFP4", (3, 4, 5), ((0, 2, 7),), 1, cost_ns=9)], []])
    assert t.shape == (2, 1, WIDTH) and WIDTH == len(TASK_FIELDS) and t.dtype == torch.int32
    row = t[0, 0].tolist()
    assert row[FIELD["opcode"]] == OPCODES["LINEAR_MXFP4"] and row[FIELD["op"] : FIELD["op"] + 3] == [3, 4, 5]
    assert [row[FIELD[f"wait0_{k}"]] for k in ("counter", "count", "expected")] == [0, 2, 7]
    assert row[FIELD["wait1_counter"]] == NONE and row[FIELD["signal"]] == 1 and row[FIELD["cost_ns"]] == 9
    assert t[1, 0, FIELD["opcode"]] == OPCODES["NOP"] and t[1, 0, FIELD["signal"]] == NONE
    with pytest.raises(KeyError, match="no opcode"):
        Task("FROBNICATE")
    with pytest.raises(ValueError, match="rows hold"):
        Task("NOP", waits=((0, 1, 1),) * 4)


def test_list_schedule_respects_dependencies_and_balances():
    tasks = [Task("LINEAR_FP8", (i,), (), 0) for i in range(8)]
    tasks += [Task("CAST_BF16", (i,), ((0, 1, 8),), 1) for i in range(4)]
    queues = list_schedule(tasks, 4)
    assert sorted(len(q) for q in queues) == [3, 3, 3, 3]
    seen: list[str] = []
    bodies = {"LINEAR_FP8": lambda c: seen.append("a"), "CAST_BF16": lambda c: seen.append("b")}
    run_table(build_table(queues), bodies, torch.zeros(2, dtype=torch.int64), epoch=1)
    assert seen.index("b") >= 8  # every cast ran after all eight GEMM tiles


def test_vm_detects_deadlock_and_unknown_opcodes():
    table = build_table([[Task("CAST_BF16", (), ((0, 1, 1),), 1)], [Task("CAST_BF16", (), ((1, 1, 1),), 0)]])
    with pytest.raises(DeadlockError, match="deadlocks"):
        run_table(table, {"CAST_BF16": lambda c: None}, torch.zeros(2, dtype=torch.int64), epoch=1)
    with pytest.raises(KeyError, match="unknown opcode"):
        run_table(build_table([[Task("LINEAR_FP8")]]), {}, torch.zeros(1, dtype=torch.int64), epoch=1)


def test_wait_ranges_cover_every_counter():
    """A wait on (first, count) needs each of count counters, not just the first."""
    table = build_table([[Task("CAST_BF16", (), ((0, 2, 1),), NONE)], [Task("LINEAR_FP8", (), (), 0)]])
    counters = torch.zeros(2, dtype=torch.int64)
    with pytest.raises(DeadlockError):
        run_table(table, {"CAST_BF16": lambda c: None, "LINEAR_FP8": lambda c: None}, counters, epoch=1)


@pytest.mark.parametrize("layers, m, n, sms", [(3, 1, 512, 8), (2, 5, 1024, 16), (2, 8, 2048, 132)])
def test_chain_vm_equals_reference(layers, m, n, sms):
    from tilert.numerics import mxfp4

    spec = chain.ChainSpec(layers=layers, m=m, n=n, num_sms=sms)
    b, s = mxfp4.quantize(torch.randn(layers, n, n) * n**-0.5)
    x = torch.randn(m, n).to(torch.bfloat16)
    y, ref = chain.run_vm(spec, x, b, s).float(), chain.reference(x, b, s).float()
    # split-K partial sums are added in another order than one matmul: bf16 rounding may differ
    assert float((y - ref).norm() / ref.norm()) < 1e-2


def test_epochs_scale_targets():
    """A second launch (epoch 2) waits for twice the count: counters are never reset."""
    table = build_table([[Task("LINEAR_FP8", (), (), 0)], [Task("CAST_BF16", (), ((0, 1, 1),), NONE)]])
    counters = torch.zeros(1, dtype=torch.int64)
    for epoch in (1, 2, 3):
        run_table(table, {"LINEAR_FP8": lambda c: None, "CAST_BF16": lambda c: None}, counters, epoch=epoch)
    assert int(counters[0]) == 3


def test_step_kernel_key_follows_views_and_switches(monkeypatch):
    # a view's shape is in a step kernel's source: two KV pools of different slot counts (the same
    # attention config) are two kernels, and so is every build switch's value
    from tilert.kernels import switches
    from tilert.runtime.persistent.program import NodeProgram
    from tilert.runtime.persistent.step import step_kernel_key

    def prog(slots: int) -> NodeProgram:
        specs = [("q", (16, 4, 64), "bfloat16"), ("k_cache", (slots, 256, 64), "bfloat16")]
        return NodeProgram(("attention", "cfg"), specs, lambda: {}, [], ("ATTN_SPLIT", "ATTN_COMBINE"))

    shape = (132, 1, 2)
    assert step_kernel_key([prog(2)], shape) == step_kernel_key([prog(2)], shape)
    assert step_kernel_key([prog(2)], shape) != step_kernel_key([prog(6)], shape)
    before = step_kernel_key([prog(2)], shape)
    monkeypatch.setenv(switches.WAIT_ENV, "warp" if switches.wait_choice() == "cta" else "cta")
    assert step_kernel_key([prog(2)], shape) != before
