"""CPU: compile (for sm_90a, no GPU needed) every kernel config the mimo-v2.5-pro 8-rank plan uses."""

import pytest

from tilert.kernels import common, fp8_gemm, moe, mxfp4_gemm

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


@pytest.mark.parametrize("cfg", F8, ids=_ids(F8))
def test_fp8(cfg):
    assert "wgmma" in common.build(fp8_gemm.make_kernel(cfg)).get_kernel_source()


@pytest.mark.parametrize("cfg", MOE, ids=_ids(MOE))
def test_moe(cfg):
    for f in moe.make_kernels(cfg):
        assert common.build(f).get_kernel_source()
