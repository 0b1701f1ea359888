"""Graph of one DFlash drafter pass (DESIGN §7; semantics and sources in docs/speculative.md).

The block [anchor, MASK x (B-1)] is embedded with the target's embedding (the mask token's row
replaced by the drafter's own mask embedding when it ships one); C new context rows (target hidden
states of the drafter's target layers, concatenated) are projected (fc) and RMS-normed, then
appended to the drafter's KV cache at their positions. Each drafter layer attends from the block
over cache entries below the block end, with the layer's own mask: full or sliding window (each
query row has its own window), bidirectional or causal (DFlashConfig.layer_window/layer_causal).
Block K/V are written at the block's positions, past the committed context, so later context rows
overwrite them: the cache keeps only context.
"""

from __future__ import annotations

from tilert.ir.builder import GraphBuilder
from tilert.ir.dtypes import BF16, F32, I32
from tilert.ir.graph import Graph
from tilert.models.builder import dense_mlp, linear, lm_head, norm
from tilert.models.config import ConfigError, ModelConfig


def build_drafter_graph(cfg: ModelConfig, *, context: int, max_seq: int = 4096) -> Graph:
    """Inputs: block_tokens/block_positions i32[B], ctx_features bf16[C, n*H], ctx_positions i32[C].

    Outputs: draft i32[B] (anchor + proposals) and the drafter logits f32[B, V].
    """
    d = cfg.dflash
    if d is None:
        raise ConfigError(f"model '{cfg.name}' has no 'dflash' drafter config")
    B, Hd, D, eps = d.block_size, d.hidden_size, d.head_dim, d.rms_norm_eps
    nq, nkv = d.num_attention_heads, d.num_key_value_heads
    meta = {
        "model": cfg.name,
        "kind": "drafter",
        "tokens": B,
        "context": context,
        "max_seq": max_seq,
        "rank": 0,
        "world": 1,
    }
    b = GraphBuilder(f"{cfg.name}.dflash.C{context}", meta)
    ids = b.input("block_tokens", (B,), I32)
    pos = b.input("block_positions", (B,), I32)
    feats = b.input("ctx_features", (context, len(d.target_layer_ids) * cfg.hidden_size), BF16)
    cpos = b.input("ctx_positions", (context,), I32)
    table = b.param("model.embed_tokens", (cfg.vocab_size, cfg.hidden_size), BF16, tensor="model.embed_tokens.weight")
    x = b.op("embed", table, ids, name="dflash.embed")
    if d.mask_embedding:
        row = b.param("dflash.mask_embedding", (cfg.hidden_size,), BF16, tensor="dflash.mask_embedding")
        x = b.op("embed_override", x, ids, row, name="dflash.embed_mask", token=d.mask_token_id)
    ctx = linear(b, feats, "dflash.fc", Hd, len(d.target_layer_ids) * cfg.hidden_size, "bf16")
    ctx = norm(b, ctx, "dflash.hidden_norm", Hd, eps)
    rope = dict(head_dim=D, rope_dim=d.rope_dim, theta=d.rope_theta)
    for i in range(d.num_hidden_layers):
        p = f"dflash.layers.{i}"
        a = f"{p}.self_attn"
        h = norm(b, x, f"{p}.input_layernorm", Hd, eps)
        qn = b.param(f"{a}.q_norm", (D,), BF16, tensor=f"{a}.q_norm.weight")
        kn = b.param(f"{a}.k_norm", (D,), BF16, tensor=f"{a}.k_norm.weight")
        q = linear(b, h, f"{a}.q_proj", nq * D, Hd, "bf16")
        q = b.op("rope", b.op("head_rms_norm", q, qn, heads=nq, eps=eps), pos, heads=nq, **rope)
        kc = b.state(f"{a}.k_cache", (nkv, max_seq, D), BF16)
        vc = b.state(f"{a}.v_cache", (nkv, max_seq, D), BF16)
        wk = b.param(f"{a}.k_proj", (nkv * D, Hd), BF16, linear=(f"{a}.k_proj",))
        wv = b.param(f"{a}.v_proj", (nkv * D, Hd), BF16, linear=(f"{a}.v_proj",))
        for src, sp, tag in ((ctx, cpos, "ctx"), (h, pos, "block")):  # context rows first, then the block
            k = b.op("matmul", src, wk, name=f"{a}.k.{tag}")
            k = b.op("rope", b.op("head_rms_norm", k, kn, heads=nkv, eps=eps), sp, heads=nkv, **rope)
            v = b.op("matmul", src, wv, name=f"{a}.v.{tag}")
            if d.attention_value_scale != 1.0:
                v = b.op("scale", v, name=f"{a}.v_scaled.{tag}", factor=d.attention_value_scale)
            kc, vc = b.op("kv_append", kc, vc, k, v, sp, name=f"{a}.kv_{tag}")
        ins = [q, kc, vc, pos]
        if d.attention_sink:
            ins.append(b.param(f"{a}.attention_sink_bias", (nq,), F32, tensor=f"{a}.attention_sink_bias"))
        o = b.op(
            "attention",
            *ins,
            name=f"{a}.attn",
            heads=nq,
            kv_heads=nkv,
            head_dim=D,
            v_head_dim=D,
            scale=D**-0.5,
            window=d.layer_window(i),
            causal=d.layer_causal(i),
            has_sink=d.attention_sink,
        )
        x = b.op("add", x, linear(b, o, f"{a}.o_proj", Hd, nq * D, "bf16"), name=f"{p}.attn_residual")
        h = norm(b, x, f"{p}.post_attention_layernorm", Hd, eps)
        x = b.op("add", x, dense_mlp(b, h, f"{p}.mlp", Hd, d.intermediate_size, "bf16"), name=f"{p}.out")
    x = norm(b, x, "dflash.norm", Hd, eps)
    logits, nxt = lm_head(b, cfg, x, Hd)
    b.output(b.op("dflash_draft", ids, nxt, name="draft"), logits)
    return b.finish()
