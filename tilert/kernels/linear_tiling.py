"""The linear family's tiling: (n tile, m tile, k split) of a linear or LM-head GEMM node.

One place for the compiler's task tables (passes/tile.py), the persistent linear bodies
(kernels/linear_fused.py) and the plan VM. Block sizes follow the standalone kernels'
(`fp8_gemm.pick_config`, `mxfp4_gemm.pick_config`); fp8 linears with few tokens run the register
GEMV body's tiling instead (`uses_gemv`). Pure python: any shape, no tilelang.
"""

from __future__ import annotations

import os

from tilert.kernels.common import cdiv
from tilert.kernels.linear_fused import GEMV_CHUNK, GEMV_M, GEMV_X_BYTES

BLOCK_M = (16, 64)  # block_m = tokens rounded up to 16, within these bounds
BLOCK_K = (128, 64, 32)  # the first that divides K
BLOCK_N, BLOCK_N_SMALL, WIDE_N = 128, 64, 128 * 16  # block_n 128 when N >= WIDE_N, else 64
# One task per SM at most per GEMM: a second wave doubles a persistent step's critical path (the FP8
# kernel's own pick_config allows 1.2 waves, since several of its CTAs share an SM).
WAVE = 1.0
MIN_K_TILES = 2  # k tiles per split at least
GEMV_BLOCK_N = 64
GEMV_NARROW_N = 32  # the narrow GEMV tile: full-K tasks where 64-row tiles would need a k split (tiles_choice)
TILES_ENV = "TILERT_LINEAR_TILES"  # "rows" (default) or "split": tiles_choice
TILES_CHOICES = ("rows", "split")
# A GEMV task costs about 4 us beside its bytes (norm prologue, x stage, split-K epilogue), so a
# small projection runs as a few long tasks beside q_proj's wave, not as many short ones queued
# behind it (docs/performance.md).
GEMV_MIN_CHUNKS = 16


def tiles_choice() -> str:
    """TILERT_LINEAR_TILES, read when a plan is tiled: "rows" (default): a GEMV linear whose 64-row
    tiles would be split over K to fill the SMs runs 32-row tiles over the whole K instead where those
    fit one wave with the same bytes per task (q_proj at decode: 96 tasks either way, no split-K
    epilogue, the x row staged whole for the norm; the streaming GEMV sweep's fastest tiling of that
    shape); "split": always 64-row tiles (the older tiling)."""
    v = os.environ.get(TILES_ENV, "rows") or "rows"
    if v not in TILES_CHOICES:
        raise ValueError(f"{TILES_ENV}={v!r}: expected one of {', '.join(TILES_CHOICES)}")
    return v


def uses_gemv(kind: str, M: int, K: int) -> bool:
    """Whether a linear node runs the register GEMV body: fp8 weights, few tokens, K in 128-blocks."""
    return kind == "linear_fp8" and M <= GEMV_M and K % 128 == 0


def gemm_shape(M: int, N: int, K: int, sms: int, gemv: bool = False) -> tuple[int, int, int, int]:
    """(block_m, block_n, block_k, split_k) as the GEMM kernels pick them; gemv=True: the register
    GEMV body's (fp8 weights and M <= GEMV_M): 64-row tiles of 64-element chunks, split so each
    task's x block fits GEMV_X_BYTES of shared memory and, beyond that, as far as the tasks fit one
    wave of SMs while each keeps GEMV_MIN_CHUNKS chunks; or, where that splits K and 32-row tiles
    over the whole K fit one wave with no more bytes per task, those (`tiles_choice`)."""
    if gemv:
        bm, bk, nk = (8 if M <= 8 else 16), GEMV_CHUNK, K // GEMV_CHUNK
        tiles, narrow = cdiv(N, GEMV_BLOCK_N) * cdiv(M, bm), cdiv(N, GEMV_NARROW_N) * cdiv(M, bm)
        fits = [s for s in range(1, nk + 1) if nk % s == 0 and bm * (K // s) * 2 <= GEMV_X_BYTES]
        ok = [s for s in fits if s == fits[0] or (nk // s >= GEMV_MIN_CHUNKS and tiles * s <= sms)]
        split = max(ok)
        if (split > 1 and fits[0] == 1 and narrow <= sms and GEMV_NARROW_N * split <= GEMV_BLOCK_N
                and tiles_choice() == "rows"):  # fmt: skip
            return bm, GEMV_NARROW_N, bk, 1
        return bm, GEMV_BLOCK_N, bk, split
    bm = min(BLOCK_M[1], max(BLOCK_M[0], cdiv(M, 16) * 16))
    bk = next((b for b in BLOCK_K if K % b == 0), BLOCK_K[-1])
    bn = BLOCK_N if N >= WIDE_N else BLOCK_N_SMALL
    tiles, nk, split = cdiv(N, bn) * cdiv(M, bm), cdiv(K, bk), 1
    for s in range(2, nk + 1):
        if nk % s == 0 and nk // s >= MIN_K_TILES and tiles * s <= sms * WAVE:
            split = s
    return bm, bn, bk, split


def node_shape(kind: str, M: int, N: int, K: int, sms: int) -> tuple[int, int, int, int, bool]:
    """(block_m, block_n, block_k, split_k, gemv) of a `kind` node of M tokens, N outputs, K inputs."""
    gemv = uses_gemv(kind, M, K)
    return (*gemm_shape(M, N, K, sms, gemv), gemv)


def supports(M: int, N: int, K: int, shape: tuple[int, int, int, int], norm: bool) -> str | None:
    """None when the persistent linear body takes this node at tiling `shape`, else why not."""
    bm, bn, bk, split = shape
    if (K // bk) % split or (norm and K % 128):
        return f"{M}x{N}x{K}: tile shape {bm}x{bn}x{bk} split {split} is off the body's contract"
    return None
