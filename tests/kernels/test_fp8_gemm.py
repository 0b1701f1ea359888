"""FP8 block-scaled GEMM: correctness on a Hopper GPU (skipped without one), validation on CPU."""

import pytest
import torch

from tilert.kernels import fp8_gemm
from tilert.ops.linear import fp8_linear

ODD = [(1, 200, 224), (3, 64, 32 * 7), (8, 130, 32 * 33), (17, 1000, 384), (64, 96, 512)]
MIMO = [(m, *fp8_gemm.MIMO_SHAPES[nm]) for m in (1, 8, 17, 64) for nm in fp8_gemm.PLAN_SHAPES]


def test_reference_is_ops():
    assert fp8_gemm.reference is fp8_linear


def test_bad_inputs():
    x = torch.randn(2, 256).to(torch.bfloat16)
    q = torch.zeros(64, 256).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="scale_inv shape"):
        fp8_gemm.run(x, q, torch.ones(2, 2))
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        fp8_gemm.run(x, q.to(torch.bfloat16), torch.ones(1, 2))
    with pytest.raises(ValueError, match="multiple of 32"):
        fp8_gemm.run(torch.randn(2, 48).to(torch.bfloat16), q[:, :48], torch.ones(1, 1))


@pytest.mark.gpu
@pytest.mark.parametrize("m, n, k", ODD + MIMO)
def test_fp8_gemm(m, n, k):
    err = fp8_gemm.check(m, n, k)
    assert err < 1e-2, f"rel err {err:.3e} (M={m}, N={n}, K={k})"
