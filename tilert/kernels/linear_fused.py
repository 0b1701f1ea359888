"""Fused linear tile for the persistent runtime: [RMSNorm ->] FP8/bf16 GEMM [-> + residual].

The compiler fuses a linear node's norm prologue and residual epilogue into it (passes/fuse_norm,
fuse_residual) and tiles it as (n tile, m tile, k split) with `gemm_shape` (passes/tile.py), the
same block sizes as the standalone FP8 kernel (fp8_gemm.pick_config). This body runs one such
tile inside the persistent kernel (256 threads, cp.async, no TMA: views come from pointers):

  prologue   with a norm: the mean square over all of K of the tile's rows that can hold tokens
             (min(block_m, M); each task reads them once more: 12 KB per token at K = 6144, in
             chunks of up to 8192 / rows columns so the loads are in flight together), then x is
             scaled by rstd * gamma in shared memory, rounded to bf16 as the eager path does.
  mainloop   fp8 weights [block_n, block_k] are dequantised with their block scale (128x128, or one
             scale per row where a shard slice cut a scale block: `scale_rows` = 1) into a bf16
             tile; bf16 weights (the LM head) go straight to the MMA.
  epilogue   split_k = 1: Out = acc [+ residual] in Out's dtype. split_k > 1: fp32 atomics into a
             workspace, then the last of the split_k tasks of the tile (an arrival counter compared
             with split_k x epoch, so nothing is reset between steps) writes Out from the
             workspace and zeroes it for the next step.
Views (in order, `views(spec)`): X [mp, K] bf16, W [N, K], Sinv (fp8 only), G [K] (norm only),
R [mp, N] (residual only), Out [mp, N], Ws [mp, N] f32 + Arr [tiles] int32 + Epoch [1] int32
(split_k > 1 only). Activations have mp = rows padded to block_m (zero rows).

With the build switch TILERT_LINEAR_BODY=gemv (`body_choice`) the persistent step's LINEAR_FP8 tasks
run the streaming GEMV of tilert/kernels/gemv.py instead (`gemv_config`: the same tiles, its norm,
residual and split-K options; runtime/kinds/linear.py).

Reference: the linear op (tilert/ir/opset/fused.py), which composes rms_norm, dequant, matmul, add.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from tilert.kernels import gemv as streaming
from tilert.kernels.common import alloc_unmerged, build, cdiv, gate_passed, make_mma_reduce, make_row_rstd, prelude
from tilert.kernels.common import gated as mark_gated
from tilert.kernels.views import grid_launcher, pointer_row
from tilert.numerics import fp8
from tilert.ops.linear import dequant_fp8, linear
from tilert.ops.norm import rms_norm

# tilelang (the kernel compiler, slow to import) is imported only inside the functions that build kernels

GEMV_M = 16  # fp8 linears with at most this many tokens run the register GEMV body
GEMV_CHUNK = 64  # k elements per GEMV chunk: a quad of lanes x 16 fp8 bytes (one 16-byte load each)
GEMV_X_BYTES = 96 * 1024  # most shared memory a GEMV task stages its x block in
GEMV_STAGE_CHUNKS = 8  # most chunks per weight ring stage (64 rows x 8 chunks = 32 KB)
GEMV_RING_BYTES = 128 * 1024  # most shared memory of the GEMV weight ring
GEMV_SMEM_BYTES = 192 * 1024  # ring + x stage at most (scales and the reduction take up to 20 KB more)
GEMV_ROW_PAD = 64  # bytes after each ring row: rows r and r + 1 fall in different banks

BODY_ENV = "TILERT_LINEAR_BODY"  # "gemv" (default) or "fused": which body the persistent LINEAR_FP8 tasks run
BODIES = ("fused", "gemv")
STREAM_SMEM = 200 * 1024  # the most shared memory the streaming body may take (the step's static buffers beside it)
STREAM_DEPTHS = (5, 4, 3, 2)  # ring depths tried, deepest first: (depth - 1) x 16 KB in flight per SM


NORM_STATS_ENV = "TILERT_NORM_STATS"  # where the streaming body's RMSNorm prologue gets its rows' rstd


def norm_stats_choice() -> str:
    """TILERT_NORM_STATS, where the streaming linear body's RMSNorm prologue (q/k/v, dense MLP) gets
    its rows' statistics (gemv.Config.norm_stats): "staged" (default): from the x rows the task has
    staged in shared memory, where they are whole rows (no split-K; split-K tiles use "global");
    "global": from X in global memory while its first weight chunks fly (common.make_row_rstd:
    dependent L2 round trips, six at 8 tokens). Staged measured 1.01x faster at B=1 and 1.002x at
    B=8 in the full-scale step, the 8-token q/k/v task 12.3 -> 10.0 us (docs/performance.md)."""
    v = os.environ.get(NORM_STATS_ENV, "staged") or "staged"
    if v not in streaming.NORM_STATS:
        raise ValueError(f"{NORM_STATS_ENV}={v!r}: expected one of {', '.join(streaming.NORM_STATS)}")
    return v


def body_choice() -> str:
    """The persistent fp8 linear body the build switch TILERT_LINEAR_BODY names: "gemv" (default: the
    streaming GEMV, `gemv_config`; 0.88x / 0.77x of the fused body's full-scale step at B=1 / B=8
    together with the GEMV experts, docs/performance.md) or "fused" (`make_gemv_body`, a CTA-shared
    stage ring)."""
    v = os.environ.get(BODY_ENV, "gemv") or "gemv"
    if v not in BODIES:
        raise ValueError(f"{BODY_ENV}={v!r}: expected one of {', '.join(BODIES)}")
    return v


@dataclass(frozen=True)
class LinearSpec:
    m: int  # tokens
    n: int
    k: int
    block_m: int
    block_n: int
    block_k: int
    split_k: int
    w_dtype: str = "float8_e4m3"  # or "bfloat16"
    scale_rows: int = 128  # weight rows per scale (128, or 1 for a finer grid)
    norm_eps: float | None = None
    res_dtype: str | None = None  # None: no residual epilogue
    out_dtype: str = "bfloat16"
    stages: int = 3
    gemv: bool = False  # the register GEMV body (fp8, m <= GEMV_M): `gemm_shape(..., gemv=True)` tiles

    def __post_init__(self) -> None:
        if self.gemv and not (self.fp8 and self.m <= GEMV_M and self.block_k == GEMV_CHUNK
                              and self.block_n % 16 == 0 and self.block_m in (8, 16)):  # fmt: skip
            raise ValueError(f"{self}: the GEMV body takes fp8 weights, m <= {GEMV_M}, block_k {GEMV_CHUNK}, "
                             f"block_n a multiple of 16 and block_m 8 or 16")  # fmt: skip

    @property
    def mp(self) -> int:
        return cdiv(self.m, self.block_m) * self.block_m

    @property
    def tiles(self) -> int:
        return cdiv(self.n, self.block_n) * (self.mp // self.block_m)

    @property
    def fp8(self) -> bool:
        return self.w_dtype == "float8_e4m3"


def views(spec: LinearSpec) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, dtype) of the tensors the body reads and writes, in argument order."""
    M, N, K = spec.mp, spec.n, spec.k
    out = [("x", (M, K), "bfloat16"), ("w", (N, K), spec.w_dtype)]
    if spec.fp8:
        out.append(("scale_inv", (cdiv(N, spec.scale_rows), cdiv(K, 128)), "float32"))
    if spec.norm_eps is not None:
        out.append(("gamma", (K,), "bfloat16"))
    if spec.res_dtype is not None:
        out.append(("residual", (M, N), spec.res_dtype))
    out.append(("out", (M, N), spec.out_dtype))
    if spec.split_k > 1:
        out += [("ws", (M, N), "float32"), ("arrivals", (spec.tiles,), "int32"), ("epoch", (1,), "int32")]
    return out


