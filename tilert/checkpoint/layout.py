"""How an HF checkpoint stores each tensor of the model, checked against the config from headers alone.

A linear may be stored in any of the three forms of `models/weights.py` (bf16 `X.weight`; FP8
`X.weight` e4m3 + `X.weight_scale_inv`; MXFP4 `X.weight_blocks` + `X.weight_scales`), whatever the
config's `quantization` says: the form is read from the header. Raw tensors (norms, embedding,
router, biases, sinks) must have their contract dtype, or one that upcasts to it exactly (a bf16
router weight or sink bias loads as float32, as upstream loaders cast it). `run_formats` then picks
the format each module group runs in, per the `quantize` mode.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from tilert.checkpoint.loader import CheckpointError, CheckpointReader, raise_problems
from tilert.models.config import ModelConfig, QuantConfig
from tilert.models.weights import DRAFTER_PREFIX, FP8_BLOCK, MXFP4_BLOCK, castable, logical_tensors, stored_specs

# Stored tensors tilert does not use, skipped rather than refused: MiMo's MTP layers (tilert drafts with
# DFlash) and rotary caches some exporters write.
IGNORED_PREFIXES = ("model.mtp.",)
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
QUANTIZE_MODES = ("auto", "on-load", "none")
_QUANTIZED = {"fp8", "mxfp4"}


@dataclass(frozen=True)
class Layout:
    """What an HF checkpoint holds, per logical tensor of the model."""

    formats: dict[str, str]  # logical name -> stored format: raw | bf16 | fp8 | mxfp4
    casts: dict[str, torch.dtype]  # stored name -> dtype it loads as (an exact upcast)
    ignored: tuple[str, ...]  # stored but unused (MTP layers, rotary caches)
    include_drafter: bool


def is_ignored(name: str, include_drafter: bool) -> bool:
    return (
        name.startswith(IGNORED_PREFIXES)
        or name.endswith(IGNORED_SUFFIXES)
        or (not include_drafter and name.startswith(DRAFTER_PREFIX))
    )


def inspect_layout(cfg: ModelConfig, reader: CheckpointReader, include_drafter: bool | None = None) -> Layout:
    """Every tensor's stored form, shape and dtype against the config; raises one error listing the problems.

    include_drafter=None checks the DFlash drafter iff the config has one and the checkpoint stores it.
    """
    if include_drafter is None:
        include_drafter = cfg.dflash is not None and any(k.startswith(DRAFTER_PREFIX) for k in reader.keys())
    formats: dict[str, str] = {}
    casts: dict[str, torch.dtype] = {}
    used: set[str] = set()
    problems: list[str] = []

    def expect(name: str, shape: tuple[int, ...], want: torch.dtype, what: str = "") -> None:
        used.add(name)
        if name not in reader:
            problems.append(f"missing tensor {name}")
            return
        got_shape, got = reader.info(name)
        if got_shape != shape:
            problems.append(f"tensor {name}: expected shape {list(shape)}, got {list(got_shape)}")
        if not castable(got, want):
            problems.append(f"tensor {name}: expected {_dt(want)}{what}, got {_dt(got)}")
        elif got != want:
            casts[name] = want

    for t in logical_tensors(cfg, include_drafter):
        if t.fmt == "raw":
            formats[t.name] = "raw"
            expect(t.name, t.shape, stored_specs(t)[0].dtype)
            continue
        out, inp = t.shape
        w = t.name + ".weight"
        if w + "_blocks" in reader:
            formats[t.name] = "mxfp4"
            if w in reader:
                used.add(w)
                problems.append(f"tensor {t.name} is stored twice ({w} and {w}_blocks)")
            expect(w + "_blocks", (out, inp // 2), torch.uint8)
            expect(w + "_scales", (out, inp // MXFP4_BLOCK), torch.uint8)
        elif w in reader and reader.info(w)[1] == torch.float8_e4m3fn:
            formats[t.name] = "fp8"
            expect(w, (out, inp), torch.float8_e4m3fn)
            expect(w + "_scale_inv", (-(-out // FP8_BLOCK), -(-inp // FP8_BLOCK)), torch.float32)
        else:
            formats[t.name] = "bf16"
            expect(w, (out, inp), torch.bfloat16, " (or float8_e4m3fn with a _scale_inv, or MXFP4 _blocks/_scales)")
    ignored = []
    for name in reader.keys():
        if name in used:
            continue
        if is_ignored(name, include_drafter):
            ignored.append(name)
        else:
            problems.append(f"unexpected tensor {name}")
    raise_problems(problems, f"checkpoint {reader.path} does not match config '{cfg.name}'")
    return Layout(formats, casts, tuple(ignored), include_drafter)


def run_formats(cfg: ModelConfig, layout: Layout, mode: str) -> QuantConfig:
    """The format each module group runs in.

    on-load: the config's `quantization` (tilert's default when config.json has none: MXFP4 experts,
    FP8 attention and dense MLP, bf16 lm_head); linears stored otherwise are converted as they load.
    none: as stored (a bf16 checkpoint runs in bf16). auto: a group stored in bf16 is quantised to the
    config's format; a group already quantised runs as stored; a group stored in mixed forms converts.
    """
    if mode not in QUANTIZE_MODES:
        raise CheckpointError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, got {mode!r}")
    stored: dict[str, set[str]] = {}
    for t in logical_tensors(cfg, include_drafter=False):
        if t.quant:
            stored.setdefault(t.quant, set()).add(layout.formats[t.name])
    out = {}
    for f in fields(QuantConfig):
        want, have = getattr(cfg.quantization, f.name), stored.get(f.name, set())
        if not have or mode == "on-load":
            out[f.name] = want
        elif mode == "none":
            if len(have) > 1:
                raise CheckpointError(
                    f"the checkpoint stores its {f.name} linears in several formats ({', '.join(sorted(have))}): "
                    "they cannot run as stored; quantize on load instead (--quantize on-load)"
                )
            out[f.name] = next(iter(have))
        else:
            out[f.name] = next(iter(have)) if len(have) == 1 and have <= _QUANTIZED else want
    return QuantConfig(**out)


def run_config(cfg: ModelConfig, layout: Layout, mode: str) -> ModelConfig:
    """The config the runtime builds graphs from: `cfg` with the formats `run_formats` picks."""
    q = run_formats(cfg, layout, mode)
    if q.experts == "mxfp4":
        for k in ("hidden_size", "moe_intermediate_size"):
            if getattr(cfg, k) % MXFP4_BLOCK:
                raise CheckpointError(f"MXFP4 experts need {k} ({getattr(cfg, k)}) to be a multiple of 32")
    if q.experts == "fp8" and cfg.moe_intermediate_size % FP8_BLOCK:
        raise CheckpointError(
            f"FP8 experts need moe_intermediate_size ({cfg.moe_intermediate_size}) to be a multiple of {FP8_BLOCK} "
            "(gate and up stack by whole scale blocks); run them in another format (--quantize on-load)"
        )
    return replace(cfg, quantization=q)


def conversions(cfg: ModelConfig, run: ModelConfig, layout: Layout) -> dict[str, tuple[str, str]]:
    """Linears whose stored format differs from the one they run in: name -> (stored, run)."""
    out = {}
    for t in logical_tensors(run, layout.include_drafter):
        if t.fmt != "raw" and layout.formats[t.name] != t.fmt:
            out[t.name] = (layout.formats[t.name], t.fmt)
    return out


def _dt(d: torch.dtype | str) -> str:
    return str(d).removeprefix("torch.")
