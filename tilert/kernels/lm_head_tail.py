"""The LM head's tail tasks: greedy argmax over the logits and DFlash greedy acceptance (one CTA).

The logits GEMM runs elsewhere (LM_HEAD_GEMM tiles); these bodies read its f32 output
Logits[T, Vloc] (T <= 16 decode / verify rows, Vloc up to 152576). Each is a T.macro for one CTA of
exactly THREADS = 256 threads: no TMA, no warp specialisation, no blockIdx, and every
T.sync_threads is reached by all threads.

Scan (shared by the bodies), row by row: the row is cut into vectors of VEC = 4 floats (2 or 1
when Vloc is not a multiple of 4); thread tx takes vectors tx, tx + 256, ... in `unroll`-deep
batches (all loads of a batch issued before any compare: up to 32 x 16 B per thread by
default) and keeps one (value, id) best per vector lane, scanning its columns in increasing order
with a strict `>`; lanes merge, then a 5-step xor warp shuffle of (value, id) pairs, then lane 0
of each warp writes shared red[t, warp]; after one barrier, thread t < T merges the 8 warps of
row t. Every merge takes the larger value, on equal values the lower id: ties go to the LOWEST
id (torch.argmax / torch.max rule). Columns >= `valid` are ignored (vocab padding). NaN logits
are not handled (unspecified result).

    argmax_body(Logits[T, Vloc] f32, Next[T] i32, valid)
        Next[t] = argmax(Logits[t, :valid])                         tilert.ops.sampling.argmax
    accept_body(Logits, Draft[T] i32, Next[T] i32, Accept[T + 1] i32, valid)
        Next as above (also kept in shared best_i[t]), a barrier, then threads t < T each count the
        accepted prefix a = longest k with Draft[1:k+1] == Next[:k], and write Accept[1 + t] =
        Draft[t + 1] (t < a), Next[a] (t == a), -1 (t > a); thread 0 writes Accept[0] = a.
                                                                    tilert.ops.sampling.dflash_accept
    local_argmax_body(Logits, Val[T] f32, Idx[T] i32, valid, offset)
        Val[t] = max(Logits[t, :valid]), Idx[t] = offset + its lowest local id: this rank's part of
        a vocabulary-parallel argmax ("vocab_argmax" op, vocab_offset = offset, vocab_valid =
        valid); the cross-rank step ("argmax_reduce": largest value, ties to the lowest id) comes
        later. valid must be >= 1 (a rank holding only padding must not run it).

`valid` and `offset` may be Python ints or PrimExprs (e.g. from a task row); the loop extents
come from the static config (Vloc), so valid <= Vloc.

Launchers: one CTA of 256 threads each (`make_kernels(cfg)` -> argmax, accept, local_argmax, with
valid = cfg.valid and offset = cfg.offset baked in); `compiled(cfg)`; `check_*(cfg, seed)`.
"""

import functools
from dataclasses import dataclass

import torch

from tilert.ir.registry import get_op
from tilert.kernels.common import build, cdiv
from tilert.ops.sampling import argmax as argmax_reference
from tilert.ops.sampling import dflash_accept as accept_reference

# tilelang (the kernel compiler, slow to import) is imported only inside the functions that build kernels

THREADS = 256  # the persistent kernel's CTA size (tilert.kernels.common.PERSISTENT_THREADS)
WARPS = THREADS // 32
PASS_CONFIGS = {"tl.disable_warp_specialized": True}  # no T.copy here, so nothing for TMA to lower
TMAX = 64  # rows handled (shared red is T x 8 pairs)


@dataclass(frozen=True)
class Config:
    t: int  # rows (tokens)
    vloc: int  # logits columns (this rank's vocabulary slice, padded)
    valid: int = 0  # columns that are real tokens; 0 = all vloc (launchers only; bodies take it)
    offset: int = 0  # global id of local column 0 (local_argmax launcher only)
    unroll: int = 32  # vectors per thread per batch (H200: 32 best; ptxas 106 registers, no spills)

    def __post_init__(self) -> None:
        if not 1 <= self.t <= TMAX:
            raise ValueError(f"T = {self.t} rows; the LM-head tail handles 1..{TMAX}")
        if self.vloc < 1 or not 0 <= self.valid <= self.vloc:
            raise ValueError(f"bad vloc {self.vloc} / valid {self.valid}")

    @property
    def n_valid(self) -> int:
        return self.valid or self.vloc

    @property
    def vec(self) -> int:
        return next(v for v in (4, 2, 1) if self.vloc % v == 0)