def gemv_config(spec: LinearSpec) -> streaming.Config | None:
    """The streaming GEMV (kernels/gemv.py) that runs `spec`'s tiles, or None where it does not take
    them (not the register GEMV tiling, a finer scale grid, dtypes it lacks). Same tiles: block_n
    rows (64: 2 row warps x 2 groups of 16; 32: 1 row warp x 2 groups) x the k range of a split
    (64-element chunks, as block_k), all of the m <= 16 tokens; norm, residual and split-K as its
    options (split-K through its own partials and arrival counters); the deepest ring that the
    persistent prefetch form allows (the next task's first depth - 1 chunks fit this one's issue
    slots) within STREAM_SMEM."""
    row_warps = {64: 2, 32: 1}.get(spec.block_n)
    if not (spec.gemv and spec.fp8 and spec.scale_rows == 128 and row_warps and spec.m <= spec.block_m):
        return None
    if spec.out_dtype not in ("float32", "bfloat16") or spec.res_dtype not in (None, "float32", "bfloat16"):
        return None
    stats = norm_stats_choice()
    for depth in STREAM_DEPTHS:
        try:
            cfg = streaming.Config("fp8", spec.m, spec.n, spec.k, wr=row_warps, g=2, split=spec.split_k, depth=depth,
                                   out_dtype=spec.out_dtype, evict_first=True, norm_eps=spec.norm_eps,
                                   res_dtype=spec.res_dtype, norm_stats=stats)  # fmt: skip
        except ValueError:
            continue
        if depth - 1 <= cfg.items and streaming.smem_bytes(cfg, prefetch=True, x_own=True) <= STREAM_SMEM:
            return cfg
    return None


