"""Fused op kinds produced by the fusion passes; each reference composes the unfused ones.

No new math lives here: every reference calls `get_op(kind).reference` of the kinds it replaced,
in the order the unfused graph ran them, so the reference executor can check each fusion.

Optional prologue/epilogue inputs follow the core inputs in a fixed order: the RMSNorm weight
(when attr `norm_eps` is set: the GEMM normalises its input rows first), then the residual
(when attr `residual` is true: the epilogue adds it to the output).

Fused kinds that contain a collective (the MoE all-reduce, the distributed argmax) recompute
each peer's partial from the peers' inputs (`ctx.peers`), because a reference only sees node
inputs; the collective's own reference then combines them, exactly as the unfused graph did.
"""

from __future__ import annotations

from typing import Any

from tilert.ir.attrs import Attrs, attrs
from tilert.ir.dtypes import F32, I32, DType, dtype
from tilert.ir.opset.attention import AttentionAttrs, RopeAttrs
from tilert.ir.opset.basic import MatmulAttrs, matmul_cost, matmul_infer
from tilert.ir.opset.moe import ExpertAttrs, expected_experts, expert_cost
from tilert.ir.registry import Cost, Placement, expect, get_op, io_cost, op, ref
from tilert.ir.value import Value
from tilert.ops.qtensor import QTensor


class PeerValues:
    """A stand-in RankContext whose peers(i) are precomputed per-rank values (for collectives)."""

    def __init__(self, rank: int, world: int, *per_input: list[Any]) -> None:
        self.rank, self.world, self._vals = rank, world, per_input

    def peers(self, i: int) -> list[Any]:
        return list(self._vals[i])


