"""infer_shapes: re-run every op's inference; check shapes/dtypes and annotate shardings.

Shapes and dtypes must already match (a mismatch is a builder or pass bug: IRError naming the
node). Shardings are propagated with passes/sharding_rules.py: unannotated activations get the
propagated sharding, annotated ones must agree with it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from tilert.ir.graph import REPLICATED, Graph, IRError
from tilert.ir.registry import get_op
from tilert.passes.sharding_rules import propagate


def infer_shapes(graph: Graph, ctx: Any = None) -> Graph:
    out = graph.copy()
    vals = out.values
    for i, n in enumerate(out.nodes):
        ins = [vals[x] for x in n.inputs]
        where = f"node {i} ({n.op} -> %{n.outputs[0]})"
        try:
            inferred = get_op(n.op).infer(ins, n.a)
            shards = propagate(n, [v.sharding for v in ins], [len(v.shape) for v in ins])
        except IRError as e:
            raise IRError(f"{where}: {e}") from None
        for o, (shape, dt), sh in zip(n.outputs, inferred, shards):
            v = vals[o]
            if tuple(shape) != v.shape or dt != v.dtype:
                raise IRError(f"{where}: %{o} is {v.dtype.name}{list(v.shape)}, inference gives {dt.name}{list(shape)}")
            if v.sharding == REPLICATED and sh != REPLICATED:
                vals[o] = replace(v, sharding=sh)
            elif v.sharding != sh:
                raise IRError(f"{where}: %{o} is annotated {v.sharding}, propagation gives {sh}")
    return out
