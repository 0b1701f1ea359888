"""Streaming GEMV (tilert/kernels/gemv.py): tiling and plan checks and the dequant bit tricks on the
CPU, sm_90a compiles (skipped without nvcc), correctness on a Hopper GPU (skipped without one)."""

import os
import re

import pytest
import torch

from tilert.cli.compile import _steps
from tilert.kernels import common, fp8_gemm, gemv, mxfp4_gemm
from tilert.models.config import load_config
from tilert.numerics import mxfp4
from tilert.passes.manager import PassContext, passes_until, run_passes

needs_toolchain = pytest.mark.skipif(not common.has_toolchain(), reason=str(common.toolchain_reason()))
THOROUGH = os.environ.get("TILERT_THOROUGH") == "1"  # compile every plan, sweep and test config

SHAPES = sorted(gemv.PLAN_SHAPES) + sorted(gemv.EXTRA_SHAPES)
C = gemv.Config
# odd shapes: N not a multiple of the tile, K not a multiple of the chunk (MXFP4 scale rows not
# 16-byte aligned: the byte-load path), uneven splits (the last split runs past K), depth 2,
# every warp layout, bf16 output, tall tiles
ODD = [
    C("mxfp4", 3, 136, 32 * 37, wr=1, g=1, split=3, depth=2),
    C("mxfp4", 7, 136, 32 * 133, wr=2, g=2, split=2, depth=3),
    C("mxfp4", 16, 520, 2048, wr=4, g=2, split=4, depth=3, out_dtype="bfloat16"),
    C("mxfp4", 1, 200, 224, wr=8, g=1, split=1, depth=2),
    C("mxfp4", 16, 4096, 6144, wr=2, g=4, split=3, depth=3),
    C("fp8", 16, 136, 32 * 37, wr=8, g=1, split=5, depth=2),
    C("fp8", 3, 136, 32 * 37, wr=1, g=4, split=1, depth=4),
    C("fp8", 7, 300, 2048 + 96, wr=4, g=1, split=3, depth=3, ctas=2),
    C("fp8", 1, 192, 6144, wr=1, g=1, split=11, depth=3),
    C("fp8", 4, 24, 64, wr=8, g=1, split=1, depth=2),  # the tiny models' shapes: 1 chunk, 24 of 128 rows
]
STREAM = [
    C("fp8", 8, 192, 6144, wr=1, g=1, split=6, depth=3),
    C("mxfp4", 16, 136, 32 * 37, wr=1, g=1, split=3, depth=2),
]
TEST_M = (1, 3, 7, 8, 16)


def stream_copies(cfg: gemv.Config) -> int:
    """Copies for a stream test: some of the 132 CTAs run three tasks (prefetch across tasks and
    both x buffers)."""
    return 2 * 132 // cfg.tiles + 2


def test_config_rejects_bad_tilings():
    with pytest.raises(ValueError, match="fmt"):
        C("int4", 1, 64, 256)
    with pytest.raises(ValueError, match="m 17"):
        C("fp8", 17, 64, 256)
    with pytest.raises(ValueError, match="multiple of 32"):
        C("fp8", 1, 64, 250)
    with pytest.raises(ValueError, match="without chunks"):
        C("fp8", 1, 64, 640, split=9)  # 10 chunks: splits of 2 leave the ninth empty
    with pytest.raises(ValueError, match="shared memory"):
        C("mxfp4", 16, 64, 6144, g=4, depth=16)


def plan_shapes(model: str = "mimo-v2.5-pro", world: int = 8, block: int = 8) -> dict[tuple[str, int, int], set]:
    """(fmt, N, K) -> {token counts} of rank 0's linear_fp8 / linear_mxfp4 / linear_bf16 nodes in the
    decode, verify and drafter steps of `model` sharded `world` ways (the compiler up to fuse_linear)."""
    fmts = {"linear_fp8": "fp8", "linear_mxfp4": "mxfp4", "linear_bf16": "bf16"}
    out: dict[tuple[str, int, int], set] = {}
    for _, g in _steps(load_config(model), block, 4096):
        rank0 = run_passes(g, PassContext(world=world), passes_until("fuse_linear"))[0]
        for node in rank0.nodes:
            if node.op in fmts:
                x, w = (rank0.values[v] for v in node.inputs[:2])
                m = 1
                for d in x.shape[:-1]:
                    m *= d
                out.setdefault((fmts[node.op], w.shape[0], w.shape[1]), set()).add(m)
    return out


