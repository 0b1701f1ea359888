"""open_checkpoint: the one loader behind every entry point (Engine, generate, serve, quantize's input).

Whatever the entry point, a checkpoint gets the same checks: the manifest (a `tilert quantize`
output) or the config (an HF checkpoint) says which tensors exist with which shapes and dtypes,
checked from the headers before anything is read; each tensor is checked as it is read (NaN/Inf,
and its sha256 against the manifest). Nothing reads the whole checkpoint into memory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tilert.checkpoint.layout import QUANTIZE_MODES, Layout, conversions, inspect_layout, run_config
from tilert.checkpoint.loader import CheckpointError, CheckpointReader, LazyWeights, nan_check
from tilert.checkpoint.manifest import is_sharded_checkpoint
from tilert.models.config import ModelConfig

log = logging.getLogger("tilert.checkpoint")


@dataclass
class Checkpoint:
    config: ModelConfig  # the config the model runs with (its `quantization`: the formats it runs in)
    weights: Any  # a Mapping (one rank's tensors) or RankWeights (per-rank shards, world > 1)
    world: int
    tokenizer_path: Path | None
    path: Path
    converted: dict[str, tuple[str, str]] = field(default_factory=dict)  # linear -> (stored, run) format


def open_checkpoint(
    path: str | Path,
    cfg: ModelConfig | None = None,
    device: str = "cpu",
    verify: bool | None = None,
    *,
    quantize: str = "auto",
    verify_checksums: bool = True,
    include_drafter: bool | None = None,
) -> Checkpoint:
    """Open a checkpoint for lazy binding; structure is validated now, values as tensors are read.

    cfg=None takes the config from the checkpoint (its manifest, or config.json next to it).
    quantize (HF checkpoints): "auto" quantises linears stored in bf16 to the config's formats and
    runs quantised ones as stored; "on-load" converts every linear to the config's formats; "none"
    runs every tensor as stored (see docs/checkpoints.md). A `tilert quantize` output runs as stored.
    verify_checksums=False skips sha256 checks (and accepts a sharded directory whose manifest is gone).
    """
    from tilert.tokenizer import find_tokenizer

    p = Path(path)
    if quantize not in QUANTIZE_MODES:
        raise CheckpointError(f"quantize must be one of {', '.join(QUANTIZE_MODES)}, got {quantize!r}")
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    from tilert.checkpoint.sharded import open_sharded, shard_files

    if is_sharded_checkpoint(p) or shard_files(p):
        cfg, rw = open_sharded(p, cfg, device=device, verify=verify, checksums=verify_checksums)
        weights = rw[0] if rw.world == 1 else rw
        return Checkpoint(cfg, weights, rw.world, find_tokenizer(p), p)
    if cfg is None:
        from tilert.checkpoint.manifest import config_next_to

        cfg = config_next_to(p)
    reader = CheckpointReader(p, device=device)
    layout = inspect_layout(cfg, reader, include_drafter)
    run = run_config(cfg, layout, quantize)
    weights, converted = hf_weights(cfg, run, reader, layout)
    if layout.ignored:
        log.info("%s: skipping %d tensor(s) tilert does not use (e.g. %s)", p, len(layout.ignored), layout.ignored[0])
    return Checkpoint(run, weights, 1, find_tokenizer(p), p, converted)


def hf_weights(
    cfg: ModelConfig, run: ModelConfig, reader: CheckpointReader, layout: Layout
) -> tuple[Any, dict[str, tuple[str, str]]]:
    """The Mapping a backend binds from: the stored tensors (checked, cast), converted where `run`
    wants another format than the checkpoint stores."""
    names = [k for k in reader.keys() if k not in set(layout.ignored)]
    source = LazyWeights(reader, nan_check, names=names, casts=layout.casts)
    converted = conversions(cfg, run, layout)
    if not converted:
        return source, {}
    from collections import Counter

    from tilert.checkpoint.convert import ConvertingWeights

    kinds = Counter(f"{a} -> {b}" for a, b in converted.values())
    summary = ", ".join(f"{n} x {k}" for k, n in kinds.items())
    log.info("converting %d linear(s) as they load: %s", len(converted), summary)
    return ConvertingWeights(source, run, layout.formats, layout.include_drafter), converted
