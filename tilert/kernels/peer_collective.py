"""Collectives as persistent tile tasks over peer memory (no NCCL, no multicast).

Ranks exchange through buffers every rank can address (device pointers of the same process, or
CUDA IPC mappings across processes): per collective node, rank r owns an inbox with one slot per
source rank and an int32 arrival counter per tile. A collective task of rank r, for its column
block c:

  1. push     writes its local block into slot r of every rank's inbox (its own included);
  2. arrive   after a system-scope fence, adds 1 to tile c's arrival counter of every rank;
  3. wait     thread 0 spins (acquire, bounded by a %globaltimer deadline) until its own counter
              reaches world x epoch, i.e. every rank has pushed this step's block (counters are
              never reset, like the task counters);
  4. combine  reads the world slots of its own inbox in rank order, so every rank computes the
              same result bit for bit.

The kernels are the same for every rank: the rank comes from a one-int view, and each rank's views
list the per-rank buffers starting with its own (`rotated`), so "my inbox" is always view 0 of
its group. Slots keep absolute rank order, so the combine adds in the same order everywhere.

This is the plan VM's rendezvous (tilert/runtime/persistent/plan_vm.py) on the GPU: the table
holds no cross-rank waits; the task itself blocks until its peers arrived. A wait past its bound
raises the error word (ERR_TIMEOUT, sm = -1, counter = -(1 + tile)) and the kernel drains.

Bodies (CTA of 256 threads, column block of `cols`):
    allreduce_body(Partial[T, N], Residual[T, N], Out[T, N], Epoch[1], Err[4], Rank[1],
                   *Inbox_q[world, T, N] f32, *Arr_q[tiles] i32, c)   Out = cast(sum_s Inbox_0[s] (+ Residual))
    allgather_body(X[T, W], Epoch, Err, Rank, Out_q[T, world * W] (every rank's output), *Arr_q, c)
                   writes X's block into columns rank * W + block of every rank's output
    argmax_body(Val[T] f32, Idx[T] i32, Next[T] i32, Epoch, Err, Rank, *InV_q[world, T] f32,
                *InI_q[world, T] i32, *Arr_q[1], c)   Next[t] = id of the largest value over ranks,
                ties to the lowest id (the "argmax_reduce" reference)
Reference: tilert/ir/opset/collective.py (all_reduce, all_reduce_residual, all_gather,
argmax_reduce) with PeerValues.
"""

from dataclasses import dataclass

from tilert.kernels.common import cdiv
from tilert.runtime.persistent.megakernel import DEFAULT_TIMEOUT_NS, ERR_TIMEOUT

THREADS = 256


@dataclass(frozen=True)
class PeerConfig:
    kind: str  # "allreduce" | "allgather" | "argmax"
    t: int
    n: int  # columns of the partial (allreduce), of X (allgather), 0 (argmax)
    world: int
    cols: int = 1024
    residual: bool = False
    partial_dtype: str = "float32"
    residual_dtype: str = "bfloat16"
    out_dtype: str = "bfloat16"

    @property
    def tiles(self) -> int:
        return max(1, cdiv(self.n, self.cols)) if self.kind != "argmax" else 1


def _arrive_and_wait(cfg: PeerConfig):
    import tilelang.language as T

    W = cfg.world
    QS = list(range(W))

    @T.macro
    def arrive_and_wait(Epoch, Err, arrs, c):
        tx = T.get_thread_binding()
        deadline = T.alloc_var("int64")
        T.sync_threads()  # every thread's pushes are issued
        if tx == 0:
            T.call_extern("handle", "__threadfence_system")
            for q in QS:  # a Python loop: q picks a buffer
                T.atomic_add(arrs[q][c], 1, memory_order="release")
            deadline = T.call_extern("int64", "tilert_globaltimer") + DEFAULT_TIMEOUT_NS
            while (
                T.atomic_load(arrs[0][c], memory_order="acquire") < W * Epoch[0]  # its own: view 0
                and T.atomic_load(Err[0], memory_order="relaxed") == 0
            ):
                if T.call_extern("int64", "tilert_globaltimer") > deadline:
                    if T.atomic_add(Err[0], ERR_TIMEOUT, return_prev=True) == 0:
                        Err[1] = -1
                        Err[2] = -1
                        Err[3] = -1 - c
        T.sync_threads()

    return arrive_and_wait


