"""A persistent program: a chain of L MXFP4 linear layers, x_{l+1} = bf16(x_l @ W_l^T).

The smallest program that has what the decode step has: weight-streaming GEMM tiles (split-K,
the same TileLang mainloop as the standalone MXFP4 kernel) and a dependency at tile
granularity between layers, so one launch replaces 3 launches per layer. It is the test bed of
the persistent machinery (task table, counters, bounded waits, trace) against its eager twin.

Tasks: gemm(l, n_tile, k_split) waits for convert(l-1) and atomically adds into Y[l];
convert(l, chunk) waits for all gemm(l) tiles, writes X[l+1] = bf16(Y[l]) and zeroes Y[l]
(so Y is zero again at the end of every step: no reset launch).
"""

import functools
from dataclasses import dataclass
from typing import Any

import torch

from tilert.abi import FIELD
from tilert.kernels import mxfp4_gemm
from tilert.kernels.common import build, cdiv
from tilert.ops.linear import dequant_mxfp4, mxfp4_linear
from tilert.runtime.persistent.megakernel import PERSISTENT_PASS_CONFIGS, make_persistent_loop, raise_on_error
from tilert.runtime.persistent.tasks import WIDTH, Task, build_table, list_schedule
from tilert.runtime.persistent.vm import run_table

# tilelang (the kernel compiler, slow to import) is imported only inside the functions that build kernels

GEMM, CAST = "LINEAR_MXFP4", "CAST_BF16"


@dataclass(frozen=True)
class ChainSpec:
    layers: int
    m: int  # tokens
    n: int  # features (square layers: K == N)
    num_sms: int = 132
    chunk: int = 512  # columns per convert task

    @functools.cached_property
    def gemm(self) -> mxfp4_gemm.Config:
        return mxfp4_gemm.pick_config(self.m, self.n, self.n, sms=self.num_sms)

    @property
    def mp(self) -> int:
        return self.gemm.m


def chain_tasks(spec: ChainSpec) -> tuple[list[Task], int]:
    """Tasks in dependency order and the number of counters (2 per layer: gemm done, cast done)."""
    g = spec.gemm
    n_tiles, n_chunks = cdiv(spec.n, g.block_n), cdiv(spec.n, spec.chunk)
    tasks: list[Task] = []
    for layer in range(spec.layers):
        done_gemm, done_cast = 2 * layer, 2 * layer + 1
        wait = ((2 * layer - 1, 1, n_chunks),) if layer else ()
        for kk in range(g.split_k):
            for nt in range(n_tiles):
                tasks.append(Task(GEMM, (layer, nt, kk), wait, done_gemm, cost_ns=5000))
        for c in range(n_chunks):
            tasks.append(Task(CAST, (layer, c), ((done_gemm, 1, n_tiles * g.split_k),), done_cast, cost_ns=1000))
    return tasks, 2 * spec.layers


def chain_table(spec: ChainSpec) -> tuple[torch.Tensor, int]:
    tasks, n_counters = chain_tasks(spec)
    return build_table(list_schedule(tasks, spec.num_sms)), n_counters


