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

Reference: the linear op (tilert/ir/opset/fused.py), which composes rms_norm, dequant, matmul, add.
"""

from __future__ import annotations

from dataclasses import dataclass

from tilert.kernels.common import cdiv
from tilert.kernels.views import grid_launcher


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


def make_row_rstd(rows: int, k: int, eps: float):
    """T.macro `row_rstd(X, row0, out)`: out[i] = rsqrt(mean(X[row0 + i, :k]^2) + eps) for i < rows,
    the RMSNorm scale of the rows that can hold tokens. Wide column chunks (up to 8192 / rows
    elements per row), so one CTA's loads are in flight together instead of one 128-column step at
    a time. Shared by the fused linear's prologue and the persistent MoE router's."""
    import tilelang.language as T

    f32 = "float32"
    cw = next(w for w in (8192 // rows, 4096 // rows, 2048 // rows, 1024, 512, 256, 128) if w <= k and k % w == 0)

    @T.macro
    def row_rstd(X, row0, out):
        sq = T.alloc_fragment((rows, cw), f32)
        rs = T.alloc_fragment((rows,), f32)
        T.clear(sq)
        for kc in T.serial(k // cw):
            for i, j in T.Parallel(rows, cw):
                v = T.Cast(f32, X[row0 + i, kc * cw + j])
                sq[i, j] += v * v
        T.reduce_sum(sq, rs, dim=1)
        for i in T.Parallel(rows):
            out[i] = T.rsqrt(rs[i] / k + eps)

    return row_rstd


def make_body(spec: LinearSpec):
    """T.macro `linear_tile(V, n_tile, m_tile, k_split)`; V: the tensors of `views(spec)` in order."""
    import tilelang.language as T

    bm, bn, bk, split = spec.block_m, spec.block_n, spec.block_k, spec.split_k
    N, K, M = spec.n, spec.k, spec.m
    nk = K // bk // split
    assert K % bk == 0 and (K // bk) % split == 0, spec
    assert spec.norm_eps is None or K % 128 == 0, spec
    norm, res, fp8 = spec.norm_eps is not None, spec.res_dtype is not None, spec.fp8
    n_mt = spec.mp // bm
    f32 = "float32"
    mv = min(bm, M)  # rows of a row block that can be real tokens (the rest are zero padding)
    row_rstd = make_row_rstd(mv, K, spec.norm_eps) if norm else None

    @T.macro
    def linear_tile(V, n_tile, m_tile, k_split):
        i_v = 2
        X, W = V[0], V[1]
        if fp8:
            Sinv = V[i_v]
            i_v += 1
        if norm:
            G = V[i_v]
            i_v += 1
        if res:
            R = V[i_v]
            i_v += 1
        Out = V[i_v]
        if split > 1:
            Ws, Arr, Ep = V[i_v + 1], V[i_v + 2], V[i_v + 3]
        x_s = T.alloc_shared((bm, bk), "bfloat16")
        w_s = T.alloc_shared((bn, bk), spec.w_dtype)
        acc = T.alloc_fragment((bn, bm), f32)
        if fp8:
            wd_s = T.alloc_shared((bn, bk), "bfloat16")
        if norm:
            xn_s = T.alloc_shared((bm, bk), "bfloat16")
            rstd = T.alloc_shared((bm,), f32)
            for i in T.Parallel(bm):
                rstd[i] = 0.0
            T.sync_threads()
            row_rstd(X, m_tile * bm, rstd)
        T.clear(acc)
        for kk in T.Pipelined(nk, num_stages=spec.stages):
            k0 = (k_split * nk + kk) * bk
            T.copy(W[n_tile * bn, k0], w_s)
            T.copy(X[m_tile * bm, k0], x_s)
            if norm:
                for i, j in T.Parallel(bm, bk):
                    xn_s[i, j] = T.Cast(
                        "bfloat16", T.Cast(f32, x_s[i, j]) * rstd[i] * T.Cast(f32, G[k0 + j])
                    )
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
        if split == 1:
            for i, j in T.Parallel(bn, bm):
                if n_tile * bn + i < N and m_tile * bm + j < M:
                    if res:
                        Out[m_tile * bm + j, n_tile * bn + i] = T.Cast(
                            spec.out_dtype, acc[i, j] + T.Cast(f32, R[m_tile * bm + j, n_tile * bn + i])
                        )
                    else:
                        Out[m_tile * bm + j, n_tile * bn + i] = T.Cast(spec.out_dtype, acc[i, j])
        else:
            last = T.alloc_shared((1,), "int32")
            for i, j in T.Parallel(bn, bm):
                if n_tile * bn + i < N and m_tile * bm + j < M:
                    T.atomic_add(Ws[m_tile * bm + j, n_tile * bn + i], acc[i, j])
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
                        v = T.atomic_load(Ws[m_tile * bm + j, n_tile * bn + i], memory_order="relaxed")
                        if res:
                            Out[m_tile * bm + j, n_tile * bn + i] = T.Cast(
                                spec.out_dtype, v + T.Cast(f32, R[m_tile * bm + j, n_tile * bn + i])
                            )
                        else:
                            Out[m_tile * bm + j, n_tile * bn + i] = T.Cast(spec.out_dtype, v)
                        Ws[m_tile * bm + j, n_tile * bn + i] = 0.0

    return linear_tile


def make_kernel(spec: LinearSpec):
    """Standalone launcher of the body (grid: n tiles x m tiles * k splits) over a pointer row."""
    n_t, m_t = cdiv(spec.n, spec.block_n), spec.mp // spec.block_m
    return grid_launcher(
        "linear_fused", make_body(spec), views(spec), (n_t, m_t * spec.split_k),
        lambda bx, by, bz: (bx, by // spec.split_k, by % spec.split_k),
    )  # fmt: skip
