"""MXFP4 weight x bf16 activation GEMM for decode: y[M, N] (f32) = x[M, K] @ W[N, K]^T.

W is MXFP4 (tilert.numerics.mxfp4): blocks uint8 [N, K/2] (element 2i in the low nibble), scales
uint8 [N, K/32] (2^(e-127)). The dequantised weight exists only in registers and in one shared
memory tile; it is never written to global memory.

Body `mxfp4_tile(X, W, S, Y, n_tile, m_tile, k_split)` ("swap AB": the weight tile fills the MMA
M slot, the few tokens the N slot):
  tile       block_n weight rows x block_m tokens, looping over K / (block_k * split_k) k-tiles of
             block_k elements; split_k > 1 accumulates into Y with fp32 atomics (Y pre-zeroed).
  pipeline   packed weight [block_n, block_k/2] u8, scales [block_n, block_k/32] u8 and
             x [block_m, block_k] bf16 go global -> shared through a `stages`-deep cp.async
             pipeline; each thread turns one 16-byte run of packed weights (= one MX block of 32)
             into 32 bf16 in registers (bit tricks, see _DEQUANT_SRC) and stores them into the bf16
             tile, which feeds a bf16 MMA with fp32 accumulators [block_n, block_m].
  shared     stages * (block_n*block_k/2 + block_n*block_k/32 + 2*block_m*block_k) + 2*block_n*block_k
  threads    `threads` (256 = two warpgroups for block_n = 128)
  writes     Y[m_tile*block_m : +block_m, n_tile*block_n : +block_n] (rows/cols clipped to M, N),
             the k range k_split * K/split_k : +K/split_k only (added atomically when split_k > 1).
"""


import functools
from dataclasses import dataclass

import torch

from tilert.kernels.common import build, cdiv
from tilert.ops.linear import mxfp4_linear

reference = mxfp4_linear

# E2M1 nibble -> bf16 without a table: code (s e1 e0 m) placed as bf16 bits s<<15 | (e1 e0 m)<<6
# is the true value * 2^-126 (codes with e = 0 land on bf16 subnormals, which bf16 multiplies keep).
# Multiplying by 2^126 * 2^(scale-127) = 2^(scale-1) restores value * scale exactly.
_DEQUANT_SRC = r"""
#ifndef TILERT_MXFP4_DEQUANT
#define TILERT_MXFP4_DEQUANT
#include <cuda_bf16.h>
__device__ __forceinline__ unsigned tilert_e2m1x2(unsigned w, unsigned u, unsigned sel) {
  // byte i of w: low nibble -> lane 0, high nibble (byte i of u = w >> 4) -> lane 1
  unsigned y = __byte_perm(w, u, sel);
  return ((y << 6) & 0x01C001C0u) | ((y << 12) & 0x80008000u);
}
__device__ __forceinline__ void tilert_mxfp4_dequant32(const void* packed, const unsigned char* scale,
                                                       void* out) {
  const uint4 q = *reinterpret_cast<const uint4*>(packed);
  const unsigned s = *scale;
  __nv_bfloat162 f1, f2;
  const bool one = s >= 1u && s <= 128u;
  // one multiply by 2^(s-1) when it is a normal bf16; else 2^126 then 2^(s-127)
  unsigned short b1 = one ? (unsigned short)((s + 126u) << 7) : (unsigned short)(253u << 7);
  unsigned short b2 = one ? (unsigned short)(127u << 7)
                          : (s == 0u ? (unsigned short)0x0040u : (unsigned short)(s << 7));
  f1 = __halves2bfloat162(__ushort_as_bfloat16(b1), __ushort_as_bfloat16(b1));
  f2 = __halves2bfloat162(__ushort_as_bfloat16(b2), __ushort_as_bfloat16(b2));
  const unsigned words[4] = {q.x, q.y, q.z, q.w};
  __nv_bfloat162* o = reinterpret_cast<__nv_bfloat162*>(out);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const unsigned w = words[i], u = w >> 4;
#pragma unroll
    for (int b = 0; b < 4; ++b) {
      unsigned v = tilert_e2m1x2(w, u, 0x4400u + 0x1100u * b + 0x0011u * b);
      __nv_bfloat162 x = *reinterpret_cast<__nv_bfloat162*>(&v);
      x = __hmul2(x, f1);
      if (!one) x = __hmul2(x, f2);
      o[i * 4 + b] = x;
    }
  }
}
#endif
"""