def make_kernel(spec: ChainSpec, max_tasks: int, n_counters: int):
    import tilelang.language as T

    g = spec.gemm
    L, Mp, N = spec.layers, spec.mp, spec.n
    bm, bn, bk, ch = g.block_m, g.block_n, g.block_k, spec.chunk
    nk_split = cdiv(cdiv(N, bk), g.split_k)
    mainloop = mxfp4_gemm.make_mainloop(bm, bn, bk, g.threads, g.stages, w3d=True, x3d=True)

    @T.macro
    def gemm_tile(bufs, layer, n_tile, k_split, c2):
        X, W, S, Y = bufs
        acc = T.alloc_shared((bn, bm), "float32")  # the mainloop leaves the tile here
        mainloop(X, layer, 0, W, S, layer, n_tile * bn, 0, k_split * nk_split, nk_split, acc)
        for i, j in T.Parallel(bn, bm):
            if n_tile * bn + i < N:
                T.atomic_add(Y[layer, j, n_tile * bn + i], acc[i, j])

    @T.macro
    def convert_chunk(bufs, layer, c, c1, c2):
        X, W, S, Y = bufs
        for i, j in T.Parallel(Mp, ch):
            if c * ch + j < N:
                X[layer + 1, i, c * ch + j] = T.cast(Y[layer, i, c * ch + j], "bfloat16")
                Y[layer, i, c * ch + j] = 0.0

    loop = make_persistent_loop({GEMM: gemm_tile, CAST: convert_chunk}, max_tasks=max_tasks)

    @T.prim_func
    def mxfp4_chain_persistent(
        Tasks: T.Tensor((spec.num_sms, max_tasks, WIDTH), "int32"),
        Counters: T.Tensor((n_counters,), "int32"),
        Err: T.Tensor((4,), "int32"),
        Epoch: T.Tensor((1,), "int32"),
        Trace: T.Tensor((spec.num_sms, max_tasks, 3), "int64"),
        X: T.Tensor((L + 1, Mp, N), "bfloat16"),
        W: T.Tensor((L, N, N // 2), "uint8"),
        S: T.Tensor((L, N, N // 32), "uint8"),
        Y: T.Tensor((L, Mp, N), "float32"),
    ):
        with T.Kernel(spec.num_sms, threads=g.threads) as sm:
            loop(sm, Tasks, Counters, Err, Epoch, Trace, (X, W, S, Y))

    return mxfp4_chain_persistent


def vm_bodies(X: torch.Tensor, W: torch.Tensor, S: torch.Tensor, Y: torch.Tensor, spec: ChainSpec) -> dict:
    """Torch versions of the task bodies, for the Python VM (same table, same buffers)."""
    g = spec.gemm
    ks = spec.n // g.split_k

    def gemm(a: list[int]) -> None:
        layer, nt, kk = a[0], a[1], a[2]
        rows = slice(nt * g.block_n, min(spec.n, (nt + 1) * g.block_n))
        cols = slice(kk * ks, (kk + 1) * ks)
        w = dequant_mxfp4(W[layer, rows], S[layer, rows])[:, cols]
        Y[layer, :, rows] += X[layer, :, cols].float() @ w.T

    def convert(a: list[int]) -> None:
        layer, c = a[0], a[1]
        cols = slice(c * spec.chunk, min(spec.n, (c + 1) * spec.chunk))
        X[layer + 1, :, cols] = Y[layer, :, cols].to(X.dtype)
        Y[layer, :, cols] = 0

    return {GEMM: gemm, CAST: convert}


def reference(x: torch.Tensor, W: torch.Tensor, S: torch.Tensor) -> torch.Tensor:
    """The chain in plain ops (bf16 between layers, as the kernels store it)."""
    for layer in range(W.shape[0]):
        x = mxfp4_linear(x, W[layer], S[layer]).to(torch.bfloat16)
    return x


def run_vm(spec: ChainSpec, x: torch.Tensor, W: torch.Tensor, S: torch.Tensor, epoch: int = 1) -> torch.Tensor:
    table, n_counters = chain_table(spec)
    X = torch.zeros(spec.layers + 1, spec.mp, spec.n, dtype=torch.bfloat16)
    X[0, : x.shape[0]] = x
    Y = torch.zeros(spec.layers, spec.mp, spec.n)
    counters = torch.zeros(n_counters, dtype=torch.int64)
    run_table(table, vm_bodies(X, W, S, Y, spec), counters, epoch=epoch)
    return X[spec.layers, : x.shape[0]]


def build_chain(spec: ChainSpec) -> tuple[Any, torch.Tensor, int]:
    """(compiled kernel, task table, counters) of the chain; needs no GPU (fills the kernel cache)."""
    table, n_counters = chain_table(spec)
    return build(make_kernel(spec, table.shape[1], n_counters), pass_configs=PERSISTENT_PASS_CONFIGS), table, n_counters


class PersistentChain:
    """The compiled persistent chain on the GPU: one launch per step."""

    def __init__(self, spec: ChainSpec, W: torch.Tensor, S: torch.Tensor) -> None:
        self.spec = spec
        self.kernel, table, n_counters = build_chain(spec)
        self.tasks = table.cuda()
        dev = W.device
        self.counters = torch.zeros(n_counters, dtype=torch.int32, device=dev)
        self.err = torch.zeros(4, dtype=torch.int32, device=dev)
        self.epoch = torch.zeros(1, dtype=torch.int32, device=dev)
        self.trace = torch.zeros(spec.num_sms, table.shape[1], 3, dtype=torch.int64, device=dev)
        self.X = torch.zeros(spec.layers + 1, spec.mp, spec.n, dtype=torch.bfloat16, device=dev)
        self.Y = torch.zeros(spec.layers, spec.mp, spec.n, dtype=torch.float32, device=dev)
        self.W, self.S = W, S
        self.steps = 0

    def launch(self, x: torch.Tensor) -> None:
        """Enqueue one step (no host sync): x -> X[0], epoch += 1, one kernel launch."""
        self.X[0, : x.shape[0]].copy_(x)
        self.steps += 1
        self.epoch.fill_(self.steps)
        self.kernel(self.tasks, self.counters, self.err, self.epoch, self.trace, self.X, self.W, self.S, self.Y)

    def check(self) -> None:
        """Raise if a wait timed out (or an opcode had no body) in any launch so far: the GPU never hangs."""
        raise_on_error(self.err.tolist())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.launch(x)
        torch.cuda.synchronize()
        self.check()
        return self.X[self.spec.layers, : x.shape[0]]


def eager_chain(x: torch.Tensor, W: torch.Tensor, S: torch.Tensor, spec: ChainSpec) -> torch.Tensor:
    """The same chain with one standalone kernel launch per op (the eager runtime's way)."""
    for layer in range(spec.layers):
        x = mxfp4_gemm.run(x, W[layer], S[layer], spec.gemm).to(torch.bfloat16)
    return x


def deadlock_table(spec: ChainSpec) -> torch.Tensor:
    """A table whose first task waits on a counter nothing signals: must report, not hang."""
    table, _ = chain_table(spec)
    bad = table.clone()
    bad[0, 0, FIELD["wait0_counter"]] = 2 * spec.layers - 1
    bad[0, 0, FIELD["wait0_count"]] = 1
    bad[0, 0, FIELD["wait0_expected"]] = 10**6
    return bad
