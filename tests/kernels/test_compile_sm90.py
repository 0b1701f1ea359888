"""CPU: compile (for sm_90a, no GPU needed) every kernel config the mimo-v2.5-pro 8-rank plan uses."""

import pytest

from tilert.kernels import common, fp8_gemm, moe, mxfp4_gemm
from tilert.numerics import mxfp4

pytestmark = pytest.mark.skipif(not common.has_toolchain(), reason=str(common.toolchain_reason()))

PLAN_M = (1, 8, 16, 64)
PLAN_T = (1, 8, 16)


def _ids(cfgs):
    return [repr(c).replace(" ", "") for c in cfgs]


MX = mxfp4_gemm.configs_for_plan(PLAN_M)
F8 = fp8_gemm.configs_for_plan(PLAN_M)
MOE = moe.configs_for_plan(PLAN_T)


@pytest.mark.parametrize("cfg", MX, ids=_ids(MX))
def test_mxfp4(cfg):
    src = common.build(mxfp4_gemm.make_kernel(cfg)).get_kernel_source()
    assert "mma_sync" in src and "tilert_e2m1x2" in src


def test_mxfp4_decode_order(monkeypatch):
    # TILERT_MXFP4_ORDER=decode: the GEMM's mainloop decodes with tilert_e2m1x2_ord
    monkeypatch.setenv(mxfp4.ORDER_ENV, "decode")
    src = common.build(mxfp4_gemm.make_kernel(MX[0])).get_kernel_source()
    body = src[src.index("__global__") :]
    assert "tilert_e2m1x2_ord(" in body and "tilert_e2m1x2(" not in body


@pytest.mark.parametrize("cfg", F8, ids=_ids(F8))
def test_fp8(cfg):
    assert "wgmma" in common.build(fp8_gemm.make_kernel(cfg)).get_kernel_source()


@pytest.mark.parametrize("cfg", MOE, ids=_ids(MOE))
def test_moe(cfg):
    for f in moe.make_kernels(cfg):
        assert common.build(f).get_kernel_source()
