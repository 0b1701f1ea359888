"""Column-block bodies (embed, silu_mul, concat, add, solo all-reduce): correctness on a Hopper GPU
(skipped without one) and sm_90a compiles on CPU (skipped without tilelang / nvcc)."""

import pytest
import torch

from tilert.kernels import common
from tilert.kernels import elementwise as ew
from tilert.kernels.elementwise import (
    BF16,
    F32,
    AddConfig,
    AllReduceConfig,
    ConcatConfig,
    EmbedConfig,
    SiluMulConfig,
)

needs_toolchain = pytest.mark.skipif(not common.has_toolchain(), reason=str(common.toolchain_reason()))


def _ids(cfgs):
    return [repr(c).replace(" ", "") for c in cfgs]


# ---- CPU: configs and references -------------------------------------------------------------------


def test_vector_width_and_blocks():
    assert ew._vec(2048, 6144, dtypes=(BF16,)) == 8
    assert ew._vec(2048, 6144, dtypes=(F32, BF16)) == 4
    assert ew._vec(2048, 1002, dtypes=(BF16,)) == 2
    assert ew._vec(2048, 1001, dtypes=(BF16,)) == 1
    assert ew.n_blocks(EmbedConfig(1, 10, 6144)) == 3
    assert ew.n_blocks(AllReduceConfig(1, 6144, 8)) == 6
    assert ew.n_blocks(ConcatConfig(1, (6144, 6144, 100))) == 7
    assert AllReduceConfig(1, 6144, 8).chunk == 128
    assert AllReduceConfig(1, 1002, 3).chunk == 342  # vec 2


def test_references_on_cpu():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 10, generator=g)
    b = torch.randn(3, 10, generator=g).to(torch.bfloat16)
    torch.testing.assert_close(ew.reference(AddConfig(3, 10), a, b), a + b.float())
    torch.testing.assert_close(
        ew.reference(SiluMulConfig(3, 10), b, b), torch.nn.functional.silu(b.float()) * b.float()
    )
    torch.testing.assert_close(ew.reference(ConcatConfig(3, (10, 10)), b, b), torch.cat([b, b], -1).float())
    table = torch.randn(7, 10, generator=g).to(torch.bfloat16)
    tok = torch.tensor([6, 0, 3], dtype=torch.int32)
    torch.testing.assert_close(ew.reference(EmbedConfig(3, 7, 10), table, tok), table[tok.long()].float())
    # solo all-reduce: rank 0's partial (+ residual)
    torch.testing.assert_close(ew.reference(AllReduceConfig(3, 10, 8, True), a, b), b.float() + a)
    torch.testing.assert_close(ew.reference(AllReduceConfig(3, 10, 8, False), a), a)


def test_bad_cols():
    with pytest.raises(ValueError, match="multiple of 256"):
        ew.make_body(AddConfig(1, 10, cols=100))


# ---- GPU: against the references ---------------------------------------------------------------------

EXACT = [  # copies: bit-exact
    EmbedConfig(3, 1000, 1000),
    EmbedConfig(17, 4099, 4100),  # 3 blocks, the last partial; vec 4
    EmbedConfig(2, 33, 1002),  # vec 2
    EmbedConfig(1, 152576, 6144),  # mimo table: ids up to 152575 (the last row is always picked)
    EmbedConfig(8, 152576, 6144),
    ConcatConfig(3, (256, 1000, 136)),
    ConcatConfig(5, (6144, 6144, 6144)),
    ConcatConfig(2, (1001, 3)),  # vec 1, a vector never crosses inputs
    ConcatConfig(16, (2000, 2096, 5000)),  # inputs straddle column blocks
]
ARITH = [  # f32 math, one rounding to the output dtype: equal to the reference rounded the same way
    AddConfig(3, 1000, F32, BF16, BF16),
    AddConfig(3, 1000, BF16, BF16, BF16),
    AddConfig(17, 4100, F32, F32, F32),
    AddConfig(8, 6144, BF16, F32, F32, cols=1024),  # all_reduce_residual at world 1
    AddConfig(1, 1001, F32, BF16, F32),
    AllReduceConfig(3, 1000, 1, True),
    AllReduceConfig(3, 1000, 2, True),
    AllReduceConfig(3, 1000, 8, True),
    AllReduceConfig(5, 1002, 3, True, F32, F32, F32),  # vec 2, chunk 342
    AllReduceConfig(16, 6144, 8, True),
    AllReduceConfig(8, 6144, 4, False, F32, BF16, F32),
    AllReduceConfig(1, 6144, 8, False, BF16, BF16, BF16),
    AllReduceConfig(2, 4100, 8, True, BF16, BF16, F32),
]
SILU = [SiluMulConfig(3, 1000), SiluMulConfig(17, 4100), SiluMulConfig(8, 2048), SiluMulConfig(1, 1002)]


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", EXACT, ids=_ids(EXACT))
def test_copies_exact(cfg):
    assert ew.check(cfg, seed=1) == 0.0


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", ARITH, ids=_ids(ARITH))
def test_add_and_all_reduce(cfg):
    for seed in (1, 2):
        err = ew.check(cfg, seed=seed)
        assert err < 1e-6, f"rel err {err:.3e} ({cfg})"


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", SILU, ids=_ids(SILU))
def test_silu_mul(cfg):
    err = ew.check(cfg, seed=3)
    assert err < 5e-3, f"rel err {err:.3e} ({cfg})"  # expf vs torch's exp: at most 1 bf16 ulp apart


@pytest.mark.gpu
def test_run_embed():
    cfg = EmbedConfig(4, 50, 3000)
    table = torch.randn(50, 3000, device="cuda").to(torch.bfloat16)
    tok = torch.tensor([3, 49, 0, 3], dtype=torch.int32, device="cuda")
    assert torch.equal(ew.run(cfg, table, tok), table[tok.long()])


# ---- CPU: sm_90a compiles of the mimo-v2.5-pro shapes ---------------------------------------------------

H = ew.MIMO_HIDDEN
PLAN = [
    EmbedConfig(1, 152576, H),
    EmbedConfig(8, 152576, H),
    SiluMulConfig(8, 2048),
    ConcatConfig(8, (H, H, H)),
    AddConfig(1, H, F32, BF16, BF16),
    AddConfig(8, H, F32, BF16, BF16),
    AllReduceConfig(1, H, 8, True),
    AllReduceConfig(8, H, 8, True),
    AllReduceConfig(8, H, 1, False, F32, BF16, F32),
]


@needs_toolchain
@pytest.mark.parametrize("cfg", PLAN, ids=_ids(PLAN))
def test_compile_sm90(cfg):
    src = ew.compiled(cfg).get_kernel_source()
    assert "__launch_bounds__(256" in src
    assert "uint4" in src or "float4" in src  # 16-byte vector accesses
    assert "tma" not in src.lower() and "blockIdx.y" not in src
    if isinstance(cfg, AllReduceConfig) and cfg.world > 1:
        assert src.count("__syncthreads()") == 2
    else:
        assert "__syncthreads" not in src
