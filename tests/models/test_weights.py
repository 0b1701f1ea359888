"""The checkpoint contract: specs, synthetic weights, validation, files, parameter counts."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from tilert.checkpoint import load_safetensors
from tilert.models.config import QuantConfig, load_config
from tilert.models.weights import (
    WeightError,
    dequantize_weight,
    logical_param_counts,
    save_safetensors,
    synthetic_weights,
    validate_weights,
    weight_specs,
)

TINY = ("tiny", "tiny-flash")


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A dtype-agnostic view for exact comparison (float8 has no torch.equal on CPU everywhere)."""
    return t.contiguous().view(torch.uint8)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(_bytes(a[k]), _bytes(b[k])) for k in a
    )


@pytest.fixture(scope="module")
def tiny_weights() -> dict[str, dict[str, torch.Tensor]]:
    return {n: synthetic_weights(load_config(n), seed=0) for n in TINY}


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("drafter", [True, False])
def test_specs_match_synthetic(name: str, drafter: bool) -> None:
    cfg = load_config(name)
    specs = weight_specs(cfg, include_drafter=drafter)
    w = synthetic_weights(cfg, seed=3, include_drafter=drafter)
    assert list(w) == list(specs)
    for k, s in specs.items():
        assert tuple(w[k].shape) == s.shape and w[k].dtype == s.dtype, k
    validate_weights(cfg, w, include_drafter=drafter)
    assert any(k.startswith("dflash.") for k in w) == drafter


def test_spec_details() -> None:
    cfg = load_config("tiny-flash")
    s = weight_specs(cfg)
    a1, a0 = cfg.attention(1), cfg.attention(0)
    assert s["model.layers.1.self_attn.k_proj.weight"].shape == (a1.num_kv_heads * a1.head_dim, 64)
    assert s["model.layers.0.self_attn.k_proj.weight"].shape == (a0.num_kv_heads * a0.head_dim, 64)
    assert s["model.layers.1.self_attn.o_proj.weight_scale_inv"].shape == (1, 1)
    assert s["model.layers.1.self_attn.v_proj.weight"].dtype == torch.float8_e4m3fn
    assert s["model.layers.1.mlp.experts.15.down_proj.weight_blocks"].shape == (64, 16)
    assert s["model.layers.1.mlp.experts.15.down_proj.weight_scales"].shape == (64, 1)
    assert s["model.layers.0.mlp.gate_proj.weight"].role == "fp8_weight"
    assert s["model.layers.2.mlp.gate.weight"].dtype == torch.float32
    assert s["lm_head.weight"].dtype == torch.bfloat16
    assert s["dflash.fc.weight"].shape == (64, 2 * 64)
    assert s["dflash.layers.1.self_attn.q_norm.weight"].shape == (16,)
    # sinks: tiny-flash has them on every layer, tiny only on sliding layers
    assert all(f"model.layers.{i}.self_attn.attention_sink_bias" in s for i in range(5))
    t = weight_specs(load_config("tiny"))
    assert "model.layers.0.self_attn.attention_sink_bias" not in t
    assert t["model.layers.1.self_attn.attention_sink_bias"].shape == (4,)
    tied = weight_specs(dataclasses.replace(cfg, tie_word_embeddings=True))
    assert "lm_head.weight" not in tied


def test_deterministic_and_seeded(tiny_weights: dict[str, dict[str, torch.Tensor]]) -> None:
    cfg = load_config("tiny-flash")
    again = synthetic_weights(cfg, seed=0)
    assert _same(again, tiny_weights["tiny-flash"])
    other = synthetic_weights(cfg, seed=1)
    for k in again:
        if again[k].numel() > 4:
            assert not torch.equal(_bytes(again[k]), _bytes(other[k])), k
    # values depend only on (seed, name): a selected subset and the target-only dict agree
    sub = synthetic_weights(cfg, seed=0, select=lambda n: ".experts.3." in n)
    assert sub and all(torch.equal(_bytes(v), _bytes(again[k])) for k, v in sub.items())
    target = synthetic_weights(cfg, seed=0, include_drafter=False)
    assert all(torch.equal(_bytes(v), _bytes(again[k])) for k, v in target.items())


def test_synthetic_scales(tiny_weights: dict[str, dict[str, torch.Tensor]]) -> None:
    w = tiny_weights["tiny"]
    q = dequantize_weight(w, "model.layers.1.self_attn.q_proj")
    assert q.dtype == torch.float32 and q.shape == (96, 64)
    assert 0.7 < q.std().item() * 64**0.5 < 1.3
    e = dequantize_weight(w, "model.layers.1.mlp.experts.0.down_proj.weight")  # ".weight" suffix tolerated
    assert e.shape == (64, 32) and 0.6 < e.std().item() * 32**0.5 < 1.4
    head = dequantize_weight(w, "lm_head")
    assert torch.equal(head, w["lm_head.weight"].float())
    norm = w["model.norm.weight"].float()
    assert (norm - 1).abs().max() < 0.6 and norm.std() > 0.01
    with pytest.raises(WeightError, match="model.nothing"):
        dequantize_weight(w, "model.nothing")


