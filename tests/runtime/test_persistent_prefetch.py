"""The persistent step's weight-prefetch table (CPU, meta tensors, nothing compiled): every fp8
linear and MoE router task names a region inside its own weight tensor, rows and bytes as the
task's tile reads them; tasks without a region (experts, attention, elementwise) have none."""

from __future__ import annotations

import os

import numpy as np
import pytest

import tilert.kernels.common as common
from tilert.abi import FIELD, OPCODES
from tilert.models.config import load_config

pytest.importorskip("tilelang")  # the step's prim_func is built (not compiled) with TileLang


@pytest.fixture(scope="module", params=["gemv", "fused"])
def step(request):
    """The tiny-gpu verify step with each fp8 linear body (TILERT_LINEAR_BODY)."""
    from tilert.engine.persistent import precompile
    from tilert.kernels import linear_fused as lf

    real, old = common.build, os.environ.get(lf.BODY_ENV)
    common.build = lambda func, **kw: func  # the prim_func is built, not compiled
    os.environ[lf.BODY_ENV] = request.param
    try:
        yield precompile(load_config("tiny-gpu"), 4, "verify", 256, 1)
    finally:
        common.build = real
        if old is None:
            os.environ.pop(lf.BODY_ENV, None)
        else:
            os.environ[lf.BODY_ENV] = old


def test_prefetch_regions_lie_inside_the_tasks_weights(step):
    pf, tb = step._prefetch_table(), step.table
    ops = tb[:, :, FIELD["opcode"]]
    seen = set()
    for s, t in zip(*np.nonzero(ops)):
        addr, nbytes, rows, stride = (int(v) for v in pf[s, t, :4])
        name = next(k for k, v in OPCODES.items() if v == ops[s, t])
        if name not in ("LINEAR_FP8", "MOE_ROUTER", "MOE_TOPK"):
            assert rows == 0, name
            continue
        seen.add(name)
        prog = step.programs[int(tb[s, t, FIELD["op"]])]
        if name == "MOE_TOPK":  # the selection bias, whole
            bias = prog.tensors[3]
            assert (addr, nbytes, rows, stride) == (bias.data_ptr(), bias.numel() * 4, 1, bias.numel() * 4)
            continue
        w = prog.tensors[1] if name == "LINEAR_FP8" else prog.tensors[2]  # meta: data_ptr() == 0
        c0, c1, c2 = (int(tb[s, t, FIELD[c]]) for c in ("c0", "c1", "c2"))
        row_bytes = w.stride(0) * w.element_size()
        assert rows > 0 and stride == row_bytes and addr + (rows - 1) * stride + nbytes <= w.numel() * w.element_size()
        if name == "MOE_ROUTER":  # the task's 4 experts' rows, whole
            assert (addr, nbytes) == (c0 * 4 * row_bytes, row_bytes)
        else:  # the tile's rows, its k split's bytes: the fused body's spec or the streaming GEMV's config
            if prog.key[0] == "linear_stream":
                cfg = prog.key[1]
                n, k, split, bn = cfg.n, cfg.k, cfg.split, cfg.rows
            else:
                spec = prog.key[2]
                n, k, split, bn = spec.n, spec.k, spec.split_k, spec.block_n
            kt = k // split
            assert nbytes == kt * w.element_size() and rows == min(bn, n - c0 * bn)
            assert addr == c0 * bn * row_bytes + c2 * nbytes
    assert seen == {"LINEAR_FP8", "MOE_ROUTER", "MOE_TOPK"}


def test_each_task_asks_for_the_next_ones_region(step, monkeypatch):
    # TILERT_PREFETCH_AHEAD=0, no quiet tasks: a task asks L2 for its successor's region (and for the
    # region-less tasks right after it); every region is asked for exactly once, before its task
    from tilert.kernels import switches

    monkeypatch.setenv(switches.QUIET_ENV, "none")
    pf, tb = step._prefetch_table(), step.table
    for s in range(tb.shape[0]):
        n = int(np.count_nonzero(tb[s, :, FIELD["opcode"]]))
        asker = {j: t for t in range(n) for j in range(int(pf[s, t, 4]), int(pf[s, t, 5]))}
        assert sorted(asker) == list(range(1, n)) and all(t < j for j, t in asker.items())
        assert all(asker[t + 1] == t for t in range(n - 1) if pf[s, t + 1, 2])  # a region: by the task before


def test_lookahead_ranges():
    from tilert.runtime.persistent.megakernel import PREFETCH_MAX_AHEAD, lookahead_ranges

    kb = [100, 200, 0, 0, 300, 100]
    assert lookahead_ranges(kb, 0) == [(1, 2), (2, 4), (4, 4), (4, 5), (5, 6), (6, 6)]
    # 300 bytes ahead: task 0 asks for 1-3 (200 bytes), task 1 for 4 (1-3 consumed but 2, 3 pending: 0 bytes)
    assert lookahead_ranges(kb, 300) == [(1, 4), (4, 5), (5, 5), (5, 5), (5, 6), (6, 6)]
    assert lookahead_ranges(kb, 10**9) == [(1, 6)] + [(6, 6)] * 5
    assert lookahead_ranges([], 0) == [] and lookahead_ranges([7], 0) == [(1, 1)]
    # the next region always, however large; never more than PREFETCH_MAX_AHEAD at once
    assert lookahead_ranges([1, 500, 1], 10) == [(1, 2), (2, 3), (3, 3)]
    # a quiet task (an expert task) asks for nothing: the region after it is left to its own task,
    # or with room ahead asked for by the task before the quiet ones
    kb, quiet = [196, 131, 98, 0, 0, 196, 131], [False, False, False, True, True, False, False]
    assert lookahead_ranges(kb, 0, quiet) == [(1, 2), (2, 3), (3, 5), (5, 5), (5, 5), (6, 7), (7, 7)]
    assert lookahead_ranges(kb, 256, quiet)[2] == (5, 6)
    many = lookahead_ranges([0] * 40, 0)
    assert all(hi - lo <= PREFETCH_MAX_AHEAD for lo, hi in many)
    assert [j for lo, hi in many for j in range(lo, hi)] == list(range(1, 40))


def test_quiet_experts_ask_for_nothing(monkeypatch, step):
    # the default: the expert tasks ask for nothing
    from tilert.kernels import switches
    from tilert.runtime.persistent.step import QUIET_OPCODES

    monkeypatch.delenv(switches.QUIET_ENV, raising=False)
    pf, tb = step._prefetch_table(), step.table
    quiet = {OPCODES[o] for o in QUIET_OPCODES["experts"]}
    ops = tb[:, :, FIELD["opcode"]]
    assert np.isin(ops, list(quiet)).any()
    for s, t in zip(*np.nonzero(np.isin(ops, list(quiet)))):
        assert pf[s, t, 4] == pf[s, t, 5]
    monkeypatch.setenv(switches.QUIET_ENV, "all")
    with pytest.raises(ValueError, match="TILERT_PREFETCH_QUIET='all'"):
        step._prefetch_table()


def test_prefetch_ahead_switch(monkeypatch):
    from tilert.kernels import switches

    monkeypatch.delenv(switches.AHEAD_ENV, raising=False)
    assert switches.prefetch_ahead() == "0"
    monkeypatch.setenv(switches.AHEAD_ENV, "0256")
    assert switches.prefetch_ahead() == "256"
    monkeypatch.setenv(switches.AHEAD_ENV, "1M")
    with pytest.raises(ValueError, match="TILERT_PREFETCH_AHEAD='1M'"):
        switches.prefetch_ahead()
