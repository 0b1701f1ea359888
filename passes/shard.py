"""shard: one graph -> N rank graphs with the same op sequence (SPMD, DESIGN §4).

Attention is split by heads (o_proj row-parallel -> partial -> all_reduce), the dense MLP
column/row-parallel, experts expert-parallel (moe_combine gives a partial sum -> all_reduce),
the LM head by vocabulary rows (distributed argmax, logits all-gathered where they are an
output). Split decisions live in shard_plan.py; this file builds each rank's graph: local
shapes by re-inference, per-rank attrs (expert_offset, vocab_offset, local head counts),
param `source` slices, Sharding annotations, and the collectives the sharding rules ask for.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from tilert.ir.graph import Graph, IRError, Node, Sharding, Value, freeze_attrs
from tilert.ir.registry import get_op
from tilert.passes.shard_plan import ShardError, Split, plan_splits
from tilert.passes.sharding_rules import ACCEPTS_PARTIAL, EXPERT_KINDS, propagate

__all__ = ["ShardError", "shard", "shard_for_ranks"]


def _local_param(v: Value, split: Split | None, r: int) -> Value:
    if split is None:
        return v
    start, stop = split.ranges[r]
    shape = list(v.shape)
    shape[split.dim] = stop - start
    src = v.src()
    if split.experts:
        src["expert_range"] = (start, stop)
    elif v.role == "param":
        src["slice"] = (split.dim, start, stop)
    return replace(v, shape=tuple(shape), sharding=Sharding("S", split.dim), source=freeze_attrs(src))


def _local_attrs(n: Node, ins: list[Value], a: dict[str, Any], splits: dict[str, Split], r: int, N: int) -> dict:
    if n.op == "rope":
        a["heads"] = ins[0].shape[-1] // n.a.head_dim
    elif n.op == "head_rms_norm":
        a["heads"] = ins[0].shape[-1] // ins[1].shape[0]
    elif n.op == "attention":
        a["heads"] = ins[0].shape[-1] // n.a.head_dim
        a["kv_heads"] = ins[1].shape[-3]  # [Hkv, S, D] or slotted [slots, Hkv, S, D]
    elif n.op in EXPERT_KINDS or n.op == "moe_combine":
        sp = next((s for s in splits.values() if s.experts), None)  # every expert stack splits alike
        if sp is not None:
            a["expert_offset"] = sp.ranges[r][0]
            if n.op == "moe_combine":
                a["n_local"] = sp.ranges[r][1] - sp.ranges[r][0]
    return a


class _RankBuilder:
    def __init__(self, g: Graph, splits: dict[str, Split], r: int, N: int) -> None:
        self.src, self.splits, self.r, self.N = g, splits, r, N
        meta = {**g.meta, "rank": r, "world": N}
        heads = [n for n in g.nodes if n.op == "argmax"]
        if heads:  # the true vocabulary size, before the vocab-parallel padding
            meta["vocab_size"] = g.values[heads[0].inputs[0]].shape[-1]
        self.g = Graph(f"{g.name}.r{r}" if N > 1 else g.name, meta=meta, outputs=list(g.outputs))
        self.rename: dict[str, str] = {}
        self.reduced: dict[str, str] = {}
        self.outs = set(g.outputs)

    def emit(self, op: str, inputs: list[str], outputs: list[str], attrs: dict[str, Any]) -> list[str]:
        """Append a node with inferred local shapes and propagated shardings; graph outputs that
        come out split or partial get a '.local' name and a collective that restores them."""
        ins = [self.g.values[x] for x in inputs]
        shapes = get_op(op).infer(ins, get_op(op).attrs.parse(attrs))
        probe = Node(op, tuple(inputs), tuple(outputs), freeze_attrs(attrs))
        shards = propagate(probe, [v.sharding for v in ins], [len(v.shape) for v in ins])
        local = [f"{o}.local" if o in self.outs and sh.kind != "R" else o for o, sh in zip(outputs, shards)]
        for o, (shape, dt), sh in zip(local, shapes, shards):
            self.g.add_value(Value(o, tuple(shape), dt, "act", sh))
        self.g.nodes.append(Node(op, tuple(inputs), tuple(local), freeze_attrs(attrs)))
        for o, lo in zip(outputs, local):
            if o != lo:
                self.rename[o] = lo
                self.finish_output(o, lo)
        return local

    def replicated(self, x: str) -> str:
        """x as a replicated value: all-reduce partial sums once (later readers reuse it)."""
        if self.g.values[x].sharding.kind != "P":
            return x
        if x not in self.reduced:
            self.reduced[x] = self.emit("all_reduce", [x], [f"{x}.sum"], {})[0]
        return self.reduced[x]

    def build(self) -> Graph:
        for v in self.src.values.values():
            if v.role != "act":
                self.g.add_value(_local_param(v, self.splits.get(v.name), self.r))
        for n in self.src.nodes:
            ins = [self.rename.get(x, x) for x in n.inputs]
            if n.op == "argmax" and self.g.values[ins[0]].sharding.kind == "S":
                self.distributed_argmax(n, ins[0])
                continue
            if n.op not in ACCEPTS_PARTIAL:
                ins = [self.replicated(x) for x in ins]
            vals = [self.g.values[x] for x in ins]
            self.emit(n.op, ins, list(n.outputs), _local_attrs(n, vals, dict(n.attrs), self.splits, self.r, self.N))
        return self.g.verify()

    def distributed_argmax(self, n: Node, logits: str) -> None:
        vloc = self.g.values[logits].shape[-1]
        V = self.src.values[n.inputs[0]].shape[-1]
        off = self.r * vloc
        base = n.outputs[0]
        val, idx = self.emit("vocab_argmax", [logits], [f"{base}.val", f"{base}.idx"],
                             {"vocab_offset": off, "vocab_valid": min(vloc, V - off)})  # fmt: skip
        self.emit("argmax_reduce", [val, idx], [base], {})

    def finish_output(self, name: str, local: str) -> None:
        """Make graph output `name` replicated again: all_reduce a partial, all_gather a split."""
        v = self.g.values[local]
        if v.sharding.kind == "P":
            self.emit("all_reduce", [local], [name], {})
        else:
            want = self.src.values[name].shape
            dim = v.sharding.dim
            full = want[dim] != v.shape[dim] * self.N
            gathered = f"{name}.gathered" if full else name
            self.emit("all_gather", [local], [gathered], {"dim": dim, "world": self.N})
            if full:
                self.emit("narrow", [gathered], [name], {"dim": dim, "start": 0, "length": want[dim]})


def shard_for_ranks(graph: Graph, world: int) -> list[Graph]:
    """The N rank graphs of `graph` (the graph itself, annotated, when world == 1)."""
    if world < 1:
        raise ShardError(f"world size must be >= 1, got {world}")
    if world == 1:
        return [graph]
    if graph.meta.get("world", 1) != 1:
        raise IRError(f"graph '{graph.name}' is already sharded")
    splits = plan_splits(graph, world)
    return [_RankBuilder(graph, splits, r, world).build() for r in range(world)]


def shard(graph: Graph, ctx: Any) -> list[Graph]:
    """Pass entry: split the step graph over ctx.world ranks."""
    return shard_for_ranks(graph, ctx.world)
