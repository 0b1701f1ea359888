"""Graph builders: one decode step of a MiMo-V2 model for B query tokens, and the DFlash drafter.

The builders only call layer functions in order; every weight is a param whose `source` says
which checkpoint tensors it comes from (see models/binding.py). Quantised weights go through an
explicit `dequant` node: the fusion passes must remove all of them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tilert.ir.builder import GraphBuilder
from tilert.ir.dtypes import BF16, F32, I32, WEIGHT_FORMATS
from tilert.ir.graph import Graph
from tilert.models.config import ConfigError, ModelConfig

MODES = ("decode", "verify")

_BUILDERS: dict[str, Callable[..., Graph]] = {}


def builder(model_type: str) -> Callable[[Callable[..., Graph]], Callable[..., Graph]]:
    """Register a step-graph builder for a config `model_type`."""

    def deco(fn: Callable[..., Graph]) -> Callable[..., Graph]:
        _BUILDERS[model_type] = fn
        return fn

    return deco


def build_step_graph(cfg: ModelConfig, **kw: Any) -> Graph:
    try:
        fn = _BUILDERS[cfg.model_type]
    except KeyError:
        raise ConfigError(f"config field 'model_type' {cfg.model_type!r} has no graph builder") from None
    return fn(cfg, **kw)


def linear(
    b: GraphBuilder,
    x: str,
    name: str,
    n: int,
    k: int,
    fmt: str,
    parts: list[str] | None = None,
    out_dtype: str = "bf16",
    out: str | None = None,
) -> str:
    """y = x @ W^T for a checkpoint linear (or several, concatenated along N)."""
    dt = WEIGHT_FORMATS[fmt]
    w = b.param(name, (n, k), dt, linear=tuple(parts or [name]))
    if dt.quantized:
        w = b.op("dequant", w, name=f"{name}.deq")
    return b.op("matmul", x, w, name=out or f"{name}.out", out_dtype=out_dtype)


def attention_layer(
    b: GraphBuilder, cfg: ModelConfig, i: int, x: str, pos: str, max_seq: int, slots: tuple[str, int] | None = None
) -> str:
    """One attention layer; `slots` = (the slots input, cache slots): each row reads and writes its own
    sequence's cache slot of stacked caches [slots, Hkv, max_seq, D]."""
    spec = cfg.attention(i)
    H, Hkv, D, Dv = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.v_head_dim
    p = f"model.layers.{i}.self_attn"
    fmt = cfg.quantization.attention
    hs = cfg.hidden_size
    q = linear(b, x, f"{p}.q_proj", H * D, hs, fmt)
    k = linear(b, x, f"{p}.k_proj", Hkv * D, hs, fmt)
    v = linear(b, x, f"{p}.v_proj", Hkv * Dv, hs, fmt)
    rope = dict(head_dim=D, rope_dim=spec.rope_dim, theta=spec.rope_theta)
    q = b.op("rope", q, pos, name=f"{p}.q_rope", heads=H, **rope)
    k = b.op("rope", k, pos, name=f"{p}.k_rope", heads=Hkv, **rope)
    v = b.op("scale", v, name=f"{p}.v_scaled", factor=cfg.attention_value_scale)
    pool = () if slots is None else (slots[1],)
    slot_in = [] if slots is None else [slots[0]]
    kc = b.state(f"{p}.k_cache", (*pool, Hkv, max_seq, D), BF16)
    vc = b.state(f"{p}.v_cache", (*pool, Hkv, max_seq, Dv), BF16)
    kc, vc = b.op("kv_append", kc, vc, k, v, pos, *slot_in, name=f"{p}.kv")
    ins = [q, kc, vc, pos]
    if spec.sink:
        ins.append(b.param(f"{p}.attention_sink_bias", (H,), F32, tensor=f"{p}.attention_sink_bias"))
    ins += slot_in
    more = {"slotted": True} if slots is not None else {}
    o = b.op(
        "attention",
        *ins,
        name=f"{p}.attn",
        heads=H,
        kv_heads=Hkv,
        head_dim=D,
        v_head_dim=Dv,
        scale=D**-0.5,
        window=spec.window,
        causal=True,
        has_sink=spec.sink,
        **more,
    )
    return linear(b, o, f"{p}.o_proj", hs, H * Dv, fmt)


def dense_mlp(b: GraphBuilder, x: str, p: str, hidden: int, inter: int, fmt: str) -> str:
    # gate and up stay separate weights: concatenating them would misalign FP8's 128-row scale blocks
    g = linear(b, x, f"{p}.gate_proj", inter, hidden, fmt)
    u = linear(b, x, f"{p}.up_proj", inter, hidden, fmt)
    a = b.op("silu_mul", g, u, name=f"{p}.act")
    return linear(b, a, f"{p}.down_proj", hidden, inter, fmt)