@dataclass(frozen=True)
class Config:
    """One compiled kernel: problem shape (M rounded up to block_m) plus the tiling."""

    m: int
    n: int
    k: int
    block_m: int = 16
    block_n: int = 128
    block_k: int = 256
    split_k: int = 1
    stages: int = 3
    threads: int = 256


def pick_config(m: int, n: int, k: int, sms: int = 132) -> Config:
    """Tiling heuristic for decode shapes: ~1 wave of CTAs via split-K, k tiles that divide K."""
    block_m = min(64, max(16, cdiv(m, 16) * 16))
    block_k = next(b for b in (256, 128, 64, 32) if k % b == 0)
    block_n = 128 if n >= 128 * 16 else 64
    threads = 256 if block_n == 128 else 128
    tiles = cdiv(n, block_n) * cdiv(m, block_m)
    nk = k // block_k
    split_k = 1
    for s in range(1, nk + 1):
        if nk % s == 0 and nk // s >= 2 or s == 1:
            if tiles * s <= sms * 1.2:
                split_k = s
    m_pad = cdiv(m, block_m) * block_m
    return Config(m_pad, n, k, block_m, block_n, block_k, split_k, 3 if block_k >= 128 else 4, threads)


def make_mainloop(
    bm: int, bn: int, bk: int, threads: int, stages: int, w3d: bool = False, x3d: bool = False, two: bool = False
):
    """The shared K loop: acc[bn, bm] += dequant(W[(e,) w_row0 : +bn, k]) @ X[(a,) x_row0 : +bm, k]^T.

    Macro args (X, xa, x_row0, W, S, e, w_row0, w_row1, k_tile0, nk, acc): k tiles k_tile0 ..
    k_tile0+nk-1 of block bk; `xa` / `e` index the leading dim of X / W,S when x3d / w3d (ignored
    otherwise). With `two`, tile rows [0, bn/2) come from w_row0 and [bn/2, bn) from w_row1 (the
    fused MoE gate and up rows); otherwise w_row1 is ignored.
    """
    import tilelang.language as T

    blocks = bk // 32
    per_thread = cdiv(bn * blocks, threads)
    exact = bn * blocks % threads == 0

    @T.macro
    def mxfp4_mainloop(X, xa, x_row0, W, S, e, w_row0, w_row1, k_tile0, nk, acc):
        T.import_source(_DEQUANT_SRC)
        x_s = T.alloc_shared((bm, bk), "bfloat16")
        w_s = T.alloc_shared((bn, bk // 2), "uint8")
        s_s = T.alloc_shared((bn, blocks), "uint8")
        wd_s = T.alloc_shared((bn, bk), "bfloat16")
        q_l = T.alloc_local((16,), "uint8")
        d_l = T.alloc_local((32,), "bfloat16")
        tx = T.get_thread_binding()
        for kk in T.Pipelined(nk, num_stages=stages):
            k0 = (k_tile0 + kk) * bk
            if two:
                T.copy(W[e, w_row0 : w_row0 + bn // 2, k0 // 2 : k0 // 2 + bk // 2], w_s[0 : bn // 2, :])
                T.copy(W[e, w_row1 : w_row1 + bn // 2, k0 // 2 : k0 // 2 + bk // 2], w_s[bn // 2 : bn, :])
                T.copy(S[e, w_row0 : w_row0 + bn // 2, k0 // 32 : k0 // 32 + blocks], s_s[0 : bn // 2, :])
                T.copy(S[e, w_row1 : w_row1 + bn // 2, k0 // 32 : k0 // 32 + blocks], s_s[bn // 2 : bn, :])
            elif w3d:
                T.copy(W[e, w_row0, k0 // 2], w_s)
                T.copy(S[e, w_row0, k0 // 32], s_s)
            else:
                T.copy(W[w_row0, k0 // 2], w_s)
                T.copy(S[w_row0, k0 // 32], s_s)
            if x3d:
                T.copy(X[xa, x_row0, k0], x_s)
            else:
                T.copy(X[x_row0, k0], x_s)
            for it in T.serial(per_thread):
                idx = it * threads + tx
                r = idx // blocks
                j = idx % blocks
                if exact or idx < bn * blocks:
                    for v in T.vectorized(16):
                        q_l[v] = w_s[r, j * 16 + v]
                    T.call_extern(
                        "handle",
                        "tilert_mxfp4_dequant32",
                        T.address_of(q_l[0]),
                        T.address_of(s_s[r, j]),
                        T.address_of(d_l[0]),
                    )
                    for v in T.vectorized(32):
                        wd_s[r, j * 32 + v] = d_l[v]
            T.gemm(wd_s, x_s, acc, transpose_B=True)

    return mxfp4_mainloop


def make_body(cfg: Config):
    """The GEMM tile body as a T.macro of (X, W, S, Y, n_tile, m_tile, k_split)."""
    import tilelang.language as T

    bm, bn, bk = cfg.block_m, cfg.block_n, cfg.block_k
    nk_split = cfg.k // bk // cfg.split_k
    mainloop = make_mainloop(bm, bn, bk, cfg.threads, cfg.stages)

    @T.macro
    def mxfp4_tile(X, W, S, Y, n_tile, m_tile, k_split):
        acc = T.alloc_fragment((bn, bm), "float32")
        T.clear(acc)
        mainloop(X, 0, m_tile * bm, W, S, 0, n_tile * bn, 0, k_split * nk_split, nk_split, acc)
        for i, j in T.Parallel(bn, bm):
            if n_tile * bn + i < cfg.n:
                if cfg.split_k == 1:
                    Y[m_tile * bm + j, n_tile * bn + i] = acc[i, j]
                else:
                    T.atomic_add(Y[m_tile * bm + j, n_tile * bn + i], acc[i, j])

    return mxfp4_tile


def make_kernel(cfg: Config):
    """Standalone launcher: grid (n tiles, m tiles * split_k), one body call per CTA."""
    import tilelang.language as T

    body = make_body(cfg)
    M, N, K = cfg.m, cfg.n, cfg.k

    @T.prim_func
    def mxfp4_gemm(
        X: T.Tensor((M, K), "bfloat16"),
        W: T.Tensor((N, K // 2), "uint8"),
        S: T.Tensor((N, K // 32), "uint8"),
        Y: T.Tensor((M, N), "float32"),
    ):
        with T.Kernel(cdiv(N, cfg.block_n), (M // cfg.block_m) * cfg.split_k, threads=cfg.threads) as (bx, by):
            body(X, W, S, Y, bx, by // cfg.split_k, by % cfg.split_k)

    return mxfp4_gemm


@functools.cache
def compiled(cfg: Config):
    return build(make_kernel(cfg))


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


def run(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, cfg: Config | None = None) -> torch.Tensor:
    """y [M, N] float32 = x [M, K] bf16 @ dequant(blocks, scales)^T."""
    m, n, k = _check_inputs(x, blocks, scales)
    cfg = cfg or pick_config(m, n, k)
    xp = x.contiguous()
    if cfg.m != m:
        xp = torch.zeros(cfg.m, k, dtype=x.dtype, device=x.device)
        xp[:m] = x
    y = (torch.zeros if cfg.split_k > 1 else torch.empty)(cfg.m, n, dtype=torch.float32, device=x.device)
    compiled(cfg)(xp, blocks.contiguous(), scales.contiguous(), y)
    return y[:m]


def check(m: int, n: int, k: int, seed: int | None = None, cfg: Config | None = None) -> float:
    """Run on fresh random data (NaN-poisoned output) and return ||y - ref|| / ||ref||; raises if unwritten."""
    from tilert.numerics import mxfp4

    g = torch.Generator(device="cuda")
    g.manual_seed(seed if seed is not None else torch.seed() % 2**31)
    w = torch.randn(n, k, device="cuda", generator=g) * 0.05
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
    """Deduplicated kernel configs the mimo-v2.5-pro plan compiles (each expert shape x decode M)."""
    shapes = shapes or MIMO_SHAPES
    return sorted({pick_config(m, n, k) for m in ms for (n, k) in shapes.values()}, key=repr)
