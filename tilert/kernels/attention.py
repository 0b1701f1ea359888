"""Decode / DFlash-verify attention over the KV cache (TileLang, Hopper sm_90a).

One launch per layer and step does: NeoX partial RoPE on the B new q and k rows, the KV append
(the new k after RoPE and v written to the cache at their positions), and split-KV
flash-decoding over the cache; a second, small launch combines the splits with log-sum-exp and
the attention-sink logit. Math, mask and window convention: `tilert.ops.attention` (the
reference). Design notes: docs/attention.md; measured figures: docs/performance.md.

Step contract (device tensors only, so one compiled kernel serves every step):
    positions [B] int32 = start + arange(B); start = tokens already in the cache, kv_len = start + B.
Each kv head's B x group query rows (row r = token r // group, head r % group) share one KV
head, so they are one tensor-core (wgmma) M dimension: B=8 x 16 heads = 128 rows.

Tile bodies (the persistent runtime calls these with its own coordinates):
    attn_split_body(h, rb, s): kv head h, row block rb (BM rows), split s in [0, NS]. Splits
        0..NS-1 cover the old keys [lo, start) (lo = start - window + 1 for SWA layers, else 0) in
        equal block_n-aligned chunks (only the first n_used(start) do work); split NS covers the
        B new keys from q/k/v in registers and (row block 0) appends them to the cache.
        Writes o_part[h, rows, s, :] (fp32, normalised) and lse[h, rows, s] (log2 domain).
    combine_body(h, r): one query row; reads the used splits and writes out[b, h*group+g, :].
"""

import functools
from dataclasses import dataclass

import torch

from tilert.kernels.common import build, cdiv, gate_passed, warp_rows
from tilert.kernels.common import gated as mark_gated
from tilert.ops.attention import attention as _ref_attention
from tilert.ops.attention import kv_append, rope

LOG2E = 1.4426950408889634
# The persistent kernel splits the keys into 1-tile splits: splits past the keys exit at once, and a
# split's cost there is mostly its fixed q-block prologue, so more, shorter splits shorten the layer
PERSISTENT_MIN_TILES = 1
PASS_CONFIGS = {"tl.disable_warp_specialized": True}


