"""Shared benchmark helpers: device timing with CUDA events, copy bandwidth, result files, pinned
routing, and value comparisons between runtimes."""

from __future__ import annotations

import datetime
import json
import os
import statistics
import subprocess
from collections.abc import Callable
from pathlib import Path

import torch

from tilert.runtime.eager.runtime import EagerRuntime


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


def time_step(rt: EagerRuntime, g, inputs: dict) -> tuple[float, float | None]:
    """Median ms of one step with eager launches, and replayed from a CUDA graph (None if capture fails)."""
    t_eager = time_cuda(lambda: rt.run(g, inputs), iters=10, warmup=2)
    try:
        rt.run(g, inputs, capture=True)
        return t_eager, time_cuda(lambda: rt.run(g, inputs, capture=True), iters=20, warmup=3)
    except RuntimeError as e:
        print(f"CUDA graph capture of {g.name} failed: {e}", flush=True)
        return t_eager, None


def pin_routing(params: dict, world: int) -> dict:
    """Give every MoE layer's selection bias one clear winner per rank's expert range (expert r * E/world
    gets +100, the rest ranks by a small descending ramp): top-8 = one expert per rank for every token,
    the expected load of a rank at decode (B=1), and no router near-ties, so runtimes that round
    differently still pick the same experts and their logits can be compared. Every token of a B=8
    verify block then picks the same experts too: one active expert per rank, where routing that
    varies by token activates about 7 of a rank's 48 (`--routing random` measures that)."""
    for k, v in params.items():
        if k.endswith("e_score_correction_bias"):
            E = v.shape[0]
            bias = -torch.arange(E, dtype=torch.float32, device=v.device) * 1e-3
            bias[:: max(1, E // world)] += 100.0
            v.copy_(bias)
    return params


def active_experts(st) -> dict | None:
    """Local experts the last step's top-k activated, per MoE layer of the persistent step (its
    device-side Count): what the gate/up and down stages streamed."""
    counts = [int(p.tensors[[v[0] for v in p.specs].index("count")][0]) for p in st.programs
              if p.key and p.key[0] == "moe"]  # fmt: skip
    if not counts:
        return None
    return {"mean": round(sum(counts) / len(counts), 2), "min": min(counts), "max": max(counts)}


def compare_values(g, got: dict, want: dict) -> list[dict]:
    """Every node output of graph g present in both environments, in graph order: float values as
    a relative error (float64 norms) and whether `got` is finite, integer values as equal or not.
    `got`'s padded activation rows are cut to `want`'s; values of other shapes are left out."""
    rows = []
    for i, node in enumerate(g.nodes):
        for o in node.outputs:
            p, e = got.get(o), want.get(o)
            if not (torch.is_tensor(p) and torch.is_tensor(e)):
                continue
            p = p.detach().to(e.device)
            p = p[: e.shape[0]] if p.dim() == e.dim() and p.shape[0] != e.shape[0] else p
            if p.shape != e.shape:
                continue
            if not e.is_floating_point():
                rows.append({"node": i, "op": node.op, "value": o, "equal": bool(torch.equal(p.long(), e.long()))})
                continue
            ref = e.double()
            err = float((p.double() - ref).norm() / ref.norm().clamp_min(1e-30))
            rows.append({"node": i, "op": node.op, "value": o, "rel_err": err,
                         "finite": bool(torch.isfinite(p).all())})  # fmt: skip
    return rows


def off_rows(rows: list[dict], tol: float) -> list[dict]:
    """The rows of compare_values past tol, unequal or not finite."""
    return [r for r in rows if r.get("rel_err", 0) > tol or r.get("equal") is False or r.get("finite") is False]