def make_body(cfg: PeerConfig):
    """The collective's tile body (T.macro of (V, c)); V: the views of `views(cfg)` in order."""
    import tilelang.language as T

    W, Tn, C = cfg.world, cfg.t, cfg.cols
    sync = _arrive_and_wait(cfg)
    f32 = "float32"
    QS = list(range(W))

    if cfg.kind == "allreduce":
        N = cfg.n

        @T.macro
        def allreduce_body(V, c):
            Partial, Residual, Out, Epoch, Err, Rank = V[0], V[1], V[2], V[3], V[4], V[5]
            inbox = V[6 : 6 + W]
            arrs = V[6 + W : 6 + 2 * W]
            acc = T.alloc_var(f32)
            for q in QS:
                for i, j in T.Parallel(Tn, C):
                    if c * C + j < N:
                        inbox[q][Rank[0], i, c * C + j] = T.Cast(f32, Partial[i, c * C + j])
            sync(Epoch, Err, arrs, c)
            if T.atomic_load(Err[0], memory_order="relaxed") == 0:
                for i, j in T.Parallel(Tn, C):
                    if c * C + j < N:
                        acc = 0.0
                        for s in T.unroll(W):
                            acc = acc + inbox[0][s, i, c * C + j]
                        if cfg.residual:
                            Out[i, c * C + j] = T.Cast(cfg.out_dtype, T.Cast(f32, Residual[i, c * C + j]) + acc)
                        else:
                            Out[i, c * C + j] = T.Cast(cfg.out_dtype, acc)

        return allreduce_body

    if cfg.kind == "allgather":
        Wd = cfg.n

        @T.macro
        def allgather_body(V, c):
            X, Epoch, Err, Rank = V[0], V[1], V[2], V[3]
            outs = V[4 : 4 + W]
            arrs = V[4 + W : 4 + 2 * W]
            for q in QS:
                for i, j in T.Parallel(Tn, C):
                    if c * C + j < Wd:
                        outs[q][i, Rank[0] * Wd + c * C + j] = X[i, c * C + j]
            sync(Epoch, Err, arrs, c)

        return allgather_body

    @T.macro
    def argmax_body(V, c):
        Val, Idx, Next, Epoch, Err, Rank = V[0], V[1], V[2], V[3], V[4], V[5]
        inv = V[6 : 6 + W]
        ini = V[6 + W : 6 + 2 * W]
        arrs = V[6 + 2 * W : 6 + 3 * W]
        bv = T.alloc_var(f32)
        bi = T.alloc_var("int32")
        tx = T.get_thread_binding()
        if tx < Tn:
            for q in QS:
                inv[q][Rank[0], tx] = Val[tx]
                ini[q][Rank[0], tx] = Idx[tx]
        sync(Epoch, Err, arrs, 0)
        if tx < Tn:
            bv = inv[0][0, tx]
            bi = ini[0][0, tx]
            for s in T.unroll(1, W):
                if inv[0][s, tx] > bv or (inv[0][s, tx] == bv and ini[0][s, tx] < bi):
                    bv = inv[0][s, tx]
                    bi = ini[0][s, tx]
            Next[tx] = bi

    return argmax_body


def rotated(per_rank: list, rank: int) -> list:
    """Per-rank buffers in the order rank `rank`'s views list them: its own first."""
    return per_rank[rank:] + per_rank[:rank]


def views(cfg: PeerConfig, res_rows: int = 0) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, dtype) of the body's tensors, in order (res_rows: the residual view's rows)."""
    W, Tn, N = cfg.world, cfg.t, cfg.n
    arrs = [(f"arrivals{q}", (cfg.tiles,), "int32") for q in range(W)]
    ctl = [("epoch", (1,), "int32"), ("err", (4,), "int32"), ("rank", (1,), "int32")]
    if cfg.kind == "allreduce":
        return ([("partial", (Tn, N), cfg.partial_dtype), ("residual", (res_rows or Tn, N), cfg.residual_dtype),
                 ("out", (Tn, N), cfg.out_dtype), *ctl]
                + [(f"inbox{q}", (W, Tn, N), "float32") for q in range(W)] + arrs)  # fmt: skip
    if cfg.kind == "allgather":
        outs = [(f"out{q}", (Tn, W * N), cfg.out_dtype) for q in range(W)]
        return [("x", (Tn, N), cfg.out_dtype), *ctl, *outs, *arrs]
    return ([("val", (Tn,), "float32"), ("idx", (Tn,), "int32"), ("next", (Tn,), "int32"), *ctl]
            + [(f"in_val{q}", (W, Tn), "float32") for q in range(W)]
            + [(f"in_idx{q}", (W, Tn), "int32") for q in range(W)] + arrs)  # fmt: skip
