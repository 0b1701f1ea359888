"""Model configs: HF-style JSON (MiMo-V2 field names) -> validated, frozen dataclasses.

Field names follow the public MiMo-V2 configs so real config.json files load as they are. Every
field is checked on load; a bad or missing field raises ConfigError naming it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from importlib import resources
from pathlib import Path
from typing import Any

QUANT_CHOICES = ("mxfp4", "fp8", "bf16")
# Sliding-window conventions, by the keys a query at position p sees for a window W:
#   "transformers"    (default; transformers' `kv_idx > q_idx - W`, vLLM's FlashAttention (W-1, 0)):
#                      the W keys p-W+1 .. p, the query included;
#   "flash_attention" (FlashAttention's window (W, 0) read literally, SGLang's FA3 backend):
#                      the W+1 keys p-W .. p.
# Every attention implementation takes the window as a key count (`window_keys`), so the convention
# is decided here once.
WINDOW_CONVENTIONS = {"transformers": 0, "flash_attention": 1}
DRAFTER_LAYER_TYPES = ("full_attention", "sliding_attention")


def window_keys(window: int, convention: str = "transformers") -> int:
    """Keys a query sees on its side of a sliding window W (itself included); 0 = no window."""
    if convention not in WINDOW_CONVENTIONS:
        raise ConfigError(f"sliding-window convention must be one of {sorted(WINDOW_CONVENTIONS)}, got {convention!r}")
    return window + WINDOW_CONVENTIONS[convention] if window > 0 else 0


def rotary_dim(partial_rotary_factor: float, head_dim: int) -> int:
    """Leading dims of a head that RoPE rotates (NeoX halves): factor x head_dim, rounded, even."""
    d = int(round(partial_rotary_factor * head_dim))
    return d - d % 2


class ConfigError(ValueError):
    """A config that cannot describe a model of this family; the message names the field."""


@dataclass(frozen=True)
class AttentionSpec:
    """Attention shape of one layer (full and sliding-window layers differ)."""

    sliding: bool
    num_heads: int
    num_kv_heads: int
    head_dim: int  # q/k
    v_head_dim: int
    rope_dim: int  # leading dims of q/k that are rotated (NeoX halves)
    rope_theta: float
    window: int  # 0 = full attention; else a query at p sees the `window` keys p-window+1 .. p
    sink: bool


@dataclass(frozen=True)
class DFlashConfig:
    """The DFlash block drafter (DESIGN §7; semantics and sources in docs/speculative.md).

    Per layer: attention type (`layer_types`: full_attention | sliding_attention) and causality
    (`is_causal`; None = the reference repository's rule: sliding layers causal, full layers not).
    A sliding layer masks each query row on its own: key k is visible to the query at q iff
    q - k < W (and k - q < W unless causal), W = `window_keys(sliding_window_size, convention)`.
    """

    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    block_size: int
    target_layer_ids: tuple[int, ...]
    sliding_window_size: int
    rope_theta: float
    mask_token_id: int
    rms_norm_eps: float = 1e-6
    layer_types: tuple[str, ...] = ()  # () = every layer sliding if sliding_window_size > 0, else full
    is_causal: bool | None = False
    partial_rotary_factor: float = 1.0
    attention_value_scale: float = 1.0  # v (context and block rows) is scaled before attention
    attention_sink: bool = False  # per-layer `self_attn.attention_sink_bias` (one logit per query head)
    mask_embedding: bool = False  # `dflash.mask_embedding` replaces the mask token's embedding
    sliding_window_convention: str = "transformers"

    def layer_type(self, i: int) -> str:
        if self.layer_types:
            return self.layer_types[i]
        return "sliding_attention" if self.sliding_window_size > 0 else "full_attention"

    def layer_window(self, i: int) -> int:
        """Keys a query sees on each side (itself included) in layer i; 0 = no window."""
        if self.layer_type(i) != "sliding_attention":
            return 0
        return window_keys(self.sliding_window_size, self.sliding_window_convention)

    def layer_causal(self, i: int) -> bool:
        if self.is_causal is None:
            return self.layer_type(i) == "sliding_attention"
        return self.is_causal

    @property
    def rope_dim(self) -> int:
        return rotary_dim(self.partial_rotary_factor, self.head_dim)


@dataclass(frozen=True)
class QuantConfig:
    """Storage format per module group: mxfp4 | fp8 (e4m3, 128x128 block scales) | bf16."""

    experts: str = "mxfp4"
    attention: str = "fp8"
    dense_mlp: str = "fp8"
    lm_head: str = "bf16"


@dataclass(frozen=True)
class ModelConfig:
    name: str
    model_type: str
    num_hidden_layers: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    vocab_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    v_head_dim: int
    swa_num_attention_heads: int
    swa_num_key_value_heads: int
    swa_head_dim: int
    swa_v_head_dim: int
    hybrid_layer_pattern: tuple[int, ...]
    moe_layer_freq: tuple[bool, ...]
    sliding_window_size: int
    add_swa_attention_sink_bias: bool
    add_full_attention_sink_bias: bool
    attention_value_scale: float
    partial_rotary_factor: float
    rope_theta: float
    swa_rope_theta: float
    n_routed_experts: int
    num_experts_per_tok: int
    topk_method: str
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    scoring_func: str
    hidden_act: str
    layernorm_epsilon: float
    routed_scaling_factor: float = 1.0
    sliding_window_convention: str = "transformers"  # see WINDOW_CONVENTIONS
    max_position_embeddings: int = 1 << 20
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0
    quantization: QuantConfig = field(default_factory=QuantConfig)
    dflash: DFlashConfig | None = None

    # ---- derived facts ------------------------------------------------------------------
    def is_sliding(self, layer: int) -> bool:
        return self.hybrid_layer_pattern[layer] == 1

    def is_moe(self, layer: int) -> bool:
        return bool(self.moe_layer_freq[layer])

    def attention(self, layer: int) -> AttentionSpec:
        s = self.is_sliding(layer)
        hd = self.swa_head_dim if s else self.head_dim
        return AttentionSpec(
            sliding=s,
            num_heads=self.swa_num_attention_heads if s else self.num_attention_heads,
            num_kv_heads=self.swa_num_key_value_heads if s else self.num_key_value_heads,
            head_dim=hd,
            v_head_dim=self.swa_v_head_dim if s else self.v_head_dim,
            rope_dim=self.rope_dim(hd),
            rope_theta=self.swa_rope_theta if s else self.rope_theta,
            window=window_keys(self.sliding_window_size, self.sliding_window_convention) if s else 0,
            sink=self.add_swa_attention_sink_bias if s else self.add_full_attention_sink_bias,
        )

    def rope_dim(self, head_dim: int) -> int:
        return rotary_dim(self.partial_rotary_factor, head_dim)

    def first_layers(self, n: int) -> ModelConfig:
        """The model cut to its first `n` layers: same widths and layer kinds in order, the drafter's
        target layers clamped into range. A quick full-width check of kernels (benchmarks/e2e.py
        --layers) without a full model's weights or compile of every layer's tasks."""
        L = self.num_hidden_layers
        if not 1 <= n <= L:
            raise ConfigError(f"{self.name} has 1..{L} layers, not {n}")
        cut = {f.name: getattr(self, f.name)[:n] for f in fields(self)
               if isinstance(getattr(self, f.name), tuple) and len(getattr(self, f.name)) == L}  # fmt: skip
        dflash = self.dflash
        if dflash is not None:
            ids = tuple(sorted({min(i, n - 1) for i in dflash.target_layer_ids}))
            dflash = replace(dflash, target_layer_ids=ids)
        return replace(self, num_hidden_layers=n, dflash=dflash, **cut)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (QuantConfig, DFlashConfig)):
                v = {g.name: _plain(getattr(v, g.name)) for g in fields(v)}
            out[f.name] = _plain(v)
        return out


def _plain(v: Any) -> Any:
    return list(v) if isinstance(v, tuple) else v


# ---- validation ------------------------------------------------------------------------------

_INT, _FLOAT, _BOOL, _STR = "int", "float", "bool", "str"


def _check(raw: dict[str, Any], key: str, kind: str, where: str = "", default: Any = ...) -> Any:
    name = f"{where}{key}"
    if key not in raw:
        if default is ...:
            raise ConfigError(f"config field '{name}' is missing")
        return default
    v = raw[key]
    ok = {
        _INT: isinstance(v, int) and not isinstance(v, bool),
        _FLOAT: isinstance(v, (int, float)) and not isinstance(v, bool),
        _BOOL: isinstance(v, bool),
        _STR: isinstance(v, str),
    }[kind]
    if not ok:
        raise ConfigError(f"config field '{name}' must be {kind}, got {v!r}")
    if kind == _INT and v < 0:
        raise ConfigError(f"config field '{name}' must be >= 0, got {v}")
    return float(v) if kind == _FLOAT else v


def _check_nullable(raw: dict[str, Any], key: str, null: float, default: Any = ...) -> float:
    """A float field whose JSON null means `null` (published configs write null for "no scaling")."""
    if key in raw and raw[key] is None:
        return null
    return _check(raw, key, _FLOAT, default=default)


def _positive(cfg: dict[str, Any], *keys: str, where: str = "") -> None:
    for k in keys:
        if cfg[k] <= 0:
            raise ConfigError(f"config field '{where}{k}' must be > 0, got {cfg[k]}")


def parse_config(raw: dict[str, Any], name: str = "custom") -> ModelConfig:
    """Validate an HF-style dict and build a ModelConfig; raises ConfigError naming the field."""
    if not isinstance(raw, dict):
        raise ConfigError("config must be a JSON object")
    ints = [
        "num_hidden_layers",
        "hidden_size",
        "intermediate_size",
        "moe_intermediate_size",
        "vocab_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "n_routed_experts",
        "num_experts_per_tok",
        "n_group",
        "topk_group",
        "sliding_window_size",
    ]
    raw = _published_aliases(raw)
    c: dict[str, Any] = {k: _check(raw, k, _INT) for k in ints}
    _positive(c, *ints)
    c["v_head_dim"] = _check(raw, "v_head_dim", _INT, default=c["head_dim"])
    for k in ("num_attention_heads", "num_key_value_heads", "head_dim", "v_head_dim"):
        c[f"swa_{k}"] = _check(raw, f"swa_{k}", _INT, default=c[k])
    _positive(c, "v_head_dim", "swa_num_attention_heads", "swa_num_key_value_heads", "swa_head_dim", "swa_v_head_dim")
    for k in ("partial_rotary_factor", "rope_theta", "layernorm_epsilon"):
        c[k] = _check(raw, k, _FLOAT)
    c["swa_rope_theta"] = _check(raw, "swa_rope_theta", _FLOAT, default=c["rope_theta"])
    # published configs write null for "no scaling" (1.0; the serving code skips the multiply)
    c["attention_value_scale"] = _check_nullable(raw, "attention_value_scale", null=1.0)
    c["routed_scaling_factor"] = _check_nullable(raw, "routed_scaling_factor", null=1.0, default=1.0)
    c["sliding_window_convention"] = _convention(raw, "")
    for k in ("add_swa_attention_sink_bias", "add_full_attention_sink_bias", "norm_topk_prob"):
        c[k] = _check(raw, k, _BOOL)
    c["tie_word_embeddings"] = _check(raw, "tie_word_embeddings", _BOOL, default=False)
    for k in ("topk_method", "scoring_func", "hidden_act"):
        c[k] = _check(raw, k, _STR)
    c["model_type"] = _check(raw, "model_type", _STR, default="mimo_v2")
    c["max_position_embeddings"] = _check(raw, "max_position_embeddings", _INT, default=1 << 20)
    c["num_nextn_predict_layers"] = _check(raw, "num_nextn_predict_layers", _INT, default=0)

    L = c["num_hidden_layers"]
    pattern = raw.get("hybrid_layer_pattern")
    if not isinstance(pattern, list) or len(pattern) != L or any(p not in (0, 1) for p in pattern):
        raise ConfigError(f"config field 'hybrid_layer_pattern' must be a list of {L} values 0/1")
    c["hybrid_layer_pattern"] = tuple(int(p) for p in pattern)
    freq = raw.get("moe_layer_freq")
    if isinstance(freq, int) and not isinstance(freq, bool):  # DeepSeek-style "every k-th layer"
        freq = [freq > 0 and i % freq == 0 for i in range(L)]
    if not isinstance(freq, list) or len(freq) != L or any(not isinstance(f, (bool, int)) for f in freq):
        raise ConfigError(f"config field 'moe_layer_freq' must be a list of {L} booleans")
    c["moe_layer_freq"] = tuple(bool(f) for f in freq)

    if not 0.0 < c["partial_rotary_factor"] <= 1.0:
        raise ConfigError("config field 'partial_rotary_factor' must be in (0, 1]")
    for pre in ("", "swa_"):
        if c[f"{pre}num_attention_heads"] % c[f"{pre}num_key_value_heads"]:
            raise ConfigError(
                f"config field '{pre}num_attention_heads' must be a multiple of '{pre}num_key_value_heads'"
            )
    if c["num_experts_per_tok"] > c["n_routed_experts"]:
        raise ConfigError("config field 'num_experts_per_tok' exceeds 'n_routed_experts'")
    if c["n_routed_experts"] % c["n_group"] or c["topk_group"] > c["n_group"]:
        raise ConfigError("config field 'n_group'/'topk_group' does not divide the experts into groups")
    if c["scoring_func"] != "sigmoid":
        raise ConfigError(f"config field 'scoring_func' must be 'sigmoid', got {c['scoring_func']!r}")
    if c["topk_method"] not in ("noaux_tc", "greedy"):
        raise ConfigError(f"config field 'topk_method' must be 'noaux_tc' or 'greedy', got {c['topk_method']!r}")
    if c["hidden_act"] != "silu":
        raise ConfigError(f"config field 'hidden_act' must be 'silu', got {c['hidden_act']!r}")
    if c["layernorm_epsilon"] <= 0:
        raise ConfigError("config field 'layernorm_epsilon' must be > 0")
    _check_unsupported(raw)

    q = raw.get("quantization", {})
    if not isinstance(q, dict):
        raise ConfigError("config field 'quantization' must be an object")
    for k, v in q.items():
        if k not in QuantConfig.__dataclass_fields__:
            raise ConfigError(f"config field 'quantization.{k}' is unknown")
        if v not in QUANT_CHOICES:
            raise ConfigError(f"config field 'quantization.{k}' must be one of {QUANT_CHOICES}, got {v!r}")
    c["quantization"] = QuantConfig(**q)
    if c["quantization"].experts == "mxfp4":
        for k in ("hidden_size", "moe_intermediate_size"):
            if c[k] % 32:
                raise ConfigError(f"config field '{k}' must be a multiple of 32 for MXFP4 experts")
    c["dflash"] = (
        _parse_dflash(raw["dflash"], L, c["vocab_size"], c["hidden_size"], c["layernorm_epsilon"])
        if raw.get("dflash") is not None
        else None
    )
    return ModelConfig(name=name, **c)


# HF spellings of fields this family names otherwise: (tilert/hub name, the other spelling)
_ALIASES = (("layernorm_epsilon", "rms_norm_eps"), ("sliding_window_size", "sliding_window"))


def _published_aliases(raw: dict[str, Any]) -> dict[str, Any]:
    """Map the other spelling of a field onto the hub name; both present must agree."""
    out = dict(raw)
    for name, other in _ALIASES:
        if other not in out:
            continue
        if name not in out:
            out[name] = out[other]
        elif out[other] is not None and out[other] != out[name]:
            raise ConfigError(f"config fields '{name}' ({out[name]!r}) and '{other}' ({out[other]!r}) disagree")
    return out


def _check_unsupported(raw: dict[str, Any]) -> None:
    """Fields published configs carry that tilert ignores when they hold their usual value, and refuses
    (naming the field) when a value would change the model: silently ignoring it would give wrong tokens."""
    shared = raw.get("n_shared_experts")
    if shared not in (None, 0):
        raise ConfigError(f"config field 'n_shared_experts' must be 0 or null (no shared expert), got {shared!r}")
    if raw.get("attention_bias") not in (None, False):
        raise ConfigError(f"config field 'attention_bias' must be false (no q/k/v bias), got {raw['attention_bias']!r}")
    rs = raw.get("rope_scaling")
    if rs is not None and not (isinstance(rs, dict) and rs.get("rope_type", rs.get("type")) == "default"):
        raise ConfigError(f"config field 'rope_scaling' must be null (RoPE scaling is not supported), got {rs!r}")
    qc = raw.get("quantization_config")
    if qc is None:
        return
    if not isinstance(qc, dict):
        raise ConfigError(f"config field 'quantization_config' must be an object, got {qc!r}")
    method = qc.get("quant_method")
    if method not in ("fp8", "mxfp4"):
        raise ConfigError(
            f"config field 'quantization_config.quant_method' must be 'fp8' or 'mxfp4' (or no quantization_config), "
            f"got {method!r}"
        )
    block = qc.get("weight_block_size")
    if method == "fp8" and block is not None and list(block) != [128, 128]:
        raise ConfigError(f"config field 'quantization_config.weight_block_size' must be [128, 128], got {block!r}")


def _convention(raw: dict[str, Any], where: str) -> str:
    v = _check(raw, "sliding_window_convention", _STR, where, default="transformers")
    if v not in WINDOW_CONVENTIONS:
        known = ", ".join(WINDOW_CONVENTIONS)
        raise ConfigError(f"config field '{where}sliding_window_convention' must be one of {known}, got {v!r}")
    return v


def _parse_dflash(raw: Any, num_layers: int, vocab: int, hidden: int, target_eps: float) -> DFlashConfig:
    """tilert's own drafter block (the target config's "dflash" object). Fields absent from older
    configs keep their old meaning: rms_norm_eps = the target's, every layer bidirectional and
    sliding iff sliding_window_size > 0, full RoPE, no value scale, sink or mask embedding."""
    if not isinstance(raw, dict):
        raise ConfigError("config field 'dflash' must be an object")
    w = "dflash."
    ints = [
        "num_hidden_layers",
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "block_size",
        "sliding_window_size",
        "mask_token_id",
    ]
    d: dict[str, Any] = {k: _check(raw, k, _INT, w) for k in ints}
    _positive(d, *[k for k in ints if k not in ("mask_token_id", "sliding_window_size")], where=w)
    d["rope_theta"] = _check(raw, "rope_theta", _FLOAT, w)
    ids = raw.get("target_layer_ids")
    if not isinstance(ids, list) or not ids or any(not isinstance(i, int) or not 0 <= i < num_layers for i in ids):
        raise ConfigError(f"config field 'dflash.target_layer_ids' must list layers in [0, {num_layers})")
    d["target_layer_ids"] = tuple(ids)
    if d["hidden_size"] != hidden:
        raise ConfigError(
            f"config field 'dflash.hidden_size' must equal hidden_size ({hidden}): the drafter shares the LM head"
        )
    if d["mask_token_id"] >= vocab:
        raise ConfigError(f"config field 'dflash.mask_token_id' must be < vocab_size ({vocab})")
    if d["num_attention_heads"] % d["num_key_value_heads"]:
        raise ConfigError("config field 'dflash.num_attention_heads' must be a multiple of num_key_value_heads")
    d["rms_norm_eps"] = _check(raw, "rms_norm_eps", _FLOAT, w, default=target_eps)
    d["partial_rotary_factor"] = _check(raw, "partial_rotary_factor", _FLOAT, w, default=1.0)
    d["attention_value_scale"] = _check(raw, "attention_value_scale", _FLOAT, w, default=1.0)
    d["attention_sink"] = _check(raw, "attention_sink", _BOOL, w, default=False)
    d["mask_embedding"] = _check(raw, "mask_embedding", _BOOL, w, default=False)
    d["sliding_window_convention"] = _convention(raw, w)
    causal = raw.get("is_causal", False)
    if causal is not None and not isinstance(causal, bool):
        raise ConfigError(f"config field 'dflash.is_causal' must be true, false or null, got {causal!r}")
    d["is_causal"] = causal
    types = raw.get("layer_types") or []
    if not isinstance(types, list) or (types and len(types) != d["num_hidden_layers"]) or any(
        t not in DRAFTER_LAYER_TYPES for t in types
    ):
        raise ConfigError(
            f"config field 'dflash.layer_types' must list {d['num_hidden_layers']} of {', '.join(DRAFTER_LAYER_TYPES)}"
        )
    d["layer_types"] = tuple(types)
    check_drafter(DFlashConfig(**d), "dflash.")
    return DFlashConfig(**d)


def check_drafter(d: DFlashConfig, where: str = "") -> None:
    """Value checks a drafter config must pass whichever layout it was read from."""
    for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
              "head_dim", "block_size"):  # fmt: skip
        if getattr(d, k) <= 0:
            raise ConfigError(f"config field '{where}{k}' must be > 0, got {getattr(d, k)}")
    if d.rms_norm_eps <= 0:
        raise ConfigError(f"config field '{where}rms_norm_eps' must be > 0")
    if not 0.0 < d.partial_rotary_factor <= 1.0 or d.rope_dim == 0:
        raise ConfigError(f"config field '{where}partial_rotary_factor' must rotate an even number of dims in (0, 1]")
    if any(d.layer_type(i) == "sliding_attention" for i in range(d.num_hidden_layers)) and d.sliding_window_size <= 0:
        raise ConfigError(f"config field '{where}sliding_window_size' must be > 0 for sliding_attention layers")


# ---- registry ---------------------------------------------------------------------------------


def list_models() -> list[str]:
    """Names of the configs shipped inside the package."""
    root = resources.files("tilert.models") / "configs"
    return sorted(p.name[: -len(".json")] for p in root.iterdir() if p.name.endswith(".json"))


def load_config(name_or_path: str | Path) -> ModelConfig:
    """A shipped model by name (e.g. 'mimo-v2.5-pro') or any config.json of this family by path."""
    p = Path(name_or_path)
    if p.suffix == ".json" or p.is_file():
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            raw = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {p} is not valid JSON: {e}") from None
        return parse_config(raw, name=p.stem)
    name = str(name_or_path)
    if name not in list_models():
        raise ConfigError(f"unknown model '{name}' (known: {', '.join(list_models())})")
    raw = json.loads((resources.files("tilert.models") / "configs" / f"{name}.json").read_text())
    return parse_config(raw, name=name)
