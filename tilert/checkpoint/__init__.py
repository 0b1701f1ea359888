"""Checkpoints: HF safetensors (single file or sharded with an index) and `tilert quantize` outputs.

`open_checkpoint` is the one loader every entry point uses (docs/checkpoints.md). Everything reads
tensor by tensor (`CheckpointReader`, `LazyWeights`); nothing loads a whole checkpoint into memory.
Every problem is a `CheckpointError` (a WeightError, a ValueError) that names the tensor or field.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "Checkpoint": "tilert.checkpoint.open",
    "open_checkpoint": "tilert.checkpoint.open",
    "CheckpointError": "tilert.checkpoint.loader",
    "CheckpointReader": "tilert.checkpoint.loader",
    "LazyWeights": "tilert.checkpoint.loader",
    "quantize_checkpoint": "tilert.checkpoint.quantize",
    "QUANTIZE_MODES": "tilert.checkpoint.layout",
    "read_manifest": "tilert.checkpoint.manifest",
    "MANIFEST_NAME": "tilert.checkpoint.manifest",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    """Lazy exports: the CLI imports `tilert.checkpoint.cli` without paying for torch."""
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'tilert.checkpoint' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(mod), name)
