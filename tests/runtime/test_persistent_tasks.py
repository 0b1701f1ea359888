"""Persistent runtime on the CPU: task rows, list scheduling, the Python VM, the chain program.

The GPU half (tests marked gpu) runs the same tables through the persistent kernel.
"""

from __future__ import annotations

import pytest
import torch

from tilert.runtime.persistent import chain
from tilert.runtime.persistent.tasks import NONE, WIDTH, OpcodeTable, Task, assign_list_schedule, build_table
from tilert.runtime.persistent.vm import DeadlockError, run_table


def test_rows_and_opcodes():
    ops = OpcodeTable()
    assert ops.add("gemm") == 1 and ops.add("gemm") == 1 and ops["nop"] == 0
    t = build_table([[Task("gemm", (3, 4), ((0, 2),), 1, tid=7)], []], ops)
    assert t.shape == (2, 1, WIDTH) and t.dtype == torch.int32
    assert t[0, 0, :3].tolist() == [1, 3, 4] and t[0, 0, 9:15].tolist() == [0, 2, NONE, 0, 1, 7]
    assert t[1, 0, 0] == 0 and t[1, 0, 13] == NONE  # padding no-op signals nothing
    with pytest.raises(KeyError, match="no opcode"):
        ops["attention"]
    with pytest.raises(ValueError, match="rows hold 8"):
        Task("x", tuple(range(9)))


def test_list_schedule_respects_dependencies_and_balances():
    tasks = [Task("a", (i,), (), 0, cost=1.0, tid=i) for i in range(8)]
    tasks += [Task("b", (i,), ((0, 8),), 1, cost=1.0, tid=8 + i) for i in range(4)]
    queues = assign_list_schedule(tasks, 4)
    assert sorted(len(q) for q in queues) == [3, 3, 3, 3]
    ops = OpcodeTable(["nop", "a", "b"])
    seen: list[str] = []
    bodies = {"a": lambda a: seen.append("a"), "b": lambda a: seen.append("b")}
    run_table(build_table(queues, ops), ops, bodies, torch.zeros(2, dtype=torch.int64), epoch=1)
    assert seen.index("b") >= 8  # every b ran after all eight a's


def test_vm_detects_deadlock():
    ops = OpcodeTable(["nop", "a"])
    table = build_table([[Task("a", (), ((0, 1),), 1)], [Task("a", (), ((1, 1),), 0)]], ops)
    with pytest.raises(DeadlockError, match="deadlocks"):
        run_table(table, ops, {"a": lambda a: None}, torch.zeros(2, dtype=torch.int64), epoch=1)


@pytest.mark.parametrize("layers, m, n, sms", [(3, 1, 512, 8), (2, 5, 1024, 16), (2, 8, 2048, 132)])
def test_chain_vm_equals_reference(layers, m, n, sms):
    from tilert.numerics import mxfp4

    spec = chain.ChainSpec(layers=layers, m=m, n=n, num_sms=sms)
    b, s = mxfp4.quantize(torch.randn(layers, n, n) * n**-0.5)
    x = torch.randn(m, n).to(torch.bfloat16)
    y, ref = chain.run_vm(spec, x, b, s).float(), chain.reference(x, b, s).float()
    # split-K partial sums are added in another order than one matmul: bf16 rounding may differ
    assert float((y - ref).norm() / ref.norm()) < 1e-2
    assert spec.gemm.split_k >= 1


def test_epochs_scale_targets():
    """A second launch (epoch 2) waits for twice the count: counters are never reset."""
    ops = OpcodeTable(["nop", "p", "c"])
    table = build_table([[Task("p", (), (), 0)], [Task("c", (), ((0, 1),), NONE)]], ops)
    counters = torch.zeros(1, dtype=torch.int64)
    for epoch in (1, 2, 3):
        run_table(table, ops, {"p": lambda a: None, "c": lambda a: None}, counters, epoch=epoch)
    assert int(counters[0]) == 3