def test_plan_shapes_match_the_compiler():
    # the table the benchmarks, compile tests and precompile use is the rank-0 plan's, and the
    # drafter's bf16 projections are covered by it (same N, K) or by EXTRA_SHAPES
    found = plan_shapes()
    fp8 = {(n, k) for (f, n, k) in found if f == "fp8"}
    assert fp8 == {(n, k) for (f, n, k) in gemv.PLAN_SHAPES}
    assert all(found[s] == {1, 8} for s in found if s[0] == "fp8")
    lm_head = 152576 // 8
    drafter = {(n, k) for (f, n, k) in found if f == "bf16" and n != lm_head}
    assert drafter <= {(n, k) for (f, n, k) in list(gemv.PLAN_SHAPES) + list(gemv.EXTRA_SHAPES)}


@pytest.mark.parametrize("shape", SHAPES, ids=[f"{f}-{n}x{k}" for f, n, k in SHAPES])
def test_pick_config_fits_and_covers(shape):
    fmt, n, k = shape
    for m in range(1, gemv.MAX_M + 1):
        cfg = gemv.pick_config(fmt, m, n, k)
        assert (cfg.m, cfg.n, cfg.k) == (m, n, k)
        assert gemv.smem_bytes(cfg) * cfg.ctas <= gemv.SMEM_LIMIT
        assert cfg.ncs >= cfg.wk and (cfg.split - 1) * cfg.ncs < cfg.chunks
        assert cfg.tiles <= 8 * 132


@pytest.mark.parametrize("n, k", [(16, 64), (24, 64), (48, 64), (8, 32)])
def test_pick_config_takes_tiny_shapes(n, k):
    # the tiny test models' projections (fewer chunks than warps along k, fewer rows than a tile)
    for fmt in ("fp8", "mxfp4"):
        for m in (1, 4, 16):
            cfg = gemv.pick_config(fmt, m, n, k)
            assert cfg.split == 1 and (cfg.m, cfg.n, cfg.k) == (m, n, k)


def test_model_prefers_filling_the_sms():
    # one tile on each of 8 SMs cannot stream 12 MB as fast as tiles on all of them
    few = C("fp8", 1, 2048, 6144, wr=8, g=2, split=1, depth=8)
    many = C("fp8", 1, 2048, 6144, wr=1, g=1, split=1, depth=6)
    assert gemv.model_time(many) < gemv.model_time(few)


def _prmt(a: int, b: int, sel: int) -> int:
    """PTX prmt.b32 (default mode): selector nibble bit 3 replicates the picked byte's sign bit."""
    src = [(a >> 8 * i) & 0xFF for i in range(4)] + [(b >> 8 * i) & 0xFF for i in range(4)]
    out = 0
    for n in range(4):
        nib = (sel >> 4 * n) & 0xF
        byte = src[nib & 7]
        if nib & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << 8 * n
    return out