def _peer_inputs(ctx: Any, idx: list[int], local: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """Every rank's copy of the node inputs at positions idx (just the local ones on one rank)."""
    world = getattr(ctx, "world", 1)
    if world == 1:
        return [local]
    cols = [ctx.peers(i) for i in idx]
    return [tuple(c[r] for c in cols) for r in range(world)]


@attrs
class LinearAttrs(MatmulAttrs):
    norm_eps: float | None = None  # RMSNorm prologue
    residual: bool = False  # residual epilogue


@attrs
class QuantExpertAttrs(ExpertAttrs):
    world: int = 1


@attrs
class MoeAttrs(Attrs):
    top_k: int
    n_group: int = 1
    topk_group: int = 1
    normalize: bool = True
    scaling: float = 1.0
    expert_offset: int = 0  # global id of this rank's first expert
    n_local: int  # experts of this rank
    world: int = 1
    reduce: bool = False  # all-reduce the ranks' partial sums (expert parallelism)
    norm_eps: float | None = None  # RMSNorm prologue
    residual: bool = False  # residual epilogue


@attrs
class AttentionBlockAttrs(AttentionAttrs):
    rope_dim: int
    theta: float
    v_scale: float | None = None  # the new values are scaled before the cache append
    qk_norm_eps: float | None = None  # per-head RMSNorm of q and k (the drafter's)


@attrs
class RopeKvAppendAttrs(RopeAttrs):
    v_scale: float | None = None  # the values are scaled before the cache append
    norm_eps: float | None = None  # per-head RMSNorm of k first (the drafter's k_norm)


@attrs
class LmHeadAttrs(Attrs):
    world: int = 1
    vocab_size: int  # the true vocabulary (the rank slices may be padded)
    vocab_offset: int = 0  # this rank's first token id
    norm_eps: float | None = None  # the final RMSNorm as a prologue
    out_dtype: str = "f32"


@attrs
class WorldAttrs(Attrs):
    world: int = 1


@attrs
class NarrowAttrs(Attrs):
    dim: int
    start: int
    length: int


def n_extras(norm_eps: float | None, residual: bool) -> int:
    return int(norm_eps is not None) + int(residual)


def split_extras(extra: tuple[Any, ...], norm_eps: float | None, residual: bool) -> tuple[Any, Any]:
    i = 0
    norm_w = res = None
    if norm_eps is not None:
        norm_w, i = extra[0], 1
    if residual:
        res = extra[i]
    return norm_w, res


def _prologue(ctx: Any, x: Any, norm_w: Any, eps: float | None) -> Any:
    return x if norm_w is None else ref("rms_norm")(ctx, x, norm_w, eps=eps)[0]


def _epilogue(ctx: Any, y: Any, res: Any) -> Any:
    return y if res is None else ref("add")(ctx, res, y)[0]


def _check_extras(ins: list[Value], n_core: int, norm_eps: float | None, residual: bool, width_in: int,
                  out_shape: tuple) -> None:  # fmt: skip
    n = n_core + n_extras(norm_eps, residual)
    expect(len(ins) == n, f"expects {n_core} inputs + prologue/epilogue extras, got {len(ins)}")
    i = n_core
    if norm_eps is not None:
        expect(ins[i].shape == (width_in,), f"norm weight {list(ins[i].shape)} does not match width {width_in}")
        i += 1
    if residual:
        expect(ins[i].shape == tuple(out_shape), f"residual {list(ins[i].shape)} != output {list(out_shape)}")


def _out_dtype(ins: list[Value], n_core: int, residual: bool, dt: DType) -> DType:
    """With a residual epilogue the output takes the residual's dtype, as `add` would."""
    return ins[-1].dtype if residual and len(ins) > n_core else dt


def _extras_cost(ins: list[Value], n_core: int) -> Cost:
    return Cost(sum(v.nbytes for v in ins[n_core:]))


# ---- linear (dequant + GEMM, RMSNorm prologue, residual epilogue) ----------------------------------


def _linear_infer(fmt: DType | None) -> Any:
    def infer(ins: list[Value], a: LinearAttrs) -> list:
        if fmt is not None:
            expect(ins[1].dtype == fmt, f"weight is {ins[1].dtype.name}, kind needs {fmt.name}")
        [(shape, dt)] = matmul_infer(ins[:2], a)
        _check_extras(ins, 2, a.norm_eps, a.residual, ins[0].shape[-1], shape)
        return [(shape, _out_dtype(ins, 2, a.residual, dt))]

    return infer


def _linear_cost(ins: list[Value], outs: list[Value], a: LinearAttrs, at: Placement) -> Cost:
    return matmul_cost(ins[:2], outs, a, at) + _extras_cost(ins, 2)


def _make_linear(name: str, fmt: DType | None) -> None:
    @op(name, attrs=LinearAttrs, infer=_linear_infer(fmt), cost=_linear_cost)
    def linear(ctx, x, w, *extra, out_dtype, norm_eps, residual):
        """[rms_norm ->] dequant -> matmul [-> + residual]."""
        norm_w, res = split_extras(extra, norm_eps, residual)
        x = _prologue(ctx, x, norm_w, norm_eps)
        if fmt is not None and fmt.quantized:
            w = ref("dequant")(ctx, w)[0]
        return (_epilogue(ctx, ref("matmul")(ctx, x, w, out_dtype=out_dtype)[0], res),)


for _f in ("bf16", "fp8_e4m3b", "mxfp4"):
    _make_linear("linear_" + _f.split("_")[0], dtype(_f))


def _make_expert_matmul(name: str, fmt: DType) -> None:
    def infer(ins: list[Value], a: QuantExpertAttrs) -> list:
        expect(ins[1].dtype == fmt, f"expert weight is {ins[1].dtype.name}, kind needs {fmt.name}")
        return get_op("expert_matmul").infer([ins[0], Value("w", ins[1].shape, F32), ins[2]], a)

    @op(name, attrs=QuantExpertAttrs, infer=infer, cost=expert_cost)
    def expert_matmul(ctx, x, w, idx, *, expert_offset, world):
        """dequant -> expert_matmul; only the experts that received tokens are dequantised."""
        return ref("expert_matmul")(ctx, x, w, idx, expert_offset=expert_offset)


_make_expert_matmul("expert_matmul_fp8", dtype("fp8_e4m3b"))
_make_expert_matmul("expert_matmul_mxfp4", dtype("mxfp4"))


# ---- fused MoE: router + top-k + experts + combine (+ all-reduce) -------------------------------

MOE_CORE = 5  # x, router gate [E, H] f32, score bias [E], gate_up [E_local, 2I, H], down [E_local, H, I]


def _moe_infer(ins: list[Value], a: MoeAttrs) -> list:
    x, gate, bias, gu, d = ins[:MOE_CORE]
    T, H = x.shape
    expect(gate.shape[1] == H and bias.shape == (gate.shape[0],), "fused_moe: router gate/bias do not match x")
    expect(gu.shape[0] == d.shape[0] == a.n_local, "fused_moe: expert stacks must hold n_local experts")
    expect(gu.shape[2] == H and d.shape[1] == H and gu.shape[1] == 2 * d.shape[2], "fused_moe: expert shapes")
    _check_extras(ins, MOE_CORE, a.norm_eps, a.residual, H, (T, H))
    return [((T, H), _out_dtype(ins, MOE_CORE, a.residual, F32))]


def _moe_cost(ins: list[Value], outs: list[Value], a: MoeAttrs, at: Placement) -> Cost:
    x, gate, bias, gu, d = ins[:MOE_CORE]
    T, k = x.shape[0], a.top_k
    idx = Value("idx", (T, k), I32)
    e = expert_cost([x, gu, idx], [Value("h", (T, k, gu.shape[1]), F32)], a, at)
    e += expert_cost([Value("a", (T, k, d.shape[2]), F32), d, idx], [Value("y", (T, k, d.shape[1]), F32)], a, at)
    router = Cost(gate.nbytes + bias.nbytes, 0, 2 * T * gate.shape[0] * gate.shape[1])
    world = at.world
    comm = Cost(comm_bytes=2 * (world - 1) * outs[0].nbytes // world) if a.reduce else Cost()
    # the [T, k, *] expert intermediates stay on chip: count the weights, x and the output only
    return Cost(e.bytes_read - x.nbytes, outs[0].nbytes, e.flops) + router + comm + _extras_cost(ins, MOE_CORE)


def _make_moe(name: str) -> None:
    @op(name, attrs=MoeAttrs, infer=_moe_infer, cost=_moe_cost, collective=True)
    def fused_moe(
        ctx, x, gate, bias, w_gu, w_d, *extra, top_k, n_group, topk_group, normalize, scaling, expert_offset, n_local,
        world, reduce, norm_eps, residual,
    ):  # fmt: skip
        """rms_norm? -> router matmul -> sigmoid -> +bias -> topk -> weights -> experts -> combine -> all_reduce?
        -> + residual?"""
        norm_w, res = split_extras(extra, norm_eps, residual)

        def partial(x, gate, bias, w_gu, w_d, norm_w, offset):
            h = _prologue(ctx, x, norm_w, norm_eps)
            scores = ref("sigmoid")(ctx, ref("matmul")(ctx, h, gate, out_dtype="f32")[0])[0]
            sel = ref("add")(ctx, scores, bias)[0]
            idx = ref("topk_select")(ctx, sel, top_k=top_k, n_group=n_group, topk_group=topk_group)[0]
            wts = ref("gather_weights")(ctx, scores, idx, normalize=normalize, scaling=scaling)[0]
            gu = ref("expert_matmul")(ctx, h, w_gu, idx, expert_offset=offset)[0]
            y = ref("expert_matmul")(ctx, ref("silu_mul")(ctx, gu)[0], w_d, idx, expert_offset=offset)[0]
            return ref("moe_combine")(ctx, y, wts, idx, expert_offset=offset, n_local=n_local)[0]

        if not reduce:
            out = partial(x, gate, bias, w_gu, w_d, norm_w, expert_offset)
        else:
            n = MOE_CORE + int(norm_eps is not None)
            peers = _peer_inputs(ctx, list(range(n)), (x, gate, bias, w_gu, w_d, norm_w)[:n])
            parts = [partial(*p[:MOE_CORE], p[MOE_CORE] if n > MOE_CORE else None, r * n_local) for r, p in
                     enumerate(peers)]  # fmt: skip
            out = ref("all_reduce")(PeerValues(ctx.rank, len(parts), parts), parts[ctx.rank])[0]
        return (_epilogue(ctx, out, res),)


for _f in ("bf16", "fp8", "mxfp4"):
    _make_moe(f"fused_moe_{_f}")


# ---- attention block: (head norm) + rope + v scale + kv_append + attention ------------------------


def _attn_block_infer(ins: list[Value], a: AttentionBlockAttrs) -> list:
    q, k, v, kc, vc, pos = ins[:6]
    rope = dict(head_dim=a.head_dim, rope_dim=a.rope_dim, theta=a.theta)
    get_op("rope").infer([q, pos], RopeAttrs(heads=a.heads, **rope))
    get_op("rope").infer([k, pos], RopeAttrs(heads=a.kv_heads, **rope))
    slots = [ins[-1]] if a.slotted else []
    get_op("kv_append").infer([kc, vc, k, v, pos, *slots], Attrs())
    rest = ins[6:]
    n = int(a.has_sink) + 2 * int(a.qk_norm_eps is not None) + int(a.slotted)
    expect(len(rest) == n, f"attention_block: {len(rest)} inputs after the positions, expected {n}")
    attn_ins = [q, kc, vc, pos] + ([rest[0]] if a.has_sink else []) + slots
    [o] = get_op("attention").infer(attn_ins, a)
    return [o, (kc.shape, kc.dtype), (vc.shape, vc.dtype)]


def _attn_block_cost(ins: list[Value], outs: list[Value], a: AttentionBlockAttrs, at: Placement) -> Cost:
    q, k, v, kc, vc, pos = ins[:6]
    c = get_op("attention").cost([q, kc, vc, pos], outs[:1], a, at)
    return c + Cost(k.nbytes + v.nbytes + pos.nbytes, k.nbytes + v.nbytes)


@op("attention_block", attrs=AttentionBlockAttrs, infer=_attn_block_infer, cost=_attn_block_cost, mutates=(3, 4))
def attention_block(
    ctx, q, k, v, k_cache, v_cache, pos, *extra, heads, kv_heads, head_dim, v_head_dim, rope_dim, theta, scale,
    window, causal, has_sink, v_scale, qk_norm_eps, slotted,
):  # fmt: skip
    """[head_rms_norm(q), head_rms_norm(k)] -> rope(q), rope(k) -> [scale(v)] -> kv_append -> attention.
    extra: [sink], [q norm, k norm], [slots] (slotted: each row's cache slot)."""
    sink = extra[0] if has_sink else None
    slots = [extra[-1]] if slotted else []
    if qk_norm_eps is not None:
        qn, kn = extra[int(has_sink) : int(has_sink) + 2]
        q = ref("head_rms_norm")(ctx, q, qn, heads=heads, eps=qk_norm_eps)[0]
        k = ref("head_rms_norm")(ctx, k, kn, heads=kv_heads, eps=qk_norm_eps)[0]
    rope = dict(head_dim=head_dim, rope_dim=rope_dim, theta=theta)
    q = ref("rope")(ctx, q, pos, heads=heads, **rope)[0]
    k = ref("rope")(ctx, k, pos, heads=kv_heads, **rope)[0]
    if v_scale is not None:
        v = ref("scale")(ctx, v, factor=v_scale)[0]
    k_cache, v_cache = ref("kv_append")(ctx, k_cache, v_cache, k, v, pos, *slots)
    attn = dict(heads=heads, kv_heads=kv_heads, head_dim=head_dim, v_head_dim=v_head_dim, scale=scale)
    o = ref("attention")(ctx, q, k_cache, v_cache, pos, *([sink] if has_sink else []), *slots, **attn, window=window,
                         causal=causal, has_sink=has_sink, slotted=slotted)[0]  # fmt: skip
    return (o, k_cache, v_cache)


# ---- rope kv append: [head norm] + rope(k) + [scale(v)] + kv_append (a drafter's context rows) -----


def _rope_kv_append_infer(ins: list[Value], a: RopeKvAppendAttrs) -> list:
    kc, vc, k, v, pos = ins[:5]
    n = 5 + int(a.norm_eps is not None)
    expect(len(ins) == n, "rope_kv_append takes k_cache, v_cache, k, v, positions[, k_norm]")
    get_op("rope").infer([k, pos], a)
    return get_op("kv_append").infer([kc, vc, k, v, pos], Attrs())


def _rope_kv_append_cost(ins: list[Value], outs: list[Value], a: RopeKvAppendAttrs, at: Placement) -> Cost:
    return get_op("kv_append").cost(ins[:5], outs, Attrs(), at)


@op("rope_kv_append", attrs=RopeKvAppendAttrs, infer=_rope_kv_append_infer, cost=_rope_kv_append_cost,
    mutates=(0, 1))  # fmt: skip
def rope_kv_append(ctx, k_cache, v_cache, k, v, pos, *norm, heads, head_dim, rope_dim, theta, v_scale, norm_eps):
    """[head_rms_norm(k)] -> rope(k) -> [scale(v)] -> kv_append: new rows written to the cache without
    attending (a DFlash drafter's context rows; the block's own rows go through attention_block)."""
    if norm_eps is not None:
        k = ref("head_rms_norm")(ctx, k, norm[0], heads=heads, eps=norm_eps)[0]
    k = ref("rope")(ctx, k, pos, heads=heads, head_dim=head_dim, rope_dim=rope_dim, theta=theta)[0]
    if v_scale is not None:
        v = ref("scale")(ctx, v, factor=v_scale)[0]
    return ref("kv_append")(ctx, k_cache, v_cache, k, v, pos)


# ---- LM head + argmax (+ distributed argmax) (+ DFlash acceptance) -------------------------------


def _lm_infer(accept: bool) -> Any:
    def infer(ins: list[Value], a: LmHeadAttrs) -> list:
        n_core = 3 if accept else 2
        [(shape, dt)] = matmul_infer(ins[:2], MatmulAttrs(out_dtype="f32"))
        _check_extras(ins, n_core, a.norm_eps, False, ins[0].shape[-1], shape)
        out = [(shape, dt), ((shape[0],), I32)]
        if accept:
            expect(ins[2].shape == (shape[0],) and ins[2].dtype == I32, "lm_head_accept: tokens must be i32[T]")
            out.append(((shape[0] + 1,), I32))
        return out

    return infer


def _lm_cost(ins: list[Value], outs: list[Value], a: LmHeadAttrs, at: Placement) -> Cost:
    comm = (at.world - 1) * 8 * ins[0].shape[0]
    return matmul_cost(ins[:2], outs[:1], a, at) + Cost(comm_bytes=comm) + io_cost(ins[2:], outs[1:], a, at)


def _lm_head(ctx, x, w, norm_w, *, norm_eps, world, vocab_size, n_core):
    """(local logits, global greedy ids); with world > 1 the argmax is vocab_argmax + argmax_reduce."""

    def logits_of(x, w, norm_w):
        h = _prologue(ctx, x, norm_w, norm_eps)
        w = ref("dequant")(ctx, w)[0] if isinstance(w, QTensor) else w
        return ref("matmul")(ctx, h, w, out_dtype="f32")[0]

    if world == 1:
        logits = logits_of(x, w, norm_w)
        return logits, ref("argmax")(ctx, logits)[0]
    n = 2 + int(norm_w is not None)
    peers = _peer_inputs(ctx, [0, 1, n_core][:n], (x, w, norm_w)[:n])
    vals, ids, mine = [], [], None
    for r, p in enumerate(peers):
        lg = logits_of(p[0], p[1], p[2] if n > 2 else None)
        vloc = lg.shape[-1]
        v, i = ref("vocab_argmax")(ctx, lg, vocab_offset=r * vloc, vocab_valid=min(vloc, vocab_size - r * vloc))
        vals.append(v)
        ids.append(i)
        mine = lg if r == ctx.rank else mine
    return mine, ref("argmax_reduce")(PeerValues(ctx.rank, world, vals, ids), vals[ctx.rank], ids[ctx.rank])[0]


@op("lm_head_argmax", attrs=LmHeadAttrs, infer=_lm_infer(False), cost=_lm_cost, collective=True)
def lm_head_argmax(ctx, x, w, *extra, world, vocab_size, vocab_offset, norm_eps, out_dtype):
    """[final norm ->] LM head GEMM -> argmax (distributed over vocabulary shards when world > 1)."""
    norm_w, _ = split_extras(extra, norm_eps, False)
    return _lm_head(ctx, x, w, norm_w, norm_eps=norm_eps, world=world, vocab_size=vocab_size, n_core=2)


@op("lm_head_accept", attrs=LmHeadAttrs, infer=_lm_infer(True), cost=_lm_cost, collective=True)
def lm_head_accept(ctx, x, w, tokens, *extra, world, vocab_size, vocab_offset, norm_eps, out_dtype):
    """lm_head_argmax -> dflash_accept: the whole greedy acceptance inside the step."""
    norm_w, _ = split_extras(extra, norm_eps, False)
    logits, nxt = _lm_head(ctx, x, w, norm_w, norm_eps=norm_eps, world=world, vocab_size=vocab_size, n_core=3)
    return (logits, nxt, ref("dflash_accept")(ctx, tokens, nxt)[0])


# ---- collectives with an epilogue, and a view ---------------------------------------------------


def _ar_res_infer(ins: list[Value], a: WorldAttrs) -> list:
    expect(len(ins) == 2 and ins[0].shape == ins[1].shape, "all_reduce_residual(partial, residual) shapes differ")
    return [(ins[1].shape, ins[1].dtype)]


def _ar_res_cost(ins: list[Value], outs: list[Value], a: WorldAttrs, at: Placement) -> Cost:
    return get_op("all_reduce").cost(ins[:1], outs, a, at) + Cost(ins[1].nbytes)


@op("all_reduce_residual", attrs=WorldAttrs, infer=_ar_res_infer, cost=_ar_res_cost, collective=True)
def all_reduce_residual(ctx, partial, residual, *, world):
    """all_reduce -> + residual (the residual add in the reduce epilogue)."""
    return (ref("add")(ctx, residual, ref("all_reduce")(ctx, partial)[0])[0],)


def _narrow_infer(ins: list[Value], a: NarrowAttrs) -> list:
    s = list(ins[0].shape)
    d = a.dim % len(s)
    expect(0 <= a.start and a.start + a.length <= s[d], "narrow: range outside the value")
    s[d] = a.length
    return [(tuple(s), ins[0].dtype)]


@op("narrow", attrs=NarrowAttrs, infer=_narrow_infer)
def narrow(ctx, x, *, dim, start, length):
    """A slice along one dim (drops the zero padding of a vocabulary-parallel LM head)."""
    return (x.narrow(dim, start, length),)


__all__ = ["MOE_CORE", "PeerValues", "expected_experts", "n_extras", "split_extras"]
