"""Read safetensors checkpoints one tensor at a time.

A 1T-parameter checkpoint never fits in host memory, so nothing here loads a whole file:
`CheckpointReader` maps names to files from the headers (or model.safetensors.index.json) and
reads a tensor only when asked; `LazyWeights` is a Mapping over it that the binder
(`models/binding.py`) reads param by param, checking each tensor (NaN/Inf, checksums) and casting
it (exact upcasts) as it is read. Structure (names, shapes, dtypes) is validated from the headers
alone, before anything is read (`tilert/checkpoint/layout.py`, `sharded.py`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from tilert.models.weights import WeightError, from_file, nonfinite

# safetensors header dtype names <-> torch dtypes
ST_DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
}
ST_NAMES: dict[torch.dtype, str] = {d: n for n, d in ST_DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"

__all__ = ["CheckpointError", "CheckpointReader", "LazyWeights", "nonfinite", "sha256"]


class CheckpointError(WeightError):
    """A checkpoint that is missing, malformed, corrupted or does not match its config/manifest."""


class CheckpointReader:
    """Name -> file map of one checkpoint (a file, a directory, or a directory with an index).

    `reads` lists every tensor read so far (tests use it to prove only requested tensors are read).
    """

    def __init__(self, path: str | Path, device: str = "cpu") -> None:
        self.path = Path(path)
        files, weight_map = _checkpoint_files(self.path)
        self._open(files, device)
        if weight_map is not None:
            for k, fname in weight_map.items():
                if self._where.get(k) is None:
                    raise CheckpointError(f"tensor {k} is in the index but not in {fname}")

    def _open(self, files: list[Path], device: str) -> None:
        """Open every file lazily (headers only) and map each tensor name to its file."""
        self.device = device
        self.reads: list[str] = []
        self._handles: dict[Path, Any] = {}
        self._where: dict[str, Path] = {}
        for f in files:
            try:
                h = safe_open(str(f), framework="pt", device=device)
            except Exception as e:  # safetensors raises its own error types for a bad header
                raise CheckpointError(f"cannot open {f}: {e}") from None
            self._handles[f] = h
            for k in h.keys():
                if k in self._where:
                    raise CheckpointError(f"tensor {k} is stored twice ({self._where[k].name} and {f.name})")
                self._where[k] = f

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def file_of(self, name: str) -> Path:
        return self._where[name]

    def info(self, name: str) -> tuple[tuple[int, ...], torch.dtype | str]:
        """(shape, dtype) from the header, without reading the data."""
        sl = self._handles[self._where[name]].get_slice(name)
        dt = sl.get_dtype()
        return tuple(sl.get_shape()), ST_DTYPES.get(dt, dt)

    def read(self, name: str) -> torch.Tensor:
        if name not in self._where:
            raise CheckpointError(f"tensor {name} is not in the checkpoint {self.path}")
        self.reads.append(name)
        try:
            return self._handles[self._where[name]].get_tensor(name)
        except Exception as e:  # a file truncated or rewritten after it was opened
            raise CheckpointError(f"tensor {name}: cannot read it from {self._where[name]}: {e}") from None


Check = Callable[[str, torch.Tensor], None]


class LazyWeights(Mapping[str, torch.Tensor]):
    """A read-on-access Mapping over a checkpoint.

    Each read is checked with `check(name, stored_tensor)` (NaN/Inf, checksum) and then cast to
    `casts[name]` if given (exact upcasts, e.g. a bf16-stored router weight to float32); MXFP4 blocks
    then take the in-memory word order (`models.weights.from_file`).
    """

    def __init__(
        self,
        reader: CheckpointReader,
        check: Check | None = None,
        names: list[str] | None = None,
        casts: Mapping[str, torch.dtype] | None = None,
    ) -> None:
        self.reader, self._check = reader, check
        self._names = names if names is not None else reader.keys()
        self._set = set(self._names)
        self._casts = dict(casts or {})

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._set:
            raise KeyError(name)
        t = self.reader.read(name)
        if self._check is not None:
            self._check(name, t)
        want = self._casts.get(name)
        return from_file(name, t.to(want) if want is not None and t.dtype != want else t)

    def __contains__(self, name: object) -> bool:
        return name in self._set

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _checkpoint_files(path: Path) -> tuple[list[Path], dict[str, str] | None]:
    if path.is_file():
        return [path], None
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}")
    index = path / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise ValueError("'weight_map' must map tensor names to file names")
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        files = []
        for fname in sorted(set(weight_map.values())):
            if Path(fname).name != fname:
                raise CheckpointError(f"{index} names {fname!r}: files must lie in the checkpoint directory")
            if not (path / fname).is_file():
                raise CheckpointError(f"{index} names {fname}, which does not exist")
            files.append(path / fname)
        return files, weight_map
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {path}")
    return files, None


def sha256(t: torch.Tensor) -> str:
    """Checksum of a tensor's bytes (dtype-agnostic, shape not included)."""
    b = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(memoryview(b)).hexdigest()


def role_of(name: str) -> str:
    """The storage role `nonfinite` needs: MXFP4 scales are e8m0 (0xFF is NaN); the rest by dtype."""
    return "mxfp4_scales" if name.endswith(".weight_scales") else ""


def nan_check(name: str, t: torch.Tensor) -> None:
    """The per-read value check every loader applies: no NaN/Inf, in the tensor's own format."""
    if nonfinite(t, role_of(name)):
        raise CheckpointError(f"tensor {name}: contains NaN/Inf")


def raise_problems(problems: list[str], head: str) -> None:
    """One CheckpointError listing the first ten problems."""
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise CheckpointError(f"{head}: " + "; ".join(problems[:10]) + more)