@dataclass(frozen=True)
class AttnConfig:
    """One compiled kernel pair. Per-rank head counts; the cache capacity is a runtime shape."""

    q_heads: int = 16
    kv_heads: int = 1
    head_dim: int = 192  # q/k
    v_head_dim: int = 128
    rope_dim: int = 64
    rope_theta: float = 1e7
    block: int = 1  # B query tokens per step (1 decode, 8/16 DFlash verify)
    window: int = 0  # 0 = full causal; W > 0: a query at p sees the W keys p-W+1 .. p (tilert.ops.attention)
    sink: bool = False
    num_split: int = 0  # 0 = auto: about one wave of CTAs on 132 SMs
    block_n: int = 64  # keys per tile
    num_stages: int = 0  # TMA ring depth (key tiles in flight per CTA); 0 = auto, see `stages`
    min_tiles: int = 2  # fewest key tiles per split (short contexts use fewer splits)
    rows_per_cta: int = 0  # 0 = auto, see `block_m`; 64 = one-warpgroup CTAs
    v_scale: float = 1.0  # new v rows are scaled (fp32) and rounded to bf16 before the cache append

    def __post_init__(self) -> None:
        if self.q_heads % self.kv_heads:
            raise ValueError(f"q_heads {self.q_heads} is not a multiple of kv_heads {self.kv_heads}")
        if self.rope_dim % 2 or self.rope_dim > self.head_dim:
            raise ValueError(f"rope_dim {self.rope_dim} must be even and <= head_dim {self.head_dim}")
        if self.rows_per_cta not in (0, 64, 128):
            raise ValueError(f"rows_per_cta {self.rows_per_cta} must be 0 (auto), 64 or 128")
        if not 1 <= self.block <= self.block_n:
            raise ValueError(f"block {self.block} must be in [1, block_n={self.block_n}]")

    @property
    def group(self) -> int:
        return self.q_heads // self.kv_heads

    @property
    def rows(self) -> int:  # query rows per kv head
        return self.block * self.group

    @property
    def block_m(self) -> int:  # wgmma needs M in multiples of 64 per warpgroup
        # full layers: one-warpgroup CTAs, two per SM (one's softmax overlaps the other's MMA;
        # measured faster for B=8/16 than one 128-row CTA per SM); SWA layers: 128-row CTAs.
        if self.rows_per_cta:
            return self.rows_per_cta
        return 64 if self.rows <= 64 or not self.window else 128

    @property
    def row_blocks(self) -> int:
        return cdiv(self.rows, self.block_m)

    @property
    def threads(self) -> int:
        return 128 if self.block_m == 64 else 256

    @property
    def stages(self) -> int:
        """TMA ring depth: 3 (one CTA per SM), 2 for one-warpgroup CTAs of several row blocks
        (104 KB of shared memory, so two CTAs share an SM)."""
        if self.num_stages:
            return self.num_stages
        return 2 if self.block_m == 64 and self.row_blocks > 1 else 3

    @property
    def ctas_per_sm(self) -> int:
        return 2 if self.block_m == 64 and self.row_blocks > 1 and self.stages == 2 else 1

    @property
    def splits(self) -> int:
        if self.num_split:
            return self.num_split
        if self.window:
            return max(1, cdiv(self.window, self.block_n))
        return max(1, 128 * self.ctas_per_sm // (self.kv_heads * self.row_blocks))

    @property
    def scale(self) -> float:
        return self.head_dim**-0.5

    def smem_bytes(self) -> int:
        tile = self.block_n * (self.head_dim + self.v_head_dim) * 2
        table_rows = warp_rows(self.block, max(self.rope_dim // 2, 1), self.block_n)  # the RoPE table
        return self.block_m * self.head_dim * 2 + self.stages * tile + table_rows * self.rope_dim * 4


def _split_plan(cfg: AttnConfig, start):
    """(lo, tiles_per_split, n_used) for the old keys [lo, start), as device expressions."""
    import tilelang.language as T

    lo = T.max(start - cfg.window + 1, 0) if cfg.window else 0  # row 0 (position start) sees start-W+1 ..
    tiles = T.ceildiv(start - lo, cfg.block_n)
    per = T.max(T.ceildiv(tiles, cfg.splits), cfg.min_tiles)
    return lo, per, T.ceildiv(tiles, per)


def make_bodies(cfg: AttnConfig, tma: bool = True, gated: bool = False):
    """The two tile bodies (T.macro) for `cfg`; see the module docstring for their contracts.

    gated: the split body is the persistent kernel's gated form `(..., h, rb, s, gate)`: it issues
    its first KV tiles (old keys, written by earlier steps) and the RoPE table, then waits for its
    inputs (runtime/persistent/megakernel.Gate).

    tma=False loads key tiles with cp.async instead of TMA (the persistent kernel: its views come
    from pointers, so there are no host-built TMA descriptors): every thread issues its share of a
    tile into the same ring and commits two groups per ring step (empty ones past the last tile),
    so waiting for all but the newest 2 x (stages - 1) groups means the tile being consumed landed;
    a proxy fence then hands the generic-proxy writes to the MMA's async proxy."""
    import tilelang.language as T

    B, G, R, BM, BN = cfg.block, cfg.group, cfg.rows, cfg.block_m, cfg.block_n
    DK, DV, ROPE, RH, NS, W = cfg.head_dim, cfg.v_head_dim, cfg.rope_dim, cfg.rope_dim // 2, cfg.splits, cfg.window
    SL2 = cfg.scale * LOG2E
    NST, TH = cfg.stages, cfg.threads
    NEG = -T.infinity("float32")
    bf16, f32 = "bfloat16", "float32"

    QR = min(cfg.block_m, cfg.rows)  # rows of a q block that can be real (B = 1: 16 of 128)
    # RoPE loops over whole warps (common.warp_rows): padded q rows and new-key rows are zeros, and
    # the table's padded rows (positions past the B new ones) are computed but never used by real rows
    QRP = warp_rows(QR, max(RH, 1), BM)
    BK = warp_rows(B, max(RH, 1), BN)

    @T.macro
    def rotate_q(q_s, rb, cs):
        """NeoX RoPE in place on q_s's real rows (plain bf16 copies of Q): each thread owns a
        (d, d + RH) pair and binds both values before it stores, so nothing is read after a write.
        fp32 math, one bf16 rounding, as the reference."""
        for i, f in T.Parallel(QRP, max(RH, 1)):
            if f < RH:
                b = T.min((rb * BM + i) // G, B - 1)
                x0 = T.Cast(f32, q_s[i, f])
                x1 = T.Cast(f32, q_s[i, f + RH])
                q_s[i, f] = T.Cast(bf16, x0 * cs[b, f] - x1 * cs[b, RH + f])
                q_s[i, f + RH] = T.Cast(bf16, x1 * cs[b, f] + x0 * cs[b, RH + f])

    @T.macro
    def rotate_k(k_ring, cs):
        """The same on the B new key rows in ring slot 0 (and BK - B zero rows)."""
        for j, f in T.Parallel(BK, max(RH, 1)):
            if f < RH:
                y0 = T.Cast(f32, k_ring[0, j, f])
                y1 = T.Cast(f32, k_ring[0, j, f + RH])
                k_ring[0, j, f] = T.Cast(bf16, y0 * cs[j, f] - y1 * cs[j, RH + f])
                k_ring[0, j, f + RH] = T.Cast(bf16, y1 * cs[j, f] + y0 * cs[j, RH + f])

    def vnew(Vnew, b, h, d):
        if cfg.v_scale == 1.0:
            return Vnew[b, h, d]
        return T.Cast(bf16, T.Cast(f32, Vnew[b, h, d]) * cfg.v_scale)

    @T.macro
    def tile(q_s, k_s, v_s, acc_s, acc_p, acc_o, m, m_prev, alpha, l_sum, r_sum, qpos, base, hi):
        """Online-softmax update with keys base..base+BN-1 (k_s, v_s), visible below hi (and by the
        causal / window mask; on a full tile of old keys the mask is all true)."""
        T.clear(acc_s)
        T.gemm(q_s, k_s, acc_s, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
        for i, j in T.Parallel(BM, BN):
            kp = base + j
            ok = (kp < hi) & (kp <= qpos[i])
            if W:
                ok = ok & (kp > qpos[i] - W)  # W keys: qpos-W+1 .. qpos
            acc_s[i, j] = T.if_then_else(ok, acc_s[i, j], NEG)
        T.copy(m, m_prev)
        T.reduce_max(acc_s, m, dim=1, clear=False)
        for i in T.Parallel(BM):
            alpha[i] = T.exp2((m_prev[i] - T.if_then_else(m[i] == NEG, 0, m[i])) * SL2)
        for i, j in T.Parallel(BM, BN):
            acc_s[i, j] = T.exp2((acc_s[i, j] - T.if_then_else(m[i] == NEG, 0, m[i])) * SL2)
        T.reduce_sum(acc_s, r_sum, dim=1)
        for i in T.Parallel(BM):
            l_sum[i] = l_sum[i] * alpha[i] + r_sum[i]
        T.copy(acc_s, acc_p)
        for i, d in T.Parallel(BM, DV):
            acc_o[i, d] *= alpha[i]
        T.gemm(acc_p, v_s, acc_o, policy=T.GemmWarpPolicy.FullRow)

    @T.macro
    def issue(Kc, Vc, k_ring, v_ring, bar, st, h, base):
        """Load the key tile at base (K and V) into ring slot st: one TMA load completing on bar[st],
        or (tma=False) cp.async by every thread, two commit groups."""
        if tma:
            T.tma_copy(Kc[h, base : base + BN, :], k_ring[st, :, :], barrier=bar[st])
            T.tma_copy(Vc[h, base : base + BN, :], v_ring[st, :, :], barrier=bar[st])
            if T.shuffle_elect(TH):
                T.barrier_arrive(bar[st])
        else:
            T.async_copy(Kc[h, base : base + BN, :], k_ring[st, :, :])
            T.async_copy(Vc[h, base : base + BN, :], v_ring[st, :, :])

    @T.macro
    def no_issue():
        """(tma=False) two empty commit groups: every ring step commits the same number."""
        if not tma:
            T.ptx_commit_group()
            T.ptx_commit_group()

    @T.macro
    def wait_tile(bar, st, t):
        if tma:
            T.mbarrier_wait_parity(bar[st], (t // NST) % 2)
        else:
            T.ptx_wait_group(2 * (NST - 1))
            T.fence_proxy_async()
            T.sync_threads()

    @T.macro
    def split_core(Q, Knew, Vnew, Kc, Vc, Pos, Opart, Lse, h, rb, s, gate):
        q_s = T.alloc_shared([BM, DK], bf16)
        k_ring = T.alloc_shared([NST, BN, DK], bf16)
        v_ring = T.alloc_shared([NST, BN, DV], bf16)
        bar = T.alloc_barrier([1] * NST)
        cs = T.alloc_shared([BK, 2 * max(RH, 1)], f32)
        acc_s = T.alloc_fragment([BM, BN], f32)
        acc_p = T.alloc_fragment([BM, BN], bf16)
        acc_o = T.alloc_fragment([BM, DV], f32)
        m = T.alloc_fragment([BM], f32)
        m_prev = T.alloc_fragment([BM], f32)
        alpha = T.alloc_fragment([BM], f32)
        l_sum = T.alloc_fragment([BM], f32)
        r_sum = T.alloc_fragment([BM], f32)
        qpos = T.alloc_fragment([BM], "int32")

        start = Pos[0]
        lo, per, n_used = _split_plan(cfg, start)
        s_lo = lo + s * per * BN
        s_hi = T.min(s_lo + per * BN, start)
        # key tiles of this split (0 for the new-key split NS and for unused splits)
        nt = T.if_then_else(s < n_used, T.ceildiv(s_hi - s_lo, BN), 0)
        # Start the first NST tile loads now, so they fly while this CTA builds its q block.
        for st in T.unroll(NST):
            if st < nt:
                issue(Kc, Vc, k_ring, v_ring, bar, st, h, s_lo + st * BN)
            else:
                no_issue()

        # cos/sin of the B new positions in float64, like the reference (angles reach 1e5 rad).
        for b, f in T.Parallel(BK, max(RH, 1)):
            ang = T.Cast("float64", start + b) * T.pow(
                T.float64(cfg.rope_theta), T.Cast("float64", f) * T.float64(-2.0 / max(ROPE, 1))
            )
            cs[b, f] = T.Cast(f32, T.cos(ang))
            cs[b, RH + f] = T.Cast(f32, T.sin(ang))
        if gate is not None:
            T.sync_threads()  # cs is written: a barrier ThreadSync can see (Gate.passed() is opaque to it)
            gate.wait()  # q and the new k/v come from earlier tasks; nothing above read them
        if gate_passed(gate):  # every input is ready (a barrier); false only after a timed-out wait
            # q rows: one plain (vectorised) copy into shared memory, then RoPE in place; only row
            # blocks that can hold real rows are rotated (B = 1: 16 of 128 rows).
            for i, d in T.Parallel(BM, DK):
                r = rb * BM + i
                q_s[i, d] = T.if_then_else(r < R, Q[T.min(r // G, B - 1), h * G + r % G, d], T.Cast(bf16, 0))
            T.sync_threads()
            rotate_q(q_s, rb, cs)
            for i in T.Parallel(BM):
                qpos[i] = start + T.min((rb * BM + i) // G, B - 1)
            T.fill(acc_o, 0)
            T.fill(l_sum, 0)
            T.fill(m, NEG)

            if s == NS:  # the B new keys: ring slot 0 (no loads are in flight: nt = 0), RoPE, append
                for j, d in T.Parallel(BN, DK):
                    k_ring[0, j, d] = T.if_then_else(j < B, Knew[T.min(j, B - 1), h, d], T.Cast(bf16, 0))
                for j, d in T.Parallel(BN, DV):
                    v_ring[0, j, d] = T.if_then_else(j < B, vnew(Vnew, T.min(j, B - 1), h, d), T.Cast(bf16, 0))
                T.sync_threads()
                rotate_k(k_ring, cs)
                T.fence_proxy_async()  # generic-proxy smem writes, read next by wgmma (async proxy)
                T.sync_threads()
                if rb == 0:
                    for j, d in T.Parallel(B, DK):
                        Kc[h, start + j, d] = k_ring[0, j, d]
                    for j, d in T.Parallel(B, DV):
                        Vc[h, start + j, d] = v_ring[0, j, d]
                T.sync_threads()  # here, not inside the append's partial-warp branches (ThreadSync)
            # One loop and one (always masked) tile for the old keys' splits and the new keys' split:
            # the body's code is fetched cold at every layer, and three expansions of the tile (full,
            # partial last, new keys) made it about 70 KB of SASS. Ring of NST slots: tile t lives in
            # slot t % NST; the trip count comes from the device (positions), so the ring is run by
            # hand instead of T.Pipelined (see docs/attention.md).
            for t in T.serial(T.if_then_else(s == NS, 1, nt)):
                st = t % NST
                base = T.if_then_else(s == NS, start, s_lo + t * BN)
                hi = T.if_then_else(s == NS, start + B, s_hi)
                if s < NS:
                    wait_tile(bar, st, t)
                    if base + BN > s_hi:
                        # the split's partial last tile: rows at or past s_hi may be stale or never
                        # written (NaN; 0 * NaN = NaN even where P = 0): zero their v rows.
                        for j, d in T.Parallel(BN, DV):
                            if base + j >= s_hi:
                                v_ring[st, j, d] = T.Cast(bf16, 0)
                        T.fence_proxy_async()
                        T.sync_threads()
                tile(q_s, k_ring[st, :, :], v_ring[st, :, :], acc_s, acc_p, acc_o, m, m_prev, alpha, l_sum, r_sum,
                     qpos, base, hi)  # fmt: skip
                T.sync_threads()  # every warp is done with slot st before it is refilled
                if s < NS:
                    if t + NST < nt:
                        issue(Kc, Vc, k_ring, v_ring, bar, st, h, base + NST * BN)
                    else:
                        no_issue()

            if (s == NS) | (s < n_used):  # splits past the keys write nothing (the combine skips them)
                # one reciprocal per row (alpha is free now): a division per element was an inlined
                # IEEE divide for each of a thread's 64 acc_o values, ~16 KB of the body's code
                for i in T.Parallel(BM):
                    alpha[i] = T.if_then_else(l_sum[i] > 0, 1.0 / l_sum[i], 0)
                for i, d in T.Parallel(BM, DV):
                    r = rb * BM + i
                    if r < R:
                        Opart[h, r, s, d] = acc_o[i, d] * alpha[i]
                for i in T.Parallel(BM):
                    r = rb * BM + i
                    if r < R:
                        Lse[h, r, s] = T.if_then_else(l_sum[i] > 0, T.log2(l_sum[i]) + m[i] * SL2, NEG)

    if gated:

        @T.macro
        def attn_split_body(Q, Knew, Vnew, Kc, Vc, Pos, Opart, Lse, h, rb, s, gate):
            split_core(Q, Knew, Vnew, Kc, Vc, Pos, Opart, Lse, h, rb, s, gate)

        attn_split_body = mark_gated(attn_split_body)
    else:

        @T.macro
        def attn_split_body(Q, Knew, Vnew, Kc, Vc, Pos, Opart, Lse, h, rb, s):
            split_core(Q, Knew, Vnew, Kc, Vc, Pos, Opart, Lse, h, rb, s, None)

    CT = 256  # combine threads: 32 lanes x 4 columns each, CT // 32 slot groups
    NG, CPL = CT // 32, DV // 32
    NSP = cdiv(NS + 1, CT) * CT

    @T.macro
    def combine_body(Pos, Sink, Opart, Lse, Out, h, r):
        tx = T.get_thread_binding()
        lse_s = T.alloc_shared([NSP], f32)
        red = T.alloc_shared([2, NG], f32)
        part = T.alloc_shared([NG, DV], f32)
        mx = T.alloc_var(f32)
        tot = T.alloc_var(f32)
        o = T.alloc_local([CPL], f32)
        _, _, n_used = _split_plan(cfg, Pos[0])
        b = r // G
        hq = h * G + r % G
        lane, grp = tx % 32, tx // 32
        # slot k < n_used is split k; slot n_used is the new-key split NS.
        mx = NEG
        for i in T.serial(NSP // CT):
            k = i * CT + tx
            sl = T.if_then_else(k < n_used, k, NS)
            v = T.if_then_else(k <= n_used, Lse[h, r, sl], NEG)
            lse_s[k] = v
            mx = T.max(mx, v)
        mx = T.warp_reduce_max(mx)
        if lane == 0:
            red[0, grp] = mx
        T.sync_threads()
        mx = NEG
        if cfg.sink:
            mx = Sink[hq] * LOG2E
        for g in T.serial(NG):
            mx = T.max(mx, red[0, g])
        tot = 0.0
        for i in T.serial(NSP // CT):
            tot = tot + T.exp2(lse_s[i * CT + tx] - mx)
        tot = T.warp_reduce_sum(tot)
        if lane == 0:
            red[1, grp] = tot
        T.sync_threads()
        tot = 0.0
        if cfg.sink:
            tot = T.exp2(Sink[hq] * LOG2E - mx)
        for g in T.serial(NG):
            tot = tot + red[1, g]
        tot = 1.0 / tot  # the weights below multiply by it (a divide per slot was unrolled code)
        for c in T.serial(CPL):
            o[c] = 0.0
        # a static, unrolled slot loop (predicated), so the partials' loads are all in flight
        for i in T.unroll(cdiv(NS + 1, NG)):
            k = i * NG + grp
            if k <= n_used:
                sl = T.if_then_else(k < n_used, k, NS)
                wk = T.exp2(lse_s[k] - mx) * tot
                for c in T.vectorized(CPL):
                    o[c] = o[c] + wk * Opart[h, r, sl, lane * CPL + c]
        T.sync_threads()  # lse_s and part may share memory
        for c in T.serial(CPL):
            part[grp, lane * CPL + c] = o[c]
        T.sync_threads()
        if grp == 0:
            for c in T.serial(CPL):
                acc = T.alloc_var(f32)
                acc = 0.0
                for g in T.serial(NG):
                    acc = acc + part[g, lane * CPL + c]
                Out[b, hq, lane * CPL + c] = T.Cast(bf16, acc)

    return attn_split_body, combine_body


def _shapes(cfg: AttnConfig):
    import tilelang.language as T

    S = T.dynamic("S")
    B, Hq, Hkv, DK, DV = cfg.block, cfg.q_heads, cfg.kv_heads, cfg.head_dim, cfg.v_head_dim
    return {
        "q": [B, Hq, DK],
        "k": [B, Hkv, DK],
        "v": [B, Hkv, DV],
        "k_cache": [Hkv, S, DK],
        "v_cache": [Hkv, S, DV],
        "positions": [B],
        "sink": [Hq],
        "o_part": [Hkv, cfg.rows, cfg.splits + 1, DV],
        "lse": [Hkv, cfg.rows, cfg.splits + 1],
        "out": [B, Hq, DV],
    }


def attn_split_kernel(cfg: AttnConfig):
    """Standalone launcher of attn_split_body: grid (row block, split, kv head)."""
    import tilelang.language as T

    body, _ = make_bodies(cfg)
    sh = _shapes(cfg)
    bf16, f32 = "bfloat16", "float32"

    @T.prim_func
    def attn_split(
        Q: T.Tensor(sh["q"], bf16),
        Knew: T.Tensor(sh["k"], bf16),
        Vnew: T.Tensor(sh["v"], bf16),
        Kc: T.Tensor(sh["k_cache"], bf16),
        Vc: T.Tensor(sh["v_cache"], bf16),
        Pos: T.Tensor(sh["positions"], "int32"),
        Opart: T.Tensor(sh["o_part"], f32),
        Lse: T.Tensor(sh["lse"], f32),
    ):
        with T.Kernel(cfg.row_blocks, cfg.splits + 1, cfg.kv_heads, threads=cfg.threads) as (rb, s, h):
            body(Q, Knew, Vnew, Kc, Vc, Pos, Opart, Lse, h, rb, s)

    return attn_split


def combine_kernel(cfg: AttnConfig):
    """Standalone launcher of combine_body: grid (query row, kv head)."""
    import tilelang.language as T

    _, body = make_bodies(cfg)
    sh = _shapes(cfg)

    @T.prim_func
    def attn_combine(
        Pos: T.Tensor(sh["positions"], "int32"),
        Sink: T.Tensor(sh["sink"], "float32"),
        Opart: T.Tensor(sh["o_part"], "float32"),
        Lse: T.Tensor(sh["lse"], "float32"),
        Out: T.Tensor(sh["out"], "bfloat16"),
    ):
        with T.Kernel(cfg.rows, cfg.kv_heads, threads=256) as (r, h):
            body(Pos, Sink, Opart, Lse, Out, h, r)

    return attn_combine


@functools.cache
def compiled(cfg: AttnConfig):
    """(split kernel, combine kernel), compiled for sm_90a and cached."""
    split = build(attn_split_kernel(cfg), pass_configs=PASS_CONFIGS)
    return split, build(combine_kernel(cfg), pass_configs=PASS_CONFIGS)


def configs_for_plan(ranks: int = 8) -> list[AttnConfig]:
    """The attention kernels the mimo-v2.5-pro plan on `ranks` ranks uses: full and SWA layers,
    plain decode (B=1) and DFlash verify (B=8)."""
    hq, hkv = 128 // ranks, max(1, 8 // ranks)
    out = []
    for block in (1, 8):
        out.append(AttnConfig(q_heads=hq, kv_heads=hkv, block=block, rope_theta=1e7))
        out.append(AttnConfig(q_heads=hq, kv_heads=hkv, block=block, rope_theta=1e4, window=128, sink=True))
    return out


def _expect(name: str, t: torch.Tensor, shape: tuple, dtype: torch.dtype, device: torch.device) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"attention: {name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.dtype != dtype:
        raise ValueError(f"attention: {name} has dtype {t.dtype}, expected {dtype}")
    if t.device != device:
        raise ValueError(f"attention: {name} is on {t.device}, expected {device}")
    if not t.is_contiguous():
        raise ValueError(f"attention: {name} must be contiguous")


def workspace(cfg: AttnConfig, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The split partials (o_part fp32, lse fp32) the two launches exchange."""
    o_part = torch.empty(cfg.kv_heads, cfg.rows, cfg.splits + 1, cfg.v_head_dim, device=device)
    lse = torch.empty(cfg.kv_heads, cfg.rows, cfg.splits + 1, device=device)
    return o_part, lse


def run(
    cfg: AttnConfig,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    positions: torch.Tensor,
    sink: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    ws: tuple[torch.Tensor, torch.Tensor] | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """RoPE + KV append + attention for one step; returns out [B, Hq, Dv] bf16.

    q [B, Hq, Dk], k [B, Hkv, Dk], v [B, Hkv, Dv] bf16 (before RoPE); caches [Hkv, S, D] bf16,
    updated in place; positions [B] int32 = start + arange(B) on the device; sink [Hq] fp32
    (required iff cfg.sink). `validate` checks the positions' contract (one host sync).
    """
    dev = q.device
    B, Hq, Hkv, DK, DV = cfg.block, cfg.q_heads, cfg.kv_heads, cfg.head_dim, cfg.v_head_dim
    S = k_cache.shape[1] if k_cache.dim() == 3 else -1
    bf = torch.bfloat16
    for name, t, shape, dt in (
        ("q", q, (B, Hq, DK), bf),
        ("k", k, (B, Hkv, DK), bf),
        ("v", v, (B, Hkv, DV), bf),
        ("k_cache", k_cache, (Hkv, S, DK), bf),
        ("v_cache", v_cache, (Hkv, S, DV), bf),
        ("positions", positions, (B,), torch.int32),
    ):
        _expect(name, t, shape, dt, dev)
    if cfg.sink:
        if sink is None:
            raise ValueError("attention: this config has a sink; pass sink [Hq] float32")
        _expect("sink", sink, (Hq,), torch.float32, dev)
    else:
        if sink is not None:
            raise ValueError("attention: sink given but the config has sink=False")
        sink = torch.zeros(Hq, device=dev)
    if validate:
        start = int(positions[0])
        if not torch.equal(positions.cpu(), torch.arange(start, start + B, dtype=torch.int32)):
            raise ValueError(f"attention: positions must be start + arange({B}); got {positions.tolist()}")
        if start + B > S:
            raise ValueError(f"attention: KV cache overflow: kv_len {start + B} > capacity {S}")
    if out is None:
        out = torch.empty(B, Hq, DV, device=dev, dtype=bf)
    else:
        _expect("out", out, (B, Hq, DV), bf, dev)
    o_part, lse = ws if ws is not None else workspace(cfg, dev)
    split, combine = compiled(cfg)
    split(q, k, v, k_cache, v_cache, positions, o_part, lse)
    combine(positions, sink, o_part, lse, out)
    return out


def reference(cfg: AttnConfig, q, k, v, k_cache, v_cache, positions, sink=None) -> torch.Tensor:
    """tilert.ops.attention composed as the kernel's step: rope, append, attend (fp32 out)."""
    qr = rope(q, positions, cfg.rope_dim, cfg.rope_theta)
    kr = rope(k, positions, cfg.rope_dim, cfg.rope_theta)
    kv_append(k_cache, v_cache, kr, v, positions)
    kv_len = int(positions[-1]) + 1
    return _ref_attention(qr, k_cache, v_cache, positions, kv_len, scale=cfg.scale, window=cfg.window, sink=sink)


def make_inputs(cfg: AttnConfig, kv_len: int, capacity: int | None = None, device="cuda", seed=None, nan_tail=False):
    """Fresh random inputs for a step ending at kv_len (cache filled with random old keys).
    nan_tail: cache slots from the step's first position on (not yet written) hold NaN."""
    g = torch.Generator(device="cpu")
    g.manual_seed(seed if seed is not None else torch.seed() % (1 << 31))
    B, Hq, Hkv, DK, DV = cfg.block, cfg.q_heads, cfg.kv_heads, cfg.head_dim, cfg.v_head_dim
    if kv_len < B:
        raise ValueError(f"kv_len {kv_len} < block {B}")
    S = capacity or kv_len + 3

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(torch.bfloat16).to(device)

    start = kv_len - B
    k_cache, v_cache = rnd(Hkv, S, DK), rnd(Hkv, S, DV)
    if nan_tail:
        k_cache[:, start:] = float("nan")
        v_cache[:, start:] = float("nan")
    return {
        "q": rnd(B, Hq, DK),
        "k": rnd(B, Hkv, DK),
        "v": rnd(B, Hkv, DV),
        "k_cache": k_cache,
        "v_cache": v_cache,
        "positions": torch.arange(start, kv_len, dtype=torch.int32).to(device),
        "sink": (torch.randn(Hq, generator=g) + 1.0).to(device) if cfg.sink else None,
    }


def check(cfg: AttnConfig, kv_len: int, seed=None, tol: float = 1e-2) -> dict:
    """Run kernel and reference on fresh random inputs; out poisoned with NaN first, and the cache
    slots not yet written (from the step's first position on) hold NaN, which must not leak.

    Returns {"rel_err", "cache_err", "written"}; raises AssertionError past tol."""
    x = make_inputs(cfg, kv_len, seed=seed, nan_tail=True)
    kc_ref, vc_ref = x["k_cache"].clone(), x["v_cache"].clone()
    out = torch.full((cfg.block, cfg.q_heads, cfg.v_head_dim), float("nan"), device="cuda", dtype=torch.bfloat16)
    run(cfg, x["q"], x["k"], x["v"], x["k_cache"], x["v_cache"], x["positions"], x["sink"], out=out)
    torch.cuda.synchronize()
    ref = reference(cfg, x["q"], x["k"], x["v"], kc_ref, vc_ref, x["positions"], x["sink"])
    written = bool(torch.isfinite(out).all())
    err = float((out.float() - ref).norm() / ref.norm())
    n = kv_len  # slots past kv_len stay NaN in both
    cache_err = max(
        float((x["k_cache"][:, :n].float() - kc_ref[:, :n].float()).abs().max()),
        float((x["v_cache"][:, :n].float() - vc_ref[:, :n].float()).abs().max()),
    )
    if not (x["k_cache"][:, n:].isnan().all() and x["v_cache"][:, n:].isnan().all()):
        cache_err = float("inf")  # the append wrote past kv_len
    res = {"rel_err": err, "cache_err": cache_err, "written": written}
    assert written, f"{cfg} kv_len={kv_len}: output not fully written (NaN left)"
    assert err < tol, f"{cfg} kv_len={kv_len}: rel err {err:.3g} >= {tol}"
    # the kernel rounds the rotated k to bf16 once, like kv_append; allow one bf16 ulp of |k| ~ 4
    assert cache_err <= 2**-6 * 4, f"{cfg} kv_len={kv_len}: cache append differs by {cache_err:.3g}"
    return res


def kv_bytes(cfg: AttnConfig, kv_len: int) -> int:
    """KV-cache bytes one step must read (SWA layers: the W - 1 keys before the block + its B keys)."""
    keys = min(kv_len, cfg.window - 1 + cfg.block) if cfg.window else kv_len
    return cfg.kv_heads * keys * (cfg.head_dim + cfg.v_head_dim) * 2


__all__ = [
    "PASS_CONFIGS",
    "AttnConfig",
    "attn_split_kernel",
    "check",
    "combine_kernel",
    "compiled",
    "configs_for_plan",
    "kv_bytes",
    "make_bodies",
    "make_inputs",
    "reference",
    "run",
    "workspace",
]
