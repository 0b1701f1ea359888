"""plan_memory: activation buffers with reuse, and the bytes each rank needs.

Activations share a buffer when the persistent kernel cannot overlap their lives: value B may
take A's buffer only if A's producer and every reader of A are surely complete before any task
of B's producer starts (`Schedule.done_before`: producers B's tasks wait on completely, and
their ancestors). Best fit among the free buffers, else a new one. Outputs that update state
in place (KV caches) alias the state and take no buffer; graph outputs are never reused.

Bytes per rank = weights (params) + KV caches (state, at the plan's max_seq) + activation
buffers + counters + the task table. A graph that does not fit the GPU raises PlanDoesNotFit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tilert.gpu_specs import GIB, GpuSpec
from tilert.ir.graph import Graph
from tilert.ir.registry import get_op

ALIGN = 256


class PlanDoesNotFit(ValueError):
    """A plan whose per-rank memory exceeds the GPU's; the message gives the figures."""


@dataclass
class MemoryPlan:
    buffers: dict[str, tuple[int, int]] = field(default_factory=dict)  # value -> (offset, nbytes)
    weights: int = 0
    kv_cache: int = 0
    activations: int = 0
    counters: int = 0
    task_table: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.counters + self.task_table

    def as_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in ("weights", "kv_cache", "activations", "counters", "task_table", "total")}


def _aliases(g: Graph) -> set[str]:
    out = set()
    for n in g.nodes:
        m = len(get_op(n.op).mutates)
        if m:
            out.update(n.outputs[-m:])
    return out


def plan_buffers(g: Graph, done_before: list[int]) -> tuple[dict[str, tuple[int, int]], int]:
    readers: dict[str, int] = {}
    for i, n in enumerate(g.nodes):
        for x in n.inputs:
            readers[x] = readers.get(x, 0) | (1 << i)
    alias, outs = _aliases(g), set(g.outputs)
    bufs: list[list[int]] = []  # [size, offset, busy mask (producer + readers), pinned]
    where: dict[str, tuple[int, int]] = {}
    top = 0
    for j, n in enumerate(g.nodes):
        for o in n.outputs:
            if o in alias:
                continue
            need = -(-g.values[o].nbytes // ALIGN) * ALIGN
            ok = [b for b in bufs if not b[3] and b[0] >= need and b[2] & ~done_before[j] == 0]
            if ok:
                b = min(ok, key=lambda b: b[0])
            else:
                b = [need, top, 0, 0]
                top += need
                bufs.append(b)
            b[2] = readers.get(o, 0) | (1 << j)
            b[3] = int(o in outs)
            where[o] = (b[1], need)
    return where, top


def check_fits(spec: GpuSpec, what: str, mem: dict[str, int]) -> None:
    if mem["total"] > spec.memory_bytes:
        big = [(k, v) for k, v in mem.items() if k != "total" and v >= GIB / 20]
        parts = ", ".join(f"{k.replace('_', ' ')} {v / GIB:.1f} GiB" for k, v in big)
        raise PlanDoesNotFit(
            f"{what} needs {mem['total'] / GIB:.1f} GiB per GPU ({parts}) but a {spec.name} has "
            f"{spec.memory_bytes / GIB:.0f} GiB usable; use more GPUs or a smaller --max-seq"
        )


def plan_memory(graph: Graph, ctx: Any) -> Graph:
    """Pass entry: ctx.results['plan_memory'][rank] = MemoryPlan; raises PlanDoesNotFit."""
    rank = int(graph.meta.get("rank", 0))
    sched = ctx.results["schedule"][rank]
    key = ("plan_memory", id(sched))
    if key not in ctx.cache:
        ctx.cache[key] = plan_buffers(graph, sched.done_before)
    where, top = ctx.cache[key]
    mp = MemoryPlan(
        buffers=where,
        weights=sum(v.nbytes for v in graph.by_role("param")),
        kv_cache=sum(v.nbytes for v in graph.by_role("state")),
        activations=top,
        counters=4 * len(sched.counter_expected),
        task_table=sched.table.nbytes,
    )
    check_fits(ctx.gpu, f"{graph.meta.get('model', graph.name)} on {graph.meta.get('world', 1)} GPU(s)", mp.as_dict())
    ctx.put("plan_memory", graph, mp)
    return graph
