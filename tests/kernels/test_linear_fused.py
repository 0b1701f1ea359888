"""Fused linear tile bodies (wgmma tile and the register GEMV): correctness on a Hopper GPU
(skipped without one), tiling and spec checks on CPU, sm_90a compiles (skipped without nvcc)."""

import dataclasses

import pytest
import torch

from tilert.kernels import common
from tilert.kernels import linear_fused as lf
from tilert.kernels.linear_tiling import gemm_shape, uses_gemv

needs_toolchain = pytest.mark.skipif(not common.has_toolchain(), reason=str(common.toolchain_reason()))


def spec(m, n, k, sms=132, gemv=True, **kw):
    bm, bn, bk, split = gemm_shape(m, n, k, sms, gemv)
    return lf.LinearSpec(m, n, k, bm, bn, bk, split, gemv=gemv, **kw)


# mimo-v2.5-pro rank 0 of 8: q (norm), o (+ residual), dense gate/up (norm), down, a small kv slice
MIMO = [(3072, 6144, 1e-6, None), (6144, 2048, None, "bfloat16"), (4096, 6144, 1e-6, None), (6144, 2048, None, None),
        (320, 6144, 1e-6, None)]  # fmt: skip


def test_gemv_tiling_fits_one_wave_and_divides_k():
    for m in (1, 8, 16):
        for n, k, _, _ in MIMO:
            bm, bn, bk, split = gemm_shape(m, n, k, 132, gemv=True)
            assert bk == lf.GEMV_CHUNK and bm == (8 if m <= 8 else 16) and bn % 16 == 0
            assert (k // bk) % split == 0 and -(-n // bn) * split <= 132
    assert uses_gemv("linear_fp8", 16, 6144) and not uses_gemv("linear_fp8", 17, 6144)
    assert not uses_gemv("linear_bf16", 1, 6144) and not uses_gemv("linear_fp8", 1, 6144 + 64)


def test_gemv_narrow_tiles_replace_a_k_split(monkeypatch):
    # q_proj at decode: 96 tasks either way, 32 rows over the whole K instead of 64 rows over half
    # (no split-K epilogue); where the narrow tiles would not fit a wave or would carry more bytes
    # per task, the 64-row tiling stays
    from tilert.kernels import linear_tiling as lt

    monkeypatch.delenv(lt.TILES_ENV, raising=False)
    assert gemm_shape(1, 3072, 6144, 132, gemv=True) == (8, 32, 64, 1)
    assert gemm_shape(8, 3072, 6144, 132, gemv=True) == (8, 32, 64, 1)
    assert gemm_shape(16, 3072, 6144, 132, gemv=True) == (16, 64, 64, 2)  # 16 x 6144 x 2 bytes of x: too many
    assert gemm_shape(1, 2048, 6144, 132, gemv=True) == (8, 64, 64, 4)  # 196 KB narrow tasks vs 98 KB split ones
    assert gemm_shape(1, 6144, 2048, 132, gemv=True) == (8, 64, 64, 1)  # no split to replace
    assert gemm_shape(1, 3072, 6144, 64, gemv=True) == (8, 64, 64, 1)  # 96 narrow tiles > 64 SMs
    monkeypatch.setenv(lt.TILES_ENV, "split")
    assert gemm_shape(1, 3072, 6144, 132, gemv=True) == (8, 64, 64, 2)
    monkeypatch.setenv(lt.TILES_ENV, "narrow")
    with pytest.raises(ValueError, match="TILERT_LINEAR_TILES='narrow'"):
        gemm_shape(1, 3072, 6144, 132, gemv=True)


def test_gemv_tasks_carry_enough_chunks():
    # a GEMV task's fixed cost is about 4 us: small projections get few tasks of >= 16 chunks
    # (k_proj 192 x 6144 was 96 tasks of 3 chunks), unless K itself has fewer chunks
    for n, k in [(192, 6144), (128, 6144), (3072, 6144), (6144, 2048), (64, 256)]:
        _, bn, bk, split = gemm_shape(1, n, k, 132, gemv=True)
        assert k // bk // split >= min(16, k // bk)
    assert gemm_shape(1, 192, 6144, 132, gemv=True)[3] == 6


def test_gemv_ring_fits_shared_memory():
    # the weight ring + x stage stay within GEMV_SMEM_BYTES, and the ring holds whole stages
    for m in (1, 8, 16):
        for n, k, _, _ in MIMO + [(192, 6144, None, None), (200, 1024, None, None)]:
            s = spec(m, n, k)
            sk, ns = lf.gemv_stages(s)
            nck = k // lf.GEMV_CHUNK // s.split_k
            assert nck % sk == 0 and 1 <= ns <= nck // sk
            ring = ns * s.block_n * (sk * lf.GEMV_CHUNK + lf.GEMV_ROW_PAD)
            x = (1 << (min(s.block_m, m) - 1).bit_length()) * (k // s.split_k) * 2
            assert ring <= lf.GEMV_RING_BYTES and (ns == 1 or ring + x <= lf.GEMV_SMEM_BYTES)


def test_gemv_spec_is_checked():
    with pytest.raises(ValueError, match="GEMV body"):
        lf.LinearSpec(32, 64, 256, 16, 64, 64, 1, gemv=True)  # too many tokens
    with pytest.raises(ValueError, match="GEMV body"):
        lf.LinearSpec(1, 64, 256, 8, 64, 64, 1, w_dtype="bfloat16", gemv=True)


def test_reference_composes_the_ops_on_cpu():
    s = spec(3, 128, 256, norm_eps=1e-5, res_dtype="float32", out_dtype="float32")
    t = lf.make_inputs(s, seed=1, device="cpu")
    ref = lf.reference(s, t["x"], t["w"], t["scale_inv"], t["gamma"], t["residual"])
    xf = t["x"][:3].float()
    xn = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * t["gamma"].float()).bfloat16().float()
    from tilert.numerics import fp8

    w = fp8.dequantize_blocks(t["w"], t["scale_inv"], dtype=torch.float32)
    torch.testing.assert_close(ref, xn @ w.t() + t["residual"][:3].float())
    assert torch.isnan(t["out"]).all()  # poisoned


@needs_toolchain
@pytest.mark.parametrize("m", [1, 8])
def test_gemv_compiles_for_sm90a(m):
    for n, k, eps, res in MIMO[:2]:
        lf.make_kernel(spec(m, n, k, norm_eps=eps, res_dtype=res))  # builds the prim_func
        common.build(lf.make_kernel(spec(m, n, k, norm_eps=eps, res_dtype=res)))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 8, 16])