def _unpack(spec: LinearSpec, V: tuple) -> dict[str, Any]:
    """The views of `views(spec)` by name."""
    return {name: v for (name, _, _), v in zip(views(spec), V)}


def make_epilogue(spec: LinearSpec):
    """T.macro `epilogue(V, src, n_tile, m_tile)`: src [block_n, block_m] (fp32 fragment or shared)
    -> Out (+ residual); with split_k > 1 fp32 atomics into the workspace, then the last of the
    tile's split_k tasks (arrival counter vs split_k x epoch) writes Out and zeroes the workspace."""
    import tilelang.language as T

    bm, bn, split = spec.block_m, spec.block_n, spec.split_k
    N, M = spec.n, spec.m
    res = spec.res_dtype is not None
    n_mt = spec.mp // bm
    f32 = "float32"

    @T.macro
    def store(Out, R, v, row, col):
        if res:
            Out[row, col] = T.Cast(spec.out_dtype, v + T.Cast(f32, R[row, col]))
        else:
            Out[row, col] = T.Cast(spec.out_dtype, v)

    @T.macro
    def epilogue(V, src, n_tile, m_tile):
        v = _unpack(spec, V)
        Out, R = v["out"], v.get("residual")
        if split == 1:
            for i, j in T.Parallel(bn, bm):
                if n_tile * bn + i < N and m_tile * bm + j < M:
                    store(Out, R, src[i, j], m_tile * bm + j, n_tile * bn + i)
        else:
            Ws, Arr, Ep = v["ws"], v["arrivals"], v["epoch"]
            last = T.alloc_shared((1,), "int32")
            for i, j in T.Parallel(bn, bm):
                if n_tile * bn + i < N and m_tile * bm + j < M:
                    T.atomic_add(Ws[m_tile * bm + j, n_tile * bn + i], src[i, j])
            T.sync_threads()
            tx = T.get_thread_binding()
            if tx == 0:
                T.call_extern("handle", "__threadfence")
                prev = T.atomic_add(Arr[n_tile * n_mt + m_tile], 1, return_prev=True)
                last[0] = T.if_then_else(prev + 1 == split * Ep[0], 1, 0)
                T.call_extern("handle", "__threadfence")
            T.sync_threads()
            if last[0] == 1:
                for i, j in T.Parallel(bn, bm):
                    if n_tile * bn + i < N and m_tile * bm + j < M:
                        w = T.atomic_load(Ws[m_tile * bm + j, n_tile * bn + i], memory_order="relaxed")
                        store(Out, R, w, m_tile * bm + j, n_tile * bn + i)
                        Ws[m_tile * bm + j, n_tile * bn + i] = 0.0

    return epilogue


