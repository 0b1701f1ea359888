"""The Plan: what the compiler hands the runtimes.

A plan directory holds plan.json (model, GPU, world size, per step graph: the per-rank graphs'
files, buffers, predicted times) and .npy arrays: per step and rank the int32 task table
[sms, max_len, len(TASK_FIELDS)] and the counters' expected counts. Ranks with identical tables
share one file. `load_plan(dir)` gives the same Plan back. The rows' layout and the opcodes are
tilert/abi.py's.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tilert.abi import OPCODES, TASK_FIELDS
from tilert.ir.graph import Graph

PLAN_FORMAT = "tilert.plan/1"


class PlanError(ValueError):
    """A plan directory that cannot be read."""


@dataclass
class RankPlan:
    rank: int
    graph: str  # file name of the rank graph (JSON)
    tasks: str  # .npy file: int32 [sms, max_len, width]
    counters: str  # .npy file: int32 [n_counters] expected per step
    buffers: dict[str, list[int]] = field(default_factory=dict)  # activation -> [offset, nbytes]
    memory: dict[str, int] = field(default_factory=dict)  # bytes: weights, kv_cache, activations, ...


@dataclass
class StepPlan:
    name: str  # decode.B1 | verify.B8 | drafter
    tokens: int
    ranks: list[RankPlan]
    tasks_per_rank: int
    fused_kernels: dict[str, int]  # op kind -> count per rank
    predicted: dict[str, float]  # persistent_ms, eager_ms, eager_cuda_graph_ms, floor_ms
    occupancy: float  # busy SM time / (SMs x makespan)


@dataclass
class Plan:
    model: str
    gpu: str
    world: int
    max_seq: int
    context: int
    steps: dict[str, StepPlan]
    bytes_per_rank: int
    memory_per_rank: dict[str, int]
    opcodes: dict[str, int] = field(default_factory=lambda: dict(OPCODES))
    task_fields: list[str] = field(default_factory=lambda: list(TASK_FIELDS))
    extra: dict[str, Any] = field(default_factory=dict)
    format: str = PLAN_FORMAT

    def graph(self, root: Path | str, step: str, rank: int = 0) -> Graph:
        return Graph.from_json((Path(root) / self.steps[step].ranks[rank].graph).read_text())

    def tasks(self, root: Path | str, step: str, rank: int = 0) -> np.ndarray:
        return np.load(Path(root) / self.steps[step].ranks[rank].tasks)

    def counters(self, root: Path | str, step: str, rank: int = 0) -> np.ndarray:
        return np.load(Path(root) / self.steps[step].ranks[rank].counters)


def save_array(root: Path, name: str, arr: np.ndarray, written: dict[bytes, str]) -> str:
    """Write arr as root/name (.npy) unless an identical array was written already; returns its file."""
    key = arr.dtype.str.encode() + str(arr.shape).encode() + arr.tobytes()
    if key not in written:
        np.save(root / name, arr)
        written[key] = name
    return written[key]


def save_plan(plan: Plan, root: Path | str) -> Path:
    """Write plan.json (arrays and graphs must already be in root); returns its path."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    p = root / "plan.json"
    p.write_text(json.dumps(asdict(plan), indent=1, allow_nan=False))
    return p


def load_plan(root: Path | str) -> Plan:
    """The Plan saved in directory root (plan.json + arrays)."""
    p = Path(root) / "plan.json"
    try:
        d = json.loads(p.read_text())
    except FileNotFoundError:
        raise PlanError(f"no plan at {p}") from None
    if d.get("format") != PLAN_FORMAT:
        raise PlanError(f"{p} is not a {PLAN_FORMAT} file")
    steps = {k: StepPlan(**{**s, "ranks": [RankPlan(**r) for r in s["ranks"]]}) for k, s in d.pop("steps").items()}
    return Plan(steps=steps, **d)
