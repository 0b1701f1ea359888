"""The persistent cost model against measurements: a rank's predicted step, and per-kind task costs
(`tilert.gpu_specs.TaskCost`) fitted to the tasks of measured traces.

`predicted_step_ms` is the compiler's figure (the schedule pass's list-schedule makespan plus one
launch, `tilert compile`'s `predicted_step_ms`) for one rank of a model, optionally for a known
routing (`routed` local experts per MoE layer instead of uniform routing's expectation) and for the
one-GPU stand-in of a rank (`GpuSpec.solo`, what `benchmarks/e2e.py` measures by default).

`fit_task_costs` turns measured tasks (`task_samples`: run, fixed or hand-over time and the tile
pass's work of every task of a `trace_analysis.RunTasks`) into a `TaskCost` per opcode;
`benchmarks/calibrate_costs.py` runs it on the stored traces and prints the table that
`tilert/gpu_specs.py` keeps.
"""

from __future__ import annotations

import collections
import itertools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tilert.gpu_specs import H200, GpuSpec, TaskCost
from tilert.ir.graph import Graph
from tilert.kernels import moe, switches
from tilert.models.builder import build_step_graph
from tilert.passes.manager import PassContext, compile_graph
from tilert.passes.tile import OpTiles
from tilert.profile.trace_analysis import RunTasks, TaskWork, run_from_trace, task_events, task_rows, task_work


@dataclass
class CompiledRank:
    """One rank's step as the compiler sees it: its graph, tiles and schedule."""

    graph: Graph
    tiles: list[OpTiles]
    schedule: Any  # passes.schedule.Schedule
    spec: GpuSpec

    @property
    def predicted_ms(self) -> float:
        """The compiler's persistent step: makespan plus one launch (ms)."""
        return (self.schedule.makespan_s + self.spec.graph_launch_s) * 1e3

    def moe_nodes(self) -> list[int]:
        """The fused MoE nodes (their expert tasks' work depends on the routing)."""
        return [i for i, n in enumerate(self.graph.nodes) if n.op.startswith("fused_moe")]


def compile_rank(cfg: Any, tokens: int, world: int, spec: GpuSpec, max_seq: int, context: int | None = None,
                 routed: float | None = None, rank: int = 0) -> CompiledRank:  # fmt: skip
    """Rank `rank`'s step of `tokens` query tokens (1: decode, more: a verify block) through the whole
    pipeline with `spec`'s costs, at KV context `context` (default max_seq) and, with `routed`, that
    many routed local experts per MoE layer (default: uniform routing's expectation)."""
    g = build_step_graph(cfg, tokens=tokens, max_seq=max_seq, mode="decode" if tokens == 1 else "verify")
    ctx = PassContext(gpu=spec, world=world, max_seq=max_seq, context_len=context, routed_experts=routed)
    graphs = compile_graph(g, ctx)
    return CompiledRank(graphs[rank], ctx.results["tile"][rank], ctx.results["schedule"][rank], spec)


def predicted_step_ms(cfg: Any, tokens: int, world: int, spec: GpuSpec, max_seq: int, context: int | None = None,
                      routed: float | None = None) -> float:  # fmt: skip
    """The compiler's predicted persistent step of rank 0 (ms); see `compile_rank`."""
    return compile_rank(cfg, tokens, world, spec, max_seq, context, routed).predicted_ms


@dataclass(frozen=True)
class MeasuredStep:
    """One persistent step time of a `benchmarks/e2e.py` result file."""

    file: str
    device: str
    commit: str
    model: str
    world: int
    solo: bool  # rank 0 alone on one GPU, collectives as local work
    context: int
    tokens: int
    routing: str  # "pinned" (one expert per rank for every token) or "token" (the router's own choices)
    routed: float | None  # local experts active per MoE layer (mean), where the file records it
    persistent_ms: float
    switches: dict[str, str] = field(default_factory=dict)  # the build switches it ran under


