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


def copy_bandwidth(nbytes: int = 4 << 30) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda").random_(0, 255)
    dst = torch.empty_like(src)
    ms = time_cuda(lambda: dst.copy_(src), iters=20, warmup=3)
    return 2 * src.numel() / (ms * 1e-3)


def git_commit() -> str:
    if os.environ.get("TILERT_COMMIT"):
        return os.environ["TILERT_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_result(kind: str, data: dict, out_dir: str | os.PathLike | None = None) -> Path:
    """benchmarks/results/<kind>-<device>.json (or under out_dir), stamped with device, date, commit."""
    name = torch.cuda.get_device_name().lower().replace(" ", "-")
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
