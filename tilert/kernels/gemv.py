"""Streaming decode GEMV, MXFP4 or FP8 weights: y[M, N] = x[M, K] bf16 @ W[N, K]^T, 1 <= M <= 16.

Decode reads each weight byte once, so the body's one job is to keep enough bytes in flight per SM
(Little's law: ~32 GB/s per SM x ~1-2 us of DRAM latency = 32-64 KB on an H100, more on an H200).

Formats (`Config.fmt`): "mxfp4" (tilert.numerics.mxfp4: blocks uint8 [N, K/2], scales uint8
[N, K/32]) and "fp8" (e4m3 [N, K] with float32 128x128 block scales [ceil(N/128), ceil(K/128)]).
Both store 64 bytes of a weight row per k *chunk* (MXFP4: 128 elements = 4 MX blocks; FP8: 64).

Body `gemv_tile(V, n_tile, k_split)`, V = the tensors of `views(cfg)` (X, W, S, Y [, WS, CNT]):
  tile       `rows` = 16 * g * wr weight rows x `ncs` chunks (the k range of split `k_split`).
  warps      8 warps = wr along rows x wk = 8 / wr along k; a warp owns g 16-row groups and the
             tile's chunks wk_i, wk_i + wk, ...; its lane (r, c) owns rows r and r + 8 of each group
             and the 16-byte piece c of every chunk ("swap AB" on mma.sync m16n8k16: weight rows fill
             the MMA's M slot, tokens its N slot; the K order inside a piece is permuted the same way
             for w and x, as in mxfp4_gemm.make_mainloop, so no shuffles).
  pipeline   every thread streams its own pieces through a private ring in shared memory: `depth`
             slots of 2g x 16 bytes (cp.async, one commit group per chunk), `depth - 1` chunks in
             flight while it computes one. The ring is private, so the mainloop has no barrier and
             no register dependency between the next load and the current MMA. In flight per CTA:
             (depth - 1) x 8 KB x g.
  x, scales  the tile's x slice (M rows x its k range, bf16, 16-byte units XOR-swizzled so a
             quarter-warp's reads hit distinct banks) and block scales are staged in shared memory
             once by cp.async in the first chunk's group (MXFP4 scale rows that are not 16-byte
             aligned, odd K: byte loads); the first chunk's wait and one barrier gate the loop.
  decode     in registers: MXFP4 by tilert_e2m1x2_lh, 4 instructions per bf16 pair, or, with the
             blocks in TILERT_MXFP4_ORDER=decode word order, tilert_e2m1x2_ord, 3 (the block
             scale folded into its bf16x2 multiply; codes > 128: a warp-uniform second multiply),
             FP8 by tilert_e4m3x2_sx exactly, the chunk's fp32 product times its 128x128 scale.
  epilogue   the wk warps of a row slice reduce through shared memory; split == 1 stores Y; split > 1
             stores the CTA's partial in WS[k_split] and the last of the tile's `split` CTAs (arrival
             counter CNT[n_tile], reset by that CTA) sums the partials in split order into Y: every
             element of Y is written exactly once, nothing needs zeroing between calls.

Persistent contract: 256 threads, no TMA descriptors, no warp specialisation, no grid-wide waits;
the views may come from pointers (`views.make_views`, as the stream launcher does). The persistent
step calls `make_body(cfg)` with its node's views in `views(cfg)` order and (n_tile, k_split) of a
task in 0..n_tiles-1 x 0..split-1, after T.import_source of a prelude holding GEMV_PRELUDE
(`import_prelude=False` when the step imports it itself); WS (never initialised) and CNT (zeroed
once) are the node's own buffers when split > 1. Shared memory: `smem_bytes(cfg)`. To keep the
loads flowing across tasks it calls `make_body(cfg, prefetch=True)` instead, with the next task
of the same node on that CTA (`make_body`'s docstring; `smem_bytes(cfg, prefetch=True)`).
Linear options (the persistent step's LINEAR_FP8 tasks with TILERT_LINEAR_BODY=gemv,
runtime/kinds/linear.py): `Config.norm_eps` (an RMSNorm prologue on the staged x slice),
`Config.res_dtype` (a residual epilogue), views gamma and residual after the others; the step calls
`make_body(cfg, prefetch=True, x_own=True)`, whose tasks stage their own x after their wait.
Item form: `make_body(cfg, items=ItemMap(...))` runs the same pipeline over items whose rows, x rows
and stores an ItemMap defines (the persistent MoE's expert items, kernels/moe.py make_gemv_tasks;
shared memory `item_smem_bytes`).

Launchers: `make_kernel(cfg)` (grid n_tiles x split, typed tensor arguments) and
`make_stream_kernel(cfg, copies, sms, prefetch)` (one CTA per SM looping over copies x tiles
tasks back to back, each copy's views a row of a pointer table: the persistent task stream of
benchmarks/gemv_sweep.py). Reference: tilert.ops.linear.mxfp4_linear / fp8_linear.
"""

# no `from __future__ import annotations`: TileLang evaluates the prim_func annotations

import dataclasses
import functools
import operator
import os
from dataclasses import dataclass
from typing import Any

from tilert.kernels.common import CTA_SMEM_LIMIT, DEVICE_PRELUDE, build, cdiv, make_row_rstd, per_mxfp4_order
from tilert.numerics import mxfp4

THREADS = 256
WARPS = THREADS // 32
MAX_M = 16


def enabled() -> bool:
    """Whether `mxfp4_gemm.run` / `fp8_gemm.run` (the eager runtime's linears) take this GEMV for
    M <= MAX_M: opt-in with TILERT_GEMV=1 until its GPU tests and sweep (benchmarks/gemv_sweep.py)
    have run on a GPU and picked the tilings (`TUNED`); the earlier kernels stay the default."""
    return os.environ.get("TILERT_GEMV", "0") == "1"


NORM_STATS = ("staged", "global")  # Config.norm_stats
CHUNK_BYTES = 64  # bytes of one weight row per chunk: 4 lanes x 16 bytes
CHUNK_ELEMS = {"mxfp4": 128, "fp8": 64}
SMEM_LIMIT = CTA_SMEM_LIMIT  # shared memory one SM offers its CTAs (H100, H200)

# DEVICE_PRELUDE plus the GEMV's helpers. A persistent step whose bodies use them imports this one
# for every body (a kernel takes one import string: kernels.common.using_prelude); DEVICE_PRELUDE
# itself stays as it is, since every cached kernel's text holds it. The ring is read and waited on
# through helpers so TileLang's barrier insertion sees neither: its slots are private to a thread,
# and a __syncthreads per chunk would only stall the warps.
GEMV_PRELUDE = (
    DEVICE_PRELUDE
    + r"""
#ifndef TILERT_GEMV_PRELUDE
#define TILERT_GEMV_PRELUDE
__device__ __forceinline__ void tilert_lds16(void* dst, int doff, const void* smem, int soff) {
  // 16 bytes of shared memory (u32 offset soff) -> dst[doff : doff + 4] (a local u32 array)
  *reinterpret_cast<uint4*>((unsigned*)dst + doff) = *reinterpret_cast<const uint4*>((const unsigned*)smem + soff);
}
__device__ __forceinline__ unsigned tilert_prmt(unsigned a, unsigned b, unsigned sel) {
  // PTX prmt: a selector nibble with bit 3 set replicates the picked byte's sign bit (0x00 / 0xFF)
  unsigned d;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
  return d;
}
__device__ __forceinline__ unsigned tilert_e2m1x2_lh(unsigned l, unsigned h, unsigned sel, unsigned mult) {
  // E2M1 pair -> bf16x2 * mult, from the nibble planes l = w & 0x0F0F0F0F, h = (w >> 4) & 0x0F0F0F0F:
  // sel = [b, 8|b, 4+b, 8|(4+b)] gives halves (l_b, h_b) with zero high bytes (sign-replicated bytes
  // < 0x80); y * 0x1040 = y << 6 | y << 12 (no carries), masked to bits 6..8 and 15: the code placed as
  // tilert_e2m1x2 places it (value * 2^-126), one multiply by mult = 2^(scale-1) restores it
  const unsigned y = tilert_prmt(l, h, sel);
  return tilert_bf16x2_mul((y * 0x1040u) & 0x81C081C0u, mult);
}
__device__ __forceinline__ unsigned tilert_e4m3x2_sx(unsigned w, unsigned sel) {
  // E4M3 pair -> bf16x2, exact: sel = [i, 8|i, j, 8|j] gives halves (b_i, sign(b_i) x 0xFF), ...;
  // << 4 puts exponent+mantissa at bits 10..4 and a sign copy at bit 15 (as tilert_e4m3x2: value *
  // 2^-120, e = 0 on bf16 subnormals), one multiply by 2^120
  const unsigned y = tilert_prmt(w, w, sel);
  return tilert_bf16x2_mul((y << 4) & 0x87F087F0u, 0x7B807B80u);
}
__device__ __forceinline__ void tilert_cp_async4(void* smem, int soff, const void* gmem, long long goff, bool ok) {
  // 4 bytes global -> shared (offsets in 4-byte words; zero-filled when !ok), through L1
  const unsigned s = (unsigned)__cvta_generic_to_shared((unsigned*)smem + soff);
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;"
               : : "r"(s), "l"((const unsigned*)gmem + goff), "r"(ok && gmem != nullptr ? 4 : 0) : "memory");
}
template <int N>
__device__ __forceinline__ void tilert_cp_async_wait() {
  // this thread's cp.async groups but the newest N are complete (no barrier: the ring is private)
  asm volatile("cp.async.wait_group %0;" : : "n"(N) : "memory");
}
#endif
"""
)

