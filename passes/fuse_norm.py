"""fuse_norm: RMSNorm -> the prologue of the GEMMs that read it.

Applies only when every reader of the normalised value is a GEMM-like fused kind taking it as
its x input (linear_*, fused_moe_*, lm_head_*); each then normalises its input rows in the
prologue (a [B, H] row is tiny next to the weight tile it multiplies), and the norm op and its
output buffer disappear. The norm weight is appended after the kind's core inputs.
"""

from __future__ import annotations

from typing import Any

from tilert.ir.graph import Graph, Node, freeze_attrs
from tilert.passes.rewrite import Rewriter

CORE_INPUTS = {
    "linear_bf16": 2,
    "linear_fp8": 2,
    "linear_mxfp4": 2,
    "lm_head_argmax": 2,
    "lm_head_accept": 3,
    **{f"fused_moe_{f}": 5 for f in ("bf16", "fp8", "mxfp4")},
}


def _can_take(n: Node, h: str) -> bool:
    return (
        n.op in CORE_INPUTS
        and n.inputs[0] == h
        and h not in n.inputs[1:]
        and n.a.norm_eps is None
        and (n.op.startswith("lm_head_") or not n.a.residual)  # the LM head has no residual epilogue
    )


def fuse_norm(graph: Graph, ctx: Any = None) -> Graph:
    rw = Rewriter(graph)
    for i, n in enumerate(graph.nodes):
        if n.op != "rms_norm":
            continue
        h = n.outputs[0]
        users = rw.users(h)
        if not users or h in rw.outputs or not all(_can_take(graph.nodes[j], h) for j in users):
            continue
        if any(rw.taken(j) for j in users):
            continue
        x, w = n.inputs
        rw.replace([i])
        for j in users:
            u = graph.nodes[j]
            k = CORE_INPUTS[u.op]
            ins = (x, *u.inputs[1:k], w, *u.inputs[k:])
            rw.replace([j], Node(u.op, ins, u.outputs, freeze_attrs({**dict(u.attrs), "norm_eps": n.a.eps})))
    return rw.finish()
