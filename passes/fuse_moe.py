"""fuse_moe: the whole MoE layer (router .. combine, + its all_reduce) -> fused_moe_<fmt>.

    logits = matmul(x, gate); scores = sigmoid(logits); idx = topk_select(add(scores, bias))
    wts = gather_weights(scores, idx); gu = expert_matmul*(x, W_gu, idx); a = silu_mul(gu)
    y = moe_combine(expert_matmul*(a, W_d, idx), wts, idx) [; all_reduce(y)]
 -> fused_moe_<fmt>(x, gate, bias, W_gu, W_d) {reduce = the all_reduce was taken}

Every intermediate must be private to the pattern. The tile pass splits the fused kind into
router, top-k, per-expert gate/up, down and reduce tasks (dependencies per expert slot group).
"""

from __future__ import annotations

from typing import Any

from tilert.ir.graph import Graph
from tilert.passes.rewrite import Rewriter, make_node

FORMAT = {"expert_matmul": "bf16", "expert_matmul_fp8": "fp8", "expert_matmul_mxfp4": "mxfp4"}


def _match(rw: Rewriter, ci: int) -> tuple[set[int], Any] | None:
    c = rw.g.nodes[ci]
    y, wts, idx = c.inputs
    down = rw.producer(y, FORMAT)
    act = down and rw.producer(down[1].inputs[0], "silu_mul")
    gu = act and len(act[1].inputs) == 1 and rw.producer(act[1].inputs[0], FORMAT)
    tk = rw.producer(idx, "topk_select")
    sel = tk and rw.producer(tk[1].inputs[0], "add")
    sg = sel and rw.producer(sel[1].inputs[0], "sigmoid")
    rm = sg and rw.producer(sg[1].inputs[0], "matmul")
    gw = rw.producer(wts, "gather_weights")
    if not (down and act and gu and tk and sel and sg and rm and gw) or down[1].op != gu[1].op:
        return None
    x = gu[1].inputs[0]
    if rm[1].inputs[0] != x or gw[1].inputs != (sg[1].outputs[0], idx) or down[1].inputs[2] != idx:
        return None
    nodes = {ci, down[0], act[0], gu[0], tk[0], sel[0], sg[0], rm[0], gw[0]}
    out, reduce = c.outputs[0], False
    ar = rw.sole_user(out)
    if ar is not None and rw.g.nodes[ar].op == "all_reduce":
        nodes.add(ar)
        out, reduce = rw.g.nodes[ar].outputs[0], True
    inner = [n for i in nodes for n in rw.g.nodes[i].outputs if n != out]
    if not all(rw.private(v, nodes) for v in inner):
        return None
    a = {
        **dict(tk[1].attrs),  # top_k, and the group limits where set
        "normalize": gw[1].a.normalize,
        "scaling": gw[1].a.scaling,
        "expert_offset": c.a.expert_offset,
        "n_local": c.a.n_local,
        "world": int(rw.g.meta.get("world", 1)),
        "reduce": reduce,
    }
    ins = (x, rm[1].inputs[1], sel[1].inputs[1], gu[1].inputs[1], down[1].inputs[1])
    return nodes, make_node(f"fused_moe_{FORMAT[down[1].op]}", ins, (out,), **a)


def fuse_moe(graph: Graph, ctx: Any = None) -> Graph:
    rw = Rewriter(graph)
    for i, n in enumerate(graph.nodes):
        if n.op == "moe_combine":
            m = _match(rw, i)
            if m is not None:
                rw.replace(m[0], m[1])
    return rw.finish()
