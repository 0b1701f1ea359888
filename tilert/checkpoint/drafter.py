"""Published DFlash drafters: read one from its own directory, attach it to a target, write it out.

Two published layouts (docs/speculative.md):
- the reference repository's (z-lab/dflash): config.json (HF Qwen3 fields + `dflash_config` with
  `target_layer_ids`, `block_size`, `mask_token_id`) and safetensors with `fc.weight`,
  `hidden_norm.weight`, `layers.{i}.*` (HF Qwen3 names), `norm.weight`;
- MiMo's: the same names in `dflash_draft_model.safetensors` (+ `model.safetensors.index.json`),
  `mask_embedding.pt` (the trained embedding of the mask token) and MiMo's extras in config.json
  (sliding layers, `is_causal`, attention sink bias, `attention_value_scale`,
  `partial_rotary_factor`, its own `rms_norm_eps`).
Config fields are mapped by name (Qwen3Config's defaults and rules where a field is absent);
tensors are read lazily, one at a time, and renamed to tilert's `dflash.*` names. A drafter that
does not fit its target fails with one line naming the mismatch.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from tilert.checkpoint.loader import CheckpointError, CheckpointReader, nonfinite
from tilert.models.config import (
    DRAFTER_LAYER_TYPES,
    WINDOW_CONVENTIONS,
    ConfigError,
    DFlashConfig,
    ModelConfig,
    check_drafter,
)
from tilert.models.weights import DRAFTER_PREFIX, weight_specs

CONFIG_NAME = "config.json"
MASK_EMBEDDING_NAME = "mask_embedding.pt"
MASK_EMBEDDING = DRAFTER_PREFIX + "mask_embedding"
SUBDIR = "dflash"  # where a target checkpoint (MiMo's, `tilert quantize` output) keeps its drafter
_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# fields of newer reference drafters (DFlash2 and friends) that change the forward pass tilert runs
_UNSUPPORTED = ("conv_kernel_size", "selector_rank", "selector_top_k")
_NEUTRAL = {"input_embedding_scale": 1.0, "output_multiplier": 1.0, "final_logit_softcapping": None}


class DrafterError(CheckpointError):
    """A drafter directory that cannot be read, or a drafter that does not fit its target."""


# ---- config --------------------------------------------------------------------------------------


def is_drafter_dir(path: str | Path) -> bool:
    """A directory holding a published drafter's config.json (one with a `dflash_config`)."""
    cj = Path(path) / CONFIG_NAME
    if not cj.is_file():
        return False
    try:
        raw = json.loads(cj.read_text())
    except ValueError:
        return False
    return isinstance(raw, dict) and isinstance(raw.get("dflash_config"), dict)


def find_drafter(path: str | Path) -> Path | None:
    """The drafter directory `path` is or holds as `dflash/`, else None."""
    p = Path(path)
    for d in (p, p / SUBDIR):
        if d.is_dir() and is_drafter_dir(d):
            return d
    return None


def _get(raw: dict[str, Any], sub: dict[str, Any], key: str, default: Any = ...) -> Any:
    """A field from dflash_config, else the top level (the reference reads both, dflash_config first)."""
    if key in sub:
        return sub[key]
    if key in raw:
        return raw[key]
    if default is ...:
        raise ConfigError(f"drafter config field 'dflash_config.{key}' is missing")
    return default


