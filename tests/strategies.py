"""Hypothesis strategies shared by tests: random tiny MiMo-family configs."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from tilert.models.config import ModelConfig, parse_config


@st.composite
def tiny_configs(draw: Any, heads_multiple: int = 1) -> ModelConfig:
    """A small random config keeping every architectural feature (dense layer 0, SWA + full, sinks...)."""
    L = draw(st.integers(2, 4))
    kv = draw(st.sampled_from([1, 2])) * heads_multiple
    group = draw(st.sampled_from([1, 2]))
    hd = draw(st.sampled_from([8, 12, 16]))
    vhd = draw(st.sampled_from([8, 16]))
    E = draw(st.sampled_from([4, 8])) * heads_multiple
    n_group = draw(st.sampled_from([1, 2]))
    pattern = [0] + [draw(st.sampled_from([0, 1])) for _ in range(L - 1)]
    if all(p == 0 for p in pattern):
        pattern[-1] = 1
    raw = dict(
        num_hidden_layers=L,
        hidden_size=32 * draw(st.integers(1, 2)),
        intermediate_size=48,
        moe_intermediate_size=32,
        vocab_size=draw(st.sampled_from([64, 97])),
        num_attention_heads=kv * group,
        num_key_value_heads=kv,
        head_dim=hd,
        v_head_dim=vhd,
        hybrid_layer_pattern=pattern,
        moe_layer_freq=[i > 0 for i in range(L)],
        sliding_window_size=draw(st.integers(1, 6)),
        add_swa_attention_sink_bias=draw(st.booleans()),
        add_full_attention_sink_bias=draw(st.booleans()),
        attention_value_scale=0.7,
        partial_rotary_factor=0.5,
        rope_theta=10000.0,
        swa_rope_theta=500.0,
        n_routed_experts=E,
        num_experts_per_tok=draw(st.integers(1, 3)),
        topk_method="noaux_tc",
        n_group=n_group,
        topk_group=1 if n_group == 1 else draw(st.integers(1, 2)),
        norm_topk_prob=draw(st.booleans()),
        scoring_func="sigmoid",
        hidden_act="silu",
        layernorm_epsilon=1e-6,
        quantization=dict(experts="mxfp4", attention=draw(st.sampled_from(["fp8", "bf16"])), dense_mlp="fp8"),
        dflash=dict(
            num_hidden_layers=1,
            hidden_size=0,
            intermediate_size=32,
            num_attention_heads=2 * heads_multiple,
            num_key_value_heads=heads_multiple,
            head_dim=8,
            block_size=draw(st.sampled_from([2, 4])),
            target_layer_ids=[0, L - 1],
            sliding_window_size=draw(st.integers(2, 8)),
            rope_theta=1e4,
            mask_token_id=1,
        ),
    )
    raw["dflash"]["hidden_size"] = raw["hidden_size"]
    return parse_config(raw, name="random-tiny")
