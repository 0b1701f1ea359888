"""The persistent step's weight-prefetch table (CPU, meta tensors, nothing compiled): every fp8
linear and MoE router task names a region inside its own weight tensor, rows and bytes as the
task's tile reads them; tasks without a region (experts, attention, elementwise) have none."""

from __future__ import annotations

import numpy as np
import pytest

import tilert.kernels.common as common
from tilert.abi import FIELD, OPCODES
from tilert.models.config import load_config

pytest.importorskip("tilelang")  # the step's prim_func is built (not compiled) with TileLang


@pytest.fixture(scope="module")
def step():
    from tilert.engine.persistent import precompile

    real = common.build
    common.build = lambda func, **kw: func  # the prim_func is built, not compiled
    try:
        yield precompile(load_config("tiny-gpu"), 4, "verify", 256, 1)
    finally:
        common.build = real


def test_prefetch_regions_lie_inside_the_tasks_weights(step):
    pf, tb = step._prefetch_table(), step.table
    ops = tb[:, :, FIELD["opcode"]]
    seen = set()
    for s, t in zip(*np.nonzero(ops)):
        addr, nbytes, rows, stride = (int(v) for v in pf[s, t])
        name = next(k for k, v in OPCODES.items() if v == ops[s, t])
        if name not in ("LINEAR_FP8", "MOE_ROUTER"):
            assert rows == 0, name
            continue
        seen.add(name)
        prog = step.programs[int(tb[s, t, FIELD["op"]])]
        w = prog.tensors[1] if name == "LINEAR_FP8" else prog.tensors[2]  # meta: data_ptr() == 0
        c0, c1, c2 = (int(tb[s, t, FIELD[c]]) for c in ("c0", "c1", "c2"))
        row_bytes = w.stride(0) * w.element_size()
        assert rows > 0 and stride == row_bytes and addr + (rows - 1) * stride + nbytes <= w.numel() * w.element_size()
        if name == "MOE_ROUTER":  # the task's 4 experts' rows, whole
            assert (addr, nbytes) == (c0 * 4 * row_bytes, row_bytes)
        else:  # the tile's rows, its k split's bytes
            spec = prog.key[2]
            kt = spec.k // spec.split_k
            assert nbytes == kt * w.element_size() and rows == min(spec.block_n, spec.n - c0 * spec.block_n)
            assert addr == c0 * spec.block_n * row_bytes + c2 * nbytes
    assert seen == {"LINEAR_FP8", "MOE_ROUTER"}