def moe_mlp(b: GraphBuilder, cfg: ModelConfig, i: int, x: str) -> str:
    p = f"model.layers.{i}.mlp"
    E, H, I = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    gate = b.param(f"{p}.gate", (E, H), F32, tensor=f"{p}.gate.weight")
    bias = b.param(f"{p}.gate.e_score_correction_bias", (E,), F32, tensor=f"{p}.gate.e_score_correction_bias")
    logits = b.op("matmul", x, gate, name=f"{p}.router_logits", out_dtype="f32")
    scores = b.op("sigmoid", logits, name=f"{p}.scores")
    sel = b.op("add", scores, bias, name=f"{p}.sel")
    idx = b.op(
        "topk_select",
        sel,
        name=f"{p}.topk",
        top_k=cfg.num_experts_per_tok,
        n_group=cfg.n_group,
        topk_group=cfg.topk_group,
    )
    wts = b.op(
        "gather_weights",
        scores,
        idx,
        name=f"{p}.weights",
        normalize=cfg.norm_topk_prob,
        scaling=cfg.routed_scaling_factor,
    )
    dt = WEIGHT_FORMATS[cfg.quantization.experts]
    ex = f"{p}.experts"
    w_gu = b.param(f"{ex}.gate_up_proj", (E, 2 * I, H), dt, experts=ex, projs=("gate_proj", "up_proj"), count=E)
    w_d = b.param(f"{ex}.down_proj", (E, H, I), dt, experts=ex, projs=("down_proj",), count=E)
    if dt.quantized:
        w_gu = b.op("dequant", w_gu, name=f"{ex}.gate_up_proj.deq")
        w_d = b.op("dequant", w_d, name=f"{ex}.down_proj.deq")
    gu = b.op("expert_matmul", x, w_gu, idx, name=f"{ex}.gate_up", expert_offset=0)
    a = b.op("silu_mul", gu, name=f"{ex}.act")
    d = b.op("expert_matmul", a, w_d, idx, name=f"{ex}.down", expert_offset=0)
    return b.op("moe_combine", d, wts, idx, name=f"{p}.out", expert_offset=0, n_local=E)


def norm(b: GraphBuilder, x: str, name: str, dim: int, eps: float) -> str:
    w = b.param(name, (dim,), BF16, tensor=f"{name}.weight")
    return b.op("rms_norm", x, w, name=f"{name}.out", eps=eps)


def lm_head(b: GraphBuilder, cfg: ModelConfig, x: str, hidden: int) -> tuple[str, str]:
    tied = ["model.embed_tokens"] if cfg.tie_word_embeddings else None
    fmt = "bf16" if cfg.tie_word_embeddings else cfg.quantization.lm_head
    logits = linear(b, x, "lm_head", cfg.vocab_size, hidden, fmt, parts=tied, out_dtype="f32", out="logits")
    return logits, b.op("argmax", logits, name="next_tokens")


@builder("mimo_v2")
@builder("mimo_v2_flash")
def build_mimo_step(
    cfg: ModelConfig, *, tokens: int = 1, max_seq: int = 4096, mode: str = "decode", slots: int = 0
) -> Graph:
    """One decode step over B=`tokens` query tokens; mode 'verify' adds DFlash greedy acceptance.

    Inputs: tokens i32[B], positions i32[B]. State: per-layer KV caches [Hkv, max_seq, D].
    Outputs: logits f32[B, V], next_tokens i32[B], features (hidden states after the drafter's
    target layers, concatenated) and, in verify mode, accept i32[B+1] (see ops.dflash_accept).

    slots > 0: a mixed-sequence step over a pool of `slots` KV cache slots. The caches are stacked
    [slots, Hkv, max_seq, D] and a third input slots i32[B] names each row's sequence slot: row i
    writes its k/v at (slots[i], positions[i]) and attends over its own slot only (a sequence's
    rows, contiguous at consecutive positions, see each other causally; other sequences' rows never).
    Decode mode only: DFlash acceptance is per sequence (its rows' next_tokens, on the host).
    """
    if mode not in MODES:
        raise ValueError(f"unknown step mode {mode!r} (known: {', '.join(MODES)})")
    if tokens < 1 or tokens > max_seq:
        raise ValueError(f"tokens per step must be in [1, max_seq={max_seq}], got {tokens}")
    if slots < 0 or (slots and mode != "decode"):
        raise ValueError(f"a mixed-sequence step (slots={slots}) runs in decode mode with slots >= 1, not {mode!r}")
    meta = {
        "model": cfg.name,
        "kind": "target",
        "mode": mode,
        "tokens": tokens,
        "max_seq": max_seq,
        "rank": 0,
        "world": 1,
    }
    if slots:
        meta["slots"] = slots
    b = GraphBuilder(f"{cfg.name}.{mode}.B{tokens}" + (f".S{slots}" if slots else ""), meta)
    H, eps = cfg.hidden_size, cfg.layernorm_epsilon
    ids = b.input("tokens", (tokens,), I32)
    pos = b.input("positions", (tokens,), I32)
    pool = (b.input("slots", (tokens,), I32), slots) if slots else None
    table = b.param("model.embed_tokens", (cfg.vocab_size, H), BF16, tensor="model.embed_tokens.weight")
    x = b.op("embed", table, ids, name="embed")
    features = []
    targets = set(cfg.dflash.target_layer_ids) if cfg.dflash else set()
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        h = norm(b, x, f"{p}.input_layernorm", H, eps)
        x = b.op("add", x, attention_layer(b, cfg, i, h, pos, max_seq, pool), name=f"{p}.attn_residual")
        h = norm(b, x, f"{p}.post_attention_layernorm", H, eps)
        if cfg.is_moe(i):
            m = moe_mlp(b, cfg, i, h)
        else:
            m = dense_mlp(b, h, f"{p}.mlp", H, cfg.intermediate_size, cfg.quantization.dense_mlp)
        x = b.op("add", x, m, name=f"{p}.out")
        if i in targets:
            features.append(x)
    x = norm(b, x, "model.norm", H, eps)
    logits, nxt = lm_head(b, cfg, x, H)
    b.output(logits, nxt)
    if features:
        ordered = [features[sorted(targets).index(t)] for t in cfg.dflash.target_layer_ids]
        b.output(b.op("concat", *ordered, name="features", dim=-1))
    if mode == "verify":
        b.output(b.op("dflash_accept", ids, nxt, name="accept"))
    return b.finish()