def historical_switches(top_k_task: bool = True) -> dict[str, str]:
    """The build switches of a measurement that recorded none: the bodies every step ran before the
    switches had other defaults; the top-k a task of its own unless the trace shows otherwise."""
    return {**switches.HISTORICAL, moe.TOPK_ENV: "task" if top_k_task else "router"}


def measured_steps(path: str | Path, unrecorded: Mapping[str, str] | None = None) -> list[MeasuredStep]:
    """The persistent steps an e2e result file measured (keys "1", "8": routing as the file says;
    "8.pinned" and the like: pinned routing; files before the routing field: pinned), with the build
    switches the file records (`historical_switches` for files that record none). A
    `benchmarks/step_variants.py` file gives its first variant's steps (the kernel alone, rank 0
    solo), with the switches its rows record, else `unrecorded` (required then: its first variant
    ran the defaults of its commit)."""
    d = json.loads(Path(path).read_text())
    if "rows" in d:
        return _variant_steps(Path(path).name, d, unrecorded)
    out = []
    for key, row in d.get("steps", {}).items():
        head = key.split(".")[0]
        if not (head.isdigit() and isinstance(row, dict) and row.get("persistent_ms")):
            continue
        routing = "pinned" if key.endswith(".pinned") else {"random": "token"}.get(d.get("routing"), d.get("routing"))
        act = row.get("active_experts") or {}
        out.append(MeasuredStep(Path(path).name, d.get("device", "?"), str(d.get("commit", "?"))[:7], d["model"],
                                int(d["world_size"]), d.get("rank") == 0, int(d["context"]), int(head),
                                routing or "pinned", act.get("mean"), float(row["persistent_ms"]),
                                switches.completed(d.get("switches") or historical_switches())))  # fmt: skip
    return out


def _variant_steps(name: str, d: dict[str, Any], unrecorded: Mapping[str, str] | None) -> list[MeasuredStep]:
    first = d["rows"][0]["variant"]
    out = []
    for row in (r for r in d["rows"] if r["variant"] == first):
        sw = row.get("switches") or unrecorded
        if sw is None:
            raise ValueError(f"{name}: its rows record no build switches; pass the ones its '{first}' variant ran")
        routing = {"random": "token"}.get(d.get("routing"), d.get("routing"))
        out.append(MeasuredStep(name, d.get("device", "?"), str(d.get("commit", "?"))[:7], d["model"],
                                int(d["world_size"]), True, int(d["context"]), int(row["tokens"]), routing,
                                (row.get("active_experts") or {}).get("mean"), float(row["ms"]),
                                switches.completed(sw)))  # fmt: skip
    return out


def trace_run(trace: dict[str, Any], cfg: Any, tokens: int, world: int, max_seq: int, context: int | None = None,
              routed: float | dict[int, int] | None = None, spec: GpuSpec | None = None
              ) -> tuple[CompiledRank, RunTasks, TaskWork]:  # fmt: skip
    """A stored trace of rank 0's step with the task table and work the compiler gives the same step
    (`run_from_trace` pairs tasks by identity, so the table may order them otherwise). `routed`: the
    local experts each MoE layer ran, one count for all or per fused MoE node (default: the tile
    pass's uniform-routing expectation). The table is built under the build switches the trace
    recorded (`kernels.switches`), or for a trace that recorded none, under the bodies every step
    ran before the switches had other defaults, with the top-k where the trace's tasks put it."""
    topk_task = any(e["cat"] == "MOE_TOPK" for e in task_events(trace))
    env = switches.completed(trace_meta(trace).get("switches") or historical_switches(topk_task))
    with switches.applied(env):
        rank = compile_rank(cfg, tokens, world, spec or H200, max_seq, context)
    run = run_from_trace(trace, rank.schedule.table)
    active = routed if isinstance(routed, dict) or routed is None else dict.fromkeys(rank.moe_nodes(), int(routed))
    return rank, run, task_work(rank.graph, rank.tiles, run.table, active)


