"""The checkpoint contract: which tensors a model of this family stores, in which form.

Storage form is a flat dict HF-name -> tensor (what a safetensors checkpoint holds). Every
consumer (plain reference, IR executor, sharded loaders, parameter counting) derives from the
one enumeration `_logical()` here, so they cannot disagree about names, shapes or formats.

Linear weights come in three forms, chosen per module group by `cfg.quantization`:
- bf16:  `X.weight` bf16 [out, in]
- fp8:   `X.weight` float8_e4m3fn [out, in] + `X.weight_scale_inv` f32 [ceil(out/128), ceil(in/128)]
- mxfp4: `X.weight_blocks` uint8 [out, in/2] + `X.weight_scales` uint8 (e8m0) [out, in/32]
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import save_file

from tilert.numerics import fp8, mxfp4

from .config import ModelConfig

FP8_BLOCK = 128
MXFP4_BLOCK = 32
DRAFTER_PREFIX = "dflash."


class WeightError(ValueError):
    """A checkpoint that does not match the config; the message names the tensor."""


@dataclass(frozen=True)
class TensorSpec:
    """One stored tensor: its exact name, shape, dtype and what it is for."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    role: str  # bf16_weight | fp8_weight | fp8_scale | mxfp4_blocks | mxfp4_scales | embedding |
    #            norm | router_weight | router_bias | sink_bias


class _Logical(NamedTuple):
    """One logical tensor before storage: a linear (fmt bf16/fp8/mxfp4) or a raw tensor."""

    name: str  # linears: the prefix without ".weight"; raw tensors: the full name
    shape: tuple[int, ...]
    fmt: str  # "bf16" | "fp8" | "mxfp4" (linears) | "raw"
    role: str  # linear | embedding | norm | router_weight | router_bias | sink_bias
    group: str  # "target" | "expert" | "drafter"
    quant: str = ""  # linears: the QuantConfig field that sets its format ("" = always bf16: the drafter)


LogicalTensor = _Logical


_RAW_DTYPE = {
    "embedding": torch.bfloat16,
    "norm": torch.bfloat16,
    "router_weight": torch.float32,
    "router_bias": torch.float32,
    "sink_bias": torch.float32,
}


def _lin(name: str, out: int, inp: int, fmt: str, group: str = "target", quant: str = "") -> _Logical:
    return _Logical(name, (out, inp), fmt, "linear", group, quant)


def _raw(name: str, shape: tuple[int, ...], role: str, group: str = "target") -> _Logical:
    return _Logical(name, shape, "raw", role, group)


def _logical(cfg: ModelConfig, include_drafter: bool) -> Iterator[_Logical]:
    """Every logical tensor of the model, in a fixed order (DESIGN §5 names)."""
    q = cfg.quantization
    H = cfg.hidden_size
    yield _raw("model.embed_tokens.weight", (cfg.vocab_size, H), "embedding")
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        a = cfg.attention(i)
        yield _raw(p + "input_layernorm.weight", (H,), "norm")
        yield _lin(p + "self_attn.q_proj", a.num_heads * a.head_dim, H, q.attention, quant="attention")
        yield _lin(p + "self_attn.k_proj", a.num_kv_heads * a.head_dim, H, q.attention, quant="attention")
        yield _lin(p + "self_attn.v_proj", a.num_kv_heads * a.v_head_dim, H, q.attention, quant="attention")
        yield _lin(p + "self_attn.o_proj", H, a.num_heads * a.v_head_dim, q.attention, quant="attention")
        if a.sink:
            yield _raw(p + "self_attn.attention_sink_bias", (a.num_heads,), "sink_bias")
        yield _raw(p + "post_attention_layernorm.weight", (H,), "norm")
        if cfg.is_moe(i):
            E, inter = cfg.n_routed_experts, cfg.moe_intermediate_size
            yield _raw(p + "mlp.gate.weight", (E, H), "router_weight")
            yield _raw(p + "mlp.gate.e_score_correction_bias", (E,), "router_bias")
            for e in range(E):
                ep = f"{p}mlp.experts.{e}."
                yield _lin(ep + "gate_proj", inter, H, q.experts, "expert", "experts")
                yield _lin(ep + "up_proj", inter, H, q.experts, "expert", "experts")
                yield _lin(ep + "down_proj", H, inter, q.experts, "expert", "experts")
        else:
            inter = cfg.intermediate_size
            yield _lin(p + "mlp.gate_proj", inter, H, q.dense_mlp, quant="dense_mlp")
            yield _lin(p + "mlp.up_proj", inter, H, q.dense_mlp, quant="dense_mlp")
            yield _lin(p + "mlp.down_proj", H, inter, q.dense_mlp, quant="dense_mlp")
    yield _raw("model.norm.weight", (H,), "norm")
    if not cfg.tie_word_embeddings:
        yield _lin("lm_head", cfg.vocab_size, H, q.lm_head, quant="lm_head")
    if include_drafter and cfg.dflash is not None:
        yield from _logical_drafter(cfg)


