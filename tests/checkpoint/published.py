"""Checkpoints written the way the published MiMo-V2 ones are, at the `tiny` configs' sizes.

config.json carries the hub field names and values (including fields tilert does not use, and
`routed_scaling_factor: null`) and no tilert `quantization` block; the weights are bf16 safetensors
with HF names, sharded with an index; the router weight and sink bias are stored in bf16 (as some
exports do), and the MTP layers sit beside the model (tilert skips them).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import torch

from tilert.checkpoint.manifest import bf16_config
from tilert.models.config import ModelConfig, parse_config
from tilert.models.weights import save_safetensors, synthetic_weights

# MiMo-V2-Flash's config.json layout (hub spelling), at tiny sizes
FLASH = {
    "architectures": ["MiMoV2FlashForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_mimo_v2_flash.MiMoV2FlashConfig",
        "AutoModel": "modeling_mimo_v2_flash.MiMoV2FlashModel",
        "AutoModelForCausalLM": "modeling_mimo_v2_flash.MiMoV2FlashForCausalLM",
    },
    "add_full_attention_sink_bias": False,
    "add_swa_attention_sink_bias": True,
    "attention_bias": False,
    "attention_chunk_size": 4,
    "attention_dropout": 0.0,
    "attention_value_scale": 0.707,
    "bos_token_id": None,
    "eos_token_id": 151645,
    "head_dim": 24,
    "hidden_act": "silu",
    "hidden_size": 64,
    "hybrid_block_size": None,
    "hybrid_layer_pattern": [0, 1, 1, 0],
    "initializer_range": 0.02,
    "intermediate_size": 96,
    "layernorm_epsilon": 1e-05,
    "max_position_embeddings": 262144,
    "model_type": "mimo_v2_flash",
    "moe_intermediate_size": 32,
    "moe_layer_freq": [0, 1, 1, 1],
    "n_group": 1,
    "n_routed_experts": 8,
    "n_shared_experts": None,
    "norm_topk_prob": True,
    "num_attention_heads": 4,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 4,
    "num_key_value_heads": 2,
    "partial_rotary_factor": 0.334,
    "rope_scaling": None,
    "rope_theta": 5000000,
    "routed_scaling_factor": None,
    "scoring_func": "sigmoid",
    "sliding_window": 4,
    "sliding_window_size": 4,
    "swa_head_dim": 24,
    "swa_num_attention_heads": 4,
    "swa_num_key_value_heads": 2,
    "swa_rope_theta": 10000,
    "swa_v_head_dim": 16,
    "tie_word_embeddings": False,
    "topk_group": 1,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.40.1",
    "use_cache": True,
    "v_head_dim": 16,
    "vocab_size": 160,
}

# MiMo-V2.5-Pro's (architecture MiMoV2ForCausalLM): sinks on both kinds of layer, grouped routing,
# one KV head on full layers, MTP layers declared
PRO = {
    **FLASH,
    "architectures": ["MiMoV2ForCausalLM"],
    "auto_map": {
        "AutoConfig": "configuration_mimo_v2.MiMoV2Config",
        "AutoModelForCausalLM": "modeling_mimo_v2.MiMoV2ForCausalLM",
    },
    "model_type": "mimo_v2",
    "add_full_attention_sink_bias": True,
    "num_key_value_heads": 1,
    "hybrid_layer_pattern": [0, 1, 1, 0, 1],
    "moe_layer_freq": [0, 1, 1, 1, 1],
    "num_hidden_layers": 5,
    "n_routed_experts": 16,
    "num_experts_per_tok": 4,
    "n_group": 4,
    "topk_group": 2,
    "rope_theta": 10000000,
    "sliding_window": 3,
    "sliding_window_size": 3,
    "attention_chunk_size": 3,
    "num_nextn_predict_layers": 3,
    "max_position_embeddings": 1048576,
}

MTP = "model.mtp.layers.0."


def published_config(raw: dict, name: str = "published") -> ModelConfig:
    return parse_config(raw, name=name)


def published_weights(cfg: ModelConfig, seed: int = 11) -> dict[str, torch.Tensor]:
    """bf16 HF tensors; router weight and sink biases stored in bf16; MTP tensors beside them."""
    w = synthetic_weights(bf16_config(cfg), seed, include_drafter=False)
    for k in w:
        if k.endswith(("mlp.gate.weight", "attention_sink_bias")):
            w[k] = w[k].to(torch.bfloat16)
    H = cfg.hidden_size
    w[MTP + "enorm.weight"] = torch.ones(H, dtype=torch.bfloat16)
    w[MTP + "eh_proj.weight"] = torch.zeros(H, 2 * H, dtype=torch.bfloat16)
    return w


def write_shards(d: Path, weights: dict[str, torch.Tensor], shards: int = 2) -> Path:
    """`shards` safetensors files + model.safetensors.index.json, as HF exports write them."""
    d.mkdir(parents=True, exist_ok=True)
    names = list(weights)
    weight_map = {}
    for i in range(shards):
        part = {k: weights[k] for k in names[i::shards]}
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_safetensors(part, d / fname)
        weight_map.update(dict.fromkeys(part, fname))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in weights.values())}}
    (d / "model.safetensors.index.json").write_text(json.dumps({**index, "weight_map": weight_map}))
    return d


def write_published(d: Path, raw: dict, weights: dict[str, torch.Tensor], shards: int = 2) -> Path:
    """config.json + `shards` safetensors files + model.safetensors.index.json."""
    write_shards(d, weights, shards)
    (d / "config.json").write_text(json.dumps(raw, indent=2))
    return d


def in_thread(fn: Any, timeout: float = 120.0) -> Any:
    """fn() on a fresh thread (torch CPU ops run much faster off pytest's main thread on 2-core CI
    boxes, see test_api); re-raises what fn raised."""
    out: list = []
    err: list[BaseException] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as e:  # handed to the caller below
            err.append(e)

    t = threading.Thread(target=run)
    t.start()
    t.join(timeout)
    if err:
        raise err[0]
    assert out, f"no result within {timeout} s"
    return out[0]


def upcast(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What a loader must hand the model: the bf16-stored router/sink tensors as float32, MTP dropped."""
    out = {k: v for k, v in weights.items() if not k.startswith("model.mtp.")}
    for k in out:
        if k.endswith(("mlp.gate.weight", "attention_sink_bias")):
            out[k] = out[k].float()
    return out
