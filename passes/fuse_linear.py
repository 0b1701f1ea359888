"""fuse_linear: dequant + GEMM -> one linear kind per weight format, so no dequant survives.

matmul(x, dequant(W)) -> linear_fp8 / linear_mxfp4 (x, W); matmul(x, W bf16 param) ->
linear_bf16; expert_matmul(x, dequant(W), idx) -> expert_matmul_fp8 / _mxfp4. The weight is
dequantised tile by tile in registers by the kernel; it never exists in bf16 in memory. GEMMs on
f32 params (the MoE router) stay matmul: fuse_moe takes them.
"""

from __future__ import annotations

from typing import Any

from tilert.ir.graph import Graph, IRError, Node
from tilert.passes.rewrite import Rewriter

LINEAR = {"bf16": "linear_bf16", "fp8_e4m3b": "linear_fp8", "mxfp4": "linear_mxfp4"}
EXPERT = {"fp8_e4m3b": "expert_matmul_fp8", "mxfp4": "expert_matmul_mxfp4"}


def fuse_linear(graph: Graph, ctx: Any = None) -> Graph:
    rw = Rewriter(graph)
    for i, n in enumerate(graph.nodes):
        if n.op not in ("matmul", "expert_matmul"):
            continue
        p = rw.producer(n.inputs[1], "dequant")
        w = p[1].inputs[0] if p else n.inputs[1]
        wv = rw.value(w)
        if wv.role != "param":
            continue
        kind = (LINEAR if n.op == "matmul" else EXPERT).get(wv.dtype.name)
        if kind is None:
            continue
        rw.replace([i], Node(kind, (n.inputs[0], w, *n.inputs[2:]), n.outputs, n.attrs))
    for i, n in enumerate(graph.nodes):
        if n.op == "dequant":
            if not all(rw.taken(j) for j in rw.users(n.outputs[0])):
                raise IRError(f"fuse_linear: dequant '%{n.outputs[0]}' feeds a GEMM no fused kind covers")
            rw.replace([i])
    return rw.finish()
