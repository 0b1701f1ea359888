"""Multi-rank eager execution: one rank per process, collectives through torch.distributed.

`DistContext` is the rank context the eager implementations (tilert/runtime/kinds/) call when a graph has a
collective: `all_reduce` (sum, float32), `all_gather` (along a dim, rank order) and
`argmax_reduce` (largest logit over ranks, ties to the lowest token id). Values and semantics are
the reference executor's simulated ranks'. NCCL on CUDA, gloo on the CPU (so N CPU processes test
it). Every blocking collective is bounded by the process group's timeout and a failure raises a
`DistError` naming the rank. NVLink multicast stays off (DESIGN §4): `init_distributed` sets
`MULTICAST_OFF` before the process group exists.

The engine's backend for one rank is `tilert.engine.eager.DistEagerBackend`. `run_local` runs a
function on N local processes (tests, debugging).
"""

from __future__ import annotations

import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from tilert.runtime.eager.context import GpuContext

MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
DEFAULT_TIMEOUT_S = 300.0


class DistError(RuntimeError):
    """A collective, or setting up the process group, failed on this rank (the message names it)."""


class DistContext(GpuContext):
    """This process's rank in a torch.distributed process group, and the collectives on it."""

    distributed = True

    def __init__(
        self, rank: int, world: int, *, device: str | torch.device = "cpu", group: Any = None, kernels: bool = True
    ) -> None:
        super().__init__(rank, world, solo=False, kernels=kernels)
        self.device, self.group = torch.device(device), group
        self.collectives = 0  # calls so far (tests count them)

    def __repr__(self) -> str:
        return f"DistContext(rank={self.rank}, world={self.world}, device={self.device})"

    def _run(self, what: str, fn: Callable[[], Any]) -> Any:
        self.collectives += 1
        try:
            return fn()
        except Exception as e:  # gloo/NCCL errors and timeouts: say which rank and which collective
            raise DistError(f"rank {self.rank}/{self.world}: {what} failed: {e}") from e

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, float32 (a new tensor; x is left alone)."""
        y = x.to(torch.float32, copy=True).contiguous()
        self._run(f"all_reduce {list(y.shape)}", lambda: dist.all_reduce(y, group=self.group))
        return y

    def all_gather(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's x concatenated along dim in rank order."""
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world)]
        self._run(f"all_gather {list(x.shape)} dim={dim}", lambda: dist.all_gather(parts, x, group=self.group))
        return torch.cat(parts, dim=dim)

    def argmax_reduce(self, val: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Distributed argmax from each rank's (max logit f32[T], its global id i32[T]): one
        all-gather of both (float64 holds every f32 value and id exactly), then the reference's
        rule: the largest value, ties to the lowest id."""
        mine = torch.stack([val.to(torch.float64), idx.to(torch.float64)])
        both = self.all_gather(mine.unsqueeze(0), 0)  # [R, 2, T]
        vals, ids = both[:, 0].float(), both[:, 1].long()
        best = vals.max(0).values
        cand = torch.where(vals == best, ids, torch.full_like(ids, torch.iinfo(torch.int64).max))
        return cand.min(0).values.to(torch.int32)

    def barrier(self) -> None:
        self._run("barrier", lambda: dist.barrier(group=self.group))

    def close(self) -> None:
        """Destroy the process group (idempotent)."""
        if dist.is_initialized():
            dist.destroy_process_group()


def multicast_off() -> None:
    """NVLink multicast stays off in anything that may run NCCL (DESIGN §4)."""
    os.environ.update(MULTICAST_OFF)


def init_distributed(device: str = "cpu", *, timeout_s: float = DEFAULT_TIMEOUT_S, kernels: bool = True) -> DistContext:
    """This process's DistContext: from torchrun's env (RANK, WORLD_SIZE, MASTER_ADDR, ...), or a
    single-rank group when there is none. NCCL for cuda (rank on cuda:LOCAL_RANK), gloo for cpu.
    Reuses a process group that already exists."""
    multicast_off()
    cuda = str(device).startswith("cuda")
    env_rank = os.environ.get("RANK", "0")
    if cuda:
        if not torch.cuda.is_available():
            raise DistError(f"rank {env_rank}: device {device!r} but no CUDA GPU is visible")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise DistError(f"rank {env_rank}: LOCAL_RANK {local} but {torch.cuda.device_count()} GPU(s) visible")
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        backend = "nccl" if cuda else "gloo"
        kw: dict[str, Any] = {"timeout": timedelta(seconds=timeout_s)}
        if cuda:
            kw["device_id"] = dev
        if "WORLD_SIZE" not in os.environ:  # no launcher: a world of one, no rendezvous
            kw.update(store=dist.HashStore(), rank=0, world_size=1)
        try:
            dist.init_process_group(backend, **kw)
        except Exception as e:
            raise DistError(f"rank {env_rank}: init_process_group({backend}) failed: {e}") from e
    return DistContext(dist.get_rank(), dist.get_world_size(), device=dev, kernels=kernels)


# ---- N local processes (tests, debugging) -------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child(fn: Callable, rank: int, world: int, port: int, device: str, timeout_s: float, args: tuple, q: Any) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    ctx = None
    try:
        ctx = init_distributed(device, timeout_s=timeout_s)
        # plain pickle copies tensor data (a queue would share it through fds that die with this process)
        q.put((rank, True, pickle.dumps(fn(ctx, *args))))
    except BaseException as e:  # report everything, including KeyboardInterrupt, to the parent
        msg = str(e) if isinstance(e, DistError) else f"rank {rank}/{world}: {type(e).__name__}: {e}"
        q.put((rank, False, (msg, traceback.format_exc(limit=-4))))
    finally:
        if ctx is not None:
            ctx.close()
    q.close()
    q.join_thread()  # the result is in the pipe: skip the interpreter's slow torch teardown
    os._exit(0)


def run_local(
    fn: Callable[..., Any],
    world: int,
    *args: Any,
    device: str = "cpu",
    timeout_s: float = 120.0,
    collective_timeout_s: float = 30.0,
) -> list[Any]:
    """fn(ctx, *args) on `world` fresh processes (ranks over 127.0.0.1; gloo, or NCCL on cuda:rank);
    each rank's result in rank order. fn must be importable (module level), results picklable.
    Raises DistError naming every failed rank; all processes are reaped before it returns."""
    # a fork server imports torch once and forks fresh ranks from it (the caller's threads never fork)
    mp = torch.multiprocessing.get_context("forkserver")
    mp.set_forkserver_preload([__name__])
    q = mp.Queue()
    port = free_port()
    procs = [
        mp.Process(target=_child, args=(fn, r, world, port, device, collective_timeout_s, args, q), daemon=True)
        for r in range(world)
    ]
    results: dict[int, Any] = {}
    errors: dict[int, tuple[str, str]] = {}  # rank -> (message naming the rank, traceback)
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        silent_dead: set[int] = set()
        while len(results) + len(errors) < world:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = [r for r in range(world) if r not in results and r not in errors]
                errors.update({r: (f"rank {r}/{world}: no result within {timeout_s} s (killed)", "") for r in missing})
                break
            try:
                rank, ok, payload = q.get(timeout=min(left, 0.5))
            except queue.Empty:  # a rank that died without reporting (twice in a row: its message is not coming)
                for r, p in enumerate(procs):
                    if r in results or r in errors or p.exitcode is None:
                        continue
                    if r in silent_dead:
                        errors[r] = (f"rank {r}/{world}: process exited with code {p.exitcode} without a result", "")
                    silent_dead.add(r)
                continue
            if ok:
                results[rank] = pickle.loads(payload)
            else:
                errors[rank] = payload
                deadline = min(deadline, time.monotonic() + collective_timeout_s + 10)  # peers time out by then
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 1)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        q.close()
        q.cancel_join_thread()
    if errors:
        msgs, tbs = zip(*(errors[r] for r in sorted(errors)))
        raise DistError("; ".join(msgs) + "".join(f"\n{tb}" for tb in tbs if tb))
    return [results[r] for r in range(world)]


__all__ = [
    "MULTICAST_OFF",
    "DistContext",
    "DistError",
    "free_port",
    "init_distributed",
    "multicast_off",
    "run_local",
]
