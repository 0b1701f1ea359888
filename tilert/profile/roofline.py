"""Roofline of one rank's fused kernels: what the cost model predicts vs the hardware floor.

Per node of the compiled rank graph: bytes and flops from the op registry's cost, arithmetic
intensity, the floor (max(bytes / HBM rate, flops / peak): the kernel cannot be faster alone on the
GPU), the persistent prediction (its tasks' summed time spread over all SMs, from the schedule)
and the eager prediction (one launch, cost_model.eager_seconds).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from tilert.ir.graph import Graph
from tilert.passes.cost_model import eager_seconds, op_cost
from tilert.profile.timeline import measured_trace
from tilert.runtime.eager.runtime import EagerRuntime
from tilert.runtime.eager.synthetic import synthetic_params
from tilert.runtime.persistent.step import PersistentStep


@dataclass
class KernelRow:
    index: int
    op: str
    bytes: int
    flops: int
    intensity: float  # flop / byte
    floor_us: float
    persistent_us: float
    eager_us: float
    tasks: int
    measured_us: float | None = None  # this node's time on the eager runtime (`profile --measure`)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def roofline_rows(g: Graph, sched: Any, spec: Any, context: int) -> list[KernelRow]:
    ops = sched.table[:, :, 1]
    live = sched.table[:, :, 0] != 0
    rows = []
    for i, n in enumerate(g.nodes):
        c = op_cost(g, n, context)
        coll = c.comm_bytes > 0
        floor = max(c.bytes / spec.hbm_bytes_per_s, c.flops / spec.bf16_flops)
        rows.append(
            KernelRow(
                i, n.op, int(c.bytes), int(c.flops), c.flops / c.bytes if c.bytes else 0.0, floor * 1e6,
                sched.op_seconds[i] / spec.sms * 1e6,
                eager_seconds(spec, c, sched.op_longest[i], coll, graphs=True) * 1e6,
                int(((ops == i) & live).sum()),
            )
        )  # fmt: skip
    return rows


def format_roofline(rows: list[KernelRow], top: int | None = None) -> str:
    measured = any(r.measured_us is not None for r in rows)
    key = (lambda r: -(r.measured_us or 0.0)) if measured else (lambda r: -r.persistent_us)
    rs = sorted(rows, key=key)[:top] if top else rows
    out = [f"{'#':>4} {'op':<22} {'MB':>9} {'GFLOP':>8} {'flop/B':>7} {'floor us':>9} {'pers. us':>9} "
           f"{'eager us':>9} {'tasks':>6}" + (f" {'meas. us':>9} {'x floor':>8}" if measured else "")]  # fmt: skip
    for r in rs:
        line = (
            f"{r.index:>4} {r.op:<22} {r.bytes / 1e6:>9.3f} {r.flops / 1e9:>8.3f} {r.intensity:>7.2f} "
            f"{r.floor_us:>9.2f} {r.persistent_us:>9.2f} {r.eager_us:>9.2f} {r.tasks:>6}"
        )
        if measured and r.measured_us is not None:
            line += f" {r.measured_us:>9.2f} {r.measured_us / r.floor_us if r.floor_us else 0.0:>8.1f}"
        out.append(line)
    return "\n".join(out)


def step_inputs(g: Graph, context: int) -> dict[str, Any]:
    """Token ids and positions for one step of g at KV length `context`."""
    T = g.values["tokens"].shape[0] if "tokens" in g.values else 1
    return {"tokens": torch.zeros(T, dtype=torch.int32),
            "positions": torch.arange(context, context + T, dtype=torch.int32)}  # fmt: skip


def measure_rows(rows: list[KernelRow], g: Graph, device: str, context: int, world: int, iters: int = 5,
                 params: dict[str, Any] | None = None) -> str:  # fmt: skip
    """Fill `measured_us` by running the rank graph on the eager runtime (synthetic weights unless
    given; collectives as single-GPU stand-ins when world > 1). Returns a one-line description."""
    params = synthetic_params(g, device=device) if params is None else params
    rt = EagerRuntime(params, device=device, world=world, solo=world > 1)
    inputs = step_inputs(g, context)
    for r, t in zip(rows, rt.node_times(g, inputs, iters)):
        r.measured_us = t
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return f"measured on {name}: eager runtime ({rt.timing}), one launch per op, median of {iters} steps"


def measure_persistent(
    g: Graph, sched: Any, params: dict[str, Any], context: int, iters: int = 10
) -> tuple[float, dict]:
    """Median ms of the whole step as one persistent launch, and the kernel's own per-SM trace
    (Chrome/Perfetto JSON from its %globaltimer stamps) of the last launch."""
    st = PersistentStep(g, sched.table, sched.counter_expected, params)
    inputs = step_inputs(g, context)
    st.run(inputs)  # first launch: loads the kernel
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        st.launch(inputs)
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    st.check()
    return sorted(times)[len(times) // 2], measured_trace(st, f"rank 0 {g.name} (measured)")


def plot_roofline(rows: list[KernelRow], spec: Any, path: str | Path, title: str) -> str | None:
    """Write a PNG; returns None, or why no plot was written (matplotlib missing)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install 'tilert[dev]'): roofline.png skipped"
    measured = any(r.measured_us is not None for r in rows)

    def us(r: KernelRow) -> float:
        return (r.measured_us or 0.0) if measured else r.persistent_us

    pts = [r for r in rows if r.flops > 0 and r.bytes > 0 and us(r) > 0]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    peak, bw = spec.bf16_flops / 1e12, spec.hbm_bytes_per_s / 1e12
    lo = min([r.intensity for r in pts] + [0.1]) / 2
    hi = max([r.intensity for r in pts] + [peak / bw * 4])
    xs = [lo, peak / bw, hi]
    ax.plot(xs, [min(peak, x * bw) for x in xs], "k-", lw=1.5, label=f"roof: {bw:.1f} TB/s, {peak:.0f} TFLOP/s")
    kinds = sorted({r.op for r in pts})
    cmap = plt.get_cmap("tab10")
    for k, kind in enumerate(kinds):
        sel = [r for r in pts if r.op == kind]
        ax.scatter([r.intensity for r in sel], [r.flops / (us(r) * 1e-6) / 1e12 for r in sel],
                   s=18, color=cmap(k % 10), label=kind, alpha=0.8)  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (flop / byte)")
    ax.set_ylabel("measured TFLOP/s (eager runtime)" if measured else "predicted TFLOP/s (persistent share of the GPU)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)
    plt.close(fig)
    return None
