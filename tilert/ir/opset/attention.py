"""Attention ops: partial RoPE, KV-cache append (in place) and masked attention with sinks."""

from __future__ import annotations

from tilert import ops
from tilert.ir.attrs import Attrs, attrs
from tilert.ir.dtypes import BF16, I32
from tilert.ir.registry import Cost, Placement, expect, op
from tilert.ir.value import Value


@attrs
class RopeAttrs(Attrs):
    heads: int
    head_dim: int
    rope_dim: int
    theta: float


@attrs
class AttentionAttrs(Attrs):
    heads: int
    kv_heads: int
    head_dim: int
    v_head_dim: int
    scale: float
    window: int = 0  # keys a query sees on its side, itself included; 0: all (tilert.ops.attention.visible)
    causal: bool = True
    has_sink: bool = False
    slotted: bool = False  # caches [slots, Hkv, S, D] and a last input slots i32[T]: each row reads its own slot


def _infer_rope(ins: list[Value], a: RopeAttrs) -> list:
    x, pos = ins
    expect(pos.dtype == I32 and pos.shape == (x.shape[0],), "rope: positions must be i32[T]")
    expect(x.shape[-1] == a.heads * a.head_dim, f"rope: width {x.shape[-1]} != heads*head_dim")
    expect(a.rope_dim <= a.head_dim and a.rope_dim % 2 == 0, "rope: rope_dim must be even, <= head_dim")
    return [(x.shape, x.dtype)]


@op("rope", attrs=RopeAttrs, infer=_infer_rope)
def rope(ctx, x, pos, *, heads, head_dim, rope_dim, theta):
    """NeoX rotary embedding on the first rope_dim dims of every head."""
    T = x.shape[0]
    return (ops.rope(x.view(T, heads, head_dim), pos, rope_dim, theta).reshape(T, -1),)


def _check_slots(kc: Value, pos: Value, slots: Value | None, what: str) -> None:
    """A [slots, Hkv, S, D] cache comes with a slots i32[T] input (one per row); a [Hkv, S, D] one without."""
    if len(kc.shape) == 4:
        expect(
            slots is not None and slots.dtype == I32 and slots.shape == pos.shape,
            f"{what}: slotted caches {list(kc.shape)} need a slots i32[{pos.shape[0]}] input",
        )
    else:
        expect(slots is None, f"{what}: a slots input needs slotted caches [slots, Hkv, S, D]")


def _infer_kv_append(ins: list[Value], a: Attrs) -> list:
    kc, vc, k, v, pos = ins[:5]
    expect(len(ins) <= 6, "kv_append takes k_cache, v_cache, k, v, positions[, slots]")
    expect(
        len(kc.shape) in (3, 4) and len(vc.shape) == len(kc.shape) and kc.shape[:-1] == vc.shape[:-1],
        "kv caches must be [Hkv,S,D] (or [slots,Hkv,S,D])",
    )
    _check_slots(kc, pos, ins[5] if len(ins) == 6 else None, "kv_append")
    expect(
        k.shape == (pos.shape[0], kc.shape[-3] * kc.shape[-1]),
        f"kv_append: k {list(k.shape)} vs cache {list(kc.shape)}",
    )
    expect(
        v.shape == (pos.shape[0], vc.shape[-3] * vc.shape[-1]),
        f"kv_append: v {list(v.shape)} vs cache {list(vc.shape)}",
    )
    return [(kc.shape, kc.dtype), (vc.shape, vc.dtype)]


def _kv_append_cost(ins: list[Value], outs: list[Value], a: Attrs, at: Placement) -> Cost:
    return Cost(ins[2].nbytes + ins[3].nbytes + ins[4].nbytes, ins[2].nbytes + ins[3].nbytes)