def make_bodies(cfg: Config):
    """(argmax_body, accept_body, local_argmax_body, dflash_accept_body) as T.macros (signatures: module
    docstring; dflash_accept_body(Draft, Next, Accept) is accept_body's acceptance from a global Next)."""
    import tilelang.language as T

    Tn, V, VEC = cfg.t, cfg.vloc, cfg.vec
    NQ = V // VEC  # vectors per row
    ITER = cdiv(NQ, THREADS)
    U = max(1, min(cfg.unroll, ITER))
    NO = cdiv(ITER, U)
    f32, i32 = "float32", "int32"
    NEG = -T.infinity(f32)

    @T.macro
    def better(v, i, bv, bi):  # (v, i) beats (bv, bi): larger value, or equal value and lower id
        return v > bv or (v == bv and i < bi)

    @T.macro
    def scan(Logits, valid, red_v, red_i):
        """Per row: this CTA's (max, lowest argmax id) over columns < valid -> red_v/red_i[t, warp]."""
        tx = T.get_thread_binding()
        lane, warp = tx % 32, tx // 32
        buf = T.alloc_local((U * VEC,), f32)
        lv = T.alloc_local((VEC,), f32)
        li = T.alloc_local((VEC,), i32)
        bv = T.alloc_var(f32)
        bi = T.alloc_var(i32)
        ov = T.alloc_var(f32)
        oi = T.alloc_var(i32)
        for t in T.serial(Tn):
            for v in T.unroll(VEC):
                lv[v] = NEG
                li[v] = 0
            for o in T.serial(NO):
                for u in T.unroll(U):
                    q = (o * U + u) * THREADS + tx
                    if q < NQ and q * VEC < valid:
                        for v in T.vectorized(VEC):
                            buf[u * VEC + v] = Logits[t, q * VEC + v]
                    else:
                        for v in T.vectorized(VEC):
                            buf[u * VEC + v] = NEG
                for u in T.unroll(U):
                    for v in T.unroll(VEC):
                        col = ((o * U + u) * THREADS + tx) * VEC + v
                        if buf[u * VEC + v] > lv[v] and col < valid:
                            lv[v] = buf[u * VEC + v]
                            li[v] = col
            bv = lv[0]
            bi = li[0]
            for v in T.unroll(1, VEC):
                if better(lv[v], li[v], bv, bi):
                    bv = lv[v]
                    bi = li[v]
            for s in [16, 8, 4, 2, 1]:
                ov = T.shfl_xor(bv, s)
                oi = T.shfl_xor(bi, s)
                if better(ov, oi, bv, bi):
                    bv = ov
                    bi = oi
            if lane == 0:
                red_v[t, warp] = bv
                red_i[t, warp] = bi

    @T.macro
    def row_best(Logits, valid, best_v, best_i):
        """scan, a barrier, then thread t < T merges row t's 8 warp results into best_v/best_i[t]
        (buffers apart from the scan's, so no thread's reads and another's writes meet in one buffer
        inside the partial-warp branch: ThreadSync could not place a barrier there)."""
        red_v = T.alloc_shared((Tn, WARPS), f32)
        red_i = T.alloc_shared((Tn, WARPS), i32)
        bv = T.alloc_var(f32)
        bi = T.alloc_var(i32)
        tx = T.get_thread_binding()
        scan(Logits, valid, red_v, red_i)
        T.sync_threads()
        if tx < Tn:
            bv = red_v[tx, 0]
            bi = red_i[tx, 0]
            for w in T.unroll(1, WARPS):
                if better(red_v[tx, w], red_i[tx, w], bv, bi):
                    bv = red_v[tx, w]
                    bi = red_i[tx, w]
            best_v[tx] = bv
            best_i[tx] = bi

    @T.macro
    def argmax_body(Logits, Next, valid):
        best_v = T.alloc_shared((Tn,), f32)
        best_i = T.alloc_shared((Tn,), i32)
        tx = T.get_thread_binding()
        row_best(Logits, valid, best_v, best_i)
        if tx < Tn:
            Next[tx] = best_i[tx]

    @T.macro
    def local_argmax_body(Logits, Val, Idx, valid, offset):
        best_v = T.alloc_shared((Tn,), f32)
        best_i = T.alloc_shared((Tn,), i32)
        tx = T.get_thread_binding()
        row_best(Logits, valid, best_v, best_i)
        if tx < Tn:
            Val[tx] = best_v[tx]
            Idx[tx] = best_i[tx] + offset

    @T.macro
    def accept_rows(Draft, Post, Accept):
        """DFlash greedy acceptance given the posterior ids Post[T] (shared best_i, or a global
        Next): threads t < T each count the accepted prefix a (longest with Draft[1 + k] ==
        posterior[k]) and write Accept[1 + t]; thread 0 writes Accept[0] = a."""
        acc = T.alloc_var(i32)
        tx = T.get_thread_binding()
        if tx < Tn:
            acc = 0
            for k in T.serial(Tn - 1):
                if acc == k and Draft[k + 1] == Post[k]:
                    acc = k + 1
            if tx < acc:
                Accept[1 + tx] = Draft[tx + 1]
            elif tx == acc:
                Accept[1 + tx] = Post[acc]
            else:
                Accept[1 + tx] = -1
            if tx == 0:
                Accept[0] = acc

    @T.macro
    def accept_body(Logits, Draft, Next, Accept, valid):
        best_v = T.alloc_shared((Tn,), f32)
        best_i = T.alloc_shared((Tn,), i32)
        tx = T.get_thread_binding()
        row_best(Logits, valid, best_v, best_i)
        if tx < Tn:
            Next[tx] = best_i[tx]  # best_i[t] = posterior[t], read by every thread t < T below
        T.sync_threads()
        accept_rows(Draft, best_i, Accept)

    @T.macro
    def dflash_accept_body(Draft, Next, Accept):
        """accept_body's second half from posterior ids already in global Next (the cross-rank argmax)."""
        accept_rows(Draft, Next, Accept)

    return argmax_body, accept_body, local_argmax_body, dflash_accept_body


