"""MXFP4 weight x bf16 activation GEMM for decode: y[M, N] (f32) = x[M, K] @ W[N, K]^T.

W is MXFP4 (tilert.numerics.mxfp4): blocks uint8 [N, K/2] (element 2i in the low nibble), scales
uint8 [N, K/32] (2^(e-127)). The dequantised weight exists only in registers: it is never written
to shared or global memory.

Body `mxfp4_tile(X, W, S, Y, n_tile, m_tile, k_split)` ("swap AB" on mma.sync m16n8k16: 16 weight
rows fill the MMA M slot, 8 tokens the N slot; block_m = 16 issues two MMAs per dequantised A):
  tile       16 weight rows x block_m (8 or 16) tokens, over the k chunks (128 elements = 4 MX
             blocks) k_split * nk : +nk; split_k > 1 adds into Y with fp32 atomics (Y pre-zeroed).
  warp       lane (r, c) = (lane / 4, lane % 4) loads MX block c of the chunk for rows r and r+8
             straight from global memory, 16 bytes each (LDG.128, `stages` chunks in flight per
             warp), plus its two scale bytes; the 32 nibbles of a row become the A fragments of the
             chunk's 8 MMAs: the K order inside a chunk is permuted (MMA k slots {2c,2c+1,2c+8,2c+9}
             of step s = elements 4s..4s+3 of block c), and x is loaded in the same order (four
             contiguous bf16 = the B fragment), so no shuffles are needed. Dequant per bf16x2:
             prmt + 2 shifts + lop3 + one bf16x2 fma by 2^(scale-1) (DEVICE_PRELUDE, common.py).
  CTA        `threads / 32` warps split the CTA's k chunks round-robin; a shared-memory reduction
             of the warps' [16, block_m] fp32 fragments ends the mainloop (result in `out_s`).
  shared     (warps + 1) * 16 * block_m * 4 bytes (1-4 KB): many CTAs per SM.
  writes     Y[m_tile*block_m : +block_m, n_tile*16 : +16] (rows/cols clipped to M, N).
"""

import math
from dataclasses import dataclass

import torch

from tilert.kernels import gemv
from tilert.kernels.common import build, cdiv, launch_decode_gemm, make_mma_reduce, per_mxfp4_order, prelude
from tilert.numerics import mxfp4
from tilert.ops.linear import mxfp4_linear

reference = mxfp4_linear

BLOCK_N = 16  # weight rows per tile (the MMA M)
BLOCK_K = 128  # k elements per chunk (4 MX blocks: one per lane of a quad)


@dataclass(frozen=True)
class Config:
    """One compiled kernel: problem shape (M rounded up to block_m) plus the tiling.

    block_n/block_k are fixed (16, 128); `stages` = k chunks each warp keeps in flight;
    `threads` = 32 x warps splitting the CTA's k chunks.
    """

    m: int
    n: int
    k: int
    block_m: int = 8
    block_n: int = BLOCK_N
    block_k: int = BLOCK_K
    split_k: int = 1
    stages: int = 4
    threads: int = 128
    m_valid: int = 0  # token rows of X that hold data when M < block_m (0: all block_m)


def pick_config(m: int, n: int, k: int, sms: int = 132) -> Config:
    """Tiling for decode shapes: 16-row tiles x all of K per CTA (split-K only when N is small)."""
    block_m = 8 if m <= 8 else 16
    chunks = cdiv(k, BLOCK_K)
    tiles = cdiv(n, BLOCK_N) * cdiv(m, block_m)
    split_k = 1
    while tiles * split_k < 1.5 * sms and chunks // (split_k * 2) >= 4:
        split_k *= 2
    threads, stages = loop_shape(cdiv(chunks, split_k))
    m_pad = cdiv(m, block_m) * block_m
    m_valid = m if m < block_m else 0
    return Config(m_pad, n, k, block_m, BLOCK_N, BLOCK_K, split_k, stages, threads, m_valid)


