"""open_checkpoint: one entry point for HF checkpoints and `tilert quantize` outputs."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tilert.checkpoint.loader import CheckpointError, CheckpointReader, LazyWeights, validate_structure, value_check
from tilert.checkpoint.manifest import is_sharded_checkpoint
from tilert.models.config import ModelConfig


@dataclass
class Checkpoint:
    config: ModelConfig
    weights: Any  # LazyWeights (one full checkpoint) or RankWeights (per-rank shards)
    world: int
    tokenizer_path: Path | None
    path: Path


def open_checkpoint(
    path: str | Path, cfg: ModelConfig | None = None, device: str = "cpu", verify: bool | None = None
) -> Checkpoint:
    """Open a checkpoint for lazy binding; structure is validated now, values as tensors are read.

    cfg=None takes the config from the checkpoint (manifest or config.json next to it).
    """
    from tilert.tokenizer import find_tokenizer

    p = Path(path)
    if is_sharded_checkpoint(p):
        from tilert.checkpoint.sharded import open_sharded

        cfg, rw = open_sharded(p, cfg, device=device, verify=verify)
        return Checkpoint(cfg, rw, rw.world, find_tokenizer(p), p)
    if cfg is None:
        from tilert.checkpoint.manifest import config_next_to

        cfg = config_next_to(p)
    reader = CheckpointReader(p, device=device)
    try:
        validate_structure(cfg, reader)
    except CheckpointError as e:
        raise CheckpointError(
            f"{e}. (A bf16 checkpoint of a quantised model needs `python -m tilert quantize` first.)"
        ) from None
    return Checkpoint(cfg, LazyWeights(reader, value_check(cfg)), 1, find_tokenizer(p), p)