def make_kernels(cfg: Config):
    """Standalone launchers (1 CTA x 256 threads): (argmax, accept, local_argmax)."""
    import tilelang.language as T

    argmax_body, accept_body, local_argmax_body, _ = make_bodies(cfg)
    Tn, V, valid, off = cfg.t, cfg.vloc, cfg.n_valid, cfg.offset

    @T.prim_func
    def lm_argmax(Logits: T.Tensor((Tn, V), "float32"), Next: T.Tensor((Tn,), "int32")):
        with T.Kernel(1, threads=THREADS) as _:
            argmax_body(Logits, Next, valid)

    @T.prim_func
    def lm_accept(
        Logits: T.Tensor((Tn, V), "float32"),
        Draft: T.Tensor((Tn,), "int32"),
        Next: T.Tensor((Tn,), "int32"),
        Accept: T.Tensor((Tn + 1,), "int32"),
    ):
        with T.Kernel(1, threads=THREADS) as _:
            accept_body(Logits, Draft, Next, Accept, valid)

    @T.prim_func
    def lm_local_argmax(
        Logits: T.Tensor((Tn, V), "float32"),
        Val: T.Tensor((Tn,), "float32"),
        Idx: T.Tensor((Tn,), "int32"),
    ):
        with T.Kernel(1, threads=THREADS) as _:
            local_argmax_body(Logits, Val, Idx, valid, off)

    return lm_argmax, lm_accept, lm_local_argmax


KERNELS = ("argmax", "accept", "local_argmax")


@functools.cache
def compiled(cfg: Config, which: str = "argmax"):
    """The standalone launcher `which` (one of KERNELS), built for sm_90a."""
    return build(make_kernels(cfg)[KERNELS.index(which)], pass_configs=PASS_CONFIGS)


def vocab_argmax_reference(logits: torch.Tensor, vocab_offset: int, vocab_valid: int):
    """(max value, global id) per row: the "vocab_argmax" op's torch reference."""
    return get_op("vocab_argmax").reference(None, logits, vocab_offset=vocab_offset, vocab_valid=vocab_valid)


# ---- checks ----------------------------------------------------------------------------------------