_GRAPH_NAME = re.compile(r"^(?P<model>.+)\.(?P<mode>decode|verify)\.B(?P<tokens>\d+)\.r(?P<rank>\d+)$")


def trace_meta(trace: dict[str, Any]) -> dict[str, Any]:
    """What a trace says about the step it measured: the fields `benchmarks/e2e.py` writes into its
    otherData (model, world, tokens, layers, max_seq, context, routing, active_experts per MoE node,
    copy_bandwidth_Bps), else the model and tokens its graph name gives ("<model>.decode.B1.r0")."""
    meta = dict(trace.get("otherData") or {})
    m = _GRAPH_NAME.match(str(meta.get("graph", "")))
    if m:
        meta.setdefault("model", m["model"])
        meta.setdefault("tokens", int(m["tokens"]))
    if isinstance(meta.get("active_experts"), dict):  # JSON keys are strings
        meta["active_experts"] = {int(k): int(v) for k, v in meta["active_experts"].items()}
    return meta


def task_samples(run: RunTasks, work: TaskWork) -> list[dict[str, Any]]:
    """`task_rows` with each task's run, fixed or hand-over time (ns) and its work: the cost model's
    calibration samples (`fit_task_costs`)."""
    out = []
    for t in task_rows(run):
        s, k = t["sm"], t["slot"]
        waited = t["dep_end"] >= 0
        out.append({"opcode": t["opcode"], "run": t["end"] - t["ready"],
                    "fixed": None if waited else t["ready"] - t["start"],
                    "handover": t["ready"] - t["dep_end"] if waited else None,
                    "nbytes": float(work.nbytes[s, k]), "stream": float(work.stream[s, k]),
                    "flops": float(work.flops[s, k])})  # fmt: skip
    return out


def _nonneg_fit(A: np.ndarray, y: np.ndarray, constant: bool = True) -> np.ndarray:
    """Least squares with coefficients >= 0 over the columns of A (column 0: the constant, left out
    when not `constant`): of the subsets of columns whose own fit has no negative coefficient, the one
    with the smallest residual, where a larger subset replaces a smaller one only if it cuts the
    residual by more than 1% (a term the samples cannot tell apart stays out; a column left out is a
    coefficient held at 0)."""
    best: tuple[float, np.ndarray] | None = None
    cols = range(0 if constant else 1, A.shape[1])
    for r in range(1, len(cols) + 1):
        for use in map(list, itertools.combinations(cols, r)):
            x, *_ = np.linalg.lstsq(A[:, use], y, rcond=None)
            if (x < 0).any():
                continue
            res = float(((A[:, use] @ x - y) ** 2).sum())
            if best is None or res < 0.99 * best[0]:
                full = np.zeros(A.shape[1])
                full[use] = x
                best = (res, full)
    return best[1] if best is not None else np.zeros(A.shape[1])


def _quantile(v: list[float], q: float) -> float:
    return float(np.quantile(np.asarray(v, dtype=float), q)) if len(v) else math.nan


# The quantile of a kind's tasks the cost table states. A stage ends with its slowest task and its
# consumers wait for the stage, so a table of typical (median) tasks runs the stored traces' own
# schedules 13% (B=1) and 9% (B=8) short; the 75th percentile runs them within 4% and 5%
# (benchmarks/calibrate_costs.py --verbose prints both).
STAGE_QUANTILE = 0.75


