"""GPU spec table for the tile, schedule, cost and memory passes.

Whole-GPU figures (the eager model, the floor, the memory plan; H200, measured where noted, see
DESIGN §8):
- HBM: 4.3 TB/s device-to-device copy, counted as the read + write rate (bytes read plus bytes
  written per second); 141 GB on the card, 139 GiB planned as usable.
- Compute: ~790 TFLOP/s bf16 dense (an 8192^3 matmul).
- NVLink 4: 900 GB/s bidirectional per GPU = 450 GB/s per direction; we plan with 350 GB/s
  achievable per direction for NCCL.
- Launch overhead: ~4 us per kernel launched from the host, ~1.5 us per kernel in a CUDA graph;
  ~8 us for an NCCL call (eager runtime).

The persistent step (one CTA per SM, each SM's tasks one after another) is latency-bound, so its
model is per task and per SM, by task kind (`TaskCost`, keyed by opcode name):

    ready = max(SM free + fixed_s, last input written + handover_s)
    end   = ready + body_s + stream / stream_bytes_per_s + (nbytes - stream) / bytes_per_s
                  + flops / flops_per_s  [+ peer latency + comm / peer rate, ranks on their own GPUs]

`nbytes` and `stream` are the tile pass's bytes of the task (reads + writes; of them, the HBM stream:
weights, the KV cache), `flops` its flops. How the H200 figures were measured: `H200_TASKS`; the
H100's: `H100_TASKS`. A collective task with peers (every rank on its own GPU)
also waits `collective_latency_s` and writes its peers' inboxes at `peer_bytes_per_sm_s`: 3 us and
3.5 GB/s per SM put the 4-layer world-4 traces' ALL_REDUCE tasks (9edca69: 6.3 us at B=1, 19.3 us
at B=8) on top of a solo task's cost. The predicted steps are checked against the measured ones in
`tests/passes/test_cost_model_calibration.py`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

GIB = 1 << 30


class GpuSpecError(ValueError):
    """An unknown GPU name."""


@dataclass(frozen=True)
class TaskCost:
    """One kind of persistent task on one SM (times in s, rates in bytes or flops per s per SM)."""

    fixed_s: float  # SM free -> ready when the inputs are already written: the row, dispatch, one poll
    handover_s: float  # last input's producer ends (its signal) -> this task sees it (ready)
    body_s: float  # ready -> end, the part that does not scale with the work
    stream_bytes_per_s: float = math.inf  # the task's HBM stream (weights, KV cache)
    bytes_per_s: float = math.inf  # its other bytes (activations, mostly from L2)
    flops_per_s: float = math.inf

    def run_s(self, nbytes: float, stream: float, flops: float) -> float:
        """ready -> end of a task moving `nbytes` (of which `stream` from HBM) and doing `flops`."""
        return self.body_s + stream / self.stream_bytes_per_s + max(0.0, nbytes - stream) / self.bytes_per_s + \
            flops / self.flops_per_s  # fmt: skip


def _us(fixed: float, handover: float, body: float, stream_gbps: float = math.inf, gbps: float = math.inf,
        tflops: float = math.inf) -> TaskCost:  # fmt: skip
    """A TaskCost from us and GB/s / TFLOP/s per SM (how the tables below are written)."""
    return TaskCost(fixed * 1e-6, handover * 1e-6, body * 1e-6, stream_gbps * 1e9, gbps * 1e9, tflops * 1e12)


def scaled_stream(tasks: Mapping[str, TaskCost], scale: float) -> Mapping[str, TaskCost]:
    """`tasks` with every HBM-stream rate times `scale` (another memory behind the same SMs)."""
    return MappingProxyType({k: dataclasses.replace(c, stream_bytes_per_s=c.stream_bytes_per_s * scale)
                             for k, c in tasks.items()})  # fmt: skip


# H200, measured: the persistent kernel's %globaltimer stamps of the stored traces, fitted by
# `benchmarks/calibrate_costs.py` (tilert.profile.calibration.fit_task_costs) at the 75th percentile
# of each kind's tasks (a stage ends with its slower tasks): fixed and hand-over times as measured,
# body and rates a least-squares fit of the run times of tasks of equal work. Traces: rank 0 of
# mimo-v2.5-pro at world 8, B=1 and B=8, pinned routing, at bed55f8
# (benchmarks/results/trace-persistent-{decode.B1,verify.B8}-nvidia-h200.json.gz); the experts also
# with five active experts (the 4-layer world-4 B=1 trace at 9edca69, which separates the per-item
# cost from the task's constant); the router from the 4-layer traces at 9edca69 (its folded RMSNorm
# came after bed55f8). "*": a kind no trace holds (the elementwise and collective kinds pooled, its
# HBM stream at LINEAR_FP8's rate).
H200_TASKS: Mapping[str, TaskCost] = MappingProxyType({
    "LINEAR_FP8": _us(1.57, 1.09, 2.92, stream_gbps=24.1, gbps=8.66),
    "LM_HEAD_GEMM": _us(1.82, 1.25, 0.0, stream_gbps=21.3, tflops=4.78),
    "ATTN_SPLIT": _us(2.78, 2.94, 10.14, stream_gbps=30.2, gbps=6.58),
    "ATTN_COMBINE": _us(1.73, 0.99, 1.88, gbps=16.9),
    "MOE_ROUTER": _us(2.21, 1.25, 0.0, stream_gbps=31.3, gbps=153, tflops=0.0391),
    "MOE_TOPK": _us(2.21, 2.56, 8.07, gbps=67.2),
    "MOE_GATE_UP": _us(2.21, 1.09, 0.91, stream_gbps=11.4, gbps=13.9),
    "MOE_DOWN": _us(2.11, 1.47, 1.11, stream_gbps=7.61, gbps=10.4),
    "MOE_REDUCE": _us(2.14, 1.38, 0.96, gbps=126),
    "ALL_REDUCE": _us(2.21, 1.38, 0.95, gbps=67.9),
    "ALL_GATHER": _us(2.21, 1.78, 0.20, gbps=18.8),
    "LM_HEAD_ARGMAX": _us(2.21, 1.15, 4.42),
    "LM_HEAD_ACCEPT": _us(2.21, 1.15, 13.98),
    "OP_CONCAT": _us(2.21, 2.59, 1.01, gbps=45.9),
    "OP_EMBED": _us(2.21, 1.15, 1.06, gbps=39.8),
    "OP_SILU_MUL": _us(2.21, 1.15, 1.54, tflops=0.00194),
    "BARRIER": _us(2.76, 1.15, 0.32),
    "*": _us(2.02, 1.06, 2.23, stream_gbps=24.1, gbps=105),
})  # fmt: skip

# H100, measured the H200's way (`benchmarks/calibrate_costs.py`, 75th percentile) on its own traces:
# rank 0 of mimo-v2.5-pro at world 8, B=1 and B=8, solo collectives, routing by token, at 523c528
# (the streaming linear and GEMV expert bodies, norm statistics from the staged rows, the top-k a
# task; benchmarks/results/trace-step.{B1,B8}-nvidia-h100-80gb-hbm3.json.gz, 75% quantile of each
# kind's tasks, `benchmarks/calibrate_costs.py`). The H100 SXM and the H200 are the same GH100 die
# with other HBM: the tasks wait on DRAM latency, not on bandwidth. LINEAR_FP8 fits best with no
# HBM-stream term (the loop's L2 prefetch has its rows on the way before the task runs; median
# error 29% a task). The expert tasks' items follow each layer's routing, which a by-token trace
# does not record, so theirs are the H200's (fitted to the MXFP4 mainloop body) with the stream
# rates times H100_EXPERT_STREAM_SCALE (the factor that balances the log errors on the stored H100
# steps). Measured / predicted at the measured routing (`calibrate_costs.py --check-only`):
# benchmarks/results/e2e-nvidia-h100-80gb-hbm3.json at d5516a8 1.054 (B=1), 0.946 (B=8), 1.013 (B=8
# pinned); step-variants-down-early-nvidia-h100-80gb-hbm3.json at 523c528 1.020 (B=1), 0.882 (B=8).
H100_EXPERT_STREAM_SCALE = 1.348
H100_TASKS: Mapping[str, TaskCost] = MappingProxyType({
    "LINEAR_FP8": _us(1.73, 0.96, 7.02, gbps=18.7),
    "LM_HEAD_GEMM": _us(1.34, 0.96, 0.0, stream_gbps=19.6, gbps=20.1),
    "ATTN_SPLIT": _us(2.82, 2.66, 7.59, stream_gbps=39.4, gbps=4.43),
    "ATTN_COMBINE": _us(2.37, 0.80, 1.66, gbps=17.4),
    "MOE_ROUTER": _us(2.41, 0.93, 0.0, stream_gbps=33.8, gbps=246, tflops=0.0629),
    "MOE_TOPK": _us(2.41, 2.34, 2.79, gbps=10.5),
    **scaled_stream({k: H200_TASKS[k] for k in ("MOE_GATE_UP", "MOE_DOWN")}, H100_EXPERT_STREAM_SCALE),
    "MOE_REDUCE": _us(2.38, 0.90, 0.89, gbps=94.9),
    "ALL_REDUCE": _us(2.41, 0.96, 0.80, gbps=64),
    "ALL_GATHER": _us(2.41, 1.10, 0.42, gbps=20.7),
    "LM_HEAD_ARGMAX": _us(2.41, 0.93, 3.65),
    "LM_HEAD_ACCEPT": _us(2.41, 0.93, 19.10),
    "OP_CONCAT": _us(2.41, 2.05, 0.48, gbps=28.7),
    "OP_EMBED": _us(2.41, 0.93, 1.11, gbps=74.7),
    "OP_SILU_MUL": _us(2.41, 0.93, 0.0, gbps=10.3),
    "BARRIER": _us(2.82, 0.93, 0.13),
    "*": _us(2.40, 0.80, 1.98, gbps=83),
})  # fmt: skip


@dataclass(frozen=True)
class GpuSpec:
    name: str
    sms: int
    hbm_bytes_per_s: float  # read + write
    bf16_flops: float  # dense tensor-core peak actually reached
    smem_per_sm: int  # bytes usable by one CTA
    memory_bytes: int  # usable for the plan
    nvlink_bytes_per_s: float  # achievable per direction per GPU (NCCL)
    collective_latency_s: float  # persistent: a collective task's wait for its peers (peer-memory signalling)
    peer_bytes_per_sm_s: float  # persistent: one collective task's writes to its peers' inboxes, per SM
    nccl_latency_s: float  # eager: one NCCL collective
    launch_s: float  # one kernel launch from the host
    graph_launch_s: float  # one kernel inside a CUDA graph
    tasks: Mapping[str, TaskCost] = field(hash=False)  # persistent task costs by opcode ("*": the others)

    @property
    def bytes_per_sm_s(self) -> float:
        return self.hbm_bytes_per_s / self.sms

    @property
    def flops_per_sm_s(self) -> float:
        return self.bf16_flops / self.sms

    def task_cost(self, opcode: str) -> TaskCost:
        """The persistent cost of a task of this opcode (the "*" entry for opcodes not measured)."""
        return self.tasks.get(opcode) or self.tasks["*"]

    def solo(self) -> GpuSpec:
        """The one-GPU stand-in of one rank (`benchmarks/e2e.py`'s solo mode): every collective is
        local work of the same size, no peer to wait for or write to."""
        return dataclasses.replace(self, collective_latency_s=0.0, peer_bytes_per_sm_s=math.inf)


H200 = GpuSpec(
    name="h200",
    sms=132,
    hbm_bytes_per_s=4.3e12,
    bf16_flops=790e12,
    smem_per_sm=228 * 1024,
    memory_bytes=139 * GIB,
    nvlink_bytes_per_s=350e9,
    collective_latency_s=3e-6,
    peer_bytes_per_sm_s=3.5e9,
    nccl_latency_s=8e-6,
    launch_s=4e-6,
    graph_launch_s=1.5e-6,
    tasks=H200_TASKS,
)

H100 = GpuSpec(
    name="h100",
    sms=132,
    hbm_bytes_per_s=3.0e12,
    bf16_flops=700e12,
    smem_per_sm=228 * 1024,
    memory_bytes=79 * GIB,
    nvlink_bytes_per_s=350e9,
    collective_latency_s=3e-6,
    peer_bytes_per_sm_s=3.5e9,
    nccl_latency_s=8e-6,
    launch_s=4e-6,
    graph_launch_s=1.5e-6,
    tasks=H100_TASKS,
)

GPUS: dict[str, GpuSpec] = {g.name: g for g in (H200, H100)}


def gpu_spec_for_device(device_name: str) -> GpuSpec | None:
    """The spec of a CUDA device by its name ("NVIDIA H100 80GB HBM3" -> h100), None if none fits."""
    low = device_name.lower()
    return next((g for g in GPUS.values() if g.name in low), None)


def gpu_spec(name: str) -> GpuSpec:
    try:
        return GPUS[name.lower()]
    except KeyError:
        raise GpuSpecError(f"unknown GPU '{name}' (known: {', '.join(GPUS)})") from None