@op("kv_append", infer=_infer_kv_append, cost=_kv_append_cost, mutates=(0, 1))
def kv_append(ctx, k_cache, v_cache, k, v, pos, slots=None):
    """Write the new tokens' keys/values into the cache at their positions (in place); with slotted
    caches, each row into its own slot's cache."""
    T, Hkv = k.shape[0], k_cache.shape[-3]
    if slots is None:
        ops.kv_append(k_cache, v_cache, k.view(T, Hkv, -1), v.view(T, Hkv, -1), pos)
    else:
        ops.kv_append_slots(k_cache, v_cache, k.view(T, Hkv, -1), v.view(T, Hkv, -1), pos, slots)
    return (k_cache, v_cache)


def attention_infer(ins: list[Value], a: AttentionAttrs) -> list:
    q, kc, vc, pos = ins[:4]
    H, Hkv, D, Dv = a.heads, a.kv_heads, a.head_dim, a.v_head_dim
    expect(q.shape == (pos.shape[0], H * D), f"attention: q {list(q.shape)} != [T, {H}*{D}]")
    expect(
        kc.shape[-3] == Hkv and kc.shape[-1] == D and vc.shape[-3] == Hkv and vc.shape[-1] == Dv,
        f"attention: caches {list(kc.shape)}/{list(vc.shape)} do not match kv_heads={Hkv}, dims {D}/{Dv}",
    )
    expect(H % Hkv == 0, "attention: heads must be a multiple of kv_heads")
    expect(len(kc.shape) == 3 + int(a.slotted), f"attention: slotted={a.slotted} with caches {list(kc.shape)}")
    n = 4 + int(a.has_sink) + int(a.slotted)
    expect(len(ins) == n, f"attention: {len(ins)} inputs, expected {n} (sink {a.has_sink}, slotted {a.slotted})")
    if a.has_sink:
        expect(ins[4].shape == (H,), "attention: sink needs an f32[heads] input")
    _check_slots(kc, pos, ins[-1] if a.slotted else None, "attention")
    return [((pos.shape[0], H * Dv), BF16)]


def attention_cost(ins: list[Value], outs: list[Value], a: AttentionAttrs, at: Placement) -> Cost:
    """KV bytes read at the planning context; window-limited for SWA layers. A slotted (mixed) step is
    costed as T sequences of one row each, every row reading its own context."""
    q, kc, vc = ins[:3]
    T = q.shape[0]
    rows, seqs = (1, T) if a.slotted else (T, 1)
    n = at.context + rows
    if a.window:
        n = min(n, a.window + rows)
    per_tok = (kc.shape[-3] * kc.shape[-1] + vc.shape[-3] * vc.shape[-1]) * 2
    flops = 2 * T * a.heads * n * (a.head_dim + a.v_head_dim)
    return Cost(q.nbytes + seqs * n * per_tok, outs[0].nbytes, flops)


@op("attention", attrs=AttentionAttrs, infer=attention_infer, cost=attention_cost)
def attention(ctx, q, k_cache, v_cache, pos, *extra, heads, kv_heads, head_dim, v_head_dim, scale, window, causal,
              has_sink, slotted):  # fmt: skip
    """Masked attention of T queries over the cache: causal block mask or bidirectional (drafter),
    `window` = keys a query sees on its side, itself included (tilert.ops.attention.visible), sink logit;
    slotted: each row over its own slot's cache (extra ends with slots)."""
    T = q.shape[0]
    sink = extra[0] if has_sink else None
    if slotted:
        o = ops.attention_slots(q.view(T, heads, head_dim), k_cache, v_cache, pos, extra[-1], scale=scale,
                                window=window, sink=sink, causal=causal)  # fmt: skip
        return (o.reshape(T, heads * v_head_dim),)
    kv_len = pos.max() + 1 if pos.is_cuda else int(pos.max()) + 1  # a device tensor: no host sync
    o = ops.attention(
        q.view(T, heads, head_dim), k_cache, v_cache, pos, kv_len, scale=scale, window=window, sink=sink, causal=causal
    )
    return (o.reshape(T, heads * v_head_dim),)
