"""report.md for a compiled plan: fused kernels, tasks, occupancy, memory, predicted times."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tilert.gpu_specs import GIB, GpuSpec


def _gib(x: int) -> str:
    return f"{x / GIB:.2f} GiB" if x >= GIB / 10 else f"{x / 2**20:.2f} MiB"


def write_report(path: Path, plan: Any, s: dict[str, Any], spec: GpuSpec) -> None:
    L = [f"# tilert plan: {plan.model} on {plan.world} x {spec.name}", ""]
    L += [f"max_seq {plan.max_seq} tokens; step times predicted at a KV context of {plan.context} tokens.", ""]
    head = "| step | tokens | ops/rank | tasks/rank | SM occupancy | persistent | eager | eager + CUDA graph | floor |"
    L += ["## Step graphs", "", head, "|---|---|---|---|---|---|---|---|---|"]
    for name, st in plan.steps.items():
        p = st.predicted
        L.append(f"| {name} | {st.tokens} | {sum(st.fused_kernels.values())} | {st.tasks_per_rank} | "
                 f"{st.occupancy:.0%} | {p['persistent_ms']:.3f} ms | {p['eager_ms']:.3f} ms | "
                 f"{p['eager_cuda_graph_ms']:.3f} ms | {p['floor_ms']:.3f} ms |")  # fmt: skip
    L += ["", "## Kernels per rank (after fusion)", ""]
    L += ["| kind | " + " | ".join(plan.steps) + " |", "|---|" + "---|" * len(plan.steps)]
    kinds = sorted({k for st in plan.steps.values() for k in st.fused_kernels})
    for k in kinds:
        L.append(f"| {k} | " + " | ".join(str(st.fused_kernels.get(k, 0)) for st in plan.steps.values()) + " |")
    L += ["", f"Unfused dequant ops: {s['unfused_dequant_ops']}.", "", "## Memory per rank", ""]
    L += ["| part | bytes |", "|---|---|"]
    L += [f"| {k.replace('_', ' ')} | {_gib(v)} |" for k, v in plan.memory_per_rank.items()]
    L += ["", f"{spec.name} usable memory: {_gib(spec.memory_bytes)}.", "", "## Throughput per user", ""]
    L += [f"tokens/s = accept_len / (verify step + drafter step) = {s['accept_len']} / "
          f"({s['predicted_step_ms'][str(s['block'])]:.3f} ms + {s['drafter_step_ms']:.3f} ms) = "
          f"**{s['projected_tokens_per_s']:.0f} tokens/s** (plain greedy decode: "
          f"{s['plain_decode_tokens_per_s']:.0f} tokens/s).", ""]  # fmt: skip
    L += ["## Model behind the figures", "",
          f"- HBM {spec.hbm_bytes_per_s / 1e12:.1f} TB/s (read + write), shared evenly by {spec.sms} SMs; "
          f"bf16 {spec.bf16_flops / 1e12:.0f} TFLOP/s (the eager estimate and the floor).",
          f"- Persistent tasks: per kind, measured fixed and hand-over latencies and per-SM stream rates "
          f"(tilert/gpu_specs.py; LINEAR_FP8 streams {spec.task_cost('LINEAR_FP8').stream_bytes_per_s / 1e9:.1f} "
          f"GB/s per SM, hands over in {spec.task_cost('LINEAR_FP8').handover_s * 1e6:.2f} us).",
          f"- Collectives: in-kernel peer-memory signalling {spec.collective_latency_s * 1e6:.0f} us + a task's "
          f"peer writes at {spec.peer_bytes_per_sm_s / 1e9:.1f} GB/s per SM (NCCL in eager mode: "
          f"{spec.nccl_latency_s * 1e6:.0f} us + bytes at {spec.nvlink_bytes_per_s / 1e9:.0f} GB/s NVLink per "
          f"direction).",
          f"- Persistent: list-scheduled makespan + one launch ({spec.graph_launch_s * 1e6:.1f} us). Eager: each "
          f"op alone at whole-GPU rates + {spec.launch_s * 1e6:.0f} us per launch "
          f"({spec.graph_launch_s * 1e6:.1f} us in a CUDA graph).",
          "- Floor: every byte that must be read (weights once, experts expected to be routed to, the KV cache "
          "attended), read once at full bandwidth.",
          "- MoE expert costs assume uniform routing (expected distinct experts per rank).", ""]  # fmt: skip
    path.write_text("\n".join(L))