def make_logits(cfg: Config, seed: int | None = None, device: str = "cuda") -> torch.Tensor:
    """Random logits [T, Vloc] with exact ties: each row's maximum appears at 2-3 positions (same
    vector, far apart, across threads / warps), padding columns >= valid hold larger values."""
    g = torch.Generator(device="cpu")
    g.manual_seed(seed if seed is not None else torch.seed() % 2**31)
    V, n = cfg.vloc, cfg.n_valid
    x = torch.randn(cfg.t, V, generator=g) * 4.0
    for t in range(cfg.t):
        top = float(x[t, :n].max()) + 1.0 + t
        kind = t % 4
        a = int(torch.randint(0, n, (1,), generator=g))
        if kind == 0:  # a second copy later in the row
            pos = [a, int(torch.randint(a, n, (1,), generator=g))]
        elif kind == 1:  # the same 4-vector (lanes of one thread)
            b = a - a % 4
            pos = [p for p in (b + 3, b + 1) if p < n] or [a]
        elif kind == 2:  # 256 vectors apart: the same thread, next iteration; plus a copy in another warp
            pos = [p for p in (a, a + 1024, a + 37 * 4) if p < n]
        else:  # the first and last valid columns
            pos = [n - 1, 0]
        x[t, pos] = top
    if n < V:
        x[:, n:] = x.max() + 10.0  # padding must never win
    return x.to(device)


def check_argmax(cfg: Config, seed: int | None = None) -> int:
    """Runs the argmax launcher on fresh tied logits; returns the number of rows that differ from
    tilert.ops.sampling.argmax over the valid columns (0 = exact)."""
    logits = make_logits(cfg, seed)
    nxt = torch.full((cfg.t,), -7, dtype=torch.int32, device="cuda")
    compiled(cfg, "argmax")(logits, nxt)
    ref = argmax_reference(logits[:, : cfg.n_valid])
    return int((nxt != ref).sum())


def check_local_argmax(cfg: Config, seed: int | None = None) -> int:
    """As check_argmax for the local (value, global id) pair against the "vocab_argmax" reference."""
    logits = make_logits(cfg, seed)
    val = torch.full((cfg.t,), float("nan"), device="cuda")
    idx = torch.full((cfg.t,), -7, dtype=torch.int32, device="cuda")
    compiled(cfg, "local_argmax")(logits, val, idx)
    rv, ri = vocab_argmax_reference(logits, cfg.offset, cfg.n_valid)
    return int(((idx != ri) | (val != rv)).sum())


def make_draft(cfg: Config, posterior: torch.Tensor, accepted: int, seed: int | None = None) -> torch.Tensor:
    """Draft tokens [T] whose first `accepted` proposals match the posterior, then one that does not."""
    g = torch.Generator(device="cpu")
    g.manual_seed(seed if seed is not None else torch.seed() % 2**31)
    n = cfg.n_valid
    post = posterior.cpu().long()
    draft = torch.randint(0, n, (cfg.t,), generator=g)
    draft[1 : accepted + 1] = post[:accepted]
    if accepted + 1 < cfg.t:
        draft[accepted + 1] = (post[accepted] + 1) % n  # the first mismatch
    return draft.to(torch.int32).to(posterior.device)


def check_accept(cfg: Config, accepted: int | None = None, seed: int | None = None) -> int:
    """Runs the accept launcher on tied logits and a draft matching the posterior for a random (or
    given) prefix; returns the number of int32 outputs (Next and Accept) that differ from
    argmax + tilert.ops.sampling.dflash_accept."""
    logits = make_logits(cfg, seed)
    post = argmax_reference(logits[:, : cfg.n_valid])
    g = torch.Generator(device="cpu")
    g.manual_seed((seed if seed is not None else torch.seed() % 2**31) + 1)
    a = int(torch.randint(0, cfg.t, (1,), generator=g)) if accepted is None else accepted
    draft = make_draft(cfg, post, a, seed)
    nxt = torch.full((cfg.t,), -7, dtype=torch.int32, device="cuda")
    acc = torch.full((cfg.t + 1,), -7, dtype=torch.int32, device="cuda")
    compiled(cfg, "accept")(logits, draft, nxt, acc)
    ref = accept_reference(draft, post)
    return int((nxt != post).sum() + (acc != ref).sum())


# mimo-v2.5-pro: vocabulary 152576 (padded); one GPU or 8 ranks of 19072.
MIMO_VOCAB = 152576


def configs_for_plan(ts: tuple[int, ...] = (1, 8, 16)) -> list[Config]:
    return [Config(t, v) for t in ts for v in (MIMO_VOCAB, MIMO_VOCAB // 8)]
