"""Tiny published-layout DFlash drafter directories for tests, and a drafter forward written from
the published semantics (the reference repository's drafter, with MiMo's extras as SGLang/vLLM
load them), independent of tilert's IR and of models/plain.py.

The config.json files are written by hand with the published field names; tensors are bf16 with
the published names (`fc.weight`, `layers.{i}.self_attn.q_proj.weight`, ...), a few KB each.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from tilert.models.config import DFlashConfig, ModelConfig
from tilert.models.weights import synthetic_weights


def drafter_tensors(target: ModelConfig, d: DFlashConfig, seed: int) -> dict[str, torch.Tensor]:
    """Random drafter tensors under their published names (bf16, the sink bias too, as MiMo ships it)."""
    full = replace(target, dflash=replace(d, attention_sink=True, mask_embedding=False))
    w = synthetic_weights(full, seed, select=lambda n: n.startswith("dflash."))
    out = {k.removeprefix("dflash."): v.to(torch.bfloat16) for k, v in w.items()}
    if not d.attention_sink:
        out = {k: v for k, v in out.items() if not k.endswith("attention_sink_bias")}
    return out


def reference_config(target: ModelConfig, layers: int = 2, **over: Any) -> dict[str, Any]:
    """A reference-layout config.json (z-lab/dflash, Qwen3 field names): full attention layers, no
    `is_causal` (so bidirectional), no window."""
    raw = {
        "architectures": ["DFlashDraftModel"],
        "model_type": "qwen3",
        "hidden_size": target.hidden_size,
        "intermediate_size": 48,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "hidden_act": "silu",
        "attention_bias": False,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "max_position_embeddings": 40960,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": layers,
        "layer_types": ["full_attention"] * layers,
        "tie_word_embeddings": False,
        "vocab_size": target.vocab_size,
        "num_target_layers": target.num_hidden_layers,
        "block_size": 4,
        "dflash_config": {
            "target_layer_ids": [0, target.num_hidden_layers - 1],
            "mask_token_id": target.vocab_size - 1,
        },
    }
    raw.update(over)
    return raw


def mimo_config(target: ModelConfig, layers: int = 2, window: int = 3, **over: Any) -> dict[str, Any]:
    """A MiMo-layout dflash/config.json: every layer sliding and bidirectional, sinks, value scale,
    partial RoPE, its own rms_norm_eps."""
    raw = {
        "architectures": ["DFlashDraftModel"],
        "is_causal": False,
        "use_sliding_window": True,
        "hidden_act": "silu",
        "attention_bias": False,
        "tie_word_embeddings": False,
        "add_swa_attention_sink_bias": True,
        "layer_types": ["sliding_attention"] * layers,
        "head_dim": 16,
        "v_head_dim": 16,
        "block_size": 4,
        "hidden_size": target.hidden_size,
        "target_hidden_size": target.hidden_size,
        "num_target_layers": target.num_hidden_layers,
        "partial_rotary_factor": 0.5,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 48,
        "num_hidden_layers": layers,
        "rms_norm_eps": 1e-2,
        "rope_theta": 10000.0,
        "sliding_window": window,
        "dflash_config": {
            "block_size": 4,
            "target_layer_ids": [0, target.num_hidden_layers - 1],
            "mask_token_id": target.vocab_size - 2,
            "attention_value_scale": 0.6,
            "attention_sink_bias": True,
        },
    }
    raw.update(over)
    return raw


def write_drafter_dir(
    path: Path, target: ModelConfig, raw: dict[str, Any], layout: str = "reference", seed: int = 0,
    shards: int = 1, mask_embedding: Any = True,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """Write a drafter directory; returns its tensors by published name (+ "mask_embedding").

    layout "reference": config.json + model.safetensors; "mimo": config.json +
    dflash_draft_model.safetensors (or `shards` files) + model.safetensors.index.json +
    mask_embedding.pt (a {mask_token_id, embedding} dict; `mask_embedding` = a tensor or dict to
    store instead, False for none)."""
    from safetensors.torch import save_file

    from tilert.checkpoint.drafter import drafter_config

    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(raw, indent=1))
    d = drafter_config(raw, target)
    w = drafter_tensors(target, d, seed)
    if layout == "reference":
        save_file(w, str(path / "model.safetensors"))
    else:
        names = sorted(w)
        files = ["dflash_draft_model.safetensors"] if shards == 1 else [
            f"dflash_draft_model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]  # fmt: skip
        wmap = {n: files[i % shards] for i, n in enumerate(names)}
        for f in files:
            save_file({n: w[n] for n in names if wmap[n] == f}, str(path / f))
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wmap}))
        if mask_embedding is not False:
            g = torch.Generator().manual_seed(seed + 1)
            emb = torch.randn(target.hidden_size, generator=g).to(torch.bfloat16)
            obj = {"mask_token_id": d.mask_token_id, "embedding": emb} if mask_embedding is True else mask_embedding
            torch.save(obj, path / "mask_embedding.pt")
            w = dict(w, mask_embedding=emb if mask_embedding is True else None)
    return w


# ---- the published forward, written out ----------------------------------------------------------


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x: torch.Tensor, pos: torch.Tensor, rd: int, theta: float) -> torch.Tensor:
    """Rotate-half (NeoX) RoPE on the first rd dims of each head; x [T, heads, d]."""
    inv = 1.0 / theta ** (torch.arange(0, rd, 2, dtype=torch.float64) / rd)
    ang = pos.double()[:, None] * inv[None, :]
    cos = torch.cat([ang.cos(), ang.cos()], -1)[:, None, :]
    sin = torch.cat([ang.sin(), ang.sin()], -1)[:, None, :]
    xr, xp = x[..., :rd], x[..., rd:]
    rot = torch.cat([-xr[..., rd // 2 :], xr[..., : rd // 2]], -1)
    return torch.cat([xr * cos + rot * sin, xp], -1)


def published_forward(
    raw: dict[str, Any], w: dict[str, torch.Tensor], embed: torch.Tensor, head: torch.Tensor,
    features: torch.Tensor, block: list[int], start: int, mask_mode: str = "per_row",
) -> torch.Tensor:  # fmt: skip
    """Drafter logits [B, V] (float64) for `block` at positions start.., with context rows
    features [start, n*H] (target hidden states at positions 0..start-1).

    As the reference drafter computes it: context = hidden_norm(fc(features)); per layer q from the
    block (q_norm, RoPE), k/v from [context, block] (k_norm, RoPE; v times attention_value_scale),
    the reference's mask (causal: k <= q; sliding window W: q - k < W and, unless causal,
    k - q < W), softmax scale head_dim^-0.5 with the sink logit in the denominator.
    mask_mode "anchored" puts every row's window at the block's first row instead (what tilert
    did before; tests use it to show the difference matters)."""
    f64 = {k: v.double() for k, v in w.items() if v is not None}
    sub = raw["dflash_config"]
    nq, nkv, hd = raw["num_attention_heads"], raw["num_key_value_heads"], raw["head_dim"]
    eps, theta = raw["rms_norm_eps"], raw["rope_theta"]
    rd = int(hd * raw.get("partial_rotary_factor", 1.0))
    vscale = sub.get("attention_value_scale", 1.0)
    sink_on = sub.get("attention_sink_bias", False)
    W = raw["sliding_window"] if raw.get("use_sliding_window") else None
    types, is_causal = raw["layer_types"], raw.get("is_causal")
    mask_id = sub["mask_token_id"]
    B = len(block)
    x = embed.double()[torch.tensor(block)]
    if "mask_embedding" in f64:
        x[torch.tensor(block) == mask_id] = f64["mask_embedding"]
    ctx = _rms(features.double() @ f64["fc.weight"].T, f64["hidden_norm.weight"], eps)
    qpos = torch.arange(start, start + B)
    kpos = torch.arange(0, start + B)
    for i in range(raw["num_hidden_layers"]):
        p = f"layers.{i}."
        h = _rms(x, f64[p + "input_layernorm.weight"], eps)
        q = (h @ f64[p + "self_attn.q_proj.weight"].T).view(B, nq, hd)
        q = _rope(_rms(q, f64[p + "self_attn.q_norm.weight"], eps), qpos, rd, theta)
        src = torch.cat([ctx, h])
        k = (src @ f64[p + "self_attn.k_proj.weight"].T).view(-1, nkv, hd)
        k = _rope(_rms(k, f64[p + "self_attn.k_norm.weight"], eps), kpos, rd, theta)
        v = (src @ f64[p + "self_attn.v_proj.weight"].T).view(-1, nkv, hd) * vscale
        sliding = types[i] == "sliding_attention"
        causal = sliding if is_causal is None else is_causal
        qq, kk = qpos[:, None], kpos[None, :]
        if mask_mode == "anchored":
            qq = torch.full_like(qq, start)
        ok = torch.ones(B, len(kpos), dtype=torch.bool)
        if causal:
            ok &= kpos[None, :] <= qpos[:, None]
        if sliding:
            ok &= qq - kk < W
            if not causal:
                ok &= kk - qq < W
        g = nq // nkv
        s = torch.einsum("bhd,khd->hbk", q, k.repeat_interleave(g, 1)) / math.sqrt(hd)
        s = s.masked_fill(~ok[None], float("-inf"))
        if sink_on:
            sink = f64[p + "self_attn.attention_sink_bias"].view(nq, 1, 1).expand(nq, B, 1)
            probs = torch.softmax(torch.cat([s, sink], -1), -1)[..., :-1]
        else:
            probs = torch.softmax(s, -1)
        o = torch.einsum("hbk,khd->bhd", probs, v.repeat_interleave(g, 1)).reshape(B, nq * hd)
        x = x + o @ f64[p + "self_attn.o_proj.weight"].T
        h = _rms(x, f64[p + "post_attention_layernorm.weight"], eps)
        gate, up = h @ f64[p + "mlp.gate_proj.weight"].T, h @ f64[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(gate) * up) @ f64[p + "mlp.down_proj.weight"].T
    return _rms(x, f64["norm.weight"], eps) @ head.double().T