def test_formats_dequantize_close() -> None:
    """Quantised storage is close to the bf16 logical values drawn from the same seed."""
    base = load_config("tiny")
    bf16 = dataclasses.replace(base, quantization=QuantConfig("bf16", "bf16", "bf16", "bf16"))
    mx = dataclasses.replace(base, quantization=QuantConfig("mxfp4", "mxfp4", "mxfp4", "fp8"))
    wb, wm, wf = (synthetic_weights(c, seed=5, include_drafter=False) for c in (bf16, mx, base))
    for name, w, tol in [
        ("model.layers.0.self_attn.q_proj", wf, 0.08),  # fp8 e4m3
        ("model.layers.0.self_attn.q_proj", wm, 0.25),  # mxfp4
        ("model.layers.1.mlp.experts.2.up_proj", wm, 0.25),
        ("lm_head", wm, 0.08),
    ]:
        ref = dequantize_weight(wb, name)
        got = dequantize_weight(w, name)
        assert ((got - ref).norm() / ref.norm()).item() < tol, name
    validate_weights(mx, wm)


def _expect(cfg, w, name: str, include_drafter: bool = False) -> None:
    with pytest.raises(WeightError, match=name.replace(".", r"\.")):
        validate_weights(cfg, w, include_drafter=include_drafter)


def test_validate_catches_problems(tiny_weights: dict[str, dict[str, torch.Tensor]]) -> None:
    cfg = load_config("tiny-flash")
    base = tiny_weights["tiny-flash"]
    validate_weights(cfg, base)  # dflash.* tolerated when the drafter is not validated
    n = "model.layers.2.self_attn.k_proj.weight_scale_inv"
    _expect(cfg, {k: v for k, v in base.items() if k != n}, n)
    _expect(cfg, {**base, "model.layers.9.mystery": torch.zeros(1)}, "model.layers.9.mystery")
    _expect(cfg, {**base, "dflash.mystery": torch.zeros(1)}, "dflash.mystery", include_drafter=True)
    n = "model.layers.3.mlp.experts.7.up_proj.weight_blocks"
    _expect(cfg, {**base, n: base[n][:, :-1]}, n)
    n = "model.layers.1.input_layernorm.weight"
    _expect(cfg, {**base, n: base[n].float()}, n)  # wrong dtype
    bad = base[n].clone()
    bad[3] = float("nan")
    _expect(cfg, {**base, n: bad}, n)
    n = "model.layers.2.mlp.gate.e_score_correction_bias"
    bad = base[n].clone()
    bad[0] = float("inf")
    _expect(cfg, {**base, n: bad}, n)
    n = "model.layers.0.self_attn.q_proj.weight"
    bad = base[n].clone()
    bad.view(torch.uint8)[1, 2] = 0x7F  # e4m3fn NaN
    _expect(cfg, {**base, n: bad}, n)
    n = "model.layers.4.mlp.experts.0.gate_proj.weight_scales"
    bad = base[n].clone()
    bad[0, 0] = 0xFF  # e8m0 NaN
    _expect(cfg, {**base, n: bad}, n)
    drafter_less = {k: v for k, v in base.items() if not k.startswith("dflash.")}
    _expect(cfg, drafter_less, "dflash.fc.weight", include_drafter=True)


def test_safetensors_round_trip(tmp_path, tiny_weights: dict[str, dict[str, torch.Tensor]]) -> None:
    cfg = load_config("tiny-flash")
    w = tiny_weights["tiny-flash"]
    f = tmp_path / "model.safetensors"
    save_safetensors(w, f)
    assert _same(load_safetensors(f, cfg), w)
    # a sharded directory with an index
    d = tmp_path / "sharded"
    d.mkdir()
    names = list(w)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for fname, keys in shards.items():
        save_safetensors({k: w[k] for k in keys}, d / fname)
    index = {"metadata": {}, "weight_map": {k: fn for fn, ks in shards.items() for k in ks}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    assert _same(load_safetensors(d, cfg), w)
    # a directory without an index; a target-only checkpoint
    d2 = tmp_path / "plain"
    d2.mkdir()
    target = {k: v for k, v in w.items() if not k.startswith("dflash.")}
    save_safetensors(target, d2 / "a.safetensors")
    assert _same(load_safetensors(d2, cfg), target)
    # a bad tensor in a file is caught on load
    n = "model.norm.weight"
    save_safetensors({**target, n: target[n][:-1]}, d2 / "a.safetensors")
    with pytest.raises(WeightError, match=n):
        load_safetensors(d2, cfg)
    with pytest.raises(WeightError, match="not found"):
        load_safetensors(tmp_path / "nope", cfg)


def test_param_counts() -> None:
    pro = logical_param_counts(load_config("mimo-v2.5-pro"))
    assert abs(pro["total"] / 1.02e12 - 1) < 0.03
    assert abs(pro["active"] / 42e9 - 1) < 0.03
    assert pro["total"] == pro["non_expert"] + pro["expert"]
    assert 1e9 < pro["drafter"] < 5e9
    flash = logical_param_counts(load_config("mimo-v2-flash"))
    assert abs(flash["total"] / 309e9 - 1) < 0.03
    assert abs(flash["active"] / 15e9 - 1) < 0.05


def test_tiny_counts_match_specs() -> None:
    cfg = load_config("tiny")
    bf16 = dataclasses.replace(cfg, quantization=QuantConfig("bf16", "bf16", "bf16", "bf16"))
    w = synthetic_weights(bf16, seed=0)
    counts = logical_param_counts(cfg)
    drafter = sum(v.numel() for k, v in w.items() if k.startswith("dflash."))
    assert counts["drafter"] == drafter
    assert counts["total"] == sum(v.numel() for v in w.values()) - drafter
    expert = sum(v.numel() for k, v in w.items() if ".experts." in k)
    assert counts["active"] == counts["total"] - expert + expert * 2 // 8
