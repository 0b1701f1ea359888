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
        With `qk_norm_eps` it takes Qn, Kn [DK] (keywords) and RMS-normalises each q row and new k
        row per head before the RoPE (the drafter's q_norm / k_norm); `causal=False` lets every row
        see every new key (a DFlash drafter block; old keys are below every row either way).
    combine_body(h, r): one query row; reads the used splits and writes out[b, h*group+g, :].

Mixed-sequence steps (`AttnConfig.mixed`, docs/attention.md): the caches are a pool of sequence
slots [slots * Hkv, S, D] (slot u's kv head h at row u * Hkv + h) and a third input slots [B]
int32 names each row's slot. A sequence's rows are contiguous in the step at consecutive
positions (a decode row, a verify block, a prefill chunk). Row block rb is then a candidate first
token: it runs when token rb starts a chunk of at most block_m / group tokens of its sequence
(the chunk's rows are that sequence's only), reads that slot's old keys below the sequence's
first position in the step, and the sequence's new keys up to the chunk's end.
"""

import dataclasses
import functools
import math
import os
from dataclasses import dataclass

import torch

from tilert.ir.opset.fused import AttentionBlockAttrs
from tilert.kernels.common import alloc_unmerged, build, cdiv, gate_passed, make_probe, warp_rows
from tilert.kernels.common import gated as mark_gated
from tilert.ops.attention import attention as _ref_attention
from tilert.ops.attention import attention_slots, check_slots, kv_append, kv_append_slots, rope

# tilelang (the kernel compiler, slow to import) is imported only inside the functions that build kernels

LOG2E = 1.4426950408889634
# 2 pi in two doubles for rope_angle's reduction: the first with 30 significant bits, so that k times
# it is exact for any k < 2^23 (angles up to 5e7 rad), the second the rest (their sum is 2 pi to 1e-25)
TWO_PI_HI = 6.283185303211212
TWO_PI_LO = 3.968374318722162e-09
# The persistent kernel splits the keys into 1-tile splits: splits past the keys exit at once, and a
# split's cost there is mostly its fixed q-block prologue, so more, shorter splits shorten the layer
PERSISTENT_MIN_TILES = 1
PASS_CONFIGS = {"tl.disable_warp_specialized": True}
BLOCK_N = 64  # keys per tile
WAVE_CTAS = 128  # about one wave of CTAs on 132 SMs


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
    block_n: int = BLOCK_N  # keys per tile
    num_stages: int = 0  # TMA ring depth (key tiles in flight per CTA); 0 = auto, see `stages`
    min_tiles: int = 2  # fewest key tiles per split (short contexts use fewer splits)
    rows_per_cta: int = 0  # 0 = auto, see `block_m`; 64 = one-warpgroup CTAs
    v_scale: float = 1.0  # new v rows are scaled (fp32) and rounded to bf16 before the cache append
    mixed: bool = False  # rows of several sequences: a slots input and stacked caches (module docstring)
    causal: bool = True  # False: every row sees every new key (a DFlash drafter block), windowed by |q - k| < W
    qk_norm_eps: float | None = None  # per-head RMSNorm of the q and new k rows (weights q_norm, k_norm) before RoPE

    def __post_init__(self) -> None:
        if self.q_heads % self.kv_heads:
            raise ValueError(f"q_heads {self.q_heads} is not a multiple of kv_heads {self.kv_heads}")
        if self.rope_dim % 2 or self.rope_dim > self.head_dim:
            raise ValueError(f"rope_dim {self.rope_dim} must be even and <= head_dim {self.head_dim}")
        if self.rows_per_cta not in (0, 64, 128):
            raise ValueError(f"rows_per_cta {self.rows_per_cta} must be 0 (auto), 64 or 128")
        if not 1 <= self.block <= self.block_n:
            raise ValueError(f"block {self.block} must be in [1, block_n={self.block_n}]")
        if self.mixed and not self.causal:
            raise ValueError("mixed steps are causal (a non-causal row would see its sequence's later chunks)")
        if self.mixed and self.block_m % self.group:
            raise ValueError(f"mixed steps need {self.block_m} rows per CTA to be a multiple of group {self.group}")

    @classmethod
    def for_node(cls, a: AttentionBlockAttrs, tokens: int, persistent: bool = False) -> "AttnConfig":
        """The config of an attention_block node (attrs `a`, `tokens` rows; `supports` must hold).
        persistent: the persistent bodies' (256-thread CTAs: 128 query rows each, 1-tile splits, the
        value scale applied to the new rows)."""
        cfg = cls(q_heads=a.heads, kv_heads=a.kv_heads, head_dim=a.head_dim, v_head_dim=a.v_head_dim,
                  rope_dim=a.rope_dim, rope_theta=a.theta, block=tokens, window=a.window, sink=a.has_sink,
                  mixed=a.slotted, causal=a.causal, qk_norm_eps=a.qk_norm_eps)  # fmt: skip
        if not persistent:
            return cfg
        return dataclasses.replace(cfg, rows_per_cta=128, min_tiles=PERSISTENT_MIN_TILES,
                                   v_scale=float(a.v_scale or 1.0))  # fmt: skip

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
        """Row-block coordinates: blocks of block_m rows; mixed: one per token (a candidate chunk start)."""
        return self.block if self.mixed else cdiv(self.rows, self.block_m)

    @property
    def chunk_tokens(self) -> int:
        """Tokens of one sequence a mixed step's CTA takes at most."""
        return max(1, self.block_m // self.group)

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
        if self.mixed:  # one row block per token whatever the CTA shape, so the eager and persistent kernels agree
            return max(1, WAVE_CTAS // (self.kv_heads * self.row_blocks))
        return max(1, WAVE_CTAS * self.ctas_per_sm // (self.kv_heads * self.row_blocks))

    @property
    def scale(self) -> float:
        return self.head_dim**-0.5

    def smem_bytes(self) -> int:
        tile = self.block_n * (self.head_dim + self.v_head_dim) * 2
        table_rows = rope_rows(self)  # the RoPE table
        return self.block_m * self.head_dim * 2 + self.stages * tile + table_rows * self.rope_dim * 4


Q_LOAD_ENV = "TILERT_ATTN_Q_LOAD"  # how an attention split's q rows reach shared memory (q_load_choice)
Q_LOADS = ("copy", "async")


def q_load_choice() -> str:
    """TILERT_ATTN_Q_LOAD, read when the split body is built: "async" (default): the block's rows by
    cp.async, issued first, all in flight while the RoPE table is built (a gated split: after its
    wait), the rows past the step's tokens zeroed; "copy": plain loads and shared-memory stores after
    the table (2.6 us for a B=8 block's 48 KB on an H100). "async" made the full-scale step 0.988x
    at B=1 and 0.985x at B=8 on an H100 (docs/performance.md)."""
    v = os.environ.get(Q_LOAD_ENV, "async") or "async"
    if v not in Q_LOADS:
        raise ValueError(f"{Q_LOAD_ENV}={v!r}: expected one of {', '.join(Q_LOADS)}")
    return v


def rope_rows(cfg: AttnConfig) -> int:
    """Rows of the RoPE table (and of the new-key rotation), padded so their loops cover whole warps
    once vectorised: the loops over (rows, rope_dim / 2) move float pairs or quads, and with 9 or 11
    rows such a loop covered part of a warp, where ThreadSync cannot place the barrier it needs (a
    compile error). So rows are a multiple of 32 / (rope_dim / 8); B = 1 keeps its one row."""
    half = max(cfg.rope_dim // 2, 1)
    return warp_rows(cfg.block, max(half // 4, 1) if cfg.mixed or cfg.block > 1 else half, cfg.block_n)


def supports(a: AttentionBlockAttrs, tokens: int, persistent: bool = False) -> str | None:
    """None when the kernel covers an attention_block node with attrs `a` and `tokens` rows, else why
    not (head dims not multiples of 16, more rows than a key tile, a config AttnConfig rejects; the
    standalone launchers also take no q/k norms and no non-causal drafter blocks, which only the
    persistent bodies run)."""
    if not persistent and a.qk_norm_eps is not None:
        return "q/k norms"
    if a.head_dim % 16 or a.v_head_dim % 16:
        return f"head dims {a.head_dim}/{a.v_head_dim} are not multiples of 16"
    if not persistent and not a.causal:
        return "non-causal attention"
    if tokens > BLOCK_N:
        return f"{tokens} tokens > {BLOCK_N}"
    try:
        AttnConfig.for_node(a, tokens, persistent=persistent)
    except ValueError as e:
        return str(e)
    return None


def row_blocks(a: AttentionBlockAttrs, tokens: int, kv_heads: int) -> int:
    """Row-block coordinates of an attention_block node's split tasks: blocks of `tiling`'s rows per
    CTA, or for a mixed-sequence (slotted) node one per token (AttnConfig.row_blocks)."""
    rows, bm, _ = tiling(a, tokens, kv_heads)
    return tokens if a.slotted else cdiv(rows, bm)


def tiling(a: AttentionBlockAttrs, tokens: int, kv_heads: int) -> tuple[int, int, int]:
    """(query rows per kv head, rows per CTA, KV splits) of an attention_block node's tasks: the
    persistent bodies' (rows, block_m, splits) where they cover the node (the table's tasks are what
    the persistent kernel runs: `attn_split_body` at the table's coordinates), else the standalone
    kernel's; else block_m 64/128 by rows and about one wave of CTAs (the plan VM runs such nodes).
    The persistent bodies take 128 query rows a task: with the standalone kernel's 64-row blocks a
    B=8 full-attention node had two row blocks, the second of which held no query row (half of its
    258 split tasks ran the prologue for nothing). One place for the tile pass, the plan VM and the
    runtimes."""
    for persistent in (True, False):
        if supports(a, tokens, persistent) is None:
            cfg = AttnConfig.for_node(a, tokens, persistent)
            if cfg.kv_heads != kv_heads:
                raise ValueError(f"attention_block kv_heads {cfg.kv_heads} != {kv_heads} kv heads in the cache")
            return cfg.rows, cfg.block_m, cfg.splits
    window = a.window
    rows = tokens * a.heads // kv_heads
    bm = 64 if rows <= 64 else 128
    blocks = tokens if a.slotted else cdiv(rows, bm)
    splits = max(1, cdiv(window, BLOCK_N)) if window else max(1, WAVE_CTAS // (kv_heads * blocks))
    return rows, bm, splits


def _split_plan(cfg: AttnConfig, start):
    """(lo, tiles_per_split, n_used) for the old keys [lo, start), as device expressions."""
    import tilelang.language as T

    lo = T.max(start - cfg.window + 1, 0) if cfg.window else 0  # row 0 (position start) sees start-W+1 ..
    tiles = T.ceildiv(start - lo, cfg.block_n)
    per = T.max(T.ceildiv(tiles, cfg.splits), cfg.min_tiles)
    return lo, per, T.ceildiv(tiles, per)


def rope_angle(pos, f, rope_dim: int, theta: float):
    """The RoPE angle of pair f at position pos, in float64 like the reference (angles reach 1e5 rad),
    reduced to [-pi, pi] (its cos and sin are the angle's): pos * theta^(-2f / rope_dim), the power
    as exp2(f (-2 / rope_dim) log2(theta)), less the nearest multiple of 2 pi in two parts (Cody-Waite:
    k x TWO_PI_HI is exact for k < 2^23), so cos and sin take their short path at any position. The
    float64 pow cost ~0.5 us of a split's prologue at B=1 on an H100 (docs/performance.md). The power
    agrees with the reference's to 2e-15 relative, so the fp32 cos/sin differ from the reference's
    in ~1e-5 of values, by one ulp. Shared by the attention bodies and the context-row append."""
    import tilelang.language as T

    c = -2.0 / max(rope_dim, 1) * math.log2(theta)
    ang = T.Cast("float64", pos) * T.exp2(T.Cast("float64", f) * T.float64(c))
    k = T.floor(ang * T.float64(1.0 / TWO_PI_HI) + T.float64(0.5))
    return (ang - k * T.float64(TWO_PI_HI)) - k * T.float64(TWO_PI_LO)


def norm_cols(dk: int) -> int:
    """Columns per step of make_head_norm's sum of squares."""
    return 32 if dk % 32 == 0 else 16


def make_head_norm(rows: int, dk: int, eps: float, ring: bool = False):
    """T.macro `head_norm(X, Wt, sq, ss, rs)`: per-head RMSNorm in place on `rows` rows of X (shared
    bf16 [rows, dk], or with `ring` [slots, rows, dk] at slot 0: the new key rows of the attention
    ring), times the weight Wt[dk]: fp32 math, one bf16 rounding, as head_rms_norm before a RoPE
    (zero rows stay zero). sq [rows, norm_cols(dk)] and ss [rows]: fragments; rs [>= rows]: shared
    (alloc_unmerged: the loop that rewrites the rows reads it). Shared by the attention split body
    (the drafter's q_norm / k_norm) and the context-row append (kernels/kv_append.py)."""
    import tilelang.language as T

    f32, bf16, cw = "float32", "bfloat16", norm_cols(dk)

    def at(X, i, d):
        return X[0, i, d] if ring else X[i, d]

    @T.macro
    def head_norm(X, Wt, sq, ss, rs):
        T.clear(sq)
        for kc in T.serial(dk // cw):
            for i, j in T.Parallel(rows, cw):
                x = T.Cast(f32, at(X, i, kc * cw + j))
                sq[i, j] += x * x
        T.reduce_sum(sq, ss, dim=1)
        for i in T.Parallel(rows):
            rs[i] = T.rsqrt(ss[i] / dk + eps)
        T.sync_threads()
        for i, d in T.Parallel(rows, dk):
            if ring:
                X[0, i, d] = T.Cast(bf16, T.Cast(f32, X[0, i, d]) * rs[i] * T.Cast(f32, Wt[d]))
            else:
                X[i, d] = T.Cast(bf16, T.Cast(f32, X[i, d]) * rs[i] * T.Cast(f32, Wt[d]))
        T.sync_threads()

    return head_norm


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
    MIX, TPB, HKV = cfg.mixed, cfg.chunk_tokens, cfg.kv_heads
    DK, DV, ROPE, RH, NS, W = cfg.head_dim, cfg.v_head_dim, cfg.rope_dim, cfg.rope_dim // 2, cfg.splits, cfg.window
    SL2 = cfg.scale * LOG2E
    NST, TH = cfg.stages, cfg.threads
    # q rows by cp.async (TILERT_ATTN_Q_LOAD=async): whole tokens per block. A split waited for before
    # it runs issues them first, before its KV tiles, and waits for all but the tiles' 2 NST groups
    # once its RoPE table is built; a gated split issues them after its wait (its KV tiles went out
    # before it) and waits for every group.
    QASYNC = q_load_choice() == "async" and not cfg.mixed and BM % G == 0
    CAUSAL, NORM, EPS = cfg.causal, cfg.qk_norm_eps is not None, cfg.qk_norm_eps
    NEG = -T.infinity("float32")
    bf16, f32 = "bfloat16", "float32"
    probe = make_probe()  # phases of a split (TILERT_PROBES): 0 cos/sin, 1 q rows, 2 q rotated, 3 new keys,
    # 4 a key tile landed, 7 its scores (q k^T), 5 its softmax update, 6 partials written

    QR = min(cfg.block_m, cfg.rows)  # rows of a q block that can be real (B = 1: 16 of 128)
    # RoPE loops over whole warps (common.warp_rows): padded q rows and new-key rows are zeros, and
    # the table's padded rows (positions past the B new ones) are computed but never used by real rows
    QRP = warp_rows(QR, max(RH, 1), BM)
    BK = rope_rows(cfg)

    @T.macro
    def rotate_q(q_s, rb, cs):
        """NeoX RoPE in place on q_s's real rows (plain bf16 copies of Q): each thread owns a
        (d, d + RH) pair and binds both values before it stores, so nothing is read after a write.
        fp32 math, one bf16 rounding, as the reference. Mixed: rb is the block's first token's row
        of the RoPE table (its offset from the sequence's first token in the step)."""
        for i, f in T.Parallel(QRP, max(RH, 1)):
            if f < RH:
                b = T.min(rb + i // G, B - 1) if MIX else T.min((rb * BM + i) // G, B - 1)
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

    if NORM:
        norm_q, norm_k = make_head_norm(BM, DK, EPS), make_head_norm(BN, DK, EPS, ring=True)

    def vnew(Vnew, b, h, d):
        if cfg.v_scale == 1.0:
            return Vnew[b, h, d]
        return T.Cast(bf16, T.Cast(f32, Vnew[b, h, d]) * cfg.v_scale)

    @T.macro
    def tile(q_s, k_s, v_s, acc_s, acc_p, acc_o, m, m_prev, alpha, l_sum, r_sum, qpos, base, hi, rescale):
        """Online-softmax update with keys base..base+BN-1 (k_s, v_s), visible below hi (and by the
        causal / window mask; on a full tile of old keys the mask is all true). rescale: false on a
        split's first tile, whose output rows are still zero (the update is a latency-bound chain of
        dependent instructions per thread: each one left out shortens it)."""
        T.clear(acc_s)
        T.gemm(q_s, k_s, acc_s, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
        probe(7)
        for i, j in T.Parallel(BM, BN):
            kp = base + j
            if CAUSAL:
                ok = (kp < hi) & (kp <= qpos[i])
            else:  # a drafter block: every key below hi
                ok = kp < hi
            if W:
                ok = ok & (kp > qpos[i] - W)  # W keys: qpos-W+1 .. qpos
                if not CAUSAL:
                    ok = ok & (kp < qpos[i] + W)  # and qpos .. qpos+W-1
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
        if rescale:
            for i, d in T.Parallel(BM, DV):
                acc_o[i, d] *= alpha[i]
        T.gemm(acc_p, v_s, acc_o, policy=T.GemmWarpPolicy.FullRow)

    @T.macro
    def issue_q(Q, q_s, rb, h):
        """(QASYNC) The block's q rows by cp.async: block row i is head h G + i % G of token
        rb BM / G + i // G, so each token's G rows are one G x DK block of Q; one commit group a token."""
        for j in T.unroll(BM // G):
            if rb * (BM // G) + j < B:
                T.async_copy(Q[rb * (BM // G) + j, h * G : h * G + G, :], q_s[j * G : j * G + G, :],
                             coalesced_width=8)  # fmt: skip

    @T.macro
    def issue(Kc, Vc, k_ring, v_ring, bar, st, h, base):
        """Load the key tile at base (K and V) of cache row h (the kv head; mixed: slot * Hkv + kv
        head) into ring slot st: one TMA load completing on bar[st], or (tma=False) cp.async by
        every thread, two commit groups."""
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
    def chunk_of(Pos, Slot, tok0, seg):
        """Mixed steps: seg = [a, e, active, t1] for the candidate chunk starting at token tok0: its
        sequence's rows a..e-1 in the step (the run of tok0's slot), whether tok0 starts a chunk
        (every TPB tokens of the run), and the chunk's end t1."""
        seg[0] = 0
        seg[1] = B
        for k in T.serial(B):
            if (k <= tok0) & (k > 0):
                if Slot[T.max(k - 1, 0)] != Slot[k]:
                    seg[0] = k
            kk = B - 1 - k
            if kk > tok0:
                if Slot[T.max(kk - 1, 0)] != Slot[kk]:
                    seg[1] = kk
        seg[2] = T.if_then_else((tok0 - seg[0]) % TPB == 0, 1, 0)
        seg[3] = T.min(tok0 + TPB, seg[1])

    @T.macro
    def write_mixed(acc_o, m, alpha, l_sum, Opart, Lse, h, rb, s, n_used, active, t1):
        """Mixed steps: a chunk's partials, block row i = query row rb * G + i (its tokens rb..t1-1);
        non-chunk blocks and splits past the keys write nothing."""
        if ((s == NS) | (s < n_used)) & (active == 1):
            for i in T.Parallel(BM):
                alpha[i] = T.if_then_else(l_sum[i] > 0, 1.0 / l_sum[i], 0)
            for i, d in T.Parallel(BM, DV):
                if i < (t1 - rb) * G:
                    Opart[h, rb * G + i, s, d] = acc_o[i, d] * alpha[i]
            for i in T.Parallel(BM):
                if i < (t1 - rb) * G:
                    Lse[h, rb * G + i, s] = T.if_then_else(l_sum[i] > 0, T.log2(l_sum[i]) + m[i] * SL2, NEG)

    @T.macro
    def split_core(Q, Knew, Vnew, Kc, Vc, Pos, Slot, Opart, Lse, h, rb, s, gate, Qn, Kn):
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
        if NORM:
            nsq = T.alloc_fragment([BM, norm_cols(DK)], f32)
            nss = T.alloc_fragment([BM], f32)
            ksq = T.alloc_fragment([BN, norm_cols(DK)], f32)
            kss = T.alloc_fragment([BN], f32)
            nrs = alloc_unmerged((BM,), f32)  # read by the loop that writes the rows

        if MIX:  # this block's chunk of one sequence: tokens rb..t1-1 of its run a..e-1
            seg = T.alloc_local([4], "int32")
            chunk_of(Pos, Slot, rb, seg)
            a0, active, t1 = seg[0], seg[2], seg[3]
            start = Pos[a0]  # the sequence's first position in this step: its old keys lie below
            ch = Slot[rb] * HKV + h  # the slot's cache row of kv head h
            new_hi = start + (t1 - a0)  # new keys the chunk's rows may see: the run's up to the chunk end
        else:
            active, ch = 1, h
            start = Pos[0]
            new_hi = start + B
        lo, per, n_used = _split_plan(cfg, start)
        s_lo = lo + s * per * BN
        s_hi = T.min(s_lo + per * BN, start)
        # key tiles of this split (0 for the new-key split NS and for unused splits)
        if MIX:
            nt = T.if_then_else((s < n_used) & (active == 1), T.ceildiv(s_hi - s_lo, BN), 0)
        else:
            nt = T.if_then_else(s < n_used, T.ceildiv(s_hi - s_lo, BN), 0)
        # (cp.async) The split's keys and values into L2 first, two bulk prefetches by one thread: the
        # tiles' 16-byte copies are then served from L2, not each round of them from DRAM (a 64-key
        # tile took ~5 us from its issue at B=1 on an H100; TMA needs host-built tensor maps).
        if not tma:  # (the address as an integer: a C cast, TIR casts no handle)
            if (nt > 0) & (T.get_thread_binding() == 0):
                T.call_extern("handle", "tilert_prefetch_bulk_l2",
                              T.call_extern("int64", "(long long)", T.address_of(Kc[ch, s_lo, 0])),
                              (s_hi - s_lo) * (DK * 2))  # fmt: skip
                T.call_extern("handle", "tilert_prefetch_bulk_l2",
                              T.call_extern("int64", "(long long)", T.address_of(Vc[ch, s_lo, 0])),
                              (s_hi - s_lo) * (DV * 2))  # fmt: skip
        if QASYNC and gate is None:  # the q rows first: older than the tiles' groups
            issue_q(Q, q_s, rb, h)
        # Start the first NST tile loads now, so they fly while this CTA builds its q block.
        for st in T.unroll(NST):
            if st < nt:
                issue(Kc, Vc, k_ring, v_ring, bar, st, ch, s_lo + st * BN)
            else:
                no_issue()

        # cos/sin of the B new positions in float64, like the reference (angles reach 1e5 rad).
        for b, f in T.Parallel(BK, max(RH, 1)):
            ang = rope_angle(start + b, f, ROPE, cfg.rope_theta)
            cs[b, f] = T.Cast(f32, T.cos(ang))
            cs[b, RH + f] = T.Cast(f32, T.sin(ang))
        probe(0)
        if gate is not None:
            T.sync_threads()  # cs is written: a barrier ThreadSync can see (Gate.passed() is opaque to it)
            gate.wait()  # q and the new k/v come from earlier tasks; nothing above read them
        if gate_passed(gate):  # every input is ready (a barrier); false only after a timed-out wait
            # q rows: one plain (vectorised) copy into shared memory, then RoPE in place; only row
            # blocks that can hold real rows are rotated (B = 1: 16 of 128 rows).
            if MIX:  # the chunk's tokens rb..t1-1, G rows each (BM is a multiple of G)
                for i, d in T.Parallel(BM, DK):
                    q_s[i, d] = T.if_then_else(
                        rb + i // G < t1, Q[T.min(rb + i // G, B - 1), h * G + i % G, d], T.Cast(bf16, 0)
                    )
                T.sync_threads()
                if NORM:
                    norm_q(q_s, Qn, nsq, nss, nrs)
                rotate_q(q_s, rb - a0, cs)
                for i in T.Parallel(BM):
                    qpos[i] = start + T.min(rb + i // G, t1 - 1) - a0
            elif QASYNC:
                if gate is not None:
                    issue_q(Q, q_s, rb, h)
                for i, d in T.Parallel(BM, DK):  # rows past the step's tokens (other rows: the copies')
                    if rb * BM + i >= R:
                        q_s[i, d] = T.Cast(bf16, 0)
                if gate is None:
                    T.ptx_wait_group(2 * NST)  # every group but the KV tiles' (issued after q's)
                else:
                    T.ptx_wait_group(0)  # (the KV tiles went out before the wait, long since landed)
                T.sync_threads()
                probe(1)
            else:
                for i, d in T.Parallel(BM, DK):
                    r = rb * BM + i
                    q_s[i, d] = T.if_then_else(r < R, Q[T.min(r // G, B - 1), h * G + r % G, d], T.Cast(bf16, 0))
                T.sync_threads()
                probe(1)
            if not MIX:
                if NORM:
                    norm_q(q_s, Qn, nsq, nss, nrs)
                rotate_q(q_s, rb, cs)
                for i in T.Parallel(BM):
                    qpos[i] = start + T.min((rb * BM + i) // G, B - 1)
            T.fill(acc_o, 0)
            T.fill(l_sum, 0)
            T.fill(m, NEG)
            probe(2)

            if s == NS:  # the B new keys: ring slot 0 (no loads are in flight: nt = 0), RoPE, append
                if MIX:  # the run's keys a..t1-1 (table rows 0..t1-a-1); the chunk appends its own
                    for j, d in T.Parallel(BN, DK):
                        k_ring[0, j, d] = T.if_then_else(j < t1 - a0, Knew[T.min(a0 + j, B - 1), h, d], T.Cast(bf16, 0))
                    for j, d in T.Parallel(BN, DV):
                        v_ring[0, j, d] = T.if_then_else(
                            j < t1 - a0, vnew(Vnew, T.min(a0 + j, B - 1), h, d), T.Cast(bf16, 0)
                        )
                else:
                    for j, d in T.Parallel(BN, DK):
                        k_ring[0, j, d] = T.if_then_else(j < B, Knew[T.min(j, B - 1), h, d], T.Cast(bf16, 0))
                    for j, d in T.Parallel(BN, DV):
                        v_ring[0, j, d] = T.if_then_else(j < B, vnew(Vnew, T.min(j, B - 1), h, d), T.Cast(bf16, 0))
                T.sync_threads()
                if NORM:
                    norm_k(k_ring, Kn, ksq, kss, nrs)
                rotate_k(k_ring, cs)
                T.fence_proxy_async()  # generic-proxy smem writes, read next by wgmma (async proxy)
                T.sync_threads()
                if MIX:
                    off = rb - a0
                    for j, d in T.Parallel(B, DK):
                        if (active == 1) & (rb + j < t1):
                            Kc[ch, start + off + j, d] = k_ring[0, T.min(off + j, BN - 1), d]
                    for j, d in T.Parallel(B, DV):
                        if (active == 1) & (rb + j < t1):
                            Vc[ch, start + off + j, d] = v_ring[0, T.min(off + j, BN - 1), d]
                elif rb == 0:
                    for j, d in T.Parallel(B, DK):
                        Kc[h, start + j, d] = k_ring[0, j, d]
                    for j, d in T.Parallel(B, DV):
                        Vc[h, start + j, d] = v_ring[0, j, d]
                T.sync_threads()  # here, not inside the append's partial-warp branches (ThreadSync)
                probe(3)
            # One loop and one (always masked) tile for the old keys' splits and the new keys' split:
            # the body's code is fetched cold at every layer, and three expansions of the tile (full,
            # partial last, new keys) made it about 70 KB of SASS. Ring of NST slots: tile t lives in
            # slot t % NST; the trip count comes from the device (positions), so the ring is run by
            # hand instead of T.Pipelined (see docs/attention.md).
            for t in T.serial(T.if_then_else(s == NS, active, nt)):
                st = t % NST
                base = T.if_then_else(s == NS, start, s_lo + t * BN)
                hi = T.if_then_else(s == NS, new_hi, s_hi)
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
                    probe(4)
                tile(q_s, k_ring[st, :, :], v_ring[st, :, :], acc_s, acc_p, acc_o, m, m_prev, alpha, l_sum, r_sum,
                     qpos, base, hi, t > 0)  # fmt: skip
                T.sync_threads()  # every warp is done with slot st before it is refilled
                probe(5)
                if s < NS:
                    if t + NST < nt:
                        issue(Kc, Vc, k_ring, v_ring, bar, st, ch, base + NST * BN)
                    else:
                        no_issue()

            if MIX:
                write_mixed(acc_o, m, alpha, l_sum, Opart, Lse, h, rb, s, n_used, active, t1)
            elif (s == NS) | (s < n_used):  # splits past the keys write nothing (the combine skips them)
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
                probe(6)

    if MIX and gated:

        @T.macro
        def attn_split_body(Q, Knew, Vnew, Kc, Vc, Pos, Slot, Opart, Lse, h, rb, s, gate, Qn=None, Kn=None):
            split_core(Q, Knew, Vnew, Kc, Vc, Pos, Slot, Opart, Lse, h, rb, s, gate, Qn, Kn)

        attn_split_body = mark_gated(attn_split_body)
    elif MIX:

        @T.macro
        def attn_split_body(Q, Knew, Vnew, Kc, Vc, Pos, Slot, Opart, Lse, h, rb, s, Qn=None, Kn=None):
            split_core(Q, Knew, Vnew, Kc, Vc, Pos, Slot, Opart, Lse, h, rb, s, None, Qn, Kn)

    elif gated:

        @T.macro
        def attn_split_body(Q, Knew, Vnew, Kc, Vc, Pos, Opart, Lse, h, rb, s, gate, Qn=None, Kn=None):
            split_core(Q, Knew, Vnew, Kc, Vc, Pos, None, Opart, Lse, h, rb, s, gate, Qn, Kn)

        attn_split_body = mark_gated(attn_split_body)
    else:

        @T.macro
        def attn_split_body(Q, Knew, Vnew, Kc, Vc, Pos, Opart, Lse, h, rb, s, Qn=None, Kn=None):
            split_core(Q, Knew, Vnew, Kc, Vc, Pos, None, Opart, Lse, h, rb, s, None, Qn, Kn)

    CT = 256  # combine threads: 32 lanes x 4 columns each, CT // 32 slot groups
    NG, CPL = CT // 32, DV // 32
    NSP = cdiv(NS + 1, CT) * CT

    @T.macro
    def combine_core(Pos, Slot, Sink, Opart, Lse, Out, h, r):
        tx = T.get_thread_binding()
        lse_s = T.alloc_shared([NSP], f32)
        red = T.alloc_shared([2, NG], f32)
        part = T.alloc_shared([NG, DV], f32)
        mx = T.alloc_var(f32)
        tot = T.alloc_var(f32)
        o = T.alloc_local([CPL], f32)
        b = r // G
        if MIX:  # the splits of the row's sequence: its first position in the step
            seg = T.alloc_local([4], "int32")
            chunk_of(Pos, Slot, b, seg)
            _, _, n_used = _split_plan(cfg, Pos[seg[0]])
        else:
            _, _, n_used = _split_plan(cfg, Pos[0])
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

    if MIX:

        @T.macro
        def combine_body(Pos, Slot, Sink, Opart, Lse, Out, h, r):
            combine_core(Pos, Slot, Sink, Opart, Lse, Out, h, r)

    else:

        @T.macro
        def combine_body(Pos, Sink, Opart, Lse, Out, h, r):
            combine_core(Pos, None, Sink, Opart, Lse, Out, h, r)

    return attn_split_body, combine_body


def _shapes(cfg: AttnConfig):
    import tilelang.language as T

    S = T.dynamic("S")
    B, Hq, Hkv, DK, DV = cfg.block, cfg.q_heads, cfg.kv_heads, cfg.head_dim, cfg.v_head_dim
    SH = T.dynamic("SH") if cfg.mixed else Hkv  # mixed: slots x kv heads cache rows
    return {
        "q": [B, Hq, DK],
        "k": [B, Hkv, DK],
        "v": [B, Hkv, DV],
        "k_cache": [SH, S, DK],
        "v_cache": [SH, S, DV],
        "positions": [B],
        "slots": [B],
        "sink": [Hq],
        "o_part": [Hkv, cfg.rows, cfg.splits + 1, DV],
        "lse": [Hkv, cfg.rows, cfg.splits + 1],
        "out": [B, Hq, DV],
    }


def attn_split_kernel(cfg: AttnConfig):
    """Standalone launcher of attn_split_body: grid (row block, split, kv head)."""
    import tilelang.language as T

    if cfg.qk_norm_eps is not None:
        raise ValueError("the standalone attention kernel takes no q/k norms (the persistent bodies do)")
    body, _ = make_bodies(cfg)
    sh = _shapes(cfg)
    bf16, f32 = "bfloat16", "float32"

    if cfg.mixed:

        @T.prim_func
        def attn_split_mixed(
            Q: T.Tensor(sh["q"], bf16),
            Knew: T.Tensor(sh["k"], bf16),
            Vnew: T.Tensor(sh["v"], bf16),
            Kc: T.Tensor(sh["k_cache"], bf16),
            Vc: T.Tensor(sh["v_cache"], bf16),
            Pos: T.Tensor(sh["positions"], "int32"),
            Slot: T.Tensor(sh["slots"], "int32"),
            Opart: T.Tensor(sh["o_part"], f32),
            Lse: T.Tensor(sh["lse"], f32),
        ):
            with T.Kernel(cfg.row_blocks, cfg.splits + 1, cfg.kv_heads, threads=cfg.threads) as (rb, s, h):
                body(Q, Knew, Vnew, Kc, Vc, Pos, Slot, Opart, Lse, h, rb, s)

        return attn_split_mixed

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
    if cfg.mixed:

        @T.prim_func
        def attn_combine_mixed(
            Pos: T.Tensor(sh["positions"], "int32"),
            Slot: T.Tensor(sh["slots"], "int32"),
            Sink: T.Tensor(sh["sink"], "float32"),
            Opart: T.Tensor(sh["o_part"], "float32"),
            Lse: T.Tensor(sh["lse"], "float32"),
            Out: T.Tensor(sh["out"], "bfloat16"),
        ):
            with T.Kernel(cfg.rows, cfg.kv_heads, threads=256) as (r, h):
                body(Pos, Slot, Sink, Opart, Lse, Out, h, r)

        return attn_combine_mixed

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


def configs_for_plan(ranks: int = 8, mixed: bool = False) -> list[AttnConfig]:
    """The attention kernels the mimo-v2.5-pro plan on `ranks` ranks uses: full and SWA layers,
    plain decode (B=1) and DFlash verify (B=8); mixed: the mixed-sequence steps' (B=1, 8 and 16 rows)."""
    hq, hkv = 128 // ranks, max(1, 8 // ranks)
    out = []
    for block in (1, 8, 16) if mixed else (1, 8):
        out.append(AttnConfig(q_heads=hq, kv_heads=hkv, block=block, rope_theta=1e7, mixed=mixed))
        out.append(AttnConfig(q_heads=hq, kv_heads=hkv, block=block, rope_theta=1e4, window=128, sink=True,
                              mixed=mixed))  # fmt: skip
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
    slots: torch.Tensor | None = None,
) -> torch.Tensor:
    """RoPE + KV append + attention for one step; returns out [B, Hq, Dv] bf16.

    q [B, Hq, Dk], k [B, Hkv, Dk], v [B, Hkv, Dv] bf16 (before RoPE); caches [Hkv, S, D] bf16,
    updated in place; positions [B] int32 = start + arange(B) on the device; sink [Hq] fp32
    (required iff cfg.sink). `validate` checks the positions' contract (one host sync).
    cfg.mixed: caches [slots, Hkv, S, D] and slots [B] int32, each sequence's rows contiguous at
    consecutive positions (`tilert.ops.attention.check_slots`).
    """
    dev = q.device
    B, Hq, Hkv, DK, DV = cfg.block, cfg.q_heads, cfg.kv_heads, cfg.head_dim, cfg.v_head_dim
    if cfg.mixed and k_cache.dim() != 4:
        raise ValueError(f"attention: a mixed config needs caches [slots, Hkv, S, D], got {tuple(k_cache.shape)}")
    pool = (k_cache.shape[0],) if cfg.mixed else ()
    S = k_cache.shape[-2] if k_cache.dim() == 3 + len(pool) else -1
    bf = torch.bfloat16
    for name, t, shape, dt in (
        ("q", q, (B, Hq, DK), bf),
        ("k", k, (B, Hkv, DK), bf),
        ("v", v, (B, Hkv, DV), bf),
        ("k_cache", k_cache, (*pool, Hkv, S, DK), bf),
        ("v_cache", v_cache, (*pool, Hkv, S, DV), bf),
        ("positions", positions, (B,), torch.int32),
    ):
        _expect(name, t, shape, dt, dev)
    if cfg.mixed:
        if slots is None:
            raise ValueError("attention: a mixed config needs slots [B] int32")
        _expect("slots", slots, (B,), torch.int32, dev)
    elif slots is not None:
        raise ValueError("attention: slots given but the config is not mixed")
    if cfg.sink:
        if sink is None:
            raise ValueError("attention: this config has a sink; pass sink [Hq] float32")
        _expect("sink", sink, (Hq,), torch.float32, dev)
    else:
        if sink is not None:
            raise ValueError("attention: sink given but the config has sink=False")
        sink = torch.zeros(Hq, device=dev)
    if validate and cfg.mixed:
        check_slots(positions.cpu(), slots.cpu(), k_cache.shape[0], S)
    elif validate:
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
    if cfg.mixed:  # the pool as cache rows [slots * Hkv, S, D] (a view)
        kc, vc = k_cache.view(-1, S, DK), v_cache.view(-1, S, DV)
        split(q, k, v, kc, vc, positions, slots, o_part, lse)
        combine(positions, slots, sink, o_part, lse, out)
        return out
    split(q, k, v, k_cache, v_cache, positions, o_part, lse)
    combine(positions, sink, o_part, lse, out)
    return out


def reference(cfg: AttnConfig, q, k, v, k_cache, v_cache, positions, sink=None, slots=None) -> torch.Tensor:
    """tilert.ops.attention composed as the kernel's step: rope, append, attend (fp32 out); with
    slots (mixed), each row in its own slot of caches [slots, Hkv, S, D]."""
    qr = rope(q, positions, cfg.rope_dim, cfg.rope_theta)
    kr = rope(k, positions, cfg.rope_dim, cfg.rope_theta)
    if slots is not None:
        kv_append_slots(k_cache, v_cache, kr, v, positions, slots)
        return attention_slots(qr, k_cache, v_cache, positions, slots, scale=cfg.scale, window=cfg.window, sink=sink)
    kv_append(k_cache, v_cache, kr, v, positions)
    kv_len = int(positions[-1]) + 1
    return _ref_attention(qr, k_cache, v_cache, positions, kv_len, scale=cfg.scale, window=cfg.window, sink=sink,
                          causal=cfg.causal)  # fmt: skip


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


def make_mixed_inputs(cfg: AttnConfig, seqs: list[tuple[int, int, int]], n_slots: int, capacity: int,
                      device="cuda", seed=None) -> dict:  # fmt: skip
    """Fresh random inputs for a mixed step: seqs = (slot, first position, rows) per sequence, in row
    order (rows sum to cfg.block). Every slot's cache holds random old keys below its sequence's first
    position and NaN from there on (and in slots no row uses), so a row reading another slot, or a
    slot's stale tail, shows up."""
    if sum(n for _, _, n in seqs) != cfg.block:
        raise ValueError(f"rows {[n for _, _, n in seqs]} do not add up to block {cfg.block}")
    g = torch.Generator(device="cpu")
    g.manual_seed(seed if seed is not None else torch.seed() % (1 << 31))
    B, Hq, Hkv, DK, DV = cfg.block, cfg.q_heads, cfg.kv_heads, cfg.head_dim, cfg.v_head_dim

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(torch.bfloat16)

    k_cache = torch.full((n_slots, Hkv, capacity, DK), float("nan"), dtype=torch.bfloat16)
    v_cache = torch.full((n_slots, Hkv, capacity, DV), float("nan"), dtype=torch.bfloat16)
    for slot, start, _ in seqs:
        k_cache[slot, :, :start] = rnd(Hkv, start, DK)
        v_cache[slot, :, :start] = rnd(Hkv, start, DV)
    x = {
        "q": rnd(B, Hq, DK),
        "k": rnd(B, Hkv, DK),
        "v": rnd(B, Hkv, DV),
        "k_cache": k_cache,
        "v_cache": v_cache,
        "positions": torch.cat([torch.arange(p, p + n, dtype=torch.int32) for _, p, n in seqs]),
        "slots": torch.cat([torch.full((n,), u, dtype=torch.int32) for u, _, n in seqs]),
        "sink": (torch.randn(Hq, generator=g) + 1.0) if cfg.sink else None,
    }
    return {k: v.to(device) if v is not None else None for k, v in x.items()}


def check_mixed(cfg: AttnConfig, seqs: list[tuple[int, int, int]], n_slots: int, capacity: int, seed=None,
                tol: float = 1e-2) -> dict:  # fmt: skip
    """The mixed kernel against each sequence's own single-sequence reference (fresh random inputs,
    output poisoned with NaN, unwritten cache slots NaN): per-sequence relative error and the
    appended cache. Returns {"rel_err": [per sequence], "cache_err"}; raises AssertionError past tol."""
    x = make_mixed_inputs(cfg, seqs, n_slots, capacity, seed=seed)
    kc_ref, vc_ref = x["k_cache"].clone(), x["v_cache"].clone()
    out = torch.full((cfg.block, cfg.q_heads, cfg.v_head_dim), float("nan"), device="cuda", dtype=torch.bfloat16)
    run(cfg, x["q"], x["k"], x["v"], x["k_cache"], x["v_cache"], x["positions"], x["sink"], out=out,
        slots=x["slots"])  # fmt: skip
    torch.cuda.synchronize()
    errs, row, cache_err = [], 0, 0.0
    for slot, start, n in seqs:
        one = dataclasses.replace(cfg, block=n, mixed=False, num_split=0)
        rows = slice(row, row + n)
        kc, vc = kc_ref[slot].clone(), vc_ref[slot].clone()
        ref = reference(one, x["q"][rows], x["k"][rows], x["v"][rows], kc, vc, x["positions"][rows], x["sink"])
        got = out[rows].float()
        assert bool(torch.isfinite(got).all()), f"{cfg} {seqs}: sequence at slot {slot}: output not fully written"
        errs.append(float((got - ref).norm() / ref.norm()))
        end = start + n
        cache_err = max(cache_err, float((x["k_cache"][slot, :, :end].float() - kc[:, :end].float()).abs().max()),
                        float((x["v_cache"][slot, :, :end].float() - vc[:, :end].float()).abs().max()))  # fmt: skip
        if not (x["k_cache"][slot, :, end:].isnan().all() and x["v_cache"][slot, :, end:].isnan().all()):
            cache_err = float("inf")  # written past the sequence's rows
        row += n
    used = {u for u, _, _ in seqs}
    for u in range(n_slots):
        if u not in used and not (x["k_cache"][u].isnan().all() and x["v_cache"][u].isnan().all()):
            cache_err = float("inf")  # a slot no row uses was written
    assert max(errs) < tol, f"{cfg} {seqs}: rel err {errs} >= {tol}"
    assert cache_err <= 2**-6 * 4, f"{cfg} {seqs}: cache append differs by {cache_err:.3g}"
    return {"rel_err": errs, "cache_err": cache_err}


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
    "check_mixed",
    "combine_kernel",
    "compiled",
    "configs_for_plan",
    "kv_bytes",
    "make_bodies",
    "make_inputs",
    "make_mixed_inputs",
    "reference",
    "row_blocks",
    "run",
    "workspace",
]