def fit_task_costs(samples: list[dict[str, Any]], q: float = STAGE_QUANTILE, min_samples: int = 20
                   ) -> dict[str, dict[str, float]]:  # fmt: skip
    """Per opcode, the persistent cost model's parameters (`TaskCost`: seconds and per-SM rates) from
    measured tasks, at quantile `q` of the tasks (0.5: the typical task; higher: a stage's slower
    tasks, which decide when the stage is done): fixed_s and handover_s the q-quantiles of its tasks'
    fixed and hand-over times (over every kind where it has fewer than `min_samples`); body_s and the
    per-SM rates from the q-quantile run time of each group of tasks with equal work, fitted as
    run = body_s + stream / stream_bytes_per_s + (nbytes - stream) / bytes_per_s + flops / flops_per_s
    (least squares weighted by the group's tasks, coefficients >= 0; a rate the samples do not need
    is inf). Where every task streams the same bytes, the stream rate carries the constant (body_s =
    0), so the figure scales with the bytes of another shape. Also per opcode: the tasks and the
    fit's median relative error over its groups."""
    by: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for x in samples:
        by[x["opcode"]].append(x)
    every_fixed = [x["fixed"] for x in samples if x["fixed"] is not None]
    every_hand = [x["handover"] for x in samples if x["handover"] is not None]
    out = {}
    for code, xs in sorted(by.items()):
        fixed = [x["fixed"] for x in xs if x["fixed"] is not None]
        hand = [x["handover"] for x in xs if x["handover"] is not None]
        groups: dict[tuple[float, float, float], list[float]] = collections.defaultdict(list)
        for x in xs:
            groups[(x["stream"], x["nbytes"] - x["stream"], x["flops"])].append(float(x["run"]))
        A = np.array([[1.0, *k] for k in groups])
        y = np.array([_quantile(v, q) for v in groups.values()])
        w = np.sqrt([len(v) for v in groups.values()])
        st = A[:, 1]
        same = st.min() > 0 and st.max() - st.min() <= 0.01 * st.max()
        c = _nonneg_fit(A * w[:, None], y * w, constant=not same)
        out[code] = {
            "fixed_s": _quantile(fixed if len(fixed) >= min_samples else every_fixed, q) * 1e-9,
            "handover_s": _quantile(hand if len(hand) >= min_samples else every_hand, q) * 1e-9,
            "body_s": c[0] * 1e-9,
            "stream_bytes_per_s": 1e9 / c[1] if c[1] > 0 else math.inf,
            "bytes_per_s": 1e9 / c[2] if c[2] > 0 else math.inf,
            "flops_per_s": 1e9 / c[3] if c[3] > 0 else math.inf,
            "tasks": len(xs),
            "fixed_tasks": len(fixed),
            "handover_tasks": len(hand),
            "median_rel_err": float(np.median(np.abs(A @ c - y) / np.maximum(y, 1.0))),
        }
    return out


def task_cost(fit: dict[str, float]) -> TaskCost:
    """A `fit_task_costs` row as a TaskCost."""
    return TaskCost(fit["fixed_s"], fit["handover_s"], fit["body_s"], fit["stream_bytes_per_s"], fit["bytes_per_s"],
                    fit["flops_per_s"])  # fmt: skip


def format_task_costs(fits: dict[str, dict[str, float]]) -> str:
    """The fitted table in `tilert/gpu_specs.py`'s notation (`_us(fixed, handover, body, stream_gbps=,
    gbps=, tflops=)`: us, GB/s and TFLOP/s per SM), with each kind's tasks and median error."""
    out = []
    for code, f in fits.items():
        args = [f"{f['fixed_s'] * 1e6:.2f}", f"{f['handover_s'] * 1e6:.2f}", f"{f['body_s'] * 1e6:.2f}"]
        for key, name, unit in (("stream_bytes_per_s", "stream_gbps", 1e9), ("bytes_per_s", "gbps", 1e9),
                                ("flops_per_s", "tflops", 1e12)):  # fmt: skip
            if math.isfinite(f[key]):
                args.append(f"{name}={f[key] / unit:.3g}")
        out.append(f'    "{code}": _us({", ".join(args)}),  # {f["tasks"]} tasks, median error '
                   f"{f['median_rel_err']:.1%}")  # fmt: skip
    return "\n".join(out)