def make_body(spec: LinearSpec, gated: bool = False):
    """T.macro `linear_tile(V, n_tile, m_tile, k_split)`; V: the tensors of `views(spec)` in order.
    gated: the persistent kernel's form of the GEMV body, `(V, n_tile, m_tile, k_split, gate)`
    (it issues its first weight stages, then waits for its inputs: runtime/persistent/megakernel.Gate);
    check `kernels.common.is_gated` on the result (the wgmma tile body has no gated form)."""
    if spec.gemv:
        return make_gemv_body(spec, gated)
    import tilelang.language as T

    bm, bn, bk, split = spec.block_m, spec.block_n, spec.block_k, spec.split_k
    N, K, M = spec.n, spec.k, spec.m
    nk = K // bk // split
    assert K % bk == 0 and (K // bk) % split == 0, spec
    assert spec.norm_eps is None or K % 128 == 0, spec
    norm, fp8 = spec.norm_eps is not None, spec.fp8
    f32 = "float32"
    mv = min(bm, M)  # rows of a row block that can be real tokens (the rest are zero padding)
    row_rstd = make_row_rstd(mv, K, spec.norm_eps) if norm else None
    epilogue = make_epilogue(spec)

    @T.macro
    def linear_tile(V, n_tile, m_tile, k_split):
        v = _unpack(spec, V)
        X, W, Sinv, G = v["x"], v["w"], v.get("scale_inv"), v.get("gamma")
        x_s = T.alloc_shared((bm, bk), "bfloat16")
        w_s = T.alloc_shared((bn, bk), spec.w_dtype)
        acc = T.alloc_fragment((bn, bm), f32)
        if fp8:
            wd_s = T.alloc_shared((bn, bk), "bfloat16")
        if norm:
            xn_s = T.alloc_shared((bm, bk), "bfloat16")
            rstd = alloc_unmerged((bm,), f32)
            for i in T.Parallel(bm):
                rstd[i] = 0.0
            T.sync_threads()
            row_rstd(X, m_tile * bm, rstd)
        T.clear(acc)
        # never more stages than k steps: a 3-stage pipeline over one step (K = block_k = 64, a
        # dense MLP's down_proj slice at 8 ranks) computed garbage on the H200
        for kk in T.Pipelined(nk, num_stages=min(spec.stages, nk)):
            k0 = (k_split * nk + kk) * bk
            T.copy(W[n_tile * bn, k0], w_s)
            T.copy(X[m_tile * bm, k0], x_s)
            if norm:
                for i, j in T.Parallel(bm, bk):
                    xn_s[i, j] = T.Cast("bfloat16", T.Cast(f32, x_s[i, j]) * rstd[i] * T.Cast(f32, G[k0 + j]))
            if fp8:
                for i, j in T.Parallel(bn, bk):
                    wd_s[i, j] = T.Cast(
                        "bfloat16",
                        T.Cast(f32, w_s[i, j]) * Sinv[T.min(n_tile * bn + i, N - 1) // spec.scale_rows, k0 // 128],
                    )
                if norm:
                    T.gemm(wd_s, xn_s, acc, transpose_B=True)
                else:
                    T.gemm(wd_s, x_s, acc, transpose_B=True)
            else:
                if norm:
                    T.gemm(w_s, xn_s, acc, transpose_B=True)
                else:
                    T.gemm(w_s, x_s, acc, transpose_B=True)
        epilogue(V, acc, n_tile, m_tile)

    return linear_tile


def gemv_stages(spec: LinearSpec) -> tuple[int, int]:
    """(chunks per ring stage, ring stages) of the GEMV body's weight ring: a stage is block_n rows
    x up to GEMV_STAGE_CHUNKS chunks (a divisor of the task's chunks); as many stages as the task
    has, up to GEMV_RING_BYTES and what GEMV_SMEM_BYTES leaves beside the x stage."""
    nck = spec.k // GEMV_CHUNK // spec.split_k
    sk = max(d for d in range(1, GEMV_STAGE_CHUNKS + 1) if nck % d == 0)
    stage = spec.block_n * (sk * GEMV_CHUNK + GEMV_ROW_PAD)
    mv = min(spec.block_m, spec.m)
    x_bytes = (1 << (mv - 1).bit_length()) * (spec.k // spec.split_k) * 2
    budget = min(GEMV_RING_BYTES, GEMV_SMEM_BYTES - x_bytes)
    return sk, max(1, min(nck // sk, budget // stage))


def make_gemv_body(spec: LinearSpec, gated: bool = False, evict_first: bool = True):
    """The register GEMV body for fp8 weights and m <= GEMV_M tokens (decode, DFlash verify).

    Weights stream through a shared-memory ring of cp.async stages (`gemv_stages`: block_n rows x
    up to 8 chunks each). The first stages and the block scales are issued before anything else,
    so their DRAM latency overlaps the norm prologue and x staging (and, gated, the wait for the
    task's inputs, which comes right after them); then every stage is waited for, computed, and its
    slot refilled with the stage a ring length ahead. Each lane reads 16 fp8 bytes per (row, chunk)
    from the ring (rows padded so a quarter-warp's reads hit distinct banks), converts pairs to bf16
    exactly (tilert_e4m3x2) and feeds mma.sync m16n8k16 with 16 weight rows in the M slot and the
    tokens in N ("swap AB", as kernels/mxfp4_gemm.py: the K order inside a chunk is permuted the same
    way for w and x, so no shuffles). Each chunk's product is scaled by its rows' block scales in fp32
    (more exact than rounding w * scale to bf16); the task's scales are staged in shared memory once.
    The block_n rows form block_n / 16 row groups; each group's 8 / groups warps split a stage's
    chunks and reduce through shared memory. The task's x block (its rows that can hold tokens x its
    k range, at most GEMV_X_BYTES) is staged in shared memory once, normalised there with a norm
    (bf16(x * rstd * gamma), the prologue's rounding), so the MMAs never wait on a global x load."""
    import tilelang.language as T

    bm, bn, split = spec.block_m, spec.block_n, spec.split_k
    N, K, M = spec.n, spec.k, spec.m
    CH = GEMV_CHUNK
    assert K % 128 == 0 and (K // CH) % split == 0, spec
    nck = K // CH // split  # chunks of this task
    groups = bn // 16
    warps = 256 // 32
    assert warps % groups == 0, spec
    wpg = warps // groups  # warps per row group (they split each stage's chunks)
    SK, NS = gemv_stages(spec)
    nst = nck // SK  # stages of this task
    UK = -(-SK // wpg)  # chunks per warp per stage
    RW = (SK * CH + GEMV_ROW_PAD) // 4  # u32 words per ring row
    NT = bm // 8
    mv = min(bm, M)
    mvp = 1 << (mv - 1).bit_length()  # staged rows: a power of two (X holds them: rows are padded)
    kt = K // split  # k elements of this task
    assert mvp * kt * 2 <= GEMV_X_BYTES, spec
    sr = spec.scale_rows
    srows = max(1, bn // sr)  # scale rows a tile spans (tiles are block_n-aligned; sr divides or is a multiple of bn)
    scols = nck * CH // 128 + 1  # scale columns a task's k range can touch
    KS = K // 128
    NSR = -(-N // sr)
    norm = spec.norm_eps is not None
    row_rstd = make_row_rstd(mv, K, spec.norm_eps) if norm else None
    epilogue = make_epilogue(spec)
    mma_reduce = make_mma_reduce(bm, groups, warps)
    f32, u32 = "float32", "uint32"

    PR = SK * CH // 16  # 16-byte pieces per stage row
    pieces = bn * PR
    # weights evict-first in L2 inside the persistent step (a step streams GBs through it); the
    # standalone launcher uses the plain cp.async (see tilert_cp_async16 in the prelude)
    cp_async = "tilert_cp_async16_ef" if evict_first else "tilert_cp_async16"

    @T.macro
    def issue(Wv, ring, n_tile, k_split, st, tx):
        """Stage st of the task (if it has one) into ring slot st % NS (cp.async, evict-first in L2;
        rows past N zero-filled): one commit group either way."""
        if st < nst:
            for pi in T.unroll(-(-pieces // 256)):
                pc = pi * 256 + tx
                if pieces % 256 == 0 or pc < pieces:
                    row = n_tile * bn + pc // PR
                    col = (k_split * nck + st * SK) * (CH // 4) + (pc % PR) * 4
                    dst = ((st % NS) * bn + pc // PR) * RW + (pc % PR) * 4
                    src = T.cast(T.min(row, N - 1), "int64") * (K // 4) + col
                    T.call_extern("handle", cp_async, ring.data, dst, Wv.data, src, row < N)
        T.ptx_commit_group()

    @T.macro
    def gemv_core(V, n_tile, m_tile, k_split, gate):
        T.import_source(prelude())
        v = _unpack(spec, V)
        X, W, Sinv, G = v["x"], v["w"], v["scale_inv"], v.get("gamma")
        Wv = T.view(W, shape=[N, K // 4], dtype=u32)
        ring = T.alloc_shared((NS, bn, RW), u32)
        sc_s = T.alloc_shared((srows, scols), f32)
        wq = T.alloc_local((8,), u32)
        xb = T.alloc_local((NT * 16,), "bfloat16")
        af = T.alloc_local((4,), u32)
        xs = T.alloc_shared((mvp, kt), "bfloat16")
        acc = T.alloc_local((NT * 4,), f32)
        part = T.alloc_local((NT * 4,), f32)
        red = T.alloc_shared((warps, 16, bm), f32)
        out_s = T.alloc_shared((bn, bm), f32)
        rstd = alloc_unmerged((bm,), f32)  # read by the staging loop that writes xs
        tx = T.get_thread_binding()
        warp = tx // 32
        grp, wi = warp // wpg, warp % wpg
        r, c = (tx % 32) // 4, tx % 4
        for st in T.unroll(NS):  # the weights first: nothing below waits for them until the mainloop
            issue(Wv, ring, n_tile, k_split, st, tx)
        col0 = (k_split * nck * CH) // 128  # the task's first scale column
        for i, j in T.Parallel(srows, scols):
            sc_s[i, j] = Sinv[T.min((n_tile * bn) // sr + i, NSR - 1), T.min(col0 + j, KS - 1)]
        if gate is not None:
            T.sync_threads()  # sc_s is written: a barrier ThreadSync can see (Gate.passed() is opaque to it)
            gate.wait()  # x (and the residual) come from earlier tasks; nothing above read them
        if gate_passed(gate):  # every input is ready (a barrier); false only after a timed-out wait
            if norm:
                row_rstd(X, m_tile * bm, rstd)
                T.sync_threads()
            k0 = k_split * kt
            for i, j in T.Parallel(mvp, kt):
                if norm:
                    xv = T.Cast(f32, X[m_tile * bm + i, k0 + j])
                    xs[i, j] = T.Cast("bfloat16", xv * rstd[T.min(i, mv - 1)] * T.Cast(f32, G[k0 + j]))
                else:
                    xs[i, j] = X[m_tile * bm + i, k0 + j]
            for i in T.unroll(NT * 4):
                acc[i] = T.float32(0)
            srow0 = T.min((n_tile * bn + grp * 16 + r) // sr - (n_tile * bn) // sr, srows - 1)
            srow1 = T.min((n_tile * bn + grp * 16 + r + 8) // sr - (n_tile * bn) // sr, srows - 1)
            for it in T.serial(nst):
                T.ptx_wait_group(NS - 1)  # stage it has landed (this thread's copies) ...
                T.sync_threads()  # ... and everyone's; xs and sc_s are ready too
                slot = it % NS
                for u in T.unroll(UK):
                    cl = u * wpg + wi  # this warp's chunk within the stage
                    if cl < SK:
                        ci = it * SK + cl  # chunk within the task
                        for q in T.vectorized(4):
                            wq[q] = ring[slot, grp * 16 + r, cl * (CH // 4) + c * 4 + q]
                        for q in T.vectorized(4):
                            wq[4 + q] = ring[slot, grp * 16 + r + 8, cl * (CH // 4) + c * 4 + q]
                        scol = (k_split * nck + ci) * CH // 128 - col0
                        xo = ci * CH + c * 16  # this lane's 16 x elements of the chunk
                        for t in T.unroll(NT):  # x of this lane's token (row r of token tile t), same K order
                            if t * 8 + r < mv:
                                for q in T.vectorized(16):
                                    xb[t * 16 + q] = xs[t * 8 + r, xo + q]
                            else:
                                for q in T.unroll(16):
                                    xb[t * 16 + q] = T.Cast("bfloat16", 0)
                        for i in T.unroll(NT * 4):
                            part[i] = T.float32(0)
                        for s_ in T.unroll(4):
                            w0 = wq[s_]
                            w1 = wq[4 + s_]
                            af[0] = T.call_extern(u32, "tilert_e4m3x2", w0, 0x1404)
                            af[1] = T.call_extern(u32, "tilert_e4m3x2", w1, 0x1404)
                            af[2] = T.call_extern(u32, "tilert_e4m3x2", w0, 0x3424)
                            af[3] = T.call_extern(u32, "tilert_e4m3x2", w1, 0x3424)
                            for t in T.unroll(NT):
                                T.ptx_mma(f32, "m16n8k16", "row", "col", "bf16", "bf16", "fp32", af.data, 0, xb.data,
                                          t * 16 + s_ * 4, part.data, t * 4, T.bool(False))  # fmt: skip
                        for t in T.unroll(NT):  # fp32 block scales: rows r (c0, c1) and r + 8 (c2, c3)
                            for j in T.unroll(2):
                                acc[t * 4 + j] += part[t * 4 + j] * sc_s[srow0, scol]
                                acc[t * 4 + 2 + j] += part[t * 4 + 2 + j] * sc_s[srow1, scol]
                T.sync_threads()  # every warp done with slot before it is refilled
                issue(Wv, ring, n_tile, k_split, it + NS, tx)
            # every warp is past the last barrier: done with xs and the ring before `red` is written
            mma_reduce(red, acc, out_s, warp, r, c)
            epilogue(V, out_s, n_tile, m_tile)

    if gated:

        @T.macro
        def gemv_tile_gated(V, n_tile, m_tile, k_split, gate):
            gemv_core(V, n_tile, m_tile, k_split, gate)

        return mark_gated(gemv_tile_gated)

    @T.macro
    def gemv_tile(V, n_tile, m_tile, k_split):
        gemv_core(V, n_tile, m_tile, k_split, None)

    return gemv_tile


def make_kernel(spec: LinearSpec):
    """Standalone launcher of the body (grid: n tiles x m tiles * k splits) over a pointer row."""
    n_t, m_t = cdiv(spec.n, spec.block_n), spec.mp // spec.block_m
    return grid_launcher(
        "linear_fused", make_gemv_body(spec, evict_first=False) if spec.gemv else make_body(spec), views(spec),
        (n_t, m_t * spec.split_k),
        lambda bx, by, bz: (bx, by // spec.split_k, by % spec.split_k),
    )  # fmt: skip


def reference(spec: LinearSpec, x: Any, w: Any, scale_inv: Any = None, gamma: Any = None, residual: Any = None) -> Any:
    """Torch reference (fp32) composing the unfused ops: [rms_norm, rounded to bf16 as the
    prologues do ->] dequant + linear [-> + residual]; x [m, k], w [n, k]."""
    xf = x[: spec.m].float()
    if spec.norm_eps is not None:
        xf = rms_norm(xf, gamma, spec.norm_eps).to(torch.bfloat16).float()
    wf = dequant_fp8(w, scale_inv, (spec.scale_rows, 128)) if spec.fp8 else w.float()
    y = linear(xf, wf)
    return y if residual is None else y + residual[: spec.m].float()


def make_inputs(spec: LinearSpec, *, seed: int | None = None, device: str = "cuda") -> dict[str, Any]:
    """Fresh random operands for `spec` (x rows padded to mp with zeros; fp8 weights quantised with
    block scales) and NaN-poisoned outputs (workspace zeroed, as the runtime allocates it)."""
    g = torch.Generator(device=device)
    g.manual_seed(seed if seed is not None else torch.seed() % 2**31)
    M, N, K, mp = spec.m, spec.n, spec.k, spec.mp
    f32 = torch.float32
    dt = {"bfloat16": torch.bfloat16, "float32": f32}
    x = torch.zeros(mp, K, dtype=torch.bfloat16, device=device)
    x[:M] = torch.randn(M, K, device=device, generator=g).to(torch.bfloat16)
    w = torch.randn(N, K, device=device, generator=g) * K**-0.5
    t: dict[str, Any] = {"x": x}
    if spec.fp8:
        t["w"], t["scale_inv"] = fp8.quantize_blocks(w, (spec.scale_rows, 128))
    else:
        t["w"] = w.to(torch.bfloat16)
    if spec.norm_eps is not None:
        t["gamma"] = (1 + 0.1 * torch.randn(K, device=device, generator=g)).to(torch.bfloat16)
    if spec.res_dtype is not None:
        t["residual"] = torch.randn(mp, N, device=device, generator=g).to(dt[spec.res_dtype])
    t["out"] = torch.full((mp, N), float("nan"), dtype=dt[spec.out_dtype], device=device)
    if spec.split_k > 1:
        t["ws"] = torch.zeros(mp, N, dtype=f32, device=device)
        t["arrivals"] = torch.zeros(spec.tiles, dtype=torch.int32, device=device)
        t["epoch"] = torch.ones(1, dtype=torch.int32, device=device)
    return t


def run(spec: LinearSpec, t: dict[str, Any]) -> Any:
    """Launch the standalone kernel over the tensors `t` (names of `views(spec)`); returns out[:m]."""
    specs = views(spec)
    row = pointer_row([t[name] for name, _, _ in specs], specs, "linear_fused").to(t["x"].device)
    build(make_kernel(spec))(row)
    return t["out"][: spec.m]


def check(spec: LinearSpec, seed: int | None = None) -> float:
    """||out - reference|| / ||reference|| on fresh random inputs (raises on unwritten outputs)."""
    t = make_inputs(spec, seed=seed)
    y = run(spec, t).double()
    if not y.isfinite().all():
        raise AssertionError(f"unwritten or non-finite outputs: {spec}")
    ref = reference(spec, t["x"], t["w"], t.get("scale_inv"), t.get("gamma"), t.get("residual")).double()
    return ((y - ref).norm() / ref.norm()).item()
