"""Column-block tile bodies for the small ops of a decode step: embed, silu_mul, concat, add, and the
one-GPU stand-in of the (residual) all-reduce.

Every body is a T.macro for a CTA of exactly THREADS = 256 threads (the persistent kernel's CTA):
no TMA, no warp specialisation, no blockIdx (the column block `c` comes in as an argument), and a
T.sync_threads only where every thread reaches it (solo_all_reduce_body, world > 1). A body writes
the output columns [c * cols, min(W, (c + 1) * cols)) of all T rows, and reads only those columns
of its inputs (embed: of the T selected table rows). Shapes are static (the config); tensors are
plain global buffers.

Work split (all bodies): the block is cut into vectors of VEC consecutive columns (16 bytes of the
widest dtype, reduced until VEC divides every width, so a vector never crosses a row or an input);
the T x cols/VEC vectors are dealt to the 256 threads round robin (vector f -> row f // (cols/VEC)),
and a thread loads U of its vectors into registers before it stores any (U loads in flight).
Buffers must be aligned to VEC elements (row starts are, since VEC divides the row width).

    embed_body(Table[V, H] bf16, Tokens[T] i32, Out[T, H] bf16, c)
        Out[t, block] = Table[Tokens[t], block]                          ("embed" op)
    silu_mul_body(Gate[T, N] bf16, Up[T, N] bf16, Out[T, N] bf16, c)
        Out = bf16(silu(f32 g) * f32 u)                                  ("silu_mul" op, 2 inputs)
    concat_body(Ins (tuple of k [T, W_i] bf16), Out[T, sum W_i] bf16, c)
        Out[:, off_i : off_i + W_i] = In_i (the block's part of it)      ("concat" op, dim -1)
    add_body(A[T, N], B[T, N], Out[T, N], c)   dtypes bf16/f32 per config, cols per config
        Out = cast(f32 a + f32 b)                                        ("add" op)
    draft_body(Block[T] i32, Next[T] i32, Out[T] i32, c)
        Out = [Block[0], Next[1], ..., Next[T-1]]                       ("dflash_draft" op)
    solo_all_reduce_body(Partial[T, N], Residual[T, N], Inbox[2, T, N], Out[T, N], c)   cols 1024
        Out = cast(f32 residual + f32 partial), or cast(partial) without a residual: rank 0's own
        partial, as tilert/runtime/eager/context.solo_all_reduce leaves it ("solo": one GPU stands
        in for rank 0 of `world`; the result is NOT a sum over ranks). With world > 1 it moves a
        ring all-reduce's traffic through Inbox (Partial's dtype): the block is cut into `world`
        column chunks; phase 1 writes chunks 1..w-1 of the partial to Inbox[0] (what the
        reduce-scatter would receive), barrier, phase 2 writes Inbox[1] (the all-gather's
        receipts: chunks != 1, read back from Inbox[0] or, chunk 0, the partial), barrier,
        phase 3 reads chunk 1 from Inbox[0] and the others from Inbox[1] into the output. Inbox
        traffic = 2 (w-1)/w of the block written and read (a rank's ring sends and receives);
        the partial is read once and the result comes from the round-tripped copies (exact, no
        arithmetic on them), so no load can be elided. Each phase deals vectors to threads with
        a different rotation, so no thread reads back what it wrote itself.

Launchers: grid = ceil(W / cols) CTAs of 256 threads, CTA c runs the body for block c.
`make_body(cfg)`, `make_kernel(cfg)`, `compiled(cfg)` and `check(cfg, seed)` dispatch on the config
type; `reference(cfg, *inputs)` is the op's torch reference (tilert.ir op registry / tilert.ops).
"""

import functools
from dataclasses import dataclass

import torch

from tilert.ir.opset.fused import PeerValues
from tilert.ir.registry import get_op
from tilert.kernels.common import build, cdiv

# tilelang (the kernel compiler, slow to import) is imported only inside the functions that build kernels

