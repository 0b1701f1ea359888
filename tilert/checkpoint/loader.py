"""Read safetensors checkpoints one tensor at a time.

A 1T-parameter checkpoint never fits in host memory, so nothing here loads a whole file:
`CheckpointReader` maps names to files from the headers (or model.safetensors.index.json) and
reads a tensor only when asked; `LazyWeights` is a Mapping over it that the binder
(`models/binding.py`) reads param by param. Structure (names, shapes, dtypes) is validated from
the headers alone; values (NaN/Inf, checksums) are validated as each tensor is read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from tilert.models.config import ModelConfig
from tilert.models.weights import DRAFTER_PREFIX, WeightError, weight_specs

# safetensors header dtype names -> torch dtypes
ST_DTYPES: dict[str, torch.dtype] = {
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I32": torch.int32,
    "I64": torch.int64,
    "BOOL": torch.bool,
}
INDEX_NAME = "model.safetensors.index.json"


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
        from safetensors import safe_open

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
        return self._handles[self._where[name]].get_tensor(name)


class LazyWeights(Mapping[str, torch.Tensor]):
    """A read-on-access Mapping over a checkpoint; `check(name, tensor)` validates each read."""

    def __init__(
        self,
        reader: CheckpointReader,
        check: Callable[[str, torch.Tensor], None] | None = None,
        names: list[str] | None = None,
    ) -> None:
        self.reader, self._check = reader, check
        self._names = names if names is not None else reader.keys()
        self._set = set(self._names)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._set:
            raise KeyError(name)
        t = self.reader.read(name)
        if self._check is not None:
            self._check(name, t)
        return t

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
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
        files = [path / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{index} names {f.name}, which does not exist")
        return files, weight_map
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no *.safetensors files in {path}")
    return files, None


# ---- validation ---------------------------------------------------------------------------------


def nonfinite(t: torch.Tensor, role: str = "") -> bool:
    """True if a stored tensor holds NaN/Inf in its own format (e4m3fn NaN, e8m0 0xFF, float NaN/Inf)."""
    if role == "mxfp4_blocks" or (t.dtype == torch.uint8 and role != "mxfp4_scales"):
        return False
    if role == "mxfp4_scales":
        return bool((t == 0xFF).any())
    if t.dtype == torch.float8_e4m3fn:
        return bool(((t.view(torch.uint8) & 0x7F) == 0x7F).any())
    if not t.is_floating_point():
        return False
    flat = t.reshape(-1)
    step = 1 << 26  # bound the temporary memory on huge tensors
    return any(not bool(torch.isfinite(flat[i : i + step]).all()) for i in range(0, flat.numel(), step))


def sha256(t: torch.Tensor) -> str:
    """Checksum of a tensor's bytes (dtype-agnostic, shape not included)."""
    b = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(memoryview(b)).hexdigest()


def validate_structure(cfg: ModelConfig, reader: CheckpointReader, include_drafter: bool | None = None) -> None:
    """Names, shapes and dtypes against the config, from the headers alone (no tensor is read)."""
    if include_drafter is None:
        include_drafter = cfg.dflash is not None and any(k.startswith(DRAFTER_PREFIX) for k in reader.keys())
    specs = weight_specs(cfg, include_drafter)
    problems = []
    for name, s in specs.items():
        if name not in reader:
            problems.append(f"missing tensor {name}")
            continue
        shape, dtype = reader.info(name)
        if shape != s.shape or dtype != s.dtype:
            problems.append(f"tensor {name}: expected {s.dtype} {list(s.shape)}, got {dtype} {list(shape)}")
    for name in reader.keys():
        if name not in specs and (include_drafter or not name.startswith(DRAFTER_PREFIX)):
            problems.append(f"unexpected tensor {name}")
    _raise(problems, f"checkpoint {reader.path} does not match config '{cfg.name}'")


def value_check(cfg: ModelConfig) -> Callable[[str, torch.Tensor], None]:
    """A per-read check that rejects NaN/Inf, naming the tensor."""
    roles = {n: s.role for n, s in weight_specs(cfg, True).items()}

    def check(name: str, t: torch.Tensor) -> None:
        if nonfinite(t, roles.get(name, "")):
            raise CheckpointError(f"tensor {name}: contains NaN/Inf")

    return check


def _raise(problems: list[str], head: str) -> None:
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise CheckpointError(f"{head}: " + "; ".join(problems[:10]) + more)