# GEMV_PRELUDE plus the helpers of the persistent step's linear form (`make_body(cfg, prefetch=True,
# x_own=True)`, the RMSNorm prologue); a step with both imports this one (a superset of GEMV_PRELUDE).
LINEAR_PRELUDE = (
    GEMV_PRELUDE
    + r"""
#ifndef TILERT_GEMV_LINEAR_PRELUDE
#define TILERT_GEMV_LINEAR_PRELUDE
__device__ __forceinline__ unsigned tilert_bf16x2_norm(unsigned x, unsigned g, float r) {
  // bf16 pair x -> bf16(x * r * g) (fp32, in that order; g a bf16 pair too), rounded to nearest even:
  // the RMSNorm prologue's rounding (linear_fused's, the reference's rms_norm then .to(bf16))
  const float xl = __uint_as_float(x << 16), xh = __uint_as_float(x & 0xFFFF0000u);
  const float gl = __uint_as_float(g << 16), gh = __uint_as_float(g & 0xFFFF0000u);
  unsigned d;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(xh * r * gh), "f"(xl * r * gl));
  return d;
}
__device__ __forceinline__ void tilert_norm16(void* smem, int soff, const unsigned* g, float r) {
  // 16 bytes of bf16 x in shared memory (u32 offset soff) -> bf16(x * r * g) in place (g: 4 words)
  uint4* p = reinterpret_cast<uint4*>((unsigned*)smem + soff);
  uint4 v = *p;
  v.x = tilert_bf16x2_norm(v.x, g[0], r);
  v.y = tilert_bf16x2_norm(v.y, g[1], r);
  v.z = tilert_bf16x2_norm(v.z, g[2], r);
  v.w = tilert_bf16x2_norm(v.w, g[3], r);
  *p = v;
}
__device__ __forceinline__ float tilert_sq4(const void* smem, int soff) {
  // the sum of squares of the 8 bf16 values in 16 bytes of shared memory (u32 offset soff)
  const uint4 v = *reinterpret_cast<const uint4*>((const unsigned*)smem + soff);
  float s = 0.f;
  for (unsigned w : {v.x, v.y, v.z, v.w}) {
    const float l = __uint_as_float(w << 16), h = __uint_as_float(w & 0xFFFF0000u);
    s = fmaf(l, l, fmaf(h, h, s));
  }
  return s;
}
__device__ __forceinline__ void tilert_smem_live(const void* smem) {
  // nothing: a use of a shared buffer that TileLang's shared-memory merge sees, so the buffer keeps
  // its bytes to this point (copies for the next task land in it while the body ends)
}
#endif
"""
)


# LINEAR_PRELUDE plus the bulk-copy ring of the item form (`Config.bulk`): mbarriers and
# cp.async.bulk (the TMA unit copies a weight row's stage bytes in one request, so a CTA keeps its
# bytes in flight with few large requests instead of many 16-byte ones). A superset of the other
# two, so a step whose MoE loads in bulk imports it for every body.
BULK_PRELUDE = (
    LINEAR_PRELUDE
    + r"""
#ifndef TILERT_GEMV_BULK_PRELUDE
#define TILERT_GEMV_BULK_PRELUDE
__device__ __forceinline__ unsigned tilert_mbar_addr(void* bars, int i) {
  return (unsigned)__cvta_generic_to_shared((unsigned long long*)bars + i);
}
__device__ __forceinline__ void tilert_mbar_init(void* bars, int n) {
  // barriers 0 .. n-1, one arrival a phase (the producer's expect_tx); the caller then syncs the CTA
  for (int i = 0; i < n; ++i)
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" : : "r"(tilert_mbar_addr(bars, i)) : "memory");
  asm volatile("fence.mbarrier_init.release.cluster;" : : : "memory");
}
__device__ __forceinline__ void tilert_mbar_expect(void* bars, int i, int bytes) {
  // the producer's arrival on barrier i, which then completes once `bytes` more have landed
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" : : "r"(tilert_mbar_addr(bars, i)), "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void tilert_bulk_g2s(void* smem, int soff, const void* gmem, long long goff, int bytes,
                                                void* bars, int i, bool evict_first) {
  // bytes (a multiple of 16, both ends 16-byte aligned) global + goff -> shared + soff (byte offsets),
  // counted on barrier i
  const unsigned s = (unsigned)__cvta_generic_to_shared((char*)smem + soff);
  const char* g = (const char*)gmem + goff;
  if (evict_first) {
    unsigned long long pol;
    asm("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(pol));
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint"
                 " [%0], [%1], %2, [%3], %4;"
                 : : "r"(s), "l"(g), "r"(bytes), "r"(tilert_mbar_addr(bars, i)), "l"(pol) : "memory");
  } else {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 : : "r"(s), "l"(g), "r"(bytes), "r"(tilert_mbar_addr(bars, i)) : "memory");
  }
}
__device__ __forceinline__ void tilert_mbar_wait(void* bars, int i, int parity) {
  // until barrier i's phase of this parity completes; a copy that never lands traps (no hang)
  const unsigned a = tilert_mbar_addr(bars, i);
  for (long long n = 0;; ++n) {
    unsigned done;
    asm volatile("{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
                 : "=r"(done) : "r"(a), "r"(parity) : "memory");
    if (done) return;
    if (n > (1ll << 26)) __trap();
  }
}
__device__ __forceinline__ void tilert_syncwarp() { __syncwarp(); }
#endif
"""
)
RED_KEY = "gemv.red"  # the unmerged reduction buffer the prefetch and item bodies of one step kernel share
BULK_PAD = 64  # bytes after each row of a bulk stage: rows r and r + 1 start 64 bytes apart in the banks


