"""Checkpoints: HF safetensors (single file or sharded with an index) and `tilert quantize` outputs.

`open_checkpoint` is the one loader every entry point uses (docs/checkpoints.md). Everything reads
tensor by tensor (`CheckpointReader`, `LazyWeights`); nothing loads a whole checkpoint into memory.
Every problem is a `CheckpointError` (a WeightError, a ValueError) that names the tensor or field.
"""

from tilert.checkpoint.layout import QUANTIZE_MODES
from tilert.checkpoint.loader import CheckpointError, CheckpointReader, LazyWeights
from tilert.checkpoint.manifest import MANIFEST_NAME, read_manifest
from tilert.checkpoint.open import Checkpoint, load_safetensors, open_checkpoint
from tilert.checkpoint.quantize import quantize_checkpoint

__all__ = [
    "MANIFEST_NAME",
    "QUANTIZE_MODES",
    "Checkpoint",
    "CheckpointError",
    "CheckpointReader",
    "LazyWeights",
    "load_safetensors",
    "open_checkpoint",
    "quantize_checkpoint",
    "read_manifest",
]
