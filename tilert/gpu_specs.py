"""GPU spec table for the tile, schedule, cost and memory passes.

Figures (H200, measured where noted, see DESIGN §8):
- HBM: 4.3 TB/s device-to-device copy, counted as the read + write rate (bytes read plus bytes
  written per second); 141 GB on the card, 139 GiB planned as usable.
- Compute: ~790 TFLOP/s bf16 dense (an 8192^3 matmul).
- NVLink 4: 900 GB/s bidirectional per GPU = 450 GB/s per direction; we plan with 350 GB/s
  achievable per direction for peer-memory writes.
- Collective latency: ~3 us per collective for in-kernel peer-memory signalling (persistent
  runtime), ~8 us for an NCCL call (eager runtime).
- Launch overhead: ~4 us per kernel launched from the host, ~1.5 us per kernel in a CUDA graph;
  the persistent runtime launches one kernel per step.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1 << 30


class GpuSpecError(ValueError):
    """An unknown GPU name."""


@dataclass(frozen=True)
class GpuSpec:
    name: str
    sms: int
    hbm_bytes_per_s: float  # read + write
    bf16_flops: float  # dense tensor-core peak actually reached
    smem_per_sm: int  # bytes usable by one CTA
    memory_bytes: int  # usable for the plan
    nvlink_bytes_per_s: float  # achievable per direction per GPU
    collective_latency_s: float  # persistent: in-kernel peer-memory signalling
    nccl_latency_s: float  # eager: one NCCL collective
    launch_s: float  # one kernel launch from the host
    graph_launch_s: float  # one kernel inside a CUDA graph
    task_overhead_s: float = 0.3e-6  # persistent kernel: fetch a task row, wait/signal counters

    @property
    def bytes_per_sm_s(self) -> float:
        return self.hbm_bytes_per_s / self.sms

    @property
    def flops_per_sm_s(self) -> float:
        return self.bf16_flops / self.sms


H200 = GpuSpec(
    name="h200",
    sms=132,
    hbm_bytes_per_s=4.3e12,
    bf16_flops=790e12,
    smem_per_sm=228 * 1024,
    memory_bytes=139 * GIB,
    nvlink_bytes_per_s=350e9,
    collective_latency_s=3e-6,
    nccl_latency_s=8e-6,
    launch_s=4e-6,
    graph_launch_s=1.5e-6,
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
    nccl_latency_s=8e-6,
    launch_s=4e-6,
    graph_launch_s=1.5e-6,
)

GPUS: dict[str, GpuSpec] = {g.name: g for g in (H200, H100)}


def gpu_spec(name: str) -> GpuSpec:
    try:
        return GPUS[name.lower()]
    except KeyError:
        raise GpuSpecError(f"unknown GPU '{name}' (known: {', '.join(GPUS)})") from None
