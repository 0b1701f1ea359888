"""Cost model: bytes, flops and interconnect bytes -> seconds on a GpuSpec.

Persistent step (one CTA per SM, each SM's tasks one after another): per task, by its kind
(opcode), the measured latencies and per-SM rates of `GpuSpec.task_cost` (tilert/gpu_specs.py):
    ready = max(SM free + fixed, last input written + hand-over)
    end   = ready + body + HBM-stream bytes / stream rate + other bytes / their rate + flops / rate
            + for collective tasks with peers: latency + comm bytes / per-SM peer rate
(`task_time`, `task_ready`); the schedule pass list-schedules the tasks with these times and its
makespan, plus one launch, is the predicted step.

Eager estimate (one launch per fused op): each op runs alone on the whole GPU:
    max(bytes / HBM rate, flops / peak, longest task) + launch overhead [+ NCCL latency].
Floor: every byte that must be read (weights actually touched, the KV cache actually attended, the
step's inputs), read once at full bandwidth, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tilert.gpu_specs import GpuSpec
from tilert.ir.graph import Graph, Node
from tilert.ir.opset.fused import MoeAttrs
from tilert.ir.opset.moe import expected_experts
from tilert.ir.registry import Cost, Placement, get_op


def op_cost(g: Graph, n: Node, context: int) -> Cost:
    """The registry cost of node n with the plan's world size and KV context filled in."""
    ins = [g.values[x] for x in n.inputs]
    outs = [g.values[x] for x in n.outputs]
    return get_op(n.op).cost(ins, outs, n.a, Placement(int(g.meta.get("world", 1)), context))


@dataclass(frozen=True)
class TaskTime:
    """A task's predicted times on its SM (s): `fixed` and `handover` as in `task_ready`, `run` from
    ready to end; `busy` = fixed + run is its SM time when its inputs are already there."""

    fixed: float
    handover: float
    run: float

    @property
    def busy(self) -> float:
        return self.fixed + self.run


def task_time(spec: GpuSpec, opcode: str, nbytes: float, stream: float, flops: float, comm: float = 0.0,
              collective: bool = False) -> TaskTime:  # fmt: skip
    """The predicted times of one persistent task of `opcode` moving `nbytes` (of which `stream` from
    HBM) and doing `flops`; a collective task with peers also waits for them and writes `comm`
    bytes to their inboxes."""
    c = spec.task_cost(opcode)
    run = c.run_s(nbytes, stream, flops)
    if collective:
        run += spec.collective_latency_s + comm / spec.peer_bytes_per_sm_s
    return TaskTime(c.fixed_s, c.handover_s, run)


def task_ready(fixed: float, handover: float, sm_free: float, inputs_at: float | None) -> float:
    """When a task's waits are met: its SM is free and has fetched it (`fixed`), and the last of its
    inputs (written at `inputs_at`; None: it waits on nothing) has been seen (`handover`)."""
    t = sm_free + fixed
    return t if inputs_at is None else max(t, inputs_at + handover)


def eager_seconds(spec: GpuSpec, c: Cost, longest_task: float, collective: bool, graphs: bool) -> float:
    """One op launched on its own: whole-GPU rates, its longest task, the launch (and NCCL) overhead."""
    t = max(c.bytes / spec.hbm_bytes_per_s, c.flops / spec.bf16_flops, longest_task)
    if collective:
        t += spec.nccl_latency_s + c.comm_bytes / spec.nvlink_bytes_per_s
    return t + (spec.graph_launch_s if graphs else spec.launch_s)


def kv_read_bytes(n: Node, kc: Any, vc: Any, tokens: int, context: int) -> int:
    """KV cache bytes one sequence's attention reads at `context` (window-limited for sliding
    layers): caches [Hkv, max_seq, D], or [slots, Hkv, max_seq, D] for a mixed step (one slot's)."""
    keys = context + tokens
    if n.a.window:
        keys = min(keys, n.a.window + tokens)
    return keys * (kc.shape[-3] * kc.shape[-1] * kc.dtype.bits + vc.shape[-3] * vc.shape[-1] * vc.dtype.bits) // 8


def floor_bytes(g: Graph, context: int) -> int:
    """Bytes a step cannot avoid reading: each param once (experts: those expected to be routed to,
    embedding: the looked-up rows), the KV cache actually attended, the step's inputs."""
    total = sum(v.nbytes for v in g.by_role("input"))
    seen: set[str] = set()
    world = int(g.meta.get("world", 1))
    for n in g.nodes:
        ins = [g.values[x] for x in n.inputs]
        for v in ins:
            if v.role != "param" or v.name in seen:
                continue
            seen.add(v.name)
            if n.op == "embed":
                total += v.nbytes // v.shape[0] * ins[1].shape[0]
            elif "experts" in v.src():
                k = n.a.top_k if isinstance(n.a, MoeAttrs) else g.values[n.inputs[2]].shape[1]  # expert_matmul: idx
                T = ins[0].shape[0]
                touched = expected_experts(T, k, v.shape[0] * world) / world
                total += int(v.nbytes * min(1.0, touched / v.shape[0]))
            else:
                total += v.nbytes
        if n.op in ("attention", "attention_block"):
            kc, vc = ins[1:3] if n.op == "attention" else ins[3:5]
            T = ins[0].shape[0]
            if len(kc.shape) == 4:  # slotted caches, a mixed step: each row may be its own sequence
                total += T * kv_read_bytes(n, kc, vc, 1, context)
            else:
                total += kv_read_bytes(n, kc, vc, T, context)
    return total


def floor_seconds(spec: GpuSpec, g: Graph, context: int) -> float:
    return floor_bytes(g, context) / spec.hbm_bytes_per_s


def summary(spec: GpuSpec, makespan: float, eager: float, eager_graphs: float, floor: float) -> dict[str, Any]:
    return {
        "persistent_ms": (makespan + spec.graph_launch_s) * 1e3,
        "eager_ms": eager * 1e3,
        "eager_cuda_graph_ms": eager_graphs * 1e3,
        "floor_ms": floor * 1e3,
    }
