"""fuse_lm_head: LM head GEMM + argmax (+ distributed argmax) (+ dflash_accept) -> one kind.

    logits = linear_*(x, W); next = argmax(logits)                       (one rank)
    logits = linear_*(x, W_shard); v, i = vocab_argmax(logits); next = argmax_reduce(v, i)
 -> lm_head_argmax(x, W) -> (logits, next)
 ... ; accept = dflash_accept(tokens, next)  ->  lm_head_accept(x, W, tokens) -> (logits, next, accept)

So DFlash acceptance runs inside the verify step (no host round trip). Logits stay an output of
the fused kind (vocabulary-local when sharded; the all_gather after it is untouched).
"""

from __future__ import annotations

from typing import Any

from tilert.ir.graph import Graph
from tilert.passes.rewrite import Rewriter, make_node

HEADS = ("linear_bf16", "linear_fp8", "linear_mxfp4")


def _match(rw: Rewriter, i: int) -> tuple[set[int], Any] | None:
    n = rw.g.nodes[i]
    world = int(rw.g.meta.get("world", 1))
    if n.op == "argmax":
        lm = rw.producer(n.inputs[0], HEADS)
        nodes, nxt, a = {i}, n.outputs[0], {}
    else:  # argmax_reduce
        va = rw.producer(n.inputs[0], "vocab_argmax")
        lm = va and rw.producer(va[1].inputs[0], HEADS)
        if not va or va[1].outputs[1] != n.inputs[1]:
            return None
        nodes, nxt, a = {i, va[0]}, n.outputs[0], {"vocab_offset": va[1].a.vocab_offset}
    if not lm or lm[1].a.norm_eps is not None or lm[1].a.residual:
        return None
    logits = lm[1].outputs[0]
    nodes.add(lm[0])
    vloc = rw.value(logits).shape[-1]
    a.update(world=world, vocab_size=int(rw.g.meta.get("vocab_size", world * vloc)), out_dtype="f32")
    ins, outs, kind = list(lm[1].inputs), [logits, nxt], "lm_head_argmax"
    acc = [j for j in rw.users(nxt) if rw.g.nodes[j].op == "dflash_accept" and rw.g.nodes[j].inputs[1] == nxt]
    if acc:
        nodes.add(acc[0])
        ins.append(rw.g.nodes[acc[0]].inputs[0])
        outs.append(rw.g.nodes[acc[0]].outputs[0])
        kind = "lm_head_accept"
    inner = [o for j in nodes for o in rw.g.nodes[j].outputs if o not in outs]
    if not all(rw.private(o, nodes) for o in inner):
        return None
    return nodes, make_node(kind, ins, outs, **a)


def fuse_lm_head(graph: Graph, ctx: Any = None) -> Graph:
    rw = Rewriter(graph)
    for i, n in enumerate(graph.nodes):
        if n.op in ("argmax", "argmax_reduce"):
            m = _match(rw, i)
            if m is not None:
                rw.replace(m[0], m[1], first=True)  # before the logits all_gather
    return rw.finish()
