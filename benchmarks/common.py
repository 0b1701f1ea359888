"""Shared benchmark helpers: device timing with CUDA events, copy bandwidth, result files."""

from __future__ import annotations

import datetime
import json
import os
import statistics
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch


def time_cuda(fn: Callable[[], object], iters: int = 50, warmup: int = 5) -> float:
    """Median milliseconds of fn() over `iters` runs, each timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def copy_bandwidths(gib: int = 2, reps: int = 20) -> dict[str, float]:
    """Device-to-device copy rates in bytes/s (read + write), median of single timed copies of a
    `gib` GiB buffer (many times the L2): cudaMemcpyAsync (`copy_`, may use the copy engines) and an
    elementwise kernel (SM loads/stores). The larger is the ceiling (`copy_bandwidth`)."""
    n = (gib << 30) // 4
    a = torch.empty(n, dtype=torch.float32, device="cuda").uniform_(-1, 1)
    b = torch.empty_like(a)
    out = {}
    for name, fn in (("memcpy", lambda: b.copy_(a)), ("kernel", lambda: torch.mul(a, 1.0, out=b))):
        out[name] = 2 * 4 * n / (time_cuda(fn, iters=reps, warmup=3) * 1e-3)
    return out


def copy_bandwidth(gib: int = 2) -> float:
    return max(copy_bandwidths(gib).values())


def time_graph(calls: list[Callable[[], object]], iters: int = 1, reps: int = 30) -> tuple[float, str]:
    """Median seconds per call of `calls`, captured `iters` times over into one CUDA graph and replayed
    (launch gaps out of the way); falls back to plain launches if capture fails. Returns (s, mode)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()

    def rounds() -> None:
        for _ in range(iters):
            for c in calls:
                c()

    try:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            rounds()
        run, mode = g.replay, "graph"
    except Exception as e:  # a launcher that cannot be captured: time plain launches
        print(f"  (graph capture failed: {type(e).__name__}: {str(e)[:200]}; timing eager launches)", flush=True)
        torch.cuda.synchronize()
        run, mode = rounds, "eager"
    ms = time_cuda(run, iters=reps, warmup=1)
    return ms * 1e-3 / (iters * len(calls)), mode


def git_commit() -> str:
    if os.environ.get("TILERT_COMMIT"):
        return os.environ["TILERT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_result(kind: str, data: dict, out_dir: str | os.PathLike | None = None, name: str | None = None) -> Path:
    """benchmarks/results/<kind>-<name>.json (or under out_dir), stamped with device, date, commit;
    name defaults to the device's (nvidia-h200)."""
    name = name or torch.cuda.get_device_name().lower().replace(" ", "-")
    meta = {
        "device": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "commit": git_commit(),
        "torch": torch.__version__,
    }
    out = Path(out_dir or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{kind}-{name}.json"
    path.write_text(json.dumps({**meta, **data}, indent=1))
    return path
