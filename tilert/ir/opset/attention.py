"""Attention ops: partial RoPE, KV-cache append (in place) and masked attention with sinks."""

from __future__ import annotations

from tilert import ops
from tilert.ir.dtypes import BF16, I32
from tilert.ir.graph import Value
from tilert.ir.registry import Cost, expect, op


def _infer_rope(ins: list[Value], a: dict) -> list:
    x, pos = ins
    expect(pos.dtype == I32 and pos.shape == (x.shape[0],), "rope: positions must be i32[T]")
    expect(x.shape[-1] == a["heads"] * a["head_dim"], f"rope: width {x.shape[-1]} != heads*head_dim")
    expect(a["rope_dim"] <= a["head_dim"] and a["rope_dim"] % 2 == 0, "rope: rope_dim must be even, <= head_dim")
    return [(x.shape, x.dtype)]


@op("rope", infer=_infer_rope)
def rope(ctx, x, pos, *, heads, head_dim, rope_dim, theta):
    """NeoX rotary embedding on the first rope_dim dims of every head."""
    T = x.shape[0]
    return (ops.rope(x.view(T, heads, head_dim), pos, rope_dim, theta).reshape(T, -1),)


def _infer_kv_append(ins: list[Value], a: dict) -> list:
    kc, vc, k, v, pos = ins
    expect(
        len(kc.shape) == 3 and len(vc.shape) == 3 and kc.shape[:2] == vc.shape[:2],
        "kv caches must be [Hkv,S,D]",
    )
    expect(
        k.shape == (pos.shape[0], kc.shape[0] * kc.shape[2]),
        f"kv_append: k {list(k.shape)} vs cache {list(kc.shape)}",
    )
    expect(
        v.shape == (pos.shape[0], vc.shape[0] * vc.shape[2]),
        f"kv_append: v {list(v.shape)} vs cache {list(vc.shape)}",
    )
    return [(kc.shape, kc.dtype), (vc.shape, vc.dtype)]


def _kv_append_cost(ins: list[Value], outs: list[Value], a: dict) -> Cost:
    return Cost(ins[2].nbytes + ins[3].nbytes + ins[4].nbytes, ins[2].nbytes + ins[3].nbytes)


@op("kv_append", infer=_infer_kv_append, cost=_kv_append_cost, mutates=(0, 1))
def kv_append(ctx, k_cache, v_cache, k, v, pos):
    """Write the new tokens' keys/values into the cache at their positions (in place)."""
    T, Hkv = k.shape[0], k_cache.shape[0]
    ops.kv_append(k_cache, v_cache, k.view(T, Hkv, -1), v.view(T, Hkv, -1), pos)
    return (k_cache, v_cache)


def attention_infer(ins: list[Value], a: dict) -> list:
    q, kc, vc, pos = ins[:4]
    H, Hkv, D, Dv = a["heads"], a["kv_heads"], a["head_dim"], a["v_head_dim"]
    expect(q.shape == (pos.shape[0], H * D), f"attention: q {list(q.shape)} != [T, {H}*{D}]")
    expect(
        kc.shape[0] == Hkv and kc.shape[2] == D and vc.shape[0] == Hkv and vc.shape[2] == Dv,
        f"attention: caches {list(kc.shape)}/{list(vc.shape)} do not match kv_heads={Hkv}, dims {D}/{Dv}",
    )
    expect(H % Hkv == 0, "attention: heads must be a multiple of kv_heads")
    if a.get("has_sink"):
        expect(len(ins) == 5 and ins[4].shape == (H,), "attention: sink needs an f32[heads] input")
    return [((pos.shape[0], H * Dv), BF16)]


def attention_cost(ins: list[Value], outs: list[Value], a: dict) -> Cost:
    """KV bytes read at the planning context (meta 'context_len'); window-limited for SWA layers."""
    q, kc, vc = ins[:3]
    T = q.shape[0]
    n = int(a.get("context_len", 4096)) + T
    if a.get("window"):
        n = min(n, a["window"] + T)
    per_tok = (kc.shape[0] * kc.shape[2] + vc.shape[0] * vc.shape[2]) * 2
    flops = 2 * T * a["heads"] * n * (a["head_dim"] + a["v_head_dim"])
    return Cost(q.nbytes + n * per_tok, outs[0].nbytes, flops)


@op("attention", infer=attention_infer, cost=attention_cost)
def attention(
    ctx,
    q,
    k_cache,
    v_cache,
    pos,
    sink=None,
    *,
    heads,
    kv_heads,
    head_dim,
    v_head_dim,
    scale,
    window=0,
    causal=True,
    has_sink=False,
):
    """Masked attention of T queries over the cache: causal block mask or bidirectional (drafter),
    `window` = keys a query sees on its side, itself included (tilert.ops.attention.visible), sink logit."""
    T = q.shape[0]
    kv_len = pos.max() + 1 if pos.is_cuda else int(pos.max()) + 1  # a device tensor: no host sync
    o = ops.attention(
        q.view(T, heads, head_dim), k_cache, v_cache, pos, kv_len, scale=scale, window=window, sink=sink, causal=causal
    )
    return (o.reshape(T, heads * v_head_dim),)