def loop_shape(chunks: int) -> tuple[int, int]:
    """(threads, stages) for a CTA that reduces `chunks` k chunks: 4-8 warps, <= 8 chunks in flight each."""
    warps = 8 if chunks >= 32 else 4
    return 32 * warps, max(1, min(8, cdiv(chunks, warps)))


def make_mainloop(
    bm: int,
    bn: int,
    bk: int,
    threads: int,
    stages: int,
    w3d: bool = False,
    x3d: bool = False,
    two: bool = False,
    m_valid: int = 0,
):
    """The shared K loop: out_s[bn, bm] = dequant(W[(e,) rows, k]) @ X[(a,) x_row0 : +bm, k]^T.

    Macro args (X, xa, x_row0, W, S, e, w_row0, w_row1, k_tile0, nk, out_s): k chunks k_tile0 ..
    k_tile0+nk-1 of bk = 128 elements (blocks past K/32 read as 0); `xa` / `e` index the leading
    dim of X / W,S when x3d / w3d (ignored otherwise). Tile rows [0, 8) come from w_row0 + i and
    [8, 16) from w_row0 + i (default) or, with `two`, from w_row1 + i - 8 (the fused MoE's gate and
    up rows). Rows past N are clamped (read a valid row; the caller must not store them).
    out_s: a shared float32 [bn, bm] buffer, complete (after a barrier) when the macro returns.
    X rows x_row0 .. x_row0 + bm - 1 must exist (callers pad tokens with zeros); with 0 < m_valid <
    bm only the first m_valid are read (the other MMA columns get zeros).
    x for chunk u + 1 is loaded before chunk u's MMAs (two register buffers).
    """
    import tilelang.language as T

    assert bn == BLOCK_N and bk == BLOCK_K and bm in (8, 16), (bm, bn, bk)
    warps = threads // 32
    U = stages
    NT = bm // 8
    mv = m_valid if 0 < m_valid < bm else bm
    mma_reduce = make_mma_reduce(bm, 1, warps)
    decode_order = mxfp4.order_choice() == "decode"  # the blocks' word order (numerics/mxfp4.py)

    def flat(src, idx):  # the element offset of src[idx] (row-major), int64
        return sum(T.cast(v, "int64") * math.prod(src.shape[d + 1 :]) for d, v in enumerate(idx))

    @T.macro
    def ld16(dst, i, src, idx):  # dst[i : i + 4] = the 16 bytes at src[idx], evict-first in L2
        T.call_extern("handle", "tilert_ld16_ef", dst.data, i, src.data, flat(src, idx))

    def rows_of(buf):
        return buf.shape[1] if w3d else buf.shape[0]

    @T.macro
    def mxfp4_mainloop(X, xa, x_row0, W, S, e, w_row0, w_row1, k_tile0, nk, out_s):
        T.import_source(prelude())
        nblk = S.shape[-1]
        n_rows = rows_of(W)
        Wv = T.view(W, shape=list(W.shape[:-1]) + [W.shape[-1] // 4], dtype="uint32")
        Xv = T.view(X, shape=list(X.shape[:-1]) + [X.shape[-1] // 2], dtype="uint32")
        wq = T.alloc_local((U * 8,), "uint32")
        sq = T.alloc_local((U * 2,), "int32")
        xq = T.alloc_local((2 * NT * 16,), "uint32")
        af = T.alloc_local((4,), "uint32")
        ml = T.alloc_local((4,), "uint32")
        acc = T.alloc_local((NT * 4,), "float32")
        red = T.alloc_shared((warps, bn, bm), "float32")
        tx = T.get_thread_binding()
        warp = tx // 32
        r = (tx % 32) // 4
        c = tx % 4
        row0 = T.min(w_row0 + r, n_rows - 1)
        row1 = T.min((w_row1 + r) if two else (w_row0 + r + 8), n_rows - 1)
        for i in T.unroll(NT * 4):
            acc[i] = T.float32(0)
        for it in T.serial(T.ceildiv(nk, warps * U)):
            for u in T.unroll(U):
                ci = it * (warps * U) + u * warps + warp
                blk = (k_tile0 + ci) * 4 + c
                bc = T.max(T.min(blk, nblk - 1), 0)
                ok = ci < nk and blk < nblk
                # weights are read once per step: evict-first in L2 (tilert_ld16_ef), so they do not
                # push code and activations out of it
                if w3d:
                    ld16(wq, u * 8, Wv, (e, row0, bc * 4))
                    ld16(wq, u * 8 + 4, Wv, (e, row1, bc * 4))
                    sq[u * 2] = T.if_then_else(ok, T.cast(S[e, row0, bc], "int32"), -1)
                    sq[u * 2 + 1] = T.if_then_else(ok, T.cast(S[e, row1, bc], "int32"), -1)
                else:
                    ld16(wq, u * 8, Wv, (row0, bc * 4))
                    ld16(wq, u * 8 + 4, Wv, (row1, bc * 4))
                    sq[u * 2] = T.if_then_else(ok, T.cast(S[row0, bc], "int32"), -1)
                    sq[u * 2 + 1] = T.if_then_else(ok, T.cast(S[row1, bc], "int32"), -1)
            for u in T.unroll(U + 1):
                if u < U:  # x of chunk u -> register buffer u % 2 (issued before chunk u-1's MMAs)
                    bcx = T.max(T.min((k_tile0 + it * (warps * U) + u * warps + warp) * 4 + c, nblk - 1), 0)
                    for t in T.unroll(NT):
                        if t * 8 < mv:
                            if t * 8 + r < mv:
                                for q in T.unroll(4):
                                    if x3d:
                                        for v in T.vectorized(4):
                                            xq[(u % 2) * NT * 16 + t * 16 + q * 4 + v] = Xv[
                                                xa, x_row0 + t * 8 + r, bcx * 16 + q * 4 + v
                                            ]
                                    else:
                                        for v in T.vectorized(4):
                                            xq[(u % 2) * NT * 16 + t * 16 + q * 4 + v] = Xv[
                                                x_row0 + t * 8 + r, bcx * 16 + q * 4 + v
                                            ]
                            else:
                                for q in T.unroll(16):
                                    xq[(u % 2) * NT * 16 + t * 16 + q] = T.uint32(0)
                if u > 0:  # dequant + MMAs of chunk p = u - 1
                    p = u - 1
                    # bf16x2 multipliers 2^(s-1) (s <= 128), else 2^127 then 2^(s-128); 0 if invalid
                    for h in T.unroll(2):
                        ml[h] = T.if_then_else(
                            sq[p * 2 + h] < 0,
                            T.uint32(0),
                            T.cast((T.min(sq[p * 2 + h], 128) + 126) * 0x00800080, "uint32"),
                        )
                        ml[2 + h] = T.cast((T.max(sq[p * 2 + h], 128) - 1) * 0x00800080, "uint32")
                    for s in T.unroll(8):
                        w0 = wq[p * 8 + s // 2]
                        w1 = wq[p * 8 + 4 + s // 2]
                        b = 2 * (s % 2)
                        for i in T.unroll(4):  # af[i]: byte b + i // 2 of row (w0, w1)[i % 2]'s word
                            wi = w0 if i % 2 == 0 else w1
                            if decode_order:
                                af[i] = T.call_extern("uint32", "tilert_e2m1x2_ord", wi, b + i // 2, ml[i % 2])
                            else:
                                af[i] = T.call_extern(
                                    "uint32", "tilert_e2m1x2", wi, wi >> T.uint32(4), 0x4400 + 0x1111 * (b + i // 2),
                                    ml[i % 2]
                                )  # fmt: skip
                        if sq[p * 2] > 128 or sq[p * 2 + 1] > 128:
                            af[0] = T.call_extern("uint32", "tilert_bf16x2_mul", af[0], ml[2])
                            af[1] = T.call_extern("uint32", "tilert_bf16x2_mul", af[1], ml[3])
                            af[2] = T.call_extern("uint32", "tilert_bf16x2_mul", af[2], ml[2])
                            af[3] = T.call_extern("uint32", "tilert_bf16x2_mul", af[3], ml[3])
                        for t in T.unroll(NT):
                            T.ptx_mma(
                                "float32",
                                "m16n8k16",
                                "row",
                                "col",
                                "bf16",
                                "bf16",
                                "fp32",
                                af.data,
                                0,
                                xq.data,
                                (p % 2) * NT * 16 + t * 16 + s * 2,
                                acc.data,
                                t * 4,
                                T.bool(False),
                            )
        mma_reduce(red, acc, out_s, warp, r, c)

    return mxfp4_mainloop


def make_body(cfg: Config):
    """The GEMM tile body as a T.macro of (X, W, S, Y, n_tile, m_tile, k_split)."""
    import tilelang.language as T

    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    nk_split = cdiv(cdiv(cfg.k, bk), cfg.split_k)
    mainloop = make_mainloop(bm, bn, bk, cfg.threads, cfg.stages, m_valid=cfg.m_valid)

    @T.macro
    def mxfp4_tile(X, W, S, Y, n_tile, m_tile, k_split):
        out_s = T.alloc_shared((bn, bm), "float32")
        mainloop(X, 0, m_tile * bm, W, S, 0, n_tile * bn, 0, k_split * nk_split, nk_split, out_s)
        for i, j in T.Parallel(bn, bm):
            if n_tile * bn + i < cfg.n:
                if cfg.split_k == 1:
                    Y[m_tile * bm + j, n_tile * bn + i] = out_s[i, j]
                else:
                    T.atomic_add(Y[m_tile * bm + j, n_tile * bn + i], out_s[i, j])

    return mxfp4_tile


def make_kernel(cfg: Config, extra_shared_kb: int = 0):
    """Standalone launcher: grid (n tiles, m tiles * split_k), one body call per CTA. With
    `extra_shared_kb`, each CTA also holds that much more dynamic shared memory (so the SM keeps
    that much less L1), as a CTA of the persistent kernel does: benchmarks/tile_latency.py."""
    import tilelang.language as T

    body = make_body(cfg)
    M, N, K = cfg.m, cfg.n, cfg.k
    pad = extra_shared_kb * 256  # float32 words
    stride = max(1, pad // cfg.threads)

    @T.prim_func
    def mxfp4_gemm(
        X: T.Tensor((M, K), "bfloat16"),
        W: T.Tensor((N, K // 2), "uint8"),
        S: T.Tensor((N, K // 32), "uint8"),
        Y: T.Tensor((M, N), "float32"),
    ):
        with T.Kernel(cdiv(N, cfg.block_n), (M // cfg.block_m) * cfg.split_k, threads=cfg.threads) as (bx, by):
            if pad:
                block = T.alloc_shared((pad,), "float32")
                tx = T.get_thread_binding()
                block[tx * stride] = T.cast(X[0, tx], "float32")
            body(X, W, S, Y, bx, by // cfg.split_k, by % cfg.split_k)
            if pad:
                if Y[0, 0] == 12345.0:  # never: keeps the block from being dropped
                    Y[0, 1] = block[tx * stride]

    return mxfp4_gemm


@per_mxfp4_order
def compiled(cfg: Config | gemv.Config):
    return gemv.compiled(cfg) if isinstance(cfg, gemv.Config) else build(make_kernel(cfg))


def _check_inputs(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor) -> tuple[int, int, int]:
    if x.dim() != 2 or blocks.dim() != 2 or scales.dim() != 2:
        raise ValueError(f"expected 2-D x, blocks, scales; got {x.dim()}-D, {blocks.dim()}-D, {scales.dim()}-D")
    m, k = x.shape
    n = blocks.shape[0]
    if k % 32:
        raise ValueError(f"K = {k} must be a multiple of 32 (the MXFP4 block)")
    if x.dtype != torch.bfloat16:
        raise TypeError(f"x must be bfloat16, got {x.dtype}")
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if tuple(blocks.shape) != (n, k // 2):
        raise ValueError(f"blocks shape {tuple(blocks.shape)} != (N, K/2) = ({n}, {k // 2})")
    if tuple(scales.shape) != (n, k // 32):
        raise ValueError(f"scales shape {tuple(scales.shape)} != (N, K/32) = ({n}, {k // 32})")
    if not (x.is_cuda and blocks.is_cuda and scales.is_cuda):
        raise ValueError("x, blocks and scales must be CUDA tensors")
    return m, n, k


def eager_config(m: int, n: int, k: int) -> Config | gemv.Config:
    """The kernel `run` launches for this shape: the streaming GEMV (kernels/gemv.py) for
    M <= gemv.MAX_M when it is enabled (`gemv.enabled()`), else this file's GEMM."""
    return gemv.pick_config("mxfp4", m, n, k) if m <= gemv.MAX_M and gemv.enabled() else pick_config(m, n, k)


def run(
    x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, cfg: Config | gemv.Config | None = None
) -> torch.Tensor:
    """y [M, N] float32 = x [M, K] bf16 @ dequant(blocks, scales)^T: the streaming GEMV for M <= 16
    (operands it supports) when `gemv.enabled()`, else this file's GEMM; `cfg` forces either."""
    m, n, k = _check_inputs(x, blocks, scales)
    if isinstance(cfg, gemv.Config) or (cfg is None and gemv.enabled() and gemv.supports("mxfp4", x, blocks, scales)):
        return gemv.run("mxfp4", x, blocks, scales, cfg)
    cfg = cfg or pick_config(m, n, k)
    return launch_decode_gemm(compiled(cfg), x, blocks, scales, cfg.m, n, cfg.split_k)


def check(m: int, n: int, k: int, seed: int | None = None, cfg: Config | None = None, wscale: float = 0.05) -> float:
    """Run on fresh random data (NaN-poisoned output) and return ||y - ref|| / ||ref||; raises if unwritten."""
    from tilert.numerics import mxfp4

    g = torch.Generator(device="cuda")
    g.manual_seed(seed if seed is not None else torch.seed() % 2**31)
    w = torch.randn(n, k, device="cuda", generator=g) * wscale
    blocks, scales = mxfp4.quantize(w)
    x = torch.randn(m, k, device="cuda", generator=g).to(torch.bfloat16)
    cfg = cfg or pick_config(m, n, k)
    if cfg.split_k == 1:  # poison: every element must be written by the kernel
        y = torch.full((cfg.m, n), float("nan"), device="cuda")
        xp = torch.zeros(cfg.m, k, dtype=x.dtype, device="cuda")
        xp[:m] = x
        compiled(cfg)(xp, blocks, scales, y)
        y = y[:m]
    else:
        y = run(x, blocks, scales, cfg)
    if not torch.isfinite(y).all():
        raise AssertionError(f"output has unwritten/non-finite elements (M={m}, N={n}, K={k}, {cfg})")
    ref = reference(x, blocks, scales).double()
    return ((y.double() - ref).norm() / ref.norm()).item()


# MiMo-V2.5-Pro expert shapes (per rank; experts are not sharded within an expert).
MIMO_SHAPES = {"gate_up": (4096, 6144), "down": (6144, 2048)}
DECODE_M = (1, 2, 4, 8, 16, 32, 64)


def configs_for_plan(ms: tuple[int, ...] = DECODE_M, shapes: dict | None = None) -> list[Config]:
    """Deduplicated configs of this file's GEMM for the expert shapes x decode M (M <= 16 runs the
    streaming GEMV instead when it is enabled: gemv.configs_for_plan)."""
    shapes = shapes or MIMO_SHAPES
    ms = [m for m in ms if m > gemv.MAX_M or not gemv.enabled()]
    return sorted({pick_config(m, n, k) for m in ms for (n, k) in shapes.values()}, key=repr)