@pytest.mark.parametrize("n, k, eps, res", MIMO)
def test_gemv_mimo_shapes(m, n, k, eps, res):
    s = spec(m, n, k, norm_eps=eps, res_dtype=res)
    assert lf.check(s) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize(
    "m, n, k, kw",
    [
        (3, 200, 1024, {"norm_eps": 1e-5, "res_dtype": "float32", "out_dtype": "float32"}),
        (13, 72, 256, {"scale_rows": 1}),
        (5, 1000, 384, {"norm_eps": 1e-6}),
        (16, 64, 128, {"res_dtype": "bfloat16"}),
    ],
)
def test_gemv_odd_shapes(m, n, k, kw):
    assert lf.check(spec(m, n, k, **kw)) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("split", [1, 2, 6])
def test_gemv_split_k_last_arriver(split):
    s = dataclasses.replace(spec(2, 256, 1536, norm_eps=1e-6, res_dtype="bfloat16"), split_k=split)
    assert lf.check(s) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize(
    "m, n, k, kw",
    [(1, 3072, 6144, {"norm_eps": 1e-6}), (40, 640, 1024, {"res_dtype": "bfloat16"}),
     (8, 1000, 512, {"w_dtype": "bfloat16"}), (4, 256, 64, {})],  # K = 64: one k step
)  # fmt: skip
def test_wgmma_tile_body(m, n, k, kw):
    assert lf.check(spec(m, n, k, gemv=False, **kw)) < 1e-2
