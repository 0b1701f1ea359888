"""fuse_residual: a residual `add` -> the epilogue of the op producing its other operand.

    add(x, linear_*(h, W))        -> linear_*(h, W, x) {residual}
    add(x, fused_moe_*(...))      -> fused_moe_*(..., x) {residual}   (after its all-reduce)
    add(x, all_reduce(p))         -> all_reduce_residual(p, x)        (row-parallel o_proj / down)

The produced operand must have the add as its only reader. The fused op writes the add's output
value, so the sum never round-trips through memory as a separate pass.
"""

from __future__ import annotations

from typing import Any

from tilert.ir.graph import Graph, Node, freeze_attrs
from tilert.passes.rewrite import Rewriter

EPILOGUE = ("linear_bf16", "linear_fp8", "linear_mxfp4", "fused_moe_bf16", "fused_moe_fp8", "fused_moe_mxfp4")


def _fused(p: Node, res: str, out: str, world: int) -> Node | None:
    if p.op == "all_reduce":
        return Node("all_reduce_residual", (p.inputs[0], res), (out,), freeze_attrs({"world": world}))
    if p.op in EPILOGUE and not p.a.residual:
        return Node(p.op, (*p.inputs, res), (out, *p.outputs[1:]), freeze_attrs({**dict(p.attrs), "residual": True}))
    return None


def fuse_residual(graph: Graph, ctx: Any = None) -> Graph:
    rw = Rewriter(graph)
    for i, n in enumerate(graph.nodes):
        if n.op != "add" or rw.value(n.inputs[0]).shape != rw.value(n.inputs[1]).shape:
            continue
        for y, res in ((n.inputs[1], n.inputs[0]), (n.inputs[0], n.inputs[1])):
            p = rw.producer(y)
            if p is None or rw.sole_user(y) != i or rw.taken(p[0]) or y == res:
                continue
            node = _fused(p[1], res, n.outputs[0], int(graph.meta.get("world", 1)))
            if node is not None and rw.replace([p[0], i], node):
                break
    return rw.finish()