@dataclass(frozen=True)
class Config:
    """One compiled GEMV: format, problem shape, tiling (see the module docstring).

    wr: warps along rows (1, 2, 4, 8); g: 16-row groups per warp (1, 2, 4); split: k splits over
    CTAs; depth: ring slots per thread (depth - 1 chunks in flight); ctas: CTAs per SM the
    standalone launcher asks registers for (__launch_bounds__ min blocks); evict_first: weights
    evict-first in L2 (for the persistent step; standalone kernels load without a cache policy).
    norm_eps: an RMSNorm prologue, x -> bf16(x * rstd * gamma) with rstd over the whole row (X then
    holds `x_rows` rows, the padded ones zero); norm_stats: where the rows' rstd comes from, "staged"
    (the x slice in shared memory, where it is the whole row: split 1; split-K tiles fall back to
    global) or "global" (X's rows in global memory while the first chunks fly: common.make_row_rstd);
    res_dtype: a residual epilogue, Y = x @ W^T + R (the persistent step's fused linears,
    runtime/kinds/linear.py). bulk (item form only): the weights reach the ring by cp.async.bulk,
    one copy per tile row and stage (warp 0 issues them, an mbarrier per ring slot counts their
    bytes), into row-major stages (each row padded by BULK_PAD bytes), instead of 16-byte cp.async
    per thread.
    """

    fmt: str
    m: int
    n: int
    k: int
    wr: int = 2
    g: int = 2
    split: int = 1
    depth: int = 4
    ctas: int = 1
    out_dtype: str = "float32"
    evict_first: bool = False
    norm_eps: float | None = None
    res_dtype: str | None = None
    norm_stats: str = "staged"
    bulk: bool = False

    def __post_init__(self) -> None:
        bad = []
        if self.bulk and (self.fmt != "mxfp4" or self.split != 1):
            bad.append(f"bulk with fmt {self.fmt}, split {self.split} (the MXFP4 item form only: split 1)")
        if self.fmt not in CHUNK_ELEMS:
            bad.append(f"fmt {self.fmt!r} (mxfp4 or fp8)")
        if not 1 <= self.m <= MAX_M:
            bad.append(f"m {self.m} (1..{MAX_M})")
        if self.n < 1 or self.k < 32 or self.k % 32:
            bad.append(f"n {self.n}, k {self.k} (k a positive multiple of 32)")
        if self.wr not in (1, 2, 4, 8) or self.g not in (1, 2, 4) or self.depth < 2 or self.ctas < 1:
            bad.append(f"wr {self.wr}, g {self.g}, depth {self.depth}, ctas {self.ctas}")
        if self.out_dtype not in ("float32", "bfloat16"):
            bad.append(f"out_dtype {self.out_dtype}")
        if self.res_dtype not in (None, "float32", "bfloat16"):
            bad.append(f"res_dtype {self.res_dtype}")
        if self.norm_stats not in NORM_STATS:
            bad.append(f"norm_stats {self.norm_stats!r} ({' or '.join(NORM_STATS)})")
        if self.norm_eps is not None and self.k % 128:
            bad.append(f"k {self.k} with a norm (a multiple of 128)")
        if not bad and not 1 <= self.split <= self.chunks:
            bad.append(f"split {self.split} (1..{self.chunks} chunks)")
        if not bad and (self.split - 1) * self.ncs >= self.chunks:
            bad.append(f"split {self.split} leaves a split without chunks ({self.chunks} chunks of {self.ncs})")
        if not bad and smem_bytes(self) * self.ctas > SMEM_LIMIT:
            bad.append(f"shared memory {smem_bytes(self)} B x {self.ctas} CTAs > {SMEM_LIMIT}")
        if bad:
            raise ValueError(f"GEMV config: bad {'; '.join(bad)}")

    @property
    def wk(self) -> int:
        return WARPS // self.wr

    @property
    def rows(self) -> int:
        return 16 * self.g * self.wr

    @property
    def chunks(self) -> int:
        return cdiv(self.k, CHUNK_ELEMS[self.fmt])

    @property
    def ncs(self) -> int:
        """Chunks per tile (the last split may run past K: those pieces read as zeros)."""
        return cdiv(self.chunks, self.split)

    @property
    def items(self) -> int:
        """Chunks per warp per tile."""
        return cdiv(self.ncs, self.wk)

    @property
    def n_tiles(self) -> int:
        return cdiv(self.n, self.rows)

    @property
    def tiles(self) -> int:
        return self.n_tiles * self.split

    @property
    def x_rows(self) -> int:
        """Rows of X the body reads: m, or with a norm the power of two the row statistics may read
        (common.make_row_rstd)."""
        return self.m if self.norm_eps is None else 1 << (self.m - 1).bit_length()

    @property
    def nt(self) -> int:
        """8-token MMA tiles."""
        return cdiv(self.m, 8)

    @property
    def row_bytes(self) -> int:
        return self.k // 2 if self.fmt == "mxfp4" else self.k

    @property
    def weight_bytes(self) -> int:
        """Bytes of W and its scales (what one call must read)."""
        if self.fmt == "mxfp4":
            return self.n * (self.k // 2 + self.k // 32)
        return self.n * self.k + 4 * cdiv(self.n, 128) * cdiv(self.k, 128)

    @property
    def scale_async(self) -> bool:
        """MXFP4 scales staged by 16-byte cp.async (rows and the tile's start 16-byte aligned)."""
        return (self.k // 32) % 16 == 0 and (self.split == 1 or self.ncs % 4 == 0)


@dataclass(frozen=True)
class BulkStages:
    """Where the bulk loads (`Config.bulk`) put and read a tile's weights: stage i of a tile is chunk i
    of every warp along K (bytes [i sb, i sb + sb) of each of its rows), row-major in a ring slot
    with rows `pitch` bytes apart. The body's macros and the tests use the same arithmetic (ints or
    TIR expressions)."""

    rows: int  # tile rows
    wk: int  # warps along K
    row_bytes: int  # bytes of one weight row

    @property
    def sb(self) -> int:
        return self.wk * CHUNK_BYTES

    @property
    def pitch(self) -> int:
        return self.sb + BULK_PAD

    @property
    def slot_bytes(self) -> int:
        return self.rows * self.pitch

    def copy_bytes(self, i: Any) -> Any:
        """Bytes of stage i in each row (the last stage is cut at the row's end)."""
        if isinstance(i, int):
            return min(self.sb, self.row_bytes - i * self.sb)
        import tilelang.language as T

        return T.min(self.sb, self.row_bytes - i * self.sb)

    def src(self, row: Any, i: Any) -> Any:
        """Byte offset in W of stage i of weight row `row`."""
        return row * self.row_bytes + i * self.sb

    def dst(self, slot: Any, lr: Any) -> Any:
        """Byte offset in the ring of tile row lr of the stage in `slot`."""
        return slot * self.slot_bytes + lr * self.pitch

    def read(self, slot: Any, lr: Any, warp: Any, c: Any) -> Any:
        """Byte offset of the 16 bytes lane c (of 4) of `warp` reads from tile row lr in `slot`: its
        warp's chunk of the stage."""
        return self.dst(slot, lr) + (warp % self.wk) * CHUNK_BYTES + c * 16


def _any(terms: Any) -> Any:
    """Logical or of TIR conditions."""
    import tilelang.language as T

    return functools.reduce(T.Or, terms)


def _sum(terms: Any) -> Any:
    """Sum of TIR expressions without a Python 0 (which would make an int term)."""
    return functools.reduce(operator.add, terms)


def smem_bytes(cfg: Config, prefetch: bool = False, x_own: bool = False) -> int:
    """Shared memory of one body: ring + x slice + scales (both twice with prefetch; x once with
    x_own) + reduction buffer (+ flag)."""
    ring = cfg.depth * 2 * cfg.g * 16 * THREADS
    if cfg.bulk:  # row-major stages, each row padded; and the slots' mbarriers
        ring = cfg.depth * BulkStages(cfg.rows, cfg.wk, cfg.row_bytes).slot_bytes + 8 * cfg.depth
    xs = cfg.m * cfg.ncs * CHUNK_ELEMS[cfg.fmt] * 2
    if cfg.fmt == "mxfp4":
        sc = cfg.rows * cdiv(cfg.ncs, 4) * 16
    else:
        sc = cdiv(cdiv(cfg.rows, 128) * (cfg.ncs // 2 + 1) * 4, 16) * 16  # buffers start 16-byte aligned
    red = cfg.wk * 8 * cfg.nt * cfg.rows * 4
    return ring + (2 if prefetch and not x_own else 1) * xs + (2 if prefetch else 1) * sc + red + 16


def item_smem_bytes(cfg: Config, x_buffers: int) -> int:
    """Shared memory of the item form (`make_body(cfg, items=...)`): ring + x_buffers x slices +
    two scale buffers + reduction buffer (+ flag)."""
    return smem_bytes(cfg, prefetch=True) - (2 - x_buffers) * cfg.m * cfg.ncs * CHUNK_ELEMS[cfg.fmt] * 2


def prefetch_ok(cfg: Config, x_own: bool = False) -> bool:
    """Whether the stream launcher can prefetch the next task with this tiling: its first depth - 1
    chunks fit in this task's issue slots, and the doubled x (but with x_own) and scale buffers fit."""
    return cfg.depth - 1 <= cfg.items and smem_bytes(cfg, prefetch=True, x_own=x_own) <= SMEM_LIMIT


def views(cfg: Config) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, TileLang dtype) of the body's tensors, in argument order: X, W, S, Y [, WS, CNT]
    [, gamma] [, residual]."""
    m, n, k = cfg.m, cfg.n, cfg.k
    xr = cfg.x_rows
    if cfg.fmt == "mxfp4":
        out = [("x", (xr, k), "bfloat16"), ("w", (n, k // 2), "uint8"), ("s", (n, k // 32), "uint8")]
    else:
        out = [("x", (xr, k), "bfloat16"), ("w", (n, k), "float8_e4m3"), ("s", (cdiv(n, 128), cdiv(k, 128)), "float32")]
    out.append(("y", (m, n), cfg.out_dtype))
    if cfg.split > 1:
        out += [("ws", (cfg.split, m, n), "float32"), ("cnt", (cfg.n_tiles,), "int32")]
    if cfg.norm_eps is not None:
        out.append(("gamma", (k,), "bfloat16"))
    if cfg.res_dtype is not None:
        out.append(("residual", (m, n), cfg.res_dtype))
    return out


@dataclass(frozen=True)
class ItemMap:
    """Tiles that are not row blocks of one [N, K] matrix: how an *item*'s tile rows and token rows
    map onto the operands and what it stores (the persistent MoE's expert items, kernels/moe.py).
    An item `it` is whatever the caller passes (a tuple of TIR values: expert, slot, n tile, ...).

    w_rows    rows of W [.., K/2] and S [.., K/32] (uint8, any leading shape: an expert stack
              [E, N, K/2] has E x N rows); the loads address them by row x row bytes
    x_rows    rows of X [.., K] (bf16, any leading shape)
    w_row     (it, lr) -> (row, ok): the weight row tile row lr reads (kept in range) and whether it
              exists (the weights of one that does not are zero-filled and its outputs not stored)
    x_row     (it, t) -> the x row of token t
    epilogue  T.macro (O, it, red, tx): the item's stores; red [wk, 8 * nt, rows] float32 holds the
              partial sums of the wk warps of each tile row (sum them), complete when it runs
    x_buffers 1: the first item stages x and every later item reads it (x_next must be False);
              2: an item whose x differs has it staged into the other buffer during the tail of
              the one before
    """

    w_rows: int
    x_rows: int
    w_row: Any
    x_row: Any
    epilogue: Any
    x_buffers: int = 2


def make_body(
    cfg: Config, import_prelude: bool = True, prefetch: bool = False, items: ItemMap | None = None, x_own: bool = False
):
    """The GEMV tile body: T.macro `gemv_tile(V, n_tile, k_split)` (module docstring). prefetch:
    `gemv_tile_prefetch(V, n_tile, k_split, Vn, n_tile_n, k_split_n, has_next, first, b, base)`
    for back-to-back tasks on one CTA: the task's last depth - 1 issue slots carry the next task's
    (views Vn, coordinates n_tile_n, k_split_n; if has_next) first chunks and its x and scales (into
    buffer 1 - b), so its loads are in flight during this task's tail and reduction; `first`: no
    task before issued this one's; `base`: ring slots used before (task index x cfg.items). Needs
    depth - 1 <= cfg.items, and nothing else may touch the body's shared memory between tasks.

    items (MXFP4, split 1): the same pipeline over items of an ItemMap, always in the prefetch form:
    `gemv_item(X, W, S, O, it, nx, has_next, first, sbuf, xbuf, x_next, base)` runs item `it`
    (x in buffer xbuf, its scales in buffer sbuf) and, if has_next, issues item nx's first chunks
    and scales (buffer 1 - sbuf) in its last issue slots, and nx's x (buffer 1 - xbuf) if x_next.

    x_own (with prefetch): the next task's weights and scales are issued as above, but each task
    stages its own x after it starts (one x buffer; `first` tasks with their first chunk), for tasks
    whose x another CTA writes and whose wait comes between them (the persistent step's linears,
    runtime/kinds/linear.py); with a norm the row statistics are computed by `first` tasks only (a run
    of tasks on one x); the body's buffers stay in TileLang's shared-memory merge, held live to its
    end (`smem_bytes(cfg, True, True)`)."""
    import tilelang.language as T

    from tilert.kernels import common

    # phases (TILERT_PROBES): a task 0 x and first chunk in, 1 x normalised, 2 weights streamed, 3 warps
    # reduced, 4 stored; an item 5 first chunk in, 6 streamed, 7 stored
    probe = common.make_probe()
    mx = cfg.fmt == "mxfp4"
    decode_order = mx and mxfp4.order_choice() == "decode"  # the blocks' word order (numerics/mxfp4.py)
    if items is not None and not (mx and cfg.split == 1 and cfg.depth - 1 <= cfg.items):
        raise ValueError(f"GEMV item body: MXFP4, split 1 and depth - 1 <= {cfg.items} chunks: {cfg}")
    norm, res = cfg.norm_eps is not None, cfg.res_dtype is not None
    if (norm or res) and items is not None:
        raise ValueError(f"GEMV item body: the items' epilogue stores, not a norm or residual: {cfg}")
    if x_own and not prefetch:
        raise ValueError(f"GEMV body: x_own is a form of the prefetch body (prefetch=True): {cfg}")
    if norm and prefetch and not x_own:  # a prefetched x would reach the next task unnormalised
        raise ValueError(f"GEMV body: a norm in the prefetch form needs x_own: {cfg}")
    bulk = cfg.bulk
    if bulk and items is None:
        raise ValueError(f"GEMV body: bulk loads are a form of the item body (items=...): {cfg}")
    prelude = BULK_PRELUDE if bulk else LINEAR_PRELUDE if norm or x_own else GEMV_PRELUDE
    GI = 4 + (2 if cfg.split > 1 else 0)  # views: gamma, then the residual, after Y [, WS, CNT]
    RI = GI + (1 if norm else 0)
    staged = norm and cfg.norm_stats == "staged" and cfg.split == 1  # the staged slice is the whole row
    row_rstd = None
    if norm and not staged:
        row_rstd = make_row_rstd(cfg.m, cfg.k, cfg.norm_eps)
    M, N, K = cfg.m, cfg.n, cfg.k
    G, WK, D, R = cfg.g, cfg.wk, cfg.depth, cfg.rows
    NCS, ITEMS, NT, SPLIT = cfg.ncs, cfg.items, cfg.nt, cfg.split
    MT = 8 * NT  # token columns of the reduction buffer
    P = 2 * G  # 16-byte pieces per thread per chunk
    RW = cfg.row_bytes // 4  # u32 words per weight row
    PPR = cfg.row_bytes // 16  # 16-byte pieces per weight row
    UPC = CHUNK_ELEMS[cfg.fmt] // 8  # x units (8 bf16) per chunk
    UPP = UPC // 4  # x units per lane per chunk
    XW = UPP * 4  # x words per lane per token tile
    XU = NCS * UPC  # staged x units per token row
    XUK = K // 8  # x units per row of X
    XS_WORDS = M * XU * 4  # u32 words of one staged x slice
    NCW = cdiv(NCS, 4) * 4  # MXFP4 scale words per staged row
    SR, SC = cdiv(R, 128), NCS // 2 + 1  # FP8 scale rows / columns a tile touches
    NSR, NSC = cdiv(N, 128), cdiv(K, 128)
    u32, f32, i64 = "uint32", "float32", "int64"
    cp_async = "tilert_cp_async16_ef" if cfg.evict_first else "tilert_cp_async16"
    BS = BulkStages(R, WK, cfg.row_bytes)  # bulk: the ring's stages
    RED = WK * MT * R  # f32 words of the reduction buffer
    if (prefetch or items is not None) and not x_own:  # an unmerged reduction buffer: one per step kernel
        common.reserve_unmerged(RED_KEY, RED, f32)

    @T.macro
    def issue(Wv, ring, n_tile, k_split, i, slot, tx):
        """Chunk i of this thread's warp in the tile -> ring slot `slot` (nothing past the tile; rows
        past N and pieces past K are zero-filled). The caller commits the group."""
        warp, r, c = tx // 32, (tx % 32) // 4, tx % 4
        ci = warp % WK + WK * i
        if ci < NCS:
            unit = (k_split * NCS + ci) * 4 + c
            for p in T.unroll(P):
                if items is None:
                    row = n_tile * R + (warp // WK) * 16 * G + (p // 2) * 16 + (p % 2) * 8 + r
                    src = T.cast(T.min(row, N - 1), i64) * RW + T.min(unit, PPR - 1) * 4
                    dst = ((slot * P + p) * THREADS + tx) * 4
                    T.call_extern("handle", cp_async, ring.data, dst, Wv.data, src, row < N and unit < PPR)
                else:  # n_tile is the item
                    row, ok = items.w_row(n_tile, (warp // WK) * 16 * G + (p // 2) * 16 + (p % 2) * 8 + r)
                    src = T.cast(row, i64) * RW + T.min(unit, PPR - 1) * 4
                    dst = ((slot * P + p) * THREADS + tx) * 4
                    T.call_extern("handle", cp_async, ring.data, dst, Wv.data, src, ok and unit < PPR)

    @T.macro
    def issue_bulk(Wv, ring, bars, it, i, slot, tx):
        """bulk: stage i of item `it` (bytes [i SB, i SB + SB) of each of its R weight rows, cut at
        the row's end) -> ring slot `slot`, by warp 0: lane 0 arms the slot's barrier with the
        stage's bytes, then lane l copies rows l, l + 32, ... (one cp.async.bulk a row; rows past
        the item's end are its clamped rows, whose outputs are not stored)."""
        if tx < 32:
            nb = BS.copy_bytes(i)
            if tx == 0:
                T.call_extern("handle", "tilert_mbar_expect", bars.data, slot, R * nb)
            T.call_extern("handle", "tilert_syncwarp")
            for q in T.unroll(cdiv(R, 32)):
                if q * 32 + tx < R:
                    row, ok = items.w_row(it, q * 32 + tx)
                    T.call_extern("handle", "tilert_bulk_g2s", ring.data, BS.dst(slot, q * 32 + tx), Wv.data,
                                  BS.src(T.cast(row, i64), i), nb, bars.data, slot,
                                  T.bool(cfg.evict_first))  # fmt: skip

    @T.macro
    def issue_item(Wv, ring, bars, it, i, slot, tx):
        """Chunk i of item `it` into ring slot `slot`: the thread's own (issue), or with bulk loads the
        CTA's stage i (issue_bulk)."""
        if bulk:
            issue_bulk(Wv, ring, bars, it, i, slot, tx)
        else:
            issue(Wv, ring, it, 0, i, slot, tx)

    @T.macro
    def stage_x(X, xs, n_tile, k_split, b, tx):
        """The tile's x slice into buffer b (0, 1) of xs (cp.async, zeros past K; 16-byte units
        XOR-swizzled). With items, n_tile is the item and its x rows are the ItemMap's."""
        if items is None:
            Xv = T.view(X, shape=[cfg.x_rows, K // 2], dtype=u32)
        else:  # only its address is used (offsets in u32 words)
            Xv = X
        for e in T.serial(cdiv(M * XU, THREADS)):
            idx = e * THREADS + tx
            if idx < M * XU:
                row, u = idx // XU, idx % XU
                ku = k_split * XU + u
                dst = b * XS_WORDS + (row * XU + (u ^ ((u >> 2) & 2) ^ (row & 1))) * 4
                if items is None:
                    src = T.cast(row, i64) * (K // 2) + T.min(ku, XUK - 1) * 4
                else:
                    src = T.cast(items.x_row(n_tile, row), i64) * (K // 2) + T.min(ku, XUK - 1) * 4
                T.call_extern("handle", "tilert_cp_async16", xs.data, dst, Xv.data, src, ku < XUK)

    @T.macro
    def stage_s(S, scw, scf, n_tile, k_split, b, tx):
        """The tile's block scales into buffer b of scw / scf: cp.async, but for MXFP4 scale rows that
        are not 16-byte aligned (byte loads)."""
        if mx and cfg.scale_async:
            if items is None:
                Sv = T.view(S, shape=[N, K // 128], dtype=u32)
            else:  # only its address is used (a view of a whole expert stack may pass 2^31 bits)
                Sv = S
            for e in T.serial(cdiv(R * (NCW // 4), THREADS)):
                idx = e * THREADS + tx
                if idx < R * (NCW // 4):
                    lr, pc = idx // (NCW // 4), idx % (NCW // 4)
                    if items is None:
                        row = n_tile * R + lr
                        col = k_split * NCS + pc * 4
                        src = T.cast(T.min(row, N - 1), i64) * (K // 128) + T.min(col, K // 128 - 4)
                        dst = b * R * NCW + lr * NCW + pc * 4
                        T.call_extern(
                            "handle", "tilert_cp_async16", scw.data, dst, Sv.data, src, row < N and col < K // 128
                        )
                    else:
                        row, ok = items.w_row(n_tile, lr)
                        col = k_split * NCS + pc * 4
                        src = T.cast(row, i64) * (K // 128) + T.min(col, K // 128 - 4)
                        dst = b * R * NCW + lr * NCW + pc * 4
                        T.call_extern("handle", "tilert_cp_async16", scw.data, dst, Sv.data, src, ok and col < K // 128)
        elif mx:  # rows not 16-byte aligned (odd K): byte loads, assembled into words
            if items is not None:
                Sb = T.view(S, shape=[items.w_rows, K // 32], dtype="uint8")
            for e in T.serial(cdiv(R * NCS, THREADS)):
                idx = e * THREADS + tx
                if idx < R * NCS:
                    lr, ci = idx // NCS, idx % NCS
                    if items is None:
                        row = T.min(n_tile * R + lr, N - 1)
                        blk = (k_split * NCS + ci) * 4
                        scw[b * R * NCW + lr * NCW + ci] = _sum(
                            T.if_then_else(blk + q < K // 32, T.cast(S[row, T.min(blk + q, K // 32 - 1)], u32),
                                           T.uint32(0)) << T.uint32(8 * q)
                            for q in range(4)
                        )  # fmt: skip
                    else:
                        row, ok = items.w_row(n_tile, lr)
                        blk = (k_split * NCS + ci) * 4
                        scw[b * R * NCW + lr * NCW + ci] = _sum(
                            T.if_then_else(ok and blk + q < K // 32,
                                           T.cast(Sb[row, T.min(blk + q, K // 32 - 1)], u32),
                                           T.uint32(0)) << T.uint32(8 * q)
                            for q in range(4)
                        )  # fmt: skip
        else:
            for e in T.serial(cdiv(SR * SC, THREADS)):
                idx = e * THREADS + tx
                if idx < SR * SC:
                    i, j = idx // SC, idx % SC
                    row = T.min((n_tile * R) // 128 + i, NSR - 1)
                    src = T.cast(row, i64) * NSC + T.min((k_split * NCS) // 2 + j, NSC - 1)
                    T.call_extern("handle", "tilert_cp_async4", scf.data, b * SR * SC + idx, S.data, src, True)

    @T.macro
    def stage(X, S, xs, scw, scf, n_tile, k_split, b, tx):
        """The tile's x slice and block scales into buffer b (0, 1) of xs and scw / scf."""
        stage_x(X, xs, n_tile, k_split, b, tx)
        stage_s(S, scw, scf, n_tile, k_split, b, tx)

    @T.macro
    def normalize(xs, G, rstd, k_split, tx):
        """The staged x slice (buffer 0) -> bf16(x * rstd[row] * gamma) in place (units past K stay 0):
        a thread's units column by column, gamma's 16 bytes loaded once for all M rows. The caller
        fences before and after (the helper's shared-memory accesses are invisible to TileLang)."""
        Gv = T.view(G, shape=[K // 2], dtype=u32)
        gw = T.alloc_local((4,), u32)
        for e in T.serial(cdiv(XU, THREADS)):
            u = e * THREADS + tx
            if u < XU:
                ku = T.min(k_split * XU + u, XUK - 1)
                for q in T.vectorized(4):
                    gw[q] = Gv[ku * 4 + q]
                for row in T.unroll(M):  # through a helper: TileLang would fence every row (a thread's own units)
                    off = (row * XU + (u ^ ((u >> 2) & 2) ^ (row & 1))) * 4
                    T.call_extern("handle", "tilert_norm16", xs.data, off, gw.data, rstd[row])

    MP = 1 << (M - 1).bit_length()  # rows rounded up to a power of two
    GR = THREADS // MP  # threads per row of the staged statistics (>= 16)
    LW = min(GR, 32)  # lanes of one shuffle group
    WPR = max(1, GR // 32)  # warps per row (their partial sums meet in shared memory)

    @T.macro
    def stats_staged(xs, part, rstd, tx):
        """rstd[row] = rsqrt(mean(x[row]^2) + eps) from the staged slice (buffer 0: the whole row,
        units past K zero): GR threads per row sum 16-byte units, a shuffle within each lane group,
        the WPR warps of a row through `part`. Two barriers."""
        row, lane = tx // GR, tx % GR
        tot = T.alloc_var(f32)
        tot = T.float32(0)
        if row < M:
            for e in T.serial(cdiv(XU, GR)):
                u = e * GR + lane
                if u < XU:
                    tot += T.call_extern(f32, "tilert_sq4", xs.data, (row * XU + u) * 4)
        for sh in (16, 8, 4, 2, 1):
            if sh < LW:
                tot += T.shfl_xor(tot, sh)
        if tx % LW == 0:
            part[tx // LW] = tot
        T.sync_threads()
        if tx < M:
            rstd[tx] = T.rsqrt(_sum(part[tx * WPR + w] for w in range(WPR)) / K + cfg.norm_eps)
        T.sync_threads()

    @T.macro
    def mma_mx(wq, xb, af, ml, sq, acc, big):
        """MXFP4: dequantise this lane's pieces (scale codes sq) and run the chunk's MMAs. big: some
        code in the warp is > 128: multipliers 2^127 then 2^(s-128) (mxfp4_gemm's split). The prmt
        selector of byte b, [b, 8|b, 4+b, 8|(4+b)], is 0xC480 + 0x1111 * b."""
        for grp in T.unroll(G):
            for h in T.unroll(2):
                ml[h] = T.cast((T.min(sq[grp * 2 + h], 128) + 126) * 0x00800080, u32)  # 2^(min(s, 128) - 1)
                if big:
                    ml[2 + h] = T.cast((T.max(sq[grp * 2 + h], 128) - 1) * 0x00800080, u32)  # 2^(max(s, 128) - 128)
            for s in T.unroll(8):
                for i in T.unroll(4):  # af[i]: row r + 8 * (i % 2), bytes 2 * (s % 2) + i // 2 of word s // 2
                    w = wq[grp * 8 + (i % 2) * 4 + s // 2]
                    if decode_order:
                        af[i] = T.call_extern(u32, "tilert_e2m1x2_ord", w, 2 * (s % 2) + i // 2, ml[i % 2])
                    else:
                        lo, hi = w & T.uint32(0x0F0F0F0F), (w >> T.uint32(4)) & T.uint32(0x0F0F0F0F)
                        sel = 0xC480 + 0x1111 * (2 * (s % 2) + i // 2)
                        af[i] = T.call_extern(u32, "tilert_e2m1x2_lh", lo, hi, sel, ml[i % 2])
                    if big:
                        af[i] = T.call_extern(u32, "tilert_bf16x2_mul", af[i], ml[2 + i % 2])
                for t in T.unroll(NT):
                    T.ptx_mma(f32, "m16n8k16", "row", "col", "bf16", "bf16", "fp32", af.data, 0, xb.data,
                              t * XW + s * 2, acc.data, (grp * NT + t) * 4, T.bool(False))  # fmt: skip

    @T.macro
    def compute(ring, xs, scw, scf, wq, xb, af, ml, sq, part, acc, n_tile, k_split, i, slot, b, tx, bs=None):
        """MMAs of chunk i of this thread's warp (its pieces in ring slot `slot`, x in buffer b,
        scales in buffer bs, default b)."""
        warp, r, c = tx // 32, (tx % 32) // 4, tx % 4
        ci = warp % WK + WK * i
        if ci < NCS:
            for p in T.unroll(P):
                if bulk:  # row-major stage: this lane's row of piece p, its 16 bytes of chunk ci
                    lrow = (warp // WK) * 16 * G + (p // 2) * 16 + (p % 2) * 8 + r
                    soff = BS.read(slot, lrow, warp, c) // 4
                    T.call_extern("handle", "tilert_lds16", wq.data, p * 4, ring.data, soff)
                else:
                    T.call_extern("handle", "tilert_lds16", wq.data, p * 4, ring.data,
                                  ((slot * P + p) * THREADS + tx) * 4)  # fmt: skip
            for t in T.unroll(NT):
                if t * 8 + r < M:
                    for uu in T.unroll(UPP):
                        u = ci * UPC + c * UPP + uu
                        xo = b * XS_WORDS + ((t * 8 + r) * XU + (u ^ ((u >> 2) & 2) ^ (r & 1))) * 4
                        for q in T.vectorized(4):
                            xb[t * XW + uu * 4 + q] = xs[xo + q]
                else:
                    for q in T.unroll(XW):
                        xb[t * XW + q] = T.uint32(0)
            lr0 = (warp // WK) * 16 * G + r  # tile row of this lane's first row (group 0)
            if mx:
                for h in T.unroll(2 * G):  # block scale codes of rows r (even h) and r + 8 (odd h)
                    word = scw[(b if bs is None else bs) * R * NCW + (lr0 + h * 8) * NCW + ci]
                    sq[h] = T.cast((word >> T.cast(8 * c, u32)) & T.uint32(255), "int32")
                # scale codes > 128 (blocks with |w| >= 8) need a second multiply: a warp-uniform
                # branch, so the common path pays nothing for it
                if T.call_extern(u32, "tilert_ballot", _any(sq[h] > 128 for h in range(2 * G))) != T.uint32(0):
                    mma_mx(wq, xb, af, ml, sq, acc, True)
                else:
                    mma_mx(wq, xb, af, ml, sq, acc, False)
            for grp in T.unroll(G):
                if not mx:
                    srow = T.min((n_tile * R + lr0 - r + grp * 16) // 128 - (n_tile * R) // 128, SR - 1)
                    sc = scf[
                        (b if bs is None else bs) * SR * SC
                        + srow * SC
                        + (k_split * NCS + ci) // 2
                        - (k_split * NCS) // 2
                    ]
                    for i in T.unroll(NT * 4):
                        part[i] = T.float32(0)
                    for s in T.unroll(4):
                        w0 = wq[grp * 8 + s]
                        w1 = wq[grp * 8 + 4 + s]
                        af[0] = T.call_extern(u32, "tilert_e4m3x2_sx", w0, 0x9180)  # bytes 0, 1
                        af[1] = T.call_extern(u32, "tilert_e4m3x2_sx", w1, 0x9180)
                        af[2] = T.call_extern(u32, "tilert_e4m3x2_sx", w0, 0xB3A2)  # bytes 2, 3
                        af[3] = T.call_extern(u32, "tilert_e4m3x2_sx", w1, 0xB3A2)
                        for t in T.unroll(NT):
                            T.ptx_mma(f32, "m16n8k16", "row", "col", "bf16", "bf16", "fp32", af.data, 0, xb.data,
                                      t * XW + s * 2, part.data, t * 4, T.bool(False))  # fmt: skip
                    for i in T.unroll(NT * 4):
                        acc[grp * NT * 4 + i] += part[i] * sc

    @T.macro
    def reduce_warps(red, acc, tx):
        """acc of every warp -> red [wk, 8 * nt, rows] (the wk warps of a row slice side by side)."""
        warp, r, c = tx // 32, (tx % 32) // 4, tx % 4
        lr0 = (warp // WK) * 16 * G + r
        for grp in T.unroll(G):
            for t in T.unroll(NT):
                for i in T.unroll(4):
                    tok = t * 8 + 2 * c + i % 2
                    red[((warp % WK) * MT + tok) * R + lr0 + grp * 16 + (i // 2) * 8] = acc[(grp * NT + t) * 4 + i]
        T.sync_threads()

    def plus_res(v, Rv, tok, row):
        """v (+ the residual's element when the body has one)."""
        return v + T.cast(Rv[tok, row], f32) if res else v

    @T.macro
    def store_direct(Y, red, n_tile, tx, Rv=None):
        """split == 1: Y[tok, row] = the sum over the wk warps (consecutive threads: consecutive rows)."""
        for e in T.serial(cdiv(R * M, THREADS)):
            idx = e * THREADS + tx
            if idx < R * M:
                lr, tok = idx % R, idx // R
                if n_tile * R + lr < N:
                    Y[tok, n_tile * R + lr] = T.cast(
                        plus_res(_sum(red[(w * MT + tok) * R + lr] for w in range(WK)), Rv, tok, n_tile * R + lr),
                        cfg.out_dtype,
                    )

    @T.macro
    def store_split(Y, WS, CNT, red, last, n_tile, k_split, tx, Rv=None):
        """split > 1: the partial -> WS[k_split]; the tile's last CTA sums WS[0..split) into Y."""
        for e in T.serial(cdiv(R * M, THREADS)):
            idx = e * THREADS + tx
            if idx < R * M:
                lr, tok = idx % R, idx // R
                if n_tile * R + lr < N:
                    WS[k_split, tok, n_tile * R + lr] = _sum(red[(w * MT + tok) * R + lr] for w in range(WK))
        T.sync_threads()
        if tx == 0:
            T.call_extern("handle", "__threadfence")
            prev = T.atomic_add(CNT[n_tile], 1, return_prev=True)
            last[0] = T.if_then_else(prev == SPLIT - 1, 1, 0)
            T.call_extern("handle", "__threadfence")
        T.sync_threads()
        if last[0] == 1:
            for e in T.serial(cdiv(R * M, THREADS)):
                idx = e * THREADS + tx
                if idx < R * M:
                    row, tok = n_tile * R + idx % R, idx // R
                    if row < N:
                        v = _sum(T.atomic_load(WS[s, tok, row], memory_order="relaxed") for s in range(SPLIT))
                        Y[tok, row] = T.cast(plus_res(v, Rv, tok, row), cfg.out_dtype)
            if tx == 0:
                CNT[n_tile] = 0

    def regs():
        return (
            T.alloc_local((P * 4,), u32),  # wq
            T.alloc_local((NT * XW,), u32),  # xb
            T.alloc_local((4,), u32),  # af
            T.alloc_local((4,), u32),  # ml
            T.alloc_local((2 * G,), "int32"),  # sq
            T.alloc_local((NT * 4,), f32),  # part
            T.alloc_local((G * NT * 4,), f32),  # acc
        )

    def alloc(prefetch, nbx=None):
        """The body's buffers: with prefetch, x (nbx buffers, default 2) and scales double-buffered
        and the reduction buffers outside TileLang's shared-memory merge (they are written while the
        next task's copies, invisible to TileLang, land in the ring and the other x buffer); with
        x_own they stay in the merge (`keep_live` holds the ring and scales to the body's end)."""
        nb = 2 if prefetch else 1
        nbx = nb if nbx is None else nbx
        unmerged = prefetch and not x_own
        return (
            T.alloc_shared(((D * BS.slot_bytes) // 4 if bulk else D * P * THREADS * 4,), u32),  # ring
            T.alloc_shared((nbx * XS_WORDS,), u32),  # xs
            T.alloc_shared((nb * R * NCW if mx else 4,), u32),  # scw
            T.alloc_shared((4 if mx else nb * SR * SC,), f32),  # scf
            common.alloc_unmerged((RED,), f32, share=RED_KEY) if unmerged else T.alloc_shared((RED,), f32),  # red
            common.alloc_unmerged((1,), "int32") if unmerged else T.alloc_shared((1,), "int32"),  # last
        )

    @T.macro
    def finish(V, red, last, acc, n_tile, k_split, tx):
        T.sync_threads()  # TileLang cannot see the ring reads (tilert_lds16): `red` may share their bytes
        reduce_warps(red, acc, tx)
        probe(3)
        Rv = V[RI] if res else None
        if SPLIT == 1:
            store_direct(V[3], red, n_tile, tx, Rv)
        else:
            store_split(V[3], V[4], V[5], red, last, n_tile, k_split, tx, Rv)
        T.sync_threads()
        probe(4)

    def norm_buffer():
        """The rows' rstd (norm only): static shared memory, kept from a run's first task to its last;
        staged, with the statistics' partial sums (static too: nothing else's copies land there)."""
        if not norm:
            return None, None
        return common.alloc_unmerged((M,), f32), common.alloc_unmerged((max(MP, 8),), f32) if staged else None

    @T.macro
    def keep_live(ring, scw, scf):
        """x_own: the ring and scale buffers in use to the body's end (the next task's copies land
        there while `red` is written): their last use for TileLang's shared-memory merge."""
        T.call_extern("handle", "tilert_smem_live", ring.data)
        T.call_extern("handle", "tilert_smem_live", scw.data)
        T.call_extern("handle", "tilert_smem_live", scf.data)

    @T.macro
    def gemv_tile(V, n_tile, k_split):
        if import_prelude:
            T.import_source(prelude)
        Wv = T.view(V[1], shape=[N, RW], dtype=u32)
        ring, xs, scw, scf, red, last = alloc(False)
        rstd, rsum = norm_buffer()
        wq, xb, af, ml, sq, part, acc = regs()
        tx = T.get_thread_binding()
        for i in T.unroll(G * NT * 4):
            acc[i] = T.float32(0)
        for j in T.unroll(D - 1):  # the weights first; x and scales in chunk 0's group
            issue(Wv, ring, n_tile, k_split, j, j, tx)
            if j == 0:
                stage(V[0], V[2], xs, scw, scf, n_tile, k_split, 0, tx)
            T.ptx_commit_group()
        if norm and not staged:  # the rows' statistics from global memory while the first chunks fly
            row_rstd(V[0], 0, rstd)
        T.call_extern("handle", f"tilert_cp_async_wait<{D - 2}>")  # this thread's chunk 0, x, scales ...
        T.sync_threads()  # ... and everyone's
        if norm:
            if staged:
                stats_staged(xs, rsum, rstd, tx)
            normalize(xs, V[GI], rstd, k_split, tx)
            T.sync_threads()
        for j in T.serial(ITEMS):
            T.call_extern("handle", f"tilert_cp_async_wait<{D - 2}>")
            issue(Wv, ring, n_tile, k_split, j + D - 1, (j + D - 1) % D, tx)
            T.ptx_commit_group()
            compute(ring, xs, scw, scf, wq, xb, af, ml, sq, part, acc, n_tile, k_split, j, j % D, 0, tx)
        finish(V, red, last, acc, n_tile, k_split, tx)

    @T.macro
    def gemv_tile_prefetch(V, n_tile, k_split, Vn, n_tile_n, k_split_n, has_next, first, b, base):
        if import_prelude:
            T.import_source(prelude)
        Wv = T.view(V[1], shape=[N, RW], dtype=u32)
        Wn = T.view(Vn[1], shape=[N, RW], dtype=u32)
        ring, xs, scw, scf, red, last = alloc(True, 1 if x_own else None)
        rstd, rsum = norm_buffer()
        wq, xb, af, ml, sq, part, acc = regs()
        tx = T.get_thread_binding()
        xb_ = 0 if x_own else b  # the x buffer this task computes from
        for i in T.unroll(G * NT * 4):
            acc[i] = T.float32(0)
        if first:  # later tasks' first chunks were issued by the task before
            for j in T.unroll(D - 1):
                issue(Wv, ring, n_tile, k_split, j, (base + j) % D, tx)
                if j == 0:
                    stage_x(V[0], xs, n_tile, k_split, xb_, tx)
                    stage_s(V[2], scw, scf, n_tile, k_split, b, tx)
                T.ptx_commit_group()
            if norm and not staged:  # the rows' statistics while the first chunks fly (a run shares them)
                row_rstd(V[0], 0, rstd)
        if x_own:
            if first:
                T.call_extern("handle", f"tilert_cp_async_wait<{D - 2}>")
            else:  # its chunks and scales came with the task before; its x now, after its wait
                stage_x(V[0], xs, n_tile, k_split, 0, tx)
                T.ptx_commit_group()
                T.call_extern("handle", "tilert_cp_async_wait<0>")
        else:
            T.call_extern("handle", f"tilert_cp_async_wait<{D - 2}>")
        T.sync_threads()
        probe(0)
        if norm:
            if staged:  # every task from its own staged rows (x_own: the rows it normalises)
                stats_staged(xs, rsum, rstd, tx)
            normalize(xs, V[GI], rstd, k_split, tx)
            T.sync_threads()
        probe(1)
        for j in T.serial(ITEMS):
            T.call_extern("handle", f"tilert_cp_async_wait<{D - 2}>")
            if j + D - 1 < ITEMS:
                issue(Wv, ring, n_tile, k_split, j + D - 1, (base + j + D - 1) % D, tx)
            elif has_next:  # the next task's chunk j + D - 1 - ITEMS (its x and scales with its first)
                issue(Wn, ring, n_tile_n, k_split_n, j + D - 1 - ITEMS, (base + j + D - 1) % D, tx)
                if j + D - 1 == ITEMS:
                    if not x_own:
                        stage_x(Vn[0], xs, n_tile_n, k_split_n, 1 - b, tx)
                    stage_s(Vn[2], scw, scf, n_tile_n, k_split_n, 1 - b, tx)
            T.ptx_commit_group()
            compute(ring, xs, scw, scf, wq, xb, af, ml, sq, part, acc, n_tile, k_split, j, (base + j) % D, xb_, tx, b)
        probe(2)
        finish(V, red, last, acc, n_tile, k_split, tx)
        if x_own:
            keep_live(ring, scw, scf)

    @T.macro
    def gemv_item(X, W, S, O, it, nx, has_next, first, sbuf, xbuf, x_next, base):
        if import_prelude:
            T.import_source(BULK_PRELUDE if bulk else GEMV_PRELUDE)
        Wv = W  # only its address is used: cp.async offsets in u32 words (bulk: in bytes)
        ring, xs, scw, scf, red, last = alloc(True, items.x_buffers)
        bars = common.alloc_unmerged((D,), "uint64") if bulk else None  # bulk: a barrier per ring slot
        wq, xb, af, ml, sq, part, acc = regs()
        tx = T.get_thread_binding()
        for i in T.unroll(G * NT * 4):
            acc[i] = T.float32(0)
        if first:  # later items' first chunks, scales (and x) were issued by the item before
            if bulk:  # a task's stages count from 0: fresh barriers (every earlier copy has landed)
                if tx == 0:
                    T.call_extern("handle", "tilert_mbar_init", bars.data, D)
                T.sync_threads()
            for j in T.unroll(D - 1):
                issue_item(Wv, ring, bars, it, j, (base + j) % D, tx)
                if j == 0:
                    stage_x(X, xs, it, 0, xbuf, tx)
                    stage_s(S, scw, scf, it, 0, sbuf, tx)
                T.ptx_commit_group()
        T.call_extern("handle", f"tilert_cp_async_wait<{D - 2}>")
        T.sync_threads()
        probe(5)
        for j in T.serial(ITEMS):
            T.call_extern("handle", f"tilert_cp_async_wait<{D - 2}>")
            if bulk:  # every warp is done with stage j - 1's slot, which the copies below refill
                T.sync_threads()
            if j + D - 1 < ITEMS:
                issue_item(Wv, ring, bars, it, j + D - 1, (base + j + D - 1) % D, tx)
            elif has_next:  # the next item's chunk j + D - 1 - ITEMS (its scales and x with its first)
                issue_item(Wv, ring, bars, nx, j + D - 1 - ITEMS, (base + j + D - 1) % D, tx)
                if j + D - 1 == ITEMS:
                    if x_next:
                        stage_x(X, xs, nx, 0, 1 - xbuf, tx)
                    stage_s(S, scw, scf, nx, 0, 1 - sbuf, tx)
            T.ptx_commit_group()
            if bulk:  # stage j's bytes have landed (the barrier's (base + j) // D-th phase)
                T.call_extern("handle", "tilert_mbar_wait", bars.data, (base + j) % D, ((base + j) // D) % 2)
            compute(ring, xs, scw, scf, wq, xb, af, ml, sq, part, acc, it, 0, j, (base + j) % D, xbuf, tx, sbuf)
        T.sync_threads()  # TileLang cannot see the ring reads (tilert_lds16)
        probe(6)
        reduce_warps(red, acc, tx)
        items.epilogue(O, it, red, tx)
        T.sync_threads()
        probe(7)

    if items is not None:
        return gemv_item
    return gemv_tile_prefetch if prefetch else gemv_tile


def options(cfg: Config) -> bool:
    """Whether cfg has the fused linear's options (norm, residual): its standalone launcher then
    takes a pointer row (`views.grid_launcher`), not typed tensors."""
    return cfg.norm_eps is not None or cfg.res_dtype is not None


def make_kernel(cfg: Config):
    """Standalone launcher: grid (n_tiles, split), 256 threads, one body call per CTA."""
    import tilelang.language as T

    from tilert.kernels.views import grid_launcher

    body = make_body(cfg)
    specs = views(cfg)
    if options(cfg):
        return grid_launcher("gemv_linear", body, specs, (cfg.n_tiles, cfg.split), lambda bx, by, bz: (bx, by))
    (_, xsh, xdt), (_, wsh, wdt), (_, ssh, sdt), (_, ysh, ydt) = specs[:4]

    if cfg.split == 1:

        @T.prim_func
        def gemv(X: T.Tensor(xsh, xdt), W: T.Tensor(wsh, wdt), S: T.Tensor(ssh, sdt), Y: T.Tensor(ysh, ydt)):
            with T.Kernel(cfg.n_tiles, 1, threads=THREADS) as (bx, by):
                if cfg.ctas > 1:
                    T.annotate_min_blocks_per_sm(cfg.ctas)
                body((X, W, S, Y), bx, by)

        return gemv

    (_, wssh, _), (_, csh, _) = specs[4:]

    @T.prim_func
    def gemv_split(
        X: T.Tensor(xsh, xdt),
        W: T.Tensor(wsh, wdt),
        S: T.Tensor(ssh, sdt),
        Y: T.Tensor(ysh, ydt),
        WS: T.Tensor(wssh, "float32"),
        CNT: T.Tensor(csh, "int32"),
    ):
        with T.Kernel(cfg.n_tiles, cfg.split, threads=THREADS) as (bx, by):
            if cfg.ctas > 1:
                T.annotate_min_blocks_per_sm(cfg.ctas)
            body((X, W, S, Y, WS, CNT), bx, by)

    return gemv_split


def make_stream_kernel(cfg: Config, copies: int, sms: int, prefetch: bool = False, x_own: bool = False):
    """Persistent task stream: `sms` CTAs (one per SM), each looping over its share of the
    copies x tiles tasks (task i on CTA i % sms, back to back, no waits between tasks); copy c's
    views are row c of the pointer table Ptrs [copies, len(views(cfg))] (`views.pointer_row`).
    prefetch: each task issues the next one's first chunks (make_body's prefetch form); x_own: in its
    x_own form (with a norm every copy must share x and gamma: only a CTA's first task computes rstd).
    Weights load with the plain cp.async whatever `cfg.evict_first` says, as the standalone launcher's
    do: ptxas gave two stream kernels' evict-first loads an odd uniform descriptor register, which
    Hopper rejects as an illegal instruction (kernels/sass.py); the step's kernels are checked instead."""
    import tilelang.language as T

    from tilert.kernels.views import make_views

    if prefetch and not prefetch_ok(cfg, x_own):
        raise ValueError(f"GEMV stream prefetch needs depth - 1 <= {cfg.items} chunks and the doubled buffers: {cfg}")
    body = make_body(dataclasses.replace(cfg, evict_first=False), prefetch=prefetch, x_own=x_own)
    specs = views(cfg)
    tasks = copies * cfg.tiles
    T_ = cfg.tiles

    @T.prim_func
    def gemv_stream(Ptrs: T.Tensor((copies, len(specs)), T.ptr)):
        with T.Kernel(sms, threads=THREADS) as bx:
            for it in T.serial(cdiv(tasks, sms)):
                task = it * sms + bx
                if task < tasks:
                    V = make_views(Ptrs, task // T_, specs)
                    if prefetch:
                        nxt = T.min(task + sms, tasks - 1)
                        Vn = make_views(Ptrs, nxt // T_, specs)
                        body(V, (task % T_) // cfg.split, task % cfg.split, Vn, (nxt % T_) // cfg.split,
                             nxt % cfg.split, task + sms < tasks, it == 0, it % 2, it * cfg.items)  # fmt: skip
                    else:
                        body(V, (task % T_) // cfg.split, task % cfg.split)

    return gemv_stream


@per_mxfp4_order
def compiled(cfg: Config):
    return build(make_kernel(cfg), what=f"gemv {cfg}")


@per_mxfp4_order
def compiled_stream(cfg: Config, copies: int, sms: int, prefetch: bool = False, x_own: bool = False):
    what = f"gemv stream {cfg} x {copies} on {sms} SMs{' (prefetch)' if prefetch else ''}{' (x_own)' if x_own else ''}"
    return build(make_stream_kernel(cfg, copies, sms, prefetch, x_own), what=what)


# --- choosing a tiling -------------------------------------------------------------------------

# Measured winners (benchmarks/gemv_sweep.py --table prints these lines): (fmt, n, k, m) ->
# (wr, g, split, depth, ctas). pick_config takes an entry for the same shape and token count, and
# otherwise the cost model's choice.
# From benchmarks/gemv_sweep.py on an H100 at cd9b3c4 (benchmarks/results/kernels-nvidia-h100-80gb-hbm3.json):
# the fastest standalone tiling of each plan shape, every one checked against the reference there.
TUNED: dict[tuple[str, int, int, int], tuple[int, int, int, int, int]] = {
    ("fp8", 3072, 6144, 1): (1, 1, 1, 4, 2),
    ("fp8", 3072, 6144, 8): (1, 2, 1, 4, 1),
    ("fp8", 3072, 6144, 16): (2, 1, 1, 3, 1),
    ("fp8", 192, 6144, 1): (1, 1, 11, 3, 2),
    ("fp8", 192, 6144, 8): (1, 1, 11, 3, 1),
    ("fp8", 192, 6144, 16): (1, 1, 11, 3, 1),
    ("fp8", 128, 6144, 1): (1, 1, 11, 3, 4),
    ("fp8", 128, 6144, 8): (1, 1, 11, 3, 1),
    ("fp8", 128, 6144, 16): (1, 1, 11, 3, 1),
    ("fp8", 6144, 2048, 1): (1, 1, 1, 3, 4),
    ("fp8", 6144, 2048, 8): (2, 2, 1, 4, 2),
    ("fp8", 6144, 2048, 16): (2, 1, 1, 4, 2),
    ("fp8", 2048, 6144, 1): (1, 1, 1, 6, 1),
    ("fp8", 2048, 6144, 8): (1, 1, 1, 6, 1),
    ("fp8", 2048, 6144, 16): (1, 1, 1, 3, 1),
    ("mxfp4", 4096, 6144, 1): (1, 1, 1, 4, 2),
    ("mxfp4", 4096, 6144, 8): (1, 2, 1, 2, 1),
    ("mxfp4", 4096, 6144, 16): (2, 1, 1, 2, 1),
    ("mxfp4", 6144, 2048, 1): (1, 1, 1, 3, 3),
    ("mxfp4", 6144, 2048, 8): (1, 1, 1, 3, 3),
    ("mxfp4", 6144, 2048, 16): (1, 4, 1, 2, 1),
    ("fp8", 6144, 30720, 1): (4, 4, 5, 3, 1),
    ("fp8", 6144, 30720, 8): (4, 4, 5, 3, 1),
    ("fp8", 6144, 30720, 16): (4, 4, 10, 3, 1),
}

LATENCY_S = 1.5e-6  # loaded DRAM latency the in-flight bytes must cover (Little's law)
FIXUP_S = 1.0e-6  # the split-K hand-over: fence, arrival counter, reading the partials back
COPY_BW = 3.0e12  # bytes/s of device memory (H100; the model only ranks tilings)
SM_SHARE_CAP = 1.25  # most one SM is assumed to stream, in shares of bw / sms
L2_SM_BW = 100e9  # bytes/s one SM stages x from L2 at


def model_time(cfg: Config, sms: int = 132, bw: float = COPY_BW) -> float:
    """Rough seconds of one standalone call: waves of resident CTAs; each CTA stages its x slice
    from L2, then streams its weights at min(bytes in flight / LATENCY_S, its SM's share of
    SM_SHARE_CAP x bw / sms, bw / CTAs); plus the fixup when split. Only ranks tilings: the sweep
    (benchmarks/gemv_sweep.py) measures them."""
    slots = sms * cfg.ctas
    tile_w = cfg.rows * cfg.ncs * CHUNK_BYTES
    tile_x = cfg.m * cfg.ncs * CHUNK_ELEMS[cfg.fmt] * 2
    in_flight = THREADS * 2 * cfg.g * 16 * min(cfg.depth - 1, cfg.items)
    t, left = 0.0, cfg.tiles
    while left > 0:
        active = min(left, slots)
        per_sm = cdiv(active, sms)
        rate = min(in_flight / LATENCY_S, SM_SHARE_CAP * bw / sms / per_sm, bw / active)
        t += LATENCY_S + tile_x * per_sm / L2_SM_BW + tile_w / rate
        left -= active
    if cfg.split > 1:  # partials out, then the last CTA reads all of the tile's back
        t += FIXUP_S + (cfg.split + 1) * cfg.rows * cfg.m * 4 / L2_SM_BW
    return t


# registers the body takes with no cap, by (g, nt) (ptxas, sm_90a, both formats' larger): candidates
# skip CTA counts whose register cap is under 85% of it
_REGS = {(1, 1): 75, (2, 1): 90, (4, 1): 140, (1, 2): 110, (2, 2): 110, (4, 2): 195}


def candidates(fmt: str, m: int, n: int, k: int, sms: int = 132) -> list[Config]:
    """Every sensible tiling of the shape: 16-row groups that N fills, splits that leave each warp
    at least one chunk, all-in-flight or deep rings, 1-4 CTAs per SM."""
    ce = CHUNK_ELEMS[fmt]
    chunks = cdiv(k, ce)
    out = []
    for wr in (1, 2, 4, 8):
        for g in (1, 2, 4):
            rows = 16 * g * wr
            if rows > 256 or rows > max(16, 2 * n) or (rows > n and g > 1):
                continue
            wk = WARPS // wr
            for split in range(1, min(chunks, 32) + 1):
                ncs = cdiv(chunks, split)
                if (split - 1) * ncs >= chunks or ncs < wk or (split > 1 and cdiv(chunks, split - 1) == ncs):
                    continue
                if cdiv(n, rows) * split > 8 * sms:
                    continue
                items = cdiv(ncs, wk)
                for ctas in (1, 2, 3, 4):
                    if 0.85 * _REGS[g, cdiv(m, 8)] > min(255, 65536 // (THREADS * ctas)):
                        continue  # ptxas would spill the accumulators at this many CTAs per SM
                    for depth in sorted({2, 3, 4, 6, 8, 12, 16, items + 1}):
                        if depth > items + 1:
                            continue
                        try:
                            out.append(Config(fmt, m, n, k, wr, g, split, depth, ctas))
                        except ValueError:
                            pass
    return out


def pick_config(fmt: str, m: int, n: int, k: int, sms: int = 132) -> Config:
    """The tiling a standalone call uses: a TUNED entry, else the cost model's fastest candidate
    (ties: fewer splits, fewer CTAs per SM, shallower ring)."""
    hit = TUNED.get((fmt, n, k, m))
    if hit is not None:
        wr, g, split, depth, ctas = hit
        return Config(fmt, m, n, k, wr, g, split, depth, ctas)
    cands = candidates(fmt, m, n, k, sms)
    if cands:
        return min(cands, key=lambda c: (round(model_time(c, sms) * 1e8), c.split, c.ctas, c.depth, -c.g))
    # tiny shapes (fewer chunks than warps along k and a few rows): 8 row warps, one split that fits
    for split in range(1, cdiv(k, CHUNK_ELEMS[fmt]) + 1):
        try:
            return Config(fmt, m, n, k, wr=8, g=1, split=split, depth=2)
        except ValueError:
            continue
    raise ValueError(f"no GEMV tiling for {fmt} M={m}, N={n}, K={k}")


# --- host side -------------------------------------------------------------------------------

_WORKSPACES: dict[tuple[Any, Config], tuple[Any, Any]] = {}


def workspace(cfg: Config, device: Any) -> tuple[Any, Any]:
    """The split-K partials (never initialised) and arrival counters (zeroed once; each tile's last
    CTA resets its counter) of `cfg` on `device`, shared by every call with that config (calls run in
    stream order, so one set suffices)."""
    import torch

    key = (str(device), cfg)
    if key not in _WORKSPACES:
        ws = torch.empty(cfg.split, cfg.m, cfg.n, dtype=torch.float32, device=device)
        cnt = torch.zeros(cfg.n_tiles, dtype=torch.int32, device=device)
        _WORKSPACES[key] = (ws, cnt)
    return _WORKSPACES[key]


def launch(cfg: Config, x: Any, w: Any, s: Any, y: Any = None, gamma: Any = None, residual: Any = None) -> Any:
    """y [M, N] (cfg.out_dtype) = x [M, K] bf16 @ W^T with the standalone kernel; inputs as the
    format module's run() checked them (contiguous, CUDA, 16-byte aligned rows). With the options:
    x [x_rows, K] (the rows past M zero), gamma [K] bf16, residual [M, N]."""
    import torch

    from tilert.kernels.views import pointer_row

    if y is None:
        y = torch.empty(cfg.m, cfg.n, dtype=getattr(torch, cfg.out_dtype), device=x.device)
    args = [x, w, s, y]
    if cfg.split > 1:
        args += list(workspace(cfg, x.device))
    args += [t for t in (gamma, residual) if t is not None]
    if options(cfg):
        compiled(cfg)(pointer_row(args, views(cfg), "gemv").to(x.device))
    else:
        compiled(cfg)(*args)
    return y


def supports(fmt: str, x: Any, w: Any, s: Any) -> bool:
    """Whether run() takes these operands (checked by the format module for shapes and dtypes):
    1 <= M <= 16, contiguous, x and w (and MXFP4 scales) 16-byte aligned for the 16-byte copies."""
    aligned = x.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0 and (fmt == "fp8" or s.data_ptr() % 16 == 0)
    return 1 <= x.shape[0] <= MAX_M and aligned and all(t.is_contiguous() for t in (x, w, s))


def run(fmt: str, x: Any, w: Any, s: Any, cfg: Config | None = None) -> Any:
    """y [M, N] float32 = x [M, K] bf16 @ dequant(w, s)^T (operands as `supports` takes them)."""
    if not supports(fmt, x, w, s):
        raise ValueError(f"GEMV: unsupported operands (M = {x.shape[0]} of 1..{MAX_M}, contiguous, 16-byte aligned)")
    cfg = cfg or pick_config(fmt, x.shape[0], w.shape[0], x.shape[1])
    return launch(cfg, x, w, s)


def reference(fmt: str, x: Any, w: Any, s: Any) -> Any:
    """float64 y = x @ dequant(w)^T: tilert.ops.linear's dequantisers, exact in float64."""
    import torch

    from tilert.ops.linear import dequant_fp8, dequant_mxfp4

    wf = dequant_mxfp4(w, s) if fmt == "mxfp4" else dequant_fp8(w, s)
    return torch.matmul(x.double(), wf.double().t())


def make_inputs(cfg: Config, seed: int | None = None, wscale: float = 0.05, device: str = "cuda") -> dict[str, Any]:
    """Fresh random x (bf16) and quantised weights for cfg, y NaN-poisoned (and the split-K
    partials: every one the last CTA reads must have been written); with the options gamma (about
    1) and a residual, x padded to x_rows rows with zeros."""
    import torch

    from tilert.numerics import fp8, mxfp4

    g = torch.Generator(device=device)
    g.manual_seed(seed if seed is not None else torch.seed() % 2**31)
    wf = torch.randn(cfg.n, cfg.k, device=device, generator=g) * wscale
    w, s = mxfp4.quantize(wf) if cfg.fmt == "mxfp4" else fp8.quantize_blocks(wf)
    x = torch.randn(cfg.m, cfg.k, device=device, generator=g).to(torch.bfloat16)
    if cfg.x_rows > cfg.m:
        x = torch.cat([x, torch.zeros(cfg.x_rows - cfg.m, cfg.k, dtype=x.dtype, device=device)])
    y = torch.full((cfg.m, cfg.n), float("nan"), dtype=getattr(torch, cfg.out_dtype), device=device)
    t = {"x": x, "w": w, "s": s, "y": y}
    if cfg.norm_eps is not None:
        t["gamma"] = (1 + 0.1 * torch.randn(cfg.k, device=device, generator=g)).to(torch.bfloat16)
    if cfg.res_dtype is not None:
        t["residual"] = torch.randn(cfg.m, cfg.n, device=device, generator=g).to(getattr(torch, cfg.res_dtype))
    return t


def reference_of(cfg: Config, t: dict[str, Any]) -> Any:
    """float64 reference of cfg with its options on the tensors t (make_inputs' names): [RMSNorm,
    rounded to bf16 as the prologue does ->] x @ dequant(w)^T [+ residual] (tilert.ops' functions)."""
    import torch

    from tilert.ops.norm import rms_norm

    x = t["x"][: cfg.m]
    if cfg.norm_eps is not None:
        x = rms_norm(x, t["gamma"], cfg.norm_eps).to(torch.bfloat16)
    y = reference(cfg.fmt, x, t["w"], t["s"])
    return y if cfg.res_dtype is None else y + t["residual"].double()


def rel_err(y: Any, ref: Any) -> float:
    """||y - ref|| / ||ref|| in float64; inf when y has a non-finite (unwritten) element. A zero
    reference gives ||y|| (0 when y is zero too), not 0 / 0."""
    y = y.double()
    if not y.isfinite().all():
        return float("inf")
    den = ref.double().norm()
    return ((y - ref).norm() / den).item() if den > 0 else y.norm().item()


def check(cfg: Config, seed: int | None = None, wscale: float = 0.05) -> float:
    """The standalone kernel on fresh random inputs, NaN-poisoned y and partials: relative error."""
    t = make_inputs(cfg, seed, wscale)
    if cfg.split > 1:
        workspace(cfg, t["x"].device)[0].fill_(float("nan"))
    launch(cfg, t["x"], t["w"], t["s"], t["y"], t.get("gamma"), t.get("residual"))
    return rel_err(t["y"], reference_of(cfg, t))


def check_stream(
    cfg: Config, copies: int = 3, sms: int = 132, seed: int | None = None, prefetch: bool = False, x_own: bool = False
) -> float:
    """The persistent task stream over `copies` independent problems (fresh inputs, poisoned
    outputs; with a norm one x and gamma for all): the largest relative error over the copies."""
    import torch

    from tilert.kernels.views import pointer_row

    specs = views(cfg)
    sets = [make_inputs(cfg, None if seed is None else seed + i) for i in range(copies)]
    for t in sets:
        if cfg.norm_eps is not None:
            t["x"], t["gamma"] = sets[0]["x"], sets[0]["gamma"]
        if cfg.split > 1:
            t["ws"] = torch.full((cfg.split, cfg.m, cfg.n), float("nan"), device=t["x"].device)
            t["cnt"] = torch.zeros(cfg.n_tiles, dtype=torch.int32, device=t["x"].device)
    rows = [pointer_row([t[name] for name, _, _ in specs], specs, "gemv stream") for t in sets]
    compiled_stream(cfg, copies, sms, prefetch, x_own)(torch.cat(rows).to(sets[0]["x"].device))
    return max(rel_err(t["y"], reference_of(cfg, t)) for t in sets)


# --- the plan's shapes -----------------------------------------------------------------------

# (fmt, N, K) -> names, for the rank-0 linears of the 8-rank mimo-v2.5-pro plan (tests/kernels/test_gemv.py
# derives them from the compiler and keeps this table equal to them). FP8:
# q/k/v/o projections, the dense layer's MLP; the drafter's projections are bf16 in the plan and
# have the same (N, K) as these, except its context projection fc (6144 x 30720), listed in case a
# checkpoint quantises the drafter. MXFP4: one expert's gate/up and down (the fused MoE's shapes).
PLAN_SHAPES: dict[tuple[str, int, int], str] = {
    ("fp8", 3072, 6144): "q_proj",
    ("fp8", 192, 6144): "k_proj",
    ("fp8", 128, 6144): "v_proj",
    ("fp8", 6144, 2048): "o_proj,mlp_down",
    ("fp8", 2048, 6144): "mlp_gate,mlp_up",
}
EXTRA_SHAPES: dict[tuple[str, int, int], str] = {
    ("fp8", 6144, 30720): "drafter_fc",
    ("mxfp4", 4096, 6144): "expert_gate_up",
    ("mxfp4", 6144, 2048): "expert_down",
}
PLAN_M = (1, 8, 16)  # decode, DFlash verify (block 8), and the largest GEMV token count


def configs_for_plan(ms: tuple[int, ...] = PLAN_M, extra: bool = False) -> list[Config]:
    """The GEMV configs the eager runtime launches for the plan's FP8 linears (pick_config) at these
    token counts; with extra, also the drafter fc and expert shapes."""
    shapes = list(PLAN_SHAPES) + (list(EXTRA_SHAPES) if extra else [])
    return sorted({pick_config(f, m, n, k) for (f, n, k) in shapes for m in ms}, key=repr)