THREADS = 256  # the persistent kernel's CTA size (tilert.kernels.common.PERSISTENT_THREADS)
GENERIC_COLS = 2048  # passes/tile.py TILE_CONFIG["generic"]["cols"]
COLLECTIVE_COLS = 1024  # passes/tile.py TILE_CONFIG["collective"]["cols"]
PASS_CONFIGS = {"tl.disable_warp_specialized": True}  # no T.copy here, so nothing for TMA to lower
MAX_INFLIGHT = 4  # vectors a thread loads before it stores (U)

BF16, F32 = "bfloat16", "float32"
_TORCH = {BF16: torch.bfloat16, F32: torch.float32}
_BYTES = {BF16: 2, F32: 4}


@dataclass(frozen=True)
class EmbedConfig:
    t: int
    vocab: int
    hidden: int
    cols: int = GENERIC_COLS


@dataclass(frozen=True)
class SiluMulConfig:
    t: int
    n: int
    cols: int = GENERIC_COLS


@dataclass(frozen=True)
class ConcatConfig:
    t: int
    widths: tuple[int, ...]
    cols: int = GENERIC_COLS

    @property
    def n(self) -> int:
        return sum(self.widths)


@dataclass(frozen=True)
class AddConfig:
    t: int
    n: int
    a_dtype: str = F32
    b_dtype: str = BF16
    out_dtype: str = F32
    cols: int = GENERIC_COLS  # 1024 when it stands for all_reduce_residual at world 1


@dataclass(frozen=True)
class AllReduceConfig:
    t: int
    n: int
    world: int
    residual: bool = True
    partial_dtype: str = F32
    residual_dtype: str = BF16
    out_dtype: str = BF16
    cols: int = COLLECTIVE_COLS

    @property
    def chunk(self) -> int:  # ring chunk (columns of the block), a multiple of the vector width
        vec = _vec(self.cols, self.n, dtypes=(self.partial_dtype, self.residual_dtype, self.out_dtype))
        return cdiv(cdiv(self.cols, self.world), vec) * vec


@dataclass(frozen=True)
class DraftConfig:
    t: int
    cols: int = GENERIC_COLS

    @property
    def n(self) -> int:
        return self.t


Config = EmbedConfig | SiluMulConfig | ConcatConfig | AddConfig | AllReduceConfig | DraftConfig


def _vec(*widths: int, dtypes: tuple[str, ...]) -> int:
    """Elements per vector: 16 bytes of the widest dtype, halved until it divides every width."""
    v = 16 // max(_BYTES[d] for d in dtypes)
    while v > 1 and any(w % v for w in widths):
        v //= 2
    return v


@dataclass(frozen=True)
class _Split:
    """How a T x cols block is dealt to THREADS threads in vectors of `vec` columns."""

    t: int
    cols: int
    vec: int

    @property
    def per_row(self) -> int:
        return self.cols // self.vec

    @property
    def items(self) -> int:
        return self.t * self.per_row

    @property
    def unroll(self) -> int:
        return max(1, min(MAX_INFLIGHT, cdiv(self.items, THREADS)))

    @property
    def rounds(self) -> int:
        return cdiv(self.items, THREADS * self.unroll)


def _check_cols(cols: int) -> None:
    if cols % (8 * 32) or cols <= 0:
        raise ValueError(f"cols {cols} must be a positive multiple of 256")


def n_blocks(cfg: Config) -> int:
    """Column blocks (tasks / launcher CTAs) of the op."""
    return cdiv(cfg.hidden if isinstance(cfg, EmbedConfig) else cfg.n, cfg.cols)


# ---- bodies ------------------------------------------------------------------------------------