def _bf16_halves(u: int) -> list[float]:
    t = torch.tensor([u & 0xFFFF, u >> 16], dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    return t.float().tolist()


def test_e2m1_planes_decode_every_byte(monkeypatch):
    # tilert_e2m1x2_lh in GEMV_PRELUDE: for every byte value in every byte position, the two bf16
    # halves are the E2M1 codes of its low and high nibble times 2^-126 (before the scale multiply)
    monkeypatch.setenv(mxfp4.ORDER_ENV, "published")  # the bytes below are published-order codes
    codes = torch.arange(256, dtype=torch.uint8)
    vals = mxfp4.dequantize(codes.view(8, 32), torch.full((8, 2), 127, dtype=torch.uint8)).flatten()
    for b in range(4):
        sel = 0xC480 + 0x1111 * b
        assert f"{sel:04x}" == "".join(f"{v:x}" for v in (12 + b, 4 + b, 8 | b, b))
        for byte in range(256):
            w = (byte << 8 * b) | (0x5A << 8 * ((b + 1) % 4))  # a neighbour byte must not leak in
            lo, hi = w & 0x0F0F0F0F, (w >> 4) & 0x0F0F0F0F
            r = ((_prmt(lo, hi, sel) * 0x1040) & 0xFFFFFFFF) & 0x81C081C0
            got = [v * 2.0**126 for v in _bf16_halves(r)]
            assert got == [vals[2 * byte].item(), vals[2 * byte + 1].item()], (b, byte)


def _rotl(w: int, k: int) -> int:
    return ((w << k) | (w >> (32 - k))) & 0xFFFFFFFF if k else w


def test_e2m1_decode_order_decodes_every_byte(monkeypatch):
    # tilert_e2m1x2_ord (kernels/common.py) on words in TILERT_MXFP4_ORDER=decode: for each published
    # byte b and each of its 256 values, with the word's other bytes random (they must not leak in),
    # the two bf16 halves are the E2M1 codes of its low and high nibble times 2^-126
    monkeypatch.setenv(mxfp4.ORDER_ENV, "decode")
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    vals = mxfp4.E2M1_VALUES.tolist()
    for b in range(4):
        pub = torch.randint(0, 256, (256, 4), dtype=torch.uint8, generator=g)
        pub[:, b] = torch.arange(256, dtype=torch.uint8)
        words = mxfp4.to_order(pub.reshape(1, -1)).view(torch.int32).flatten().tolist()
        for byte, w in enumerate(words):
            w &= 0xFFFFFFFF
            y = (_rotl(w, 10), _rotl(w, 13), ((w & 0x001B001B) * 0x1084) & 0xFFFFFFFF)[b - 1] if b else w
            got = [v * 2.0**126 for v in _bf16_halves(y & 0x81C081C0)]
            assert got == [vals[byte & 15], vals[byte >> 4]], (b, byte)


def test_e4m3_sign_replicate_decodes_every_byte():
    # tilert_e4m3x2_sx: bytes (0, 1) with selector 0x9180 and (2, 3) with 0xB3A2 become bf16 values
    # times 2^-120, exact for every finite e4m3 code (subnormals included)
    ref = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    for sel, (i, j) in ((0x9180, (0, 1)), (0xB3A2, (2, 3))):
        for byte in range(256):
            if byte & 0x7F == 0x7F:  # NaN codes
                continue
            other = 0xC3  # the pair's other byte (a negative normal); the rest must not leak in
            w = (byte << 8 * i) | (other << 8 * j) | (0x7777 << 8 * (2 - i))
            r = ((_prmt(w, w, sel) << 4) & 0xFFFFFFFF) & 0x87F087F0
            got = [v * 2.0**120 for v in _bf16_halves(r)]
            assert got == [ref[byte].item(), ref[other].item()], (sel, byte)


def test_gemv_dispatch_rejects_what_it_cannot_load():
    x = torch.zeros(17, 256, dtype=torch.bfloat16)
    w, s = torch.zeros(64, 128, dtype=torch.uint8), torch.zeros(64, 8, dtype=torch.uint8)
    assert not gemv.supports("mxfp4", x, w, s)  # 17 tokens
    assert gemv.supports("mxfp4", x[:16], w, s)
    odd = torch.zeros(16 * 256 + 1, dtype=torch.bfloat16)[1:].view(16, 256)  # 2 bytes off alignment
    assert not gemv.supports("mxfp4", odd, w, s)
    with pytest.raises(ValueError, match="unsupported operands"):
        gemv.run("mxfp4", x, w, s)


def test_old_kernels_keep_large_m_only_when_the_gemv_is_enabled(monkeypatch):
    monkeypatch.setenv("TILERT_GEMV", "1")
    assert all(c.m > gemv.MAX_M for c in mxfp4_gemm.configs_for_plan() + fp8_gemm.configs_for_plan())
    assert isinstance(fp8_gemm.eager_config(8, 3072, 6144), gemv.Config)
    assert isinstance(fp8_gemm.eager_config(17, 3072, 6144), fp8_gemm.Config)
    assert isinstance(mxfp4_gemm.eager_config(16, 4096, 6144), gemv.Config)
    monkeypatch.setenv("TILERT_GEMV", "0")  # the default until the GEMV has run on a GPU
    assert isinstance(fp8_gemm.eager_config(8, 3072, 6144), fp8_gemm.Config)
    assert any(c.m <= gemv.MAX_M for c in mxfp4_gemm.configs_for_plan() + fp8_gemm.configs_for_plan())


def _compile_set() -> list[gemv.Config]:
    """The plan's configs (decode, verify, M = 16) and the odd tilings (about 3 s each); with
    TILERT_THOROUGH=1 also the extra shapes and every configuration the GPU tests pick."""
    cfgs = set(gemv.configs_for_plan(extra=THOROUGH)) | set(ODD)
    if THOROUGH:
        cfgs |= {gemv.pick_config(f, m, n, k) for (f, n, k) in SHAPES for m in TEST_M}
    return sorted(cfgs, key=repr)


@needs_toolchain
@pytest.mark.timeout(900)
@pytest.mark.parametrize("cfg", _compile_set(), ids=repr)
def test_compiles_for_sm90a_without_mainloop_barriers(cfg):
    from tilert.kernels import sass

    kern = gemv.compiled(cfg)
    src = kern.get_kernel_source()
    assert "tilert_cp_async16" in src and "tilert_cp_async_wait" in src and "mma_sync" in src
    dyn = _dynamic_smem(kern.get_host_source())
    assert dyn is None or dyn <= gemv.smem_bytes(cfg), (dyn, gemv.smem_bytes(cfg))
    # the private rings need no barrier in the mainloop: prologue, after the loop, the reduction,
    # the end (+ the split-K hand-over's two)
    assert src.count("__syncthreads()") == 4 + 2 * (cfg.split > 1), cfg
    lib = sass.library_of(src, common.cache_dir())
    if lib is not None and sass.find_nvdisasm():
        code = sass.disassemble(lib)
        assert "LDGSTS" in code and "HMMA" in code
        assert "LDL" not in code and "STL" not in code, f"{cfg}: registers spilled to local memory"


def _dynamic_smem(host: str) -> int | None:
    """The dynamic shared memory a TileLang host stub launches with (the value after the block
    dims 256, 1, 1), or None when the stub's form is not recognised."""
    vals = [int(v) for v in re.findall(r"v_int64\) = \(\(int64_t\)(\d+)\)", host)]
    at = [j + 3 for j in range(len(vals) - 3) if vals[j : j + 3] == [256, 1, 1]]
    return vals[at[0]] if at else None


def _static_smem(src: str) -> int:
    return sum(int(n) * 4 for n in re.findall(r"__shared__ __align__\(16\) (?:float|int) \w+\[(\d+)\]", src))


@needs_toolchain
@pytest.mark.timeout(600)
@pytest.mark.parametrize("prefetch", [False, True])
def test_stream_launcher_compiles(prefetch):
    for cfg in STREAM if THOROUGH else STREAM[:1]:
        kern = gemv.compiled_stream(cfg, 2, 132, prefetch)
        src = kern.get_kernel_source()
        assert "Ptrs" in src and src.count("__syncthreads()") == 4 + 2 * (cfg.split > 1)
        dyn = _dynamic_smem(kern.get_host_source())
        assert dyn is None or dyn + _static_smem(src) <= gemv.smem_bytes(cfg, prefetch)
        # prefetch: the reduction buffers must stay out of the merged block the next task's copies land in
        assert ("__shared__ __align__(16) float red[" in src) == prefetch


def test_prefetch_needs_the_next_tasks_chunks_to_fit():
    cfg = C("fp8", 8, 192, 6144, wr=1, g=1, split=6, depth=4)  # 2 chunks a warp, 3 issued ahead
    assert cfg.items == 2 and not gemv.prefetch_ok(cfg)
    with pytest.raises(ValueError, match="prefetch"):
        gemv.make_stream_kernel(cfg, 2, 132, prefetch=True)
    assert gemv.prefetch_ok(STREAM[0])


# --- GPU ---------------------------------------------------------------------------------------

TOL = 1e-3  # exact dequantisation, fp32 MMA accumulation: errors are ~1e-6; an index bug is O(1)
TOL_BF16 = 4e-3  # a bf16 output adds its own rounding: 2^-9 relative per element (one ulp 2^-8)


def tol(cfg: gemv.Config) -> float:
    return TOL_BF16 if cfg.out_dtype == "bfloat16" else TOL


@pytest.mark.gpu
@pytest.mark.parametrize("m", TEST_M)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{f}-{n}x{k}" for f, n, k in SHAPES])
def test_gemv_plan_shapes(shape, m):
    cfg = gemv.pick_config(shape[0], m, shape[1], shape[2])
    assert gemv.check(cfg) < TOL, cfg


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", ODD, ids=repr)
def test_gemv_odd_shapes_and_tilings(cfg):
    assert gemv.check(cfg) < tol(cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("m", (1, 3, 7, 16))
def test_gemv_odd_n_picked(m):
    for fmt in ("mxfp4", "fp8"):
        cfg = gemv.pick_config(fmt, m, 136, 32 * 37)
        assert gemv.check(cfg) < TOL, cfg


@pytest.mark.gpu
@pytest.mark.parametrize("wscale", [1e-30, 3e3])
def test_gemv_mxfp4_extreme_scales(wscale):
    # tiny weights: scale codes near 0 (bf16 subnormal products); large: codes > 128, the
    # warp-uniform second multiply
    assert gemv.check(gemv.pick_config("mxfp4", 8, 256, 1024), wscale=wscale) < TOL


DECODE_ORDER_M = (1, 8, 16)  # scripts/precompile_gpu.py --mxfp4-decode builds these


@pytest.mark.gpu
@pytest.mark.parametrize("m", DECODE_ORDER_M)
@pytest.mark.parametrize("wscale", [0.05, 1e-30, 3e3])
def test_gemv_mxfp4_decode_order(monkeypatch, m, wscale):
    # TILERT_MXFP4_ORDER=decode: weights quantised into the decode word order, the kernel decoding
    # them with tilert_e2m1x2_ord (the second multiply for codes > 128 too)
    monkeypatch.setenv(mxfp4.ORDER_ENV, "decode")
    assert gemv.check(gemv.pick_config("mxfp4", m, 4096, 6144), wscale=wscale) < TOL


@pytest.mark.gpu
def test_gemv_repeated_calls_reset_the_split_counters():
    cfg = max(ODD, key=lambda c: c.split)  # the most CTAs meeting at one arrival counter
    assert cfg.split > 1
    assert max(gemv.check(cfg) for _ in range(3)) < tol(cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("cfg", STREAM, ids=repr)
def test_gemv_stream_matches_reference(cfg, prefetch):
    assert gemv.check_stream(cfg, copies=stream_copies(cfg), prefetch=prefetch) < TOL


@pytest.mark.gpu
@pytest.mark.parametrize("mod, fmt", [(mxfp4_gemm, "mxfp4"), (fp8_gemm, "fp8")])
def test_format_modules_run_the_gemv_and_fall_back(mod, fmt, monkeypatch):
    monkeypatch.setenv("TILERT_GEMV", "1")
    cfg = gemv.pick_config(fmt, 3, 256, 1024)
    t = gemv.make_inputs(cfg)
    ref = gemv.reference(fmt, t["x"], t["w"], t["s"])
    assert gemv.rel_err(mod.run(t["x"], t["w"], t["s"]), ref) < TOL  # the GEMV
    odd = torch.empty(3 * 1024 + 1, dtype=torch.bfloat16, device="cuda")[1:].view(3, 1024)
    odd.copy_(t["x"])
    assert not gemv.supports(fmt, odd, t["w"], t["s"])
    assert gemv.rel_err(mod.run(odd, t["w"], t["s"]), ref) < 1e-2  # the old kernel


def test_rel_err_of_a_zero_reference_is_the_norm_of_the_output():
    import torch

    z = torch.zeros(3, 4, dtype=torch.float64)
    assert gemv.rel_err(z, z) == 0.0
    assert gemv.rel_err(torch.full((3, 4), 0.5), z) == pytest.approx(3**0.5)
    assert gemv.rel_err(torch.full((3, 4), float("nan")), z) == float("inf")
