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


def test_prefetch_regions_lie_inside_the_tasks_weights(step, monkeypatch):
    from tilert.kernels import switches

    monkeypatch.setenv(switches.QUIET_ENV, "none")  # every region in the table
    pf, tb = step._prefetch_table(), step.table
    ops = tb[:, :, FIELD["opcode"]]
    seen = set()
    for s, t in zip(*np.nonzero(ops)):
        addr, nbytes, rows, stride = (int(v) for v in pf[s, t])
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


def test_quiet_experts_ask_for_nothing(monkeypatch, step):
    # the default: the loop asks L2 for the next task's region while a task runs, except while an
    # expert task runs: the region of a task after one is left out, every other region stays
    from tilert.kernels import switches
    from tilert.runtime.persistent.step import QUIET_OPCODES

    assert set(QUIET_OPCODES) == set(switches.QUIET_CHOICES)  # every choice the switch takes has its opcodes
    monkeypatch.setenv(switches.QUIET_ENV, "none")
    full = step._prefetch_table()
    monkeypatch.delenv(switches.QUIET_ENV)
    pf, tb = step._prefetch_table(), step.table
    ops = tb[:, :, FIELD["opcode"]]
    after_quiet = np.zeros(ops.shape, dtype=bool)
    after_quiet[:, 1:] = np.isin(ops[:, :-1], [OPCODES[o] for o in QUIET_OPCODES["experts"]])
    assert (full[after_quiet][:, 2] > 0).any()  # some of those tasks have a region to leave out
    assert (pf[after_quiet] == 0).all() and (pf[~after_quiet] == full[~after_quiet]).all()
    monkeypatch.setenv(switches.QUIET_ENV, "all")
    with pytest.raises(ValueError, match="TILERT_PREFETCH_QUIET='all'"):
        step._prefetch_table()