def _logical_drafter(cfg: ModelConfig) -> Iterator[_Logical]:
    d = cfg.dflash
    assert d is not None
    Hd, hd, g = d.hidden_size, d.head_dim, "drafter"
    P = DRAFTER_PREFIX
    yield _lin(P + "fc", Hd, len(d.target_layer_ids) * cfg.hidden_size, "bf16", g)
    yield _raw(P + "hidden_norm.weight", (Hd,), "norm", g)
    if d.mask_embedding:
        yield _raw(P + "mask_embedding", (cfg.hidden_size,), "embedding", g)
    for i in range(d.num_hidden_layers):
        p = f"{P}layers.{i}."
        yield _raw(p + "input_layernorm.weight", (Hd,), "norm", g)
        yield _lin(p + "self_attn.q_proj", d.num_attention_heads * hd, Hd, "bf16", g)
        yield _lin(p + "self_attn.k_proj", d.num_key_value_heads * hd, Hd, "bf16", g)
        yield _lin(p + "self_attn.v_proj", d.num_key_value_heads * hd, Hd, "bf16", g)
        yield _lin(p + "self_attn.o_proj", Hd, d.num_attention_heads * hd, "bf16", g)
        yield _raw(p + "self_attn.q_norm.weight", (hd,), "norm", g)
        yield _raw(p + "self_attn.k_norm.weight", (hd,), "norm", g)
        if d.attention_sink:
            yield _raw(p + "self_attn.attention_sink_bias", (d.num_attention_heads,), "sink_bias", g)
        yield _raw(p + "post_attention_layernorm.weight", (Hd,), "norm", g)
        yield _lin(p + "mlp.gate_proj", d.intermediate_size, Hd, "bf16", g)
        yield _lin(p + "mlp.up_proj", d.intermediate_size, Hd, "bf16", g)
        yield _lin(p + "mlp.down_proj", Hd, d.intermediate_size, "bf16", g)
    yield _raw(P + "norm.weight", (Hd,), "norm", g)