def _embed_body(cfg: EmbedConfig):
    import tilelang.language as T

    _check_cols(cfg.cols)
    H, C = cfg.hidden, cfg.cols
    vec = _vec(C, H, dtypes=(BF16,))
    sp = _Split(cfg.t, C, vec)
    PR, ITEMS, U = sp.per_row, sp.items, sp.unroll

    @T.macro
    def embed_body(Table, Tokens, Out, c):
        tx = T.get_thread_binding()
        buf = T.alloc_local((U * vec,), BF16)
        for ob in T.serial(sp.rounds):
            for u in T.unroll(U):
                f = (ob * U + u) * THREADS + tx
                col = c * C + (f % PR) * vec
                if f < ITEMS and col < H:
                    tok = T.cast(Tokens[f // PR], "int64")
                    for v in T.vectorized(vec):
                        buf[u * vec + v] = Table[tok, col + v]
            for u in T.unroll(U):
                f = (ob * U + u) * THREADS + tx
                col = c * C + (f % PR) * vec
                if f < ITEMS and col < H:
                    for v in T.vectorized(vec):
                        Out[f // PR, col + v] = buf[u * vec + v]

    return embed_body


def _silu_mul_body(cfg: SiluMulConfig):
    import tilelang.language as T

    _check_cols(cfg.cols)
    N, C = cfg.n, cfg.cols
    vec = _vec(C, N, dtypes=(BF16,))
    sp = _Split(cfg.t, C, vec)
    PR, ITEMS, U = sp.per_row, sp.items, sp.unroll

    @T.macro
    def silu_mul_body(Gate, Up, Out, c):
        tx = T.get_thread_binding()
        gb = T.alloc_local((U * vec,), BF16)
        ub = T.alloc_local((U * vec,), BF16)
        for ob in T.serial(sp.rounds):
            for u in T.unroll(U):
                f = (ob * U + u) * THREADS + tx
                col = c * C + (f % PR) * vec
                if f < ITEMS and col < N:
                    for v in T.vectorized(vec):
                        gb[u * vec + v] = Gate[f // PR, col + v]
                    for v in T.vectorized(vec):
                        ub[u * vec + v] = Up[f // PR, col + v]
            for u in T.unroll(U):
                f = (ob * U + u) * THREADS + tx
                col = c * C + (f % PR) * vec
                if f < ITEMS and col < N:
                    for v in T.vectorized(vec):
                        Out[f // PR, col + v] = T.cast(
                            T.cast(gb[u * vec + v], F32)
                            / (1.0 + T.exp(-T.cast(gb[u * vec + v], F32)))
                            * T.cast(ub[u * vec + v], F32),
                            BF16,
                        )

    return silu_mul_body


def _concat_body(cfg: ConcatConfig):
    import tilelang.language as T

    _check_cols(cfg.cols)
    if not cfg.widths or min(cfg.widths) <= 0:
        raise ValueError(f"concat widths {cfg.widths} must be positive")
    N, C, widths = cfg.n, cfg.cols, list(cfg.widths)
    offs = [sum(widths[:i]) for i in range(len(widths))]
    idx = list(range(len(widths)))
    vec = _vec(C, *widths, dtypes=(BF16,))
    sp = _Split(cfg.t, C, vec)
    PR, ITEMS, U = sp.per_row, sp.items, sp.unroll

    @T.macro
    def concat_body(Ins, Out, c):
        tx = T.get_thread_binding()
        buf = T.alloc_local((U * vec,), BF16)
        for ob in T.serial(sp.rounds):
            for u in T.unroll(U):
                f = (ob * U + u) * THREADS + tx
                col = c * C + (f % PR) * vec
                if f < ITEMS and col < N:
                    for i in idx:  # static: one guarded copy per input (never rebind Ins[i]: it renames it)
                        if col >= offs[i] and col < offs[i] + widths[i]:
                            for v in T.vectorized(vec):
                                buf[u * vec + v] = Ins[i][f // PR, col - offs[i] + v]
            for u in T.unroll(U):
                f = (ob * U + u) * THREADS + tx
                col = c * C + (f % PR) * vec
                if f < ITEMS and col < N:
                    for v in T.vectorized(vec):
                        Out[f // PR, col + v] = buf[u * vec + v]

    return concat_body


def _add_body(cfg: AddConfig):
    import tilelang.language as T

    _check_cols(cfg.cols)
    N, C = cfg.n, cfg.cols
    ad, bd, od = cfg.a_dtype, cfg.b_dtype, cfg.out_dtype
    vec = _vec(C, N, dtypes=(ad, bd, od))
    sp = _Split(cfg.t, C, vec)
    PR, ITEMS, U = sp.per_row, sp.items, sp.unroll

    @T.macro
    def add_body(A, B, Out, c):
        tx = T.get_thread_binding()
        ab = T.alloc_local((U * vec,), ad)
        bb = T.alloc_local((U * vec,), bd)
        for ob in T.serial(sp.rounds):
            for u in T.unroll(U):
                f = (ob * U + u) * THREADS + tx
                col = c * C + (f % PR) * vec
                if f < ITEMS and col < N:
                    for v in T.vectorized(vec):
                        ab[u * vec + v] = A[f // PR, col + v]
                    for v in T.vectorized(vec):
                        bb[u * vec + v] = B[f // PR, col + v]
            for u in T.unroll(U):
                f = (ob * U + u) * THREADS + tx
                col = c * C + (f % PR) * vec
                if f < ITEMS and col < N:
                    for v in T.vectorized(vec):
                        Out[f // PR, col + v] = T.cast(T.cast(ab[u * vec + v], F32) + T.cast(bb[u * vec + v], F32), od)

    return add_body


def _solo_all_reduce_body(cfg: AllReduceConfig):
    import tilelang.language as T

    _check_cols(cfg.cols)
    if cfg.world < 1:
        raise ValueError(f"world {cfg.world} must be >= 1")
    N, C, W = cfg.n, cfg.cols, cfg.world
    pd, rd, od = cfg.partial_dtype, cfg.residual_dtype, cfg.out_dtype
    vec = _vec(C, N, dtypes=(pd, rd, od))
    sp = _Split(cfg.t, C, vec)
    PR, ITEMS, U, CC = sp.per_row, sp.items, sp.unroll, cfg.chunk
    res = cfg.residual
    # thread rotation per phase: thread tx serves the vectors of thread (tx + ROT[p]) % THREADS
    ROT = (0, 96, 192)

    @T.macro
    def load_res(Residual, rb, u, f, col):
        if res:
            for v in T.vectorized(vec):
                rb[u * vec + v] = Residual[f // PR, col + v]

    @T.macro
    def epilogue(Out, pb, rb, u, f, col):
        if res:
            for v in T.vectorized(vec):
                Out[f // PR, col + v] = T.cast(T.cast(rb[u * vec + v], F32) + T.cast(pb[u * vec + v], F32), od)
        else:
            for v in T.vectorized(vec):
                Out[f // PR, col + v] = T.cast(pb[u * vec + v], od)

    @T.macro
    def solo_all_reduce_body(Partial, Residual, Inbox, Out, c):
        tx = T.get_thread_binding()
        pb = T.alloc_local((U * vec,), pd)
        rb = T.alloc_local((U * vec,), rd)
        if W == 1:
            for ob in T.serial(sp.rounds):
                for u in T.unroll(U):
                    f = (ob * U + u) * THREADS + tx
                    col = c * C + (f % PR) * vec
                    if f < ITEMS and col < N:
                        for v in T.vectorized(vec):
                            pb[u * vec + v] = Partial[f // PR, col + v]
                        load_res(Residual, rb, u, f, col)
                for u in T.unroll(U):
                    f = (ob * U + u) * THREADS + tx
                    col = c * C + (f % PR) * vec
                    if f < ITEMS and col < N:
                        epilogue(Out, pb, rb, u, f, col)
        else:
            tq0 = (tx + ROT[0]) % THREADS
            tq1 = (tx + ROT[1]) % THREADS
            tq2 = (tx + ROT[2]) % THREADS
            # phase 1: reduce-scatter receipts, chunks 1..W-1 -> Inbox[0]
            for ob in T.serial(sp.rounds):
                for u in T.unroll(U):
                    f = (ob * U + u) * THREADS + tq0
                    col = c * C + (f % PR) * vec
                    if f < ITEMS and col < N and (f % PR) * vec >= CC:
                        for v in T.vectorized(vec):
                            pb[u * vec + v] = Partial[f // PR, col + v]
                for u in T.unroll(U):
                    f = (ob * U + u) * THREADS + tq0
                    col = c * C + (f % PR) * vec
                    if f < ITEMS and col < N and (f % PR) * vec >= CC:
                        for v in T.vectorized(vec):
                            Inbox[0, f // PR, col + v] = pb[u * vec + v]
            T.sync_threads()
            # phase 2: all-gather receipts, chunks != 1 -> Inbox[1] (chunk 0 from the partial)
            for ob in T.serial(sp.rounds):
                for u in T.unroll(U):
                    f = (ob * U + u) * THREADS + tq1
                    j = (f % PR) * vec
                    col = c * C + j
                    if f < ITEMS and col < N and (j < CC or j >= 2 * CC):
                        if j < CC:
                            for v in T.vectorized(vec):
                                pb[u * vec + v] = Partial[f // PR, col + v]
                        else:
                            for v in T.vectorized(vec):
                                pb[u * vec + v] = Inbox[0, f // PR, col + v]
                for u in T.unroll(U):
                    f = (ob * U + u) * THREADS + tq1
                    j = (f % PR) * vec
                    col = c * C + j
                    if f < ITEMS and col < N and (j < CC or j >= 2 * CC):
                        for v in T.vectorized(vec):
                            Inbox[1, f // PR, col + v] = pb[u * vec + v]
            T.sync_threads()
            # phase 3: own chunk 1 from Inbox[0], the rest from Inbox[1]; + residual, cast, store
            for ob in T.serial(sp.rounds):
                for u in T.unroll(U):
                    f = (ob * U + u) * THREADS + tq2
                    j = (f % PR) * vec
                    col = c * C + j
                    if f < ITEMS and col < N:
                        if j >= CC and j < 2 * CC:
                            for v in T.vectorized(vec):
                                pb[u * vec + v] = Inbox[0, f // PR, col + v]
                        else:
                            for v in T.vectorized(vec):
                                pb[u * vec + v] = Inbox[1, f // PR, col + v]
                        load_res(Residual, rb, u, f, col)
                for u in T.unroll(U):
                    f = (ob * U + u) * THREADS + tq2
                    col = c * C + (f % PR) * vec
                    if f < ITEMS and col < N:
                        epilogue(Out, pb, rb, u, f, col)

    return solo_all_reduce_body


def _draft_body(cfg: DraftConfig):
    import tilelang.language as T

    TP = cdiv(cfg.t, 32) * 32  # whole warps

    @T.macro
    def draft_body(Block, Next, Out, c):
        for i in T.Parallel(TP):
            if i < cfg.t:
                Out[i] = T.if_then_else(i == 0, Block[0], Next[i])

    return draft_body


_BODIES = {
    EmbedConfig: _embed_body,
    SiluMulConfig: _silu_mul_body,
    ConcatConfig: _concat_body,
    AddConfig: _add_body,
    AllReduceConfig: _solo_all_reduce_body,
    DraftConfig: _draft_body,
}


def make_body(cfg: Config):
    """The config's tile body (T.macro); see the module docstring for each signature."""
    return _BODIES[type(cfg)](cfg)


# ---- standalone launchers ------------------------------------------------------------------------


def make_kernel(cfg: Config):
    """Standalone launcher: grid n_blocks(cfg) x 256 threads, CTA c runs the body for block c.
    Parameters (in order): the body's tensors, e.g. (Table, Tokens, Out); concat: I0..Ik-1, Out;
    solo all-reduce: Partial, [Residual,] Inbox, Out."""
    import tilelang.language as T

    body = make_body(cfg)
    Tn, nb = cfg.t, n_blocks(cfg)

    if isinstance(cfg, EmbedConfig):

        @T.prim_func
        def embed(
            Table: T.Tensor((cfg.vocab, cfg.hidden), BF16),
            Tokens: T.Tensor((Tn,), "int32"),
            Out: T.Tensor((Tn, cfg.hidden), BF16),
        ):
            with T.Kernel(nb, threads=THREADS) as bx:
                body(Table, Tokens, Out, bx)

        return embed

    if isinstance(cfg, SiluMulConfig):

        @T.prim_func
        def silu_mul(
            Gate: T.Tensor((Tn, cfg.n), BF16),
            Up: T.Tensor((Tn, cfg.n), BF16),
            Out: T.Tensor((Tn, cfg.n), BF16),
        ):
            with T.Kernel(nb, threads=THREADS) as bx:
                body(Gate, Up, Out, bx)

        return silu_mul

    if isinstance(cfg, ConcatConfig):
        widths = list(cfg.widths)

        @T.prim_func
        def concat():
            ins = []
            for i, w in enumerate(widths):  # static: one parameter per input
                ins.append(T.arg(f"I{i}", T.Tensor((Tn, w), BF16)))
            Out = T.arg("Out", T.Tensor((Tn, cfg.n), BF16))
            with T.Kernel(nb, threads=THREADS) as bx:
                body(tuple(ins), Out, bx)

        return concat

    if isinstance(cfg, AddConfig):

        @T.prim_func
        def add(
            A: T.Tensor((Tn, cfg.n), cfg.a_dtype),
            B: T.Tensor((Tn, cfg.n), cfg.b_dtype),
            Out: T.Tensor((Tn, cfg.n), cfg.out_dtype),
        ):
            with T.Kernel(nb, threads=THREADS) as bx:
                body(A, B, Out, bx)

        return add

    if isinstance(cfg, DraftConfig):

        @T.prim_func
        def dflash_draft(
            Block: T.Tensor((Tn,), "int32"), Next: T.Tensor((Tn,), "int32"), Out: T.Tensor((Tn,), "int32")
        ):
            with T.Kernel(1, threads=THREADS) as bx:
                body(Block, Next, Out, bx)

        return dflash_draft

    if isinstance(cfg, AllReduceConfig):
        N = cfg.n

        @T.prim_func
        def solo_all_reduce():
            Partial = T.arg("Partial", T.Tensor((Tn, N), cfg.partial_dtype))
            Residual = T.arg("Residual", T.Tensor((Tn, N), cfg.residual_dtype)) if cfg.residual else Partial
            Inbox = T.arg("Inbox", T.Tensor((2, Tn, N), cfg.partial_dtype))
            Out = T.arg("Out", T.Tensor((Tn, N), cfg.out_dtype))
            with T.Kernel(nb, threads=THREADS) as bx:
                body(Partial, Residual, Inbox, Out, bx)

        return solo_all_reduce

    raise TypeError(f"not an elementwise config: {cfg!r}")


@functools.cache
def compiled(cfg: Config):
    return build(make_kernel(cfg), pass_configs=PASS_CONFIGS)


# ---- references and checks -----------------------------------------------------------------------


def _op(kind: str):
    return get_op(kind).reference


def reference(cfg: Config, *inputs: torch.Tensor) -> torch.Tensor:
    """The op's torch reference (float32) for the launcher's inputs (Inbox excluded)."""
    if isinstance(cfg, EmbedConfig):
        return _op("embed")(None, *inputs)[0]
    if isinstance(cfg, SiluMulConfig):
        return _op("silu_mul")(None, *inputs)[0]
    if isinstance(cfg, ConcatConfig):
        return _op("concat")(None, *inputs, dim=-1)[0]
    if isinstance(cfg, AddConfig):
        return _op("add")(None, *inputs)[0]
    if isinstance(cfg, DraftConfig):
        return _op("dflash_draft")(None, *inputs)[0]
    if isinstance(cfg, AllReduceConfig):  # solo: rank 0's partial stands in for the sum
        partial = inputs[0]
        ctx = PeerValues(0, 1, [partial])
        if cfg.residual:
            return _op("all_reduce_residual")(ctx, partial, inputs[1], world=1)[0]
        return _op("all_reduce")(ctx, partial)[0]
    raise TypeError(f"not an elementwise config: {cfg!r}")


def make_inputs(
    cfg: Config, seed: int | None = None, device: str = "cuda"
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(random inputs, NaN-poisoned outputs) in launcher parameter order."""
    g = torch.Generator(device=device)
    g.manual_seed(seed if seed is not None else torch.seed() % 2**31)

    def rnd(shape, dt, scale=1.0):
        return (torch.randn(*shape, device=device, generator=g) * scale).to(_TORCH[dt])

    def nan(shape, dt):
        return torch.full(shape, float("nan"), dtype=_TORCH[dt], device=device)

    Tn = cfg.t
    if isinstance(cfg, EmbedConfig):
        table = rnd((cfg.vocab, cfg.hidden), BF16)
        tokens = torch.randint(0, cfg.vocab, (Tn,), device=device, generator=g, dtype=torch.int32)
        tokens[-1] = cfg.vocab - 1  # the last row of the table (largest offset)
        return [table, tokens], [nan((Tn, cfg.hidden), BF16)]
    if isinstance(cfg, SiluMulConfig):
        return [rnd((Tn, cfg.n), BF16, 3.0), rnd((Tn, cfg.n), BF16)], [nan((Tn, cfg.n), BF16)]
    if isinstance(cfg, ConcatConfig):
        return [rnd((Tn, w), BF16) for w in cfg.widths], [nan((Tn, cfg.n), BF16)]
    if isinstance(cfg, AddConfig):
        return [rnd((Tn, cfg.n), cfg.a_dtype), rnd((Tn, cfg.n), cfg.b_dtype)], [nan((Tn, cfg.n), cfg.out_dtype)]
    if isinstance(cfg, DraftConfig):
        ids = [torch.randint(0, 1 << 20, (Tn,), device=device, generator=g, dtype=torch.int32) for _ in range(2)]
        return ids, [torch.full((Tn,), -1, dtype=torch.int32, device=device)]
    if isinstance(cfg, AllReduceConfig):
        ins = [rnd((Tn, cfg.n), cfg.partial_dtype)]
        if cfg.residual:
            ins.append(rnd((Tn, cfg.n), cfg.residual_dtype, 4.0))
        return ins, [nan((2, Tn, cfg.n), cfg.partial_dtype), nan((Tn, cfg.n), cfg.out_dtype)]
    raise TypeError(f"not an elementwise config: {cfg!r}")


def run(cfg: Config, *inputs: torch.Tensor) -> torch.Tensor:
    """Launch the standalone kernel on the config's inputs (launcher order, Inbox excluded)."""
    dev = inputs[0].device
    if isinstance(cfg, EmbedConfig):
        out = torch.empty(cfg.t, cfg.hidden, dtype=torch.bfloat16, device=dev)
        compiled(cfg)(*inputs, out)
        return out
    if isinstance(cfg, AllReduceConfig):
        inbox = torch.empty(2, cfg.t, cfg.n, dtype=_TORCH[cfg.partial_dtype], device=dev)
        out = torch.empty(cfg.t, cfg.n, dtype=_TORCH[cfg.out_dtype], device=dev)
        compiled(cfg)(*inputs, inbox, out)
        return out
    if isinstance(cfg, DraftConfig):
        out = torch.empty(cfg.t, dtype=torch.int32, device=dev)
        compiled(cfg)(*inputs, out)
        return out
    odt = _TORCH[cfg.out_dtype] if isinstance(cfg, AddConfig) else torch.bfloat16
    out = torch.empty(cfg.t, cfg.n, dtype=odt, device=dev)
    compiled(cfg)(*inputs, out)
    return out


def check(cfg: Config, seed: int | None = None) -> float:
    """Fresh random inputs, NaN-poisoned outputs (and Inbox); returns ||out - ref|| / ||ref|| in
    float64 against the op reference rounded to the output dtype (0.0 for the copies)."""
    ins, outs = make_inputs(cfg, seed)
    compiled(cfg)(*ins, *outs)
    torch.cuda.synchronize()
    out = outs[-1]
    if not torch.isfinite(out.float()).all():
        bad = (~torch.isfinite(out.float())).nonzero()[:4].tolist()
        raise AssertionError(f"output has unwritten/non-finite elements at {bad} ({cfg})")
    ref = reference(cfg, *ins).to(out.dtype).double()
    den = ref.norm().item()
    err = (out.double() - ref).norm().item()
    return err / den if den else err


# mimo-v2.5-pro per rank of 8 (hidden 6144, expert/dense intermediate 2048 per rank), and world 1.
MIMO_HIDDEN = 6144


def configs_for_plan(ts: tuple[int, ...] = (1, 8)) -> list[Config]:
    """Representative configs of the mimo-v2.5-pro step (8 ranks and one GPU)."""
    H = MIMO_HIDDEN
    out: list[Config] = []
    for t in ts:
        out += [
            EmbedConfig(t, 152576, H),
            SiluMulConfig(t, 2048),
            AddConfig(t, H, F32, BF16, BF16),
            AllReduceConfig(t, H, 8, True),
            AllReduceConfig(t, H, 1, True, out_dtype=F32),
        ]
    return out
