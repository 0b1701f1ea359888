"""fuse_attention: [head norm] + rope(q), rope(k) + [scale(v)] + kv_append + attention -> attention_block;
a kv_append left over (a drafter's context rows) with [head norm] + rope(k) + [scale(v)] -> rope_kv_append.

One kind for B query tokens (B=1 decode, B=block DFlash verify: the causal block mask; drafter
layers: bidirectional or causal, per layer, with the block's v scale fused as `v_scale`; the
drafter's context rows keep their own append before it, fused as rope_kv_append): the kernel ropes
the new q/k in registers, writes the new k/v into the cache at their positions and runs split-KV attention over it, so
there is no separate launch or round trip for the rope and the cache update.
"""

from __future__ import annotations

from typing import Any

from tilert.ir.graph import Graph, Node
from tilert.passes.rewrite import Rewriter, make_node


def _roped(rw: Rewriter, v: str) -> tuple[list[int], str, Any, Any] | None:
    """rope([head_rms_norm](x)) -> (node ids, x, rope node, norm node or None)."""
    r = rw.producer(v, "rope")
    if r is None:
        return None
    hn = rw.producer(r[1].inputs[0], "head_rms_norm")
    if hn is None:
        return [r[0]], r[1].inputs[0], r[1], None
    return [r[0], hn[0]], hn[1].inputs[0], r[1], hn[1]


def _rope(n: Node) -> tuple:
    return n.a.rope_dim, n.a.theta, n.a.head_dim


def _match(rw: Rewriter, ai: int) -> tuple[set[int], Any] | None:
    at = rw.g.nodes[ai]
    q, kc, vc, pos = at.inputs[:4]
    kv = rw.producer(kc, "kv_append")
    rq = _roped(rw, q)
    if kv is None or rq is None or kv[1].outputs != (kc, vc):
        return None
    kc0, vc0, k, v, kpos = kv[1].inputs[:5]
    if kv[1].inputs[5:] != (at.inputs[-1:] if at.a.slotted else ()):  # the same slots, or none
        return None
    rk = _roped(rw, k)
    if rk is None or len({pos, kpos, rq[2].inputs[1], rk[2].inputs[1]}) != 1:
        return None
    if (rq[3] is None) != (rk[3] is None) or _rope(rq[2]) != _rope(rk[2]):
        return None
    sc = rw.producer(v, "scale")
    nodes = {ai, kv[0], *rq[0], *rk[0], *([sc[0]] if sc else [])}
    inner = [o for i in nodes for o in rw.g.nodes[i].outputs if i != ai and i != kv[0]]
    if not all(rw.private(x, nodes) for x in inner) or not all(rw.private(x, {ai}) for x in (kc, vc)):
        return None
    extra = list(at.inputs[4 : 4 + int(at.a.has_sink)])
    eps = None
    if rq[3] is not None:
        if rq[3].a.eps != rk[3].a.eps:
            return None
        extra += [rq[3].inputs[1], rk[3].inputs[1]]
        eps = rq[3].a.eps
    extra += list(at.inputs[-1:]) if at.a.slotted else []  # slots last
    ins = (rq[1], rk[1], sc[1].inputs[0] if sc else v, kc0, vc0, pos, *extra)
    a = {**dict(at.attrs), "rope_dim": rq[2].a.rope_dim, "theta": rq[2].a.theta}
    a.update(v_scale=sc[1].a.factor if sc else None, qk_norm_eps=eps)
    return nodes, make_node("attention_block", ins, (at.outputs[0], kc, vc), **a)


def _match_append(rw: Rewriter, ai: int) -> tuple[set[int], Any] | None:
    """kv_append(rope([head_rms_norm](k)), [scale](v)) with no attention after it -> rope_kv_append."""
    kv = rw.g.nodes[ai]
    kc0, vc0, k, v, pos = kv.inputs[:5]
    rk = _roped(rw, k)
    if len(kv.inputs) != 5 or rk is None or rk[2].inputs[1] != pos:
        return None
    sc = rw.producer(v, "scale")
    nodes = {ai, *rk[0], *([sc[0]] if sc else [])}
    if not all(rw.private(o, nodes) for i in nodes - {ai} for o in rw.g.nodes[i].outputs):
        return None
    r, hn = rk[2], rk[3]
    ins = (kc0, vc0, rk[1], sc[1].inputs[0] if sc else v, pos, *([hn.inputs[1]] if hn else []))
    a = dict(heads=r.a.heads, head_dim=r.a.head_dim, rope_dim=r.a.rope_dim, theta=r.a.theta,
             v_scale=sc[1].a.factor if sc else None, norm_eps=hn.a.eps if hn else None)  # fmt: skip
    return nodes, make_node("rope_kv_append", ins, kv.outputs, **a)


def fuse_attention(graph: Graph, ctx: Any = None) -> Graph:
    rw = Rewriter(graph)
    for i, n in enumerate(graph.nodes):
        if n.op == "attention":
            m = _match(rw, i)
            if m is not None:
                rw.replace(m[0], m[1])
    for i, n in enumerate(graph.nodes):  # appends no attention took: a drafter's context rows
        if n.op == "kv_append" and not rw.taken(i):
            m = _match_append(rw, i)
            if m is not None:
                rw.replace(m[0], m[1])
    return rw.finish()
