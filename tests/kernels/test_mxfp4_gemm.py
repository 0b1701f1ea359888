"""MXFP4 GEMM: correctness on a Hopper GPU (skipped without one) and input validation on CPU."""

import dataclasses

import pytest
import torch

from tilert.kernels import mxfp4_gemm
from tilert.numerics import mxfp4
from tilert.ops.linear import mxfp4_linear

ODD = [(1, 200, 224), (3, 64, 32 * 7), (8, 130, 32 * 33), (17, 1000, 32 * 5), (64, 96, 512)]
MIMO = [(m, n, k) for m in (1, 8, 17, 64) for (n, k) in mxfp4_gemm.MIMO_SHAPES.values()]


def test_reference_is_ops():
    assert mxfp4_gemm.reference is mxfp4_linear


@pytest.mark.parametrize(
    "shapes, err",
    [
        (((2, 64), (16, 16), (16, 2)), "blocks shape"),
        (((2, 64), (16, 32), (16, 3)), "scales shape"),
        (((2, 48), (16, 24), (16, 1)), "multiple of 32"),
    ],
)
def test_bad_shapes(shapes, err):
    (xs, bs, ss) = shapes
    x = torch.randn(*xs).to(torch.bfloat16)
    with pytest.raises(ValueError, match=err):
        mxfp4_gemm.run(x, torch.zeros(bs, dtype=torch.uint8), torch.zeros(ss, dtype=torch.uint8))


def test_bad_dtype():
    with pytest.raises(TypeError, match="bfloat16"):
        u8 = torch.uint8
        mxfp4_gemm.run(torch.randn(2, 64), torch.zeros(16, 32, dtype=u8), torch.zeros(16, 2, dtype=u8))


def test_plan_configs_dedupe():
    cfgs = mxfp4_gemm.configs_for_plan()
    assert len(cfgs) == len(set(cfgs)) and all(c.k % c.block_k == 0 for c in cfgs)


@pytest.mark.gpu
@pytest.mark.parametrize("m, n, k", ODD + MIMO)
def test_mxfp4_gemm(m, n, k):
    err = mxfp4_gemm.check(m, n, k)
    assert err < 1e-2, f"rel err {err:.3e} (M={m}, N={n}, K={k})"


DECODE_ORDER_SHAPES = [(17, 1000, 32 * 5), (64, 4096, 2048)]  # scripts/precompile_gpu.py --mxfp4-decode builds these


@pytest.mark.gpu
@pytest.mark.parametrize("m, n, k", DECODE_ORDER_SHAPES)
def test_mxfp4_gemm_in_decode_order(monkeypatch, m, n, k):
    # TILERT_MXFP4_ORDER=decode: the weights quantised into the decode word order, the kernel built
    # with its decode
    monkeypatch.setenv(mxfp4.ORDER_ENV, "decode")
    err = mxfp4_gemm.check(m, n, k)
    assert err < 1e-2, f"rel err {err:.3e} (M={m}, N={n}, K={k})"


@pytest.mark.gpu
def test_mxfp4_gemm_no_split():
    cfg = dataclasses.replace(mxfp4_gemm.pick_config(8, 4096, 2048), split_k=1)
    assert mxfp4_gemm.check(8, 4096, 2048, cfg=cfg) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("m, split", [(1, 3), (5, 2), (16, 4)])
def test_mxfp4_gemm_split_k(m, split):
    # uneven split: the last split's chunk range runs past K (those blocks must read as 0)
    cfg = dataclasses.replace(mxfp4_gemm.pick_config(m, 520, 32 * 37), split_k=split)
    assert mxfp4_gemm.check(m, 520, 32 * 37, cfg=cfg) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("wscale", [1e-30, 3e3])
def test_mxfp4_gemm_extreme_scales(wscale):
    # tiny weights: scale codes near 0 (bf16 subnormal products); large: scale codes > 128
    # (the second bf16x2 multiply)
    assert mxfp4_gemm.check(8, 256, 1024, wscale=wscale) < 1e-2