def _stored(t: _Logical) -> list[TensorSpec]:
    """The stored tensors that hold one logical tensor."""
    if t.fmt == "raw":
        return [TensorSpec(t.name, t.shape, _RAW_DTYPE[t.role], t.role)]
    out, inp = t.shape
    w = t.name + ".weight"
    if t.fmt == "bf16":
        return [TensorSpec(w, (out, inp), torch.bfloat16, "bf16_weight")]
    if t.fmt == "fp8":
        sc = (-(-out // FP8_BLOCK), -(-inp // FP8_BLOCK))
        return [
            TensorSpec(w, (out, inp), torch.float8_e4m3fn, "fp8_weight"),
            TensorSpec(w + "_scale_inv", sc, torch.float32, "fp8_scale"),
        ]
    if t.fmt == "mxfp4":
        if inp % MXFP4_BLOCK:
            raise WeightError(f"{w}: MXFP4 needs the input dim ({inp}) to be a multiple of {MXFP4_BLOCK}")
        return [
            TensorSpec(w + "_blocks", (out, inp // 2), torch.uint8, "mxfp4_blocks"),
            TensorSpec(w + "_scales", (out, inp // MXFP4_BLOCK), torch.uint8, "mxfp4_scales"),
        ]
    raise WeightError(f"{w}: unknown storage format {t.fmt!r}")


def logical_tensors(cfg: ModelConfig, include_drafter: bool = True) -> list[LogicalTensor]:
    """Every logical tensor (linears by prefix, raw tensors by name) in the config's formats."""
    return list(_logical(cfg, include_drafter))


def stored_specs(t: LogicalTensor) -> list[TensorSpec]:
    """The stored tensors that hold one logical tensor in its format."""
    return _stored(t)


# Casts applied on load, as upstream loaders do: a float32 tensor (router, its bias, sink bias, FP8
# scales) may be stored in bf16/f16 and is upcast (exact). Nothing is ever downcast.
UPCASTS: dict[torch.dtype, frozenset[torch.dtype]] = {torch.float32: frozenset({torch.bfloat16, torch.float16})}


def castable(stored: torch.dtype | str, want: torch.dtype) -> bool:
    """True if a tensor stored as `stored` loads as `want` (equal, or an exact upcast)."""
    return stored == want or stored in UPCASTS.get(want, ())


def weight_specs(cfg: ModelConfig, include_drafter: bool = True) -> dict[str, TensorSpec]:
    """Every stored tensor of the checkpoint, by name, in a fixed order."""
    return {s.name: s for t in _logical(cfg, include_drafter) for s in _stored(t)}


def logical_param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts in logical elements (quantised [out, in] weights count out*in, scales not).

    active = every non-expert parameter (embedding and lm_head included) plus num_experts_per_tok
    experts per MoE layer; the drafter is reported on its own and is in neither total nor active.
    """
    non_expert = expert = drafter = 0
    for t in _logical(cfg, include_drafter=True):
        n = math.prod(t.shape)
        if t.group == "expert":
            expert += n
        elif t.group == "drafter":
            drafter += n
        else:
            non_expert += n
    active_expert = expert * cfg.num_experts_per_tok // cfg.n_routed_experts if expert else 0
    return {
        "total": non_expert + expert,
        "active": non_expert + active_expert,
        "non_expert": non_expert,
        "expert": expert,
        "active_expert": active_expert,
        "drafter": drafter,
    }


# ---- synthetic weights --------------------------------------------------------------------------


def _draw(t: _Logical, seed: int) -> torch.Tensor:
    """The logical f32 values of one tensor; seeded by (seed, name) so order and subsets do not matter."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(t.name.encode())) % (1 << 62))
    x = torch.randn(t.shape, generator=gen, dtype=torch.float32)
    if t.role == "linear":
        return x * t.shape[1] ** -0.5  # keeps the output scale of a projection ~ its input's
    if t.role == "norm":
        return 1.0 + 0.1 * x
    if t.role == "router_weight":
        return x * t.shape[1] ** -0.5  # router logits O(1)
    if t.role == "router_bias":
        return 0.1 * x
    return x  # embedding, sink bias: N(0, 1)


def _store(t: _Logical, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Quantise a logical tensor into its storage form (the inverse of dequantize_weight)."""
    if t.fmt == "raw":
        return {t.name: x.to(_RAW_DTYPE[t.role])}
    w = t.name + ".weight"
    if t.fmt == "bf16":
        return {w: x.to(torch.bfloat16)}
    if t.fmt == "fp8":
        qw, sc = fp8.quantize_blocks(x)
        return {w: qw, w + "_scale_inv": sc.to(torch.float32)}

    blocks, scales = mxfp4.quantize(x)
    return {w + "_blocks": blocks, w + "_scales": scales}


def synthetic_weights(
    cfg: ModelConfig,
    seed: int,
    device: str | torch.device = "cpu",
    include_drafter: bool = True,
    select: Callable[[str], bool] | None = None,
) -> dict[str, torch.Tensor]:
    """A deterministic random checkpoint in storage form, with activations that stay O(1).

    Projections ~ N(0, 1/fan_in), norms 1 + 0.1 N(0,1), router bias 0.1 N(0,1), sink bias and
    embedding N(0,1); then quantised to the configured formats. Each tensor's values depend only on
    (seed, name), so `select` (a predicate on stored names, e.g. one rank's shard) yields the same
    values as the full dict.
    """
    out: dict[str, torch.Tensor] = {}
    for t in _logical(cfg, include_drafter):
        if select is not None and not any(select(s.name) for s in _stored(t)):
            continue
        for name, v in _store(t, _draw(t, seed)).items():
            if select is None or select(name):
                out[name] = v.to(device)
    return out


# ---- validation, dequantisation, files ----------------------------------------------------------


def margin_safe_weights(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """Synthetic weights whose selection bias (10 apart per expert) fixes every token's experts, so
    runtimes that round differently still route alike and their outputs can be compared."""
    w = synthetic_weights(cfg, seed)
    for k in w:
        if k.endswith("e_score_correction_bias"):
            w[k] = torch.arange(cfg.n_routed_experts, 0, -1, dtype=torch.float32) * 10.0
    return w


def nonfinite(t: torch.Tensor, role: str = "") -> bool:
    """True if a stored tensor holds NaN/Inf in its own format (e4m3fn NaN, e8m0 0xFF, float NaN/Inf)."""
    if role == "mxfp4_scales":
        return bool((t == 0xFF).any())  # e8m0 NaN
    if t.dtype == torch.float8_e4m3fn:
        return bool(((t.view(torch.uint8) & 0x7F) == 0x7F).any())  # e4m3fn NaN (no Inf)
    if not t.is_floating_point():
        return False  # E2M1 blocks, integers: no NaN/Inf
    flat = t.reshape(-1)
    step = 1 << 26  # bound the temporary memory of the check on huge tensors
    return any(not bool(torch.isfinite(flat[i : i + step]).all()) for i in range(0, flat.numel(), step))


def validate_weights(
    cfg: ModelConfig, weights: dict[str, torch.Tensor], include_drafter: bool = False, check_values: bool = True
) -> None:
    """Raise WeightError naming each missing, extra, misshaped, wrong-dtype or non-finite tensor.

    With include_drafter=False, `dflash.*` tensors are neither required nor checked (a checkpoint
    that carries a drafter still validates as a target checkpoint).
    """
    specs = weight_specs(cfg, include_drafter)
    problems: list[str] = []
    for name, s in specs.items():
        t = weights.get(name)
        if t is None:
            problems.append(f"missing tensor {name}")
        elif tuple(t.shape) != s.shape or not castable(t.dtype, s.dtype):
            problems.append(f"tensor {name}: expected {s.dtype} {list(s.shape)}, got {t.dtype} {list(t.shape)}")
        elif check_values and nonfinite(t, s.role):
            problems.append(f"tensor {name}: contains NaN/Inf")
    for name in weights:
        if name not in specs and (include_drafter or not name.startswith(DRAFTER_PREFIX)):
            problems.append(f"unexpected tensor {name}")
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise WeightError(f"checkpoint does not match config '{cfg.name}': " + "; ".join(problems[:10]) + more)


def dequantize_weight(weights: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    """A linear weight as float32 [out, in], whichever storage form `prefix` is in."""
    prefix = prefix.removesuffix(".weight")
    w = prefix + ".weight"
    if w + "_blocks" in weights:
        return mxfp4.dequantize(weights[w + "_blocks"], weights[w + "_scales"], dtype=torch.float32)
    if w + "_scale_inv" in weights:
        return fp8.dequantize_blocks(weights[w], weights[w + "_scale_inv"], dtype=torch.float32)
    if w in weights:
        return weights[w].to(torch.float32)
    raise WeightError(f"no weight stored for {prefix} (looked for {w}, {w}_scale_inv, {w}_blocks)")


def from_file(name: str, t: torch.Tensor) -> torch.Tensor:
    """A stored tensor as read from a checkpoint file -> its in-memory form: MXFP4 blocks move from
    the published word order to the one in force (numerics/mxfp4.py, TILERT_MXFP4_ORDER)."""
    return mxfp4.to_order(t) if name.endswith(".weight_blocks") else t


def to_file(name: str, t: torch.Tensor) -> torch.Tensor:
    """The inverse of `from_file`: what a checkpoint file holds (MXFP4 blocks in the published order)."""
    return mxfp4.from_order(t) if name.endswith(".weight_blocks") else t


def save_safetensors(weights: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write a storage-form dict as one safetensors file (HF layout, loadable by
    `tilert.checkpoint.load_safetensors`)."""
    save_file({k: to_file(k, v.detach()).contiguous().cpu() for k, v in weights.items()}, str(path),
              metadata={"format": "pt"})  # fmt: skip