def _int(v: Any, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ConfigError(f"drafter config field '{name}' must be an int >= 0, got {v!r}")
    return v


def _float(v: Any, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ConfigError(f"drafter config field '{name}' must be a number, got {v!r}")
    return float(v)


def reference_target_layer_ids(num_target_layers: int, num_draft_layers: int) -> list[int]:
    """The reference repository's default target layers (when dflash_config has none)."""
    if num_draft_layers == 1:
        return [num_target_layers // 2]
    start, end = 1, num_target_layers - 3
    if end < start:
        raise ConfigError("drafter config: default target_layer_ids need num_target_layers >= 4")
    return [int(round(start + i * (end - start) / (num_draft_layers - 1))) for i in range(num_draft_layers)]


def _rope(raw: dict[str, Any]) -> tuple[float, float]:
    """(rope_theta, partial_rotary_factor): top-level fields or transformers' `rope_parameters`."""
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    for name, p in (("rope_parameters", params), ("rope_scaling", scaling)):
        if not isinstance(p, dict):
            raise ConfigError(f"drafter config field '{name}' must be an object or null")
        kind = p.get("rope_type", p.get("type", "default"))
        if kind != "default":
            raise ConfigError(f"drafter config field '{name}.rope_type' {kind!r} is not supported (only 'default')")
    theta = _float(params.get("rope_theta", raw.get("rope_theta", 10000.0)), "rope_theta")
    factor = _float(params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)), "partial_rotary_factor")
    return theta, factor


def drafter_config(raw: dict[str, Any], target: ModelConfig) -> DFlashConfig:
    """A published drafter config.json -> DFlashConfig, checked against the target it drafts for."""
    if not isinstance(raw, dict) or not isinstance(raw.get("dflash_config", {}), dict):
        raise ConfigError("drafter config must be a JSON object with an object 'dflash_config'")
    sub = raw.get("dflash_config", {})
    for k in _UNSUPPORTED:
        if _get(raw, sub, k, None) is not None:
            raise ConfigError(f"drafter config field '{k}' (a DFlash2-style drafter) is not supported")
    for k, neutral in _NEUTRAL.items():
        if _get(raw, sub, k, neutral) != neutral:
            raise ConfigError(f"drafter config field '{k}' = {_get(raw, sub, k)!r} is not supported (only {neutral})")
    if raw.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"drafter config field 'hidden_act' must be 'silu', got {raw['hidden_act']!r}")
    if raw.get("attention_bias", False):
        raise ConfigError("drafter config field 'attention_bias' must be false (tilert's drafter has no biases)")
    missing = [k for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads")
               if k not in raw]  # fmt: skip
    if missing:
        raise ConfigError(f"drafter config field '{missing[0]}' is missing")
    n = {k: _int(raw[k], k) for k in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads")}
    L = n["num_hidden_layers"]
    nkv = _int(raw.get("num_key_value_heads") or n["num_attention_heads"], "num_key_value_heads")
    head_dim = _int(raw.get("head_dim", 128), "head_dim")  # Qwen3Config's default
    if raw.get("v_head_dim", head_dim) != head_dim:
        raise ConfigError("drafter config field 'v_head_dim' must equal head_dim")
    # Qwen3Config: sliding_window counts only with use_sliding_window; default layer types from it
    window = raw.get("sliding_window") if raw.get("use_sliding_window", False) else None
    types = raw.get("layer_types")
    if types is None:
        first = _int(raw.get("max_window_layers", 28), "max_window_layers")
        types = ["sliding_attention" if window is not None and i >= first else "full_attention" for i in range(L)]
    if not isinstance(types, list) or len(types) != L or any(t not in DRAFTER_LAYER_TYPES for t in types):
        raise ConfigError(f"drafter config field 'layer_types' must list {L} of {', '.join(DRAFTER_LAYER_TYPES)}")
    sliding = "sliding_attention" in types
    if sliding and window is None:
        raise ConfigError("drafter config lists sliding_attention layers but no 'sliding_window' "
                          "(with 'use_sliding_window': true)")  # fmt: skip
    causal = raw.get("is_causal")
    if causal is not None and not isinstance(causal, bool):
        raise ConfigError(f"drafter config field 'is_causal' must be true, false or null, got {causal!r}")
    theta, factor = _rope(raw)
    sink = _get(raw, sub, "attention_sink_bias", None)
    if sink is None:
        swa, full = raw.get("add_swa_attention_sink_bias", False), raw.get("add_full_attention_sink_bias", False)
        kinds = {swa if t == "sliding_attention" else full for t in types}
        if len(kinds) > 1:
            raise ConfigError("drafter config: attention sinks on only some layers are not supported")
        sink = kinds.pop()
    ids = _get(raw, sub, "target_layer_ids", None)
    n_target = raw.get("num_target_layers")
    if ids is None:
        if n_target is None:
            raise ConfigError("drafter config field 'dflash_config.target_layer_ids' is missing")
        ids = reference_target_layer_ids(_int(n_target, "num_target_layers"), L)
    if not isinstance(ids, list) or not ids or any(isinstance(i, bool) or not isinstance(i, int) for i in ids):
        raise ConfigError("drafter config field 'dflash_config.target_layer_ids' must be a list of ints")
    convention = _get(raw, sub, "sliding_window_convention", "transformers")
    if convention not in WINDOW_CONVENTIONS:
        known = ", ".join(WINDOW_CONVENTIONS)
        raise ConfigError(f"drafter config field 'sliding_window_convention' must be one of {known}")
    d = DFlashConfig(
        num_hidden_layers=L,
        hidden_size=n["hidden_size"],
        intermediate_size=n["intermediate_size"],
        num_attention_heads=n["num_attention_heads"],
        num_key_value_heads=nkv,
        head_dim=head_dim,
        block_size=_int(_get(raw, sub, "block_size", 16), "block_size"),  # the reference's default
        target_layer_ids=tuple(ids),
        sliding_window_size=_int(window, "sliding_window") if sliding else 0,
        rope_theta=theta,
        mask_token_id=_int(_get(raw, sub, "mask_token_id"), "dflash_config.mask_token_id"),
        rms_norm_eps=_float(raw.get("rms_norm_eps", 1e-6), "rms_norm_eps"),
        layer_types=tuple(types),
        is_causal=causal,
        partial_rotary_factor=factor,
        attention_value_scale=_float(_get(raw, sub, "attention_value_scale", 1.0), "attention_value_scale"),
        attention_sink=bool(sink),
        sliding_window_convention=convention,
    )
    check_drafter(d)
    check_fits(d, target, raw)
    return d


def check_fits(d: DFlashConfig, target: ModelConfig, raw: Mapping[str, Any] | None = None) -> None:
    """One line naming the first way drafter `d` does not fit `target`."""
    raw = raw or {}
    who = f"the drafter does not fit the target '{target.name}'"
    if d.hidden_size != target.hidden_size:
        raise DrafterError(f"{who}: drafter hidden_size {d.hidden_size} != target hidden_size {target.hidden_size} "
                           "(the drafter shares the target's embedding and LM head)")  # fmt: skip
    th = raw.get("target_hidden_size")
    if th is not None and th != target.hidden_size:
        raise DrafterError(f"{who}: drafter target_hidden_size {th} != target hidden_size {target.hidden_size}")
    L = target.num_hidden_layers
    bad = [i for i in d.target_layer_ids if not 0 <= i < L]
    if bad:
        raise DrafterError(f"{who}: target_layer_ids {list(bad)} are beyond the target's {L} layers")
    nt = raw.get("num_target_layers")
    if nt is not None and nt != L:
        raise DrafterError(f"{who}: drafter num_target_layers {nt} != the target's {L} layers")
    vocab = raw.get("vocab_size")
    if vocab is not None and vocab != target.vocab_size:
        raise DrafterError(f"{who}: drafter vocab_size {vocab} != target vocab_size {target.vocab_size}")
    if d.mask_token_id >= target.vocab_size:
        raise DrafterError(f"{who}: mask_token_id {d.mask_token_id} is outside the vocabulary ({target.vocab_size})")
    if d.num_attention_heads % d.num_key_value_heads:
        raise DrafterError("drafter config field 'num_attention_heads' must be a multiple of num_key_value_heads")


def published_config(d: DFlashConfig, target: ModelConfig) -> dict[str, Any]:
    """The reference layout's config.json for `d` (what `write_drafter` writes; `drafter_config` reads it back)."""
    sliding = any(d.layer_type(i) == "sliding_attention" for i in range(d.num_hidden_layers))
    return {
        "architectures": ["DFlashDraftModel"],
        "model_type": "qwen3",
        "num_hidden_layers": d.num_hidden_layers,
        "hidden_size": d.hidden_size,
        "intermediate_size": d.intermediate_size,
        "num_attention_heads": d.num_attention_heads,
        "num_key_value_heads": d.num_key_value_heads,
        "head_dim": d.head_dim,
        "hidden_act": "silu",
        "attention_bias": False,
        "rms_norm_eps": d.rms_norm_eps,
        "rope_theta": d.rope_theta,
        "partial_rotary_factor": d.partial_rotary_factor,
        "use_sliding_window": sliding,
        "sliding_window": d.sliding_window_size if sliding else None,
        "layer_types": [d.layer_type(i) for i in range(d.num_hidden_layers)],
        "is_causal": d.is_causal,
        "vocab_size": target.vocab_size,
        "num_target_layers": target.num_hidden_layers,
        "block_size": d.block_size,
        "dflash_config": {
            "target_layer_ids": list(d.target_layer_ids),
            "block_size": d.block_size,
            "mask_token_id": d.mask_token_id,
            "attention_value_scale": d.attention_value_scale,
            "attention_sink_bias": d.attention_sink,
            "sliding_window_convention": d.sliding_window_convention,
        },
    }


# ---- tensors -------------------------------------------------------------------------------------


def _published(name: str) -> str:
    """tilert name (dflash.X) -> the published tensor name (X)."""
    return name.removeprefix(DRAFTER_PREFIX)


class DrafterWeights(Mapping[str, torch.Tensor]):
    """tilert's `dflash.*` names over a published drafter: each read goes to its file, is cast to the
    dtype tilert stores (bf16 weights and norms, f32 sink logits, as upstream loaders cast) and
    checked for NaN/Inf. The mask embedding (small) is held in memory."""

    def __init__(self, reader: CheckpointReader, specs: Mapping[str, Any], rename: Mapping[str, str],
                 mask: torch.Tensor | None) -> None:  # fmt: skip
        self.reader, self.specs, self.rename, self.mask = reader, specs, rename, mask

    def __getitem__(self, name: str) -> torch.Tensor:
        if name == MASK_EMBEDDING and self.mask is not None:
            return self.mask
        if name not in self.rename:
            raise KeyError(name)
        t = self.reader.read(self.rename[name]).to(self.specs[name].dtype)
        if nonfinite(t):
            raise DrafterError(f"drafter tensor {self.rename[name]} contains NaN/Inf")
        return t

    def __iter__(self) -> Iterator[str]:
        yield from self.rename
        if self.mask is not None:
            yield MASK_EMBEDDING

    def __len__(self) -> int:
        return len(self.rename) + int(self.mask is not None)

    def __contains__(self, name: object) -> bool:
        return name in self.rename or (name == MASK_EMBEDDING and self.mask is not None)


@dataclass
class Drafter:
    config: DFlashConfig
    weights: DrafterWeights
    path: Path


def _tensor_files(d: Path, device: str) -> CheckpointReader:
    """The drafter's safetensors (an index, dflash_draft_model.safetensors, or every *.safetensors)."""
    try:
        return CheckpointReader(d, device=device)
    except CheckpointError as e:
        raise DrafterError(f"drafter {d}: {e}") from None


def _load_mask_embedding(path: Path, d: DFlashConfig) -> torch.Tensor:
    """mask_embedding.pt: a tensor [H] / [1, H], or a dict with `embedding` (or `mask_embedding`, or
    one entry) and optionally `mask_token_id`, which must be the config's."""
    try:
        got = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt or non-tensor pickle
        raise DrafterError(f"cannot read {path}: {e}") from None
    if isinstance(got, dict):
        if "mask_token_id" in got and int(got["mask_token_id"]) != d.mask_token_id:
            raise DrafterError(f"{path} is for mask token {int(got['mask_token_id'])}, "
                               f"the config's mask_token_id is {d.mask_token_id}")  # fmt: skip
        tensors = {k: v for k, v in got.items() if isinstance(v, torch.Tensor)}
        key = next((k for k in ("embedding", "mask_embedding") if k in tensors), None)
        if key is None and len(tensors) == 1:
            key = next(iter(tensors))
        if key is None:
            raise DrafterError(f"{path}: no 'embedding' tensor (keys {sorted(got)})")
        got = tensors[key]
    if not isinstance(got, torch.Tensor) or got.numel() != d.hidden_size or not got.is_floating_point():
        what = f"{got.dtype} {list(got.shape)}" if isinstance(got, torch.Tensor) else type(got).__name__
        raise DrafterError(f"{path}: expected a float embedding of {d.hidden_size} values, got {what}")
    t = got.reshape(-1).to(torch.bfloat16)
    if nonfinite(t):
        raise DrafterError(f"{path}: contains NaN/Inf")
    return t


def open_drafter(path: str | Path, target: ModelConfig, device: str = "cpu") -> Drafter:
    """Open a published drafter directory for `target`: config mapped and checked, tensor structure
    checked from the headers (names, shapes, float dtypes), no tensor data read yet."""
    d = find_drafter(path)
    if d is None:
        raise DrafterError(f"{path}: not a DFlash drafter directory (no config.json with 'dflash_config', "
                           f"here or in {SUBDIR}/)")  # fmt: skip
    try:
        raw = json.loads((d / CONFIG_NAME).read_text())
        cfg = drafter_config(raw, target)
    except ValueError as e:  # ConfigError, JSON
        raise DrafterError(f"drafter {d}: {e}") from None
    mask_file = d / MASK_EMBEDDING_NAME
    if mask_file.is_file():
        cfg = replace(cfg, mask_embedding=True)
    full = replace(target, dflash=cfg)
    specs = {k: s for k, s in weight_specs(full, include_drafter=True).items()
             if k.startswith(DRAFTER_PREFIX) and k != MASK_EMBEDDING}  # fmt: skip
    reader = _tensor_files(d, device)
    stored = {k.removeprefix("model."): k for k in reader.keys()}
    problems, rename = [], {}
    for name, s in specs.items():
        key = stored.get(_published(name))
        if key is None:
            problems.append(f"missing tensor {_published(name)}")
            continue
        shape, dtype = reader.info(key)
        if shape != s.shape or dtype not in _FLOAT_DTYPES:
            problems.append(f"tensor {key}: expected a float tensor {list(s.shape)}, got {dtype} {list(shape)}")
        rename[name] = key
    problems += [f"unexpected tensor {k}" for k in reader.keys() if k not in set(rename.values())]
    if problems:
        more = f" (and {len(problems) - 6} more)" if len(problems) > 6 else ""
        raise DrafterError(f"drafter {d} does not match its config: " + "; ".join(problems[:6]) + more)
    mask = _load_mask_embedding(mask_file, cfg) if mask_file.is_file() else None
    return Drafter(cfg, DrafterWeights(reader, specs, rename, mask), d)


# ---- attaching a drafter to a target's weights ---------------------------------------------------


class WithDrafter(Mapping[str, Any]):
    """A target's weights with the drafter's `dflash.*` tensors taken from a drafter instead."""

    def __init__(self, target: Mapping[str, Any], drafter: Mapping[str, Any]) -> None:
        self.target, self.drafter = target, drafter

    def __getitem__(self, name: str) -> Any:
        return (self.drafter if name.startswith(DRAFTER_PREFIX) else self.target)[name]

    def __contains__(self, name: object) -> bool:
        if isinstance(name, str) and name.startswith(DRAFTER_PREFIX):
            return name in self.drafter
        return name in self.target

    def __iter__(self) -> Iterator[str]:
        yield from (k for k in self.target if not k.startswith(DRAFTER_PREFIX))
        yield from self.drafter

    def __len__(self) -> int:
        return sum(1 for _ in self)


def _with_rank_drafter(weights: Any, drafter: Drafter) -> Any:
    """Per-rank shards (`tilert quantize` output) + a whole drafter: each rank binds the drafter's
    params from the drafter's full tensors, sliced as the shard pass says."""
    from tilert.checkpoint.sharded import RankWeights

    class RankWeightsWithDrafter(RankWeights):
        def __init__(self, base: RankWeights) -> None:
            self.__dict__.update(base.__dict__)

        def unsliced(self, rank: int, v: Any) -> Any:
            if v.name.startswith(DRAFTER_PREFIX):
                return v  # bound from the whole drafter tensor, slice and all
            return super().unsliced(rank, v)

        def __getitem__(self, rank: int) -> Any:
            return WithDrafter(self.ranks[rank], drafter.weights)

    return RankWeightsWithDrafter(weights)


def attach_drafter(cfg: ModelConfig, weights: Any, path: str | Path, device: str = "cpu") -> tuple[ModelConfig, Any]:
    """(target config with the drafter's `dflash` config, target weights + the drafter's tensors)."""
    from tilert.checkpoint.sharded import RankWeights

    drafter = open_drafter(path, cfg, device)
    out = replace(cfg, dflash=drafter.config)
    if isinstance(weights, RankWeights):
        return out, _with_rank_drafter(weights, drafter)
    return out, WithDrafter(weights, drafter.weights)


# ---- writing (quantize carries the drafter along) ------------------------------------------------


def write_drafter(drafter: Drafter, target: ModelConfig, out: str | Path, max_file_bytes: int = 4 << 30) -> dict:
    """Write `drafter` as a reference-layout directory `out` (config.json, safetensors + index,
    mask_embedding.pt), tensor by tensor, files of at most `max_file_bytes`. Returns a summary."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    files: list[str] = []
    buf: dict[str, torch.Tensor] = {}
    size = 0

    def flush() -> None:
        nonlocal buf, size
        if buf:
            fname = f"model-{len(files):05d}.safetensors"
            save_file({k: v.contiguous() for k, v in buf.items()}, str(out / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(buf, fname))
            files.append(fname)
            buf, size = {}, 0

    for name in drafter.weights.rename:
        t = drafter.weights[name]
        buf[_published(name)] = t
        size += t.numel() * t.element_size()
        if size >= max_file_bytes:
            flush()
    flush()
    total = sum((out / f).stat().st_size for f in files)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")
    if drafter.weights.mask is not None:
        torch.save({"mask_token_id": drafter.config.mask_token_id, "embedding": drafter.weights.mask},
                   out / MASK_EMBEDDING_NAME)  # fmt: skip
    (out / CONFIG_NAME).write_text(json.dumps(published_config(drafter.config, target), indent=1) + "\n")
    return {"drafter": str(out), "files": files, "tensors": len(weight_map)}


def drafter_for_quantize(src: str | Path, drafter: str | Path | None, cfg: ModelConfig | None) -> Any:
    """`tilert quantize [--drafter DIR]`: None when there is no drafter to carry (no --drafter, no
    `dflash/` in the input), else a function out_dir -> summary that writes the drafter (checked
    against the target now, before the long quantisation) into `out/dflash/`, where Engine, generate
    and serve find it next to the target's shards. Its weights stay bf16, as tilert runs them."""
    from tilert.checkpoint.manifest import config_next_to

    path = drafter if drafter is not None else find_drafter(Path(src) / SUBDIR)
    if path is None:
        return None
    target = cfg if cfg is not None else config_next_to(src)
    opened = open_drafter(path, target)
    return lambda out: write_drafter(opened, target, Path(out) / SUBDIR)
