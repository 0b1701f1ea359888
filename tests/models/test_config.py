"""Configs: shipped models, validation errors naming the field."""

from __future__ import annotations

import json

import pytest

from tilert.models.config import ConfigError, list_models, load_config


def test_shipped_models():
    assert {"mimo-v2.5-pro", "mimo-v2-flash", "tiny", "tiny-flash"} <= set(list_models())
    c = load_config("mimo-v2.5-pro")
    assert c.num_hidden_layers == 70 and c.n_routed_experts == 384 and c.num_experts_per_tok == 8
    assert sum(c.is_sliding(i) for i in range(70)) == 60
    assert not c.is_moe(0) and all(c.is_moe(i) for i in range(1, 70))
    a = c.attention(1)
    assert (a.num_heads, a.num_kv_heads, a.head_dim, a.v_head_dim, a.rope_dim, a.window, a.sink) == (
        128,
        8,
        192,
        128,
        64,
        128,
        True,
    )
    assert c.attention(0).window == 0 and c.attention(0).rope_theta == 1e7 and a.rope_theta == 1e4


def test_tiny_keeps_every_feature():
    for name in ("tiny", "tiny-flash"):
        c = load_config(name)
        L = c.num_hidden_layers
        assert not c.is_moe(0) and any(c.is_moe(i) for i in range(L))
        assert any(c.is_sliding(i) for i in range(L)) and not all(c.is_sliding(i) for i in range(L))
        s = next(c.attention(i) for i in range(L) if c.is_sliding(i))
        assert s.sink and s.window > 0
        assert s.num_heads > s.num_kv_heads and s.head_dim != s.v_head_dim and 0 < s.rope_dim < s.head_dim
        assert c.scoring_func == "sigmoid" and c.norm_topk_prob and c.dflash is not None


def _raw(**over):
    raw = json.loads(json.dumps(load_config("tiny").to_dict()))
    raw.pop("name")
    raw.update(over)
    return raw


@pytest.mark.parametrize(
    "over, field",
    [
        ({"hidden_size": "64"}, "hidden_size"),
        ({"num_attention_heads": 5}, "num_attention_heads"),
        ({"hybrid_layer_pattern": [0, 1]}, "hybrid_layer_pattern"),
        ({"scoring_func": "softmax"}, "scoring_func"),
        ({"num_experts_per_tok": 99}, "num_experts_per_tok"),
        ({"moe_intermediate_size": 40}, "moe_intermediate_size"),
        ({"quantization": {"experts": "int3"}}, "quantization.experts"),
        ({"dflash": {"block_size": 4}}, "dflash."),
        ({"layernorm_epsilon": -1.0}, "layernorm_epsilon"),
    ],
)
def test_bad_field_is_named(tmp_path, over, field):
    p = tmp_path / "c.json"
    p.write_text(json.dumps(_raw(**over)))
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(p)


def test_missing_field_is_named(tmp_path):
    raw = _raw()
    del raw["rope_theta"]
    p = tmp_path / "c.json"
    p.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="'rope_theta' is missing"):
        load_config(p)


def test_unknown_model_and_bad_json(tmp_path):
    with pytest.raises(ConfigError, match="unknown model 'gpt-9'"):
        load_config("gpt-9")
    p = tmp_path / "x.json"
    p.write_text("{nope")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(p)


def test_config_round_trip(tmp_path):
    for name in list_models():
        c = load_config(name)
        p = tmp_path / f"{name}.json"
        p.write_text(json.dumps(c.to_dict()))
        c2 = load_config(p)
        assert c2.to_dict() | {"name": name} == c.to_dict()


def test_first_layers_keeps_widths_and_layer_kinds():
    cfg = load_config("mimo-v2.5-pro")
    cut = cfg.first_layers(4)
    assert cut.num_hidden_layers == 4 and cut.hidden_size == cfg.hidden_size
    assert [cut.is_sliding(i) for i in range(4)] == [cfg.is_sliding(i) for i in range(4)]
    assert [cut.is_moe(i) for i in range(4)] == [cfg.is_moe(i) for i in range(4)] == [False, True, True, True]
    assert max(cut.dflash.target_layer_ids) == 3
    with pytest.raises(ConfigError, match="1..70 layers"):
        cfg.first_layers(71)


def test_published_nulls_mean_no_scaling(tmp_path):
    """Hub configs write `routed_scaling_factor: null` (and may write attention_value_scale: null)."""
    p = tmp_path / "c.json"
    p.write_text(json.dumps(_raw(routed_scaling_factor=None, attention_value_scale=None)))
    c = load_config(p)
    assert c.routed_scaling_factor == 1.0 and c.attention_value_scale == 1.0
    raw = _raw()
    del raw["routed_scaling_factor"]
    p.write_text(json.dumps(raw))
    assert load_config(p).routed_scaling_factor == 1.0
    p.write_text(json.dumps(_raw(routed_scaling_factor=2.5)))
    assert load_config(p).routed_scaling_factor == 2.5
    p.write_text(json.dumps(_raw(routed_scaling_factor="x")))
    with pytest.raises(ConfigError, match="routed_scaling_factor"):
        load_config(p)


def test_hf_spellings_and_unused_fields(tmp_path):
    """Fields tilert does not use are ignored; HF spellings map onto the hub names; both must agree."""
    raw = _raw(torch_dtype="bfloat16", use_cache=True, auto_map={"AutoConfig": "x.Y"}, attention_chunk_size=4,
               n_shared_experts=None, rope_scaling=None, attention_bias=False, bos_token_id=None)  # fmt: skip
    raw["rms_norm_eps"] = raw.pop("layernorm_epsilon")
    raw["sliding_window"] = raw.pop("sliding_window_size")
    p = tmp_path / "c.json"
    p.write_text(json.dumps(raw))
    c = load_config(p)
    assert c.layernorm_epsilon == 1e-6 and c.sliding_window_size == load_config("tiny").sliding_window_size
    p.write_text(json.dumps(_raw(sliding_window=99)))
    with pytest.raises(ConfigError, match="'sliding_window_size' .* and 'sliding_window' .* disagree"):
        load_config(p)


@pytest.mark.parametrize(
    "over, field",
    [
        ({"n_shared_experts": 2}, "n_shared_experts"),
        ({"attention_bias": True}, "attention_bias"),
        ({"rope_scaling": {"type": "yarn", "factor": 2.0}}, "rope_scaling"),
        ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config.quant_method"),
        ({"quantization_config": "fp8"}, "quantization_config"),
    ],
)
def test_published_fields_that_change_the_model_are_refused(tmp_path, over, field):
    p = tmp_path / "c.json"
    p.write_text(json.dumps(_raw(**over)))
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(p)
