"""`tilert quantize`: an HF checkpoint (bf16, or already quantised) -> per-rank quantised shards.

Each rank's files hold exactly what the shard pass gives that rank (its attention heads, its
experts, its vocabulary slice of lm_head; replicated tensors duplicated), each linear quantised
per `cfg.quantization` on the slice's own block grid, so no runtime ever re-quantises.

The input goes through the same checks as every loader (`layout.inspect_layout`: names, shapes,
dtypes; NaN/Inf as each tensor is read). Each source tensor is read (and dequantised) once and
sliced for every rank that needs it. Memory stays bounded by one logical tensor: every output file's
layout is known up front (names, shapes, dtypes follow from the config), so its safetensors header is
written first and each tensor's bytes go straight to their offset.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import struct
from pathlib import Path
from typing import Any

import torch

from tilert.checkpoint.convert import Source
from tilert.checkpoint.layout import inspect_layout
from tilert.checkpoint.loader import ST_NAMES, CheckpointError, CheckpointReader, LazyWeights, nan_check, sha256
from tilert.checkpoint.manifest import (
    FORMAT,
    MANIFEST_NAME,
    VERSION,
    Need,
    config_next_to,
    dtype_name,
    logical_shapes,
    rank_needs,
    raw_dtypes,
    sliced_shape,
    stored_layout,
    write_manifest,
)
from tilert.checkpoint.sharded import shard_file_name, shard_files
from tilert.models.config import ModelConfig
from tilert.models.weights import to_file
from tilert.progress import progress
from tilert.tokenizer import find_tokenizer, load_tokenizer

log = logging.getLogger("tilert.quantize")


def quantize_need(weights: Any, need: Need) -> dict[str, torch.Tensor]:
    """Read one logical tensor (any stored form), cut the rank's slice, store it in the need's format."""
    if need.fmt == "raw":
        return Source(weights, need.name, "raw").to("raw", need.slice)
    w = need.name + ".weight"
    fmt = "mxfp4" if w + "_blocks" in weights else "fp8" if w + "_scale_inv" in weights else "bf16"
    return Source(weights, need.name, fmt).to(need.fmt, need.slice)


def check_paths(src: Path, out: Path) -> None:
    """Refuse an output that is, contains or lies inside the input (it would overwrite it)."""
    s = src.resolve()
    s_dir = s if s.is_dir() else s.parent
    o = out.resolve()
    if o == s_dir or s_dir in o.parents or o in s.parents or o == s:
        raise CheckpointError(
            f"--out {out} overlaps --in {src}: quantize writes config.json and shard files there and would "
            "overwrite the input; choose a separate output directory"
        )
    if o.exists() and not o.is_dir():
        raise CheckpointError(f"--out {out} exists and is not a directory")


def quantize_checkpoint(
    src: str | Path,
    out: str | Path,
    world: int,
    cfg: ModelConfig | None = None,
    *,
    max_file_bytes: int = 4 << 30,
) -> dict[str, Any]:
    """Write per-rank shards + tilert-manifest.json + config.json (+ tokenizer.json) to `out`."""
    src, out = Path(src), Path(out)
    if not src.exists():
        raise CheckpointError(f"checkpoint not found: {src}")
    check_paths(src, out)
    if world < 1:
        raise CheckpointError(f"--gpus must be >= 1, got {world}")
    if (src / MANIFEST_NAME).is_file() or shard_files(src):
        raise CheckpointError(f"{src} is already a tilert sharded checkpoint; quantize reads HF checkpoints")
    cfg = cfg if cfg is not None else config_next_to(src)
    reader = CheckpointReader(src)
    layout = inspect_layout(cfg, reader, include_drafter=cfg.dflash is not None)
    source = LazyWeights(reader, nan_check, casts=layout.casts)
    tok = find_tokenizer(src)
    if tok is not None and _has_tokenizers():
        load_tokenizer(tok, vocab_size=cfg.vocab_size)  # refuse a tokenizer of another model before writing
    needs = rank_needs(cfg, world)
    plan = _plan_files(cfg, needs, max_file_bytes)
    _clear_previous(out)
    files = {name: _PlannedFile(out / name, entries) for name, entries in plan.items()}
    where = {(r, k): f for f, entries in plan.items() for (r, k) in ((e.rank, e.name) for e in entries)}
    users: dict[str, list[tuple[int, Need]]] = {}
    for r, rneeds in enumerate(needs):
        for n in rneeds.values():
            users.setdefault(n.name, []).append((r, n))
    ranks: list[dict[str, Any]] = [{"rank": r, "files": [], "tensors": {}} for r in range(world)]
    for f, entries in plan.items():
        ranks[entries[0].rank]["files"].append(f)
    with progress(total=len(users), desc="quantize", unit="tensor") as bar:
        for i, (name, uses) in enumerate(users.items()):
            one = Source(source, name, layout.formats[name])  # read (and dequantised) once for all ranks
            for r, need in uses:
                for k, t in one.to(need.fmt, need.slice).items():
                    digest = files[where[(r, k)]].write(k, t)
                    ranks[r]["tensors"][k] = {
                        "shape": list(t.shape), "dtype": dtype_name(t.dtype), "file": where[(r, k)],
                        "sha256": digest, "source": need.name, "format": need.fmt,
                        "slice": list(need.slice) if need.slice else None,
                    }  # fmt: skip
            bar.update(1)
            if (i + 1) % 1000 == 0:
                log.debug("quantize: %d/%d tensors", i + 1, len(users))
    for f in files.values():
        f.finish()
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "model": cfg.name,
        "world": world,
        "quantization": cfg.to_dict()["quantization"],
        "config": cfg.to_dict(),
        "tokenizer": None,
        "ranks": ranks,
    }
    if tok is not None:
        shutil.copyfile(tok, out / "tokenizer.json")
        manifest["tokenizer"] = "tokenizer.json"
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")
    write_manifest(out, manifest)  # last: a directory without it is incomplete (and refused)
    log.info("quantize: wrote %d files for %d rank(s) to %s", len(files), world, out)
    return manifest


def _has_tokenizers() -> bool:
    return importlib.util.find_spec("tokenizers") is not None


class _Entry:
    __slots__ = ("rank", "name", "shape", "dtype", "nbytes")

    def __init__(self, rank: int, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.rank, self.name, self.shape, self.dtype = rank, name, shape, dtype
        n = 1
        for d in shape:
            n *= d
        self.nbytes = n * dtype.itemsize


def _plan_files(cfg: ModelConfig, needs: list[dict[str, Need]], max_bytes: int) -> dict[str, list[_Entry]]:
    """Every output file and the tensors it holds, from the config alone (names, shapes, dtypes)."""
    shapes, raw = logical_shapes(cfg), raw_dtypes(cfg)
    plan: dict[str, list[_Entry]] = {}
    for r, rneeds in enumerate(needs):
        index, size = 0, 0
        for n in rneeds.values():
            for k, (shape, dtype) in stored_layout(n, sliced_shape(shapes[n.name], n.slice), raw.get(n.name)).items():
                e = _Entry(r, k, tuple(shape), dtype)
                if size and size + e.nbytes > max_bytes:
                    index, size = index + 1, 0
                plan.setdefault(shard_file_name(r, index), []).append(e)
                size += e.nbytes
    return plan


def _clear_previous(out: Path) -> None:
    """Remove an earlier run's manifest and shard files (only those: nothing else in `out` is touched)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    for f in shard_files(out):
        f.unlink()


class _PlannedFile:
    """A safetensors file whose header is written first; tensors are then written at their offsets."""

    def __init__(self, path: Path, entries: list[_Entry]) -> None:
        self.path = path
        ordered = sorted(entries, key=lambda e: -e.dtype.itemsize)  # keep every tensor aligned
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        self._slots: dict[str, tuple[int, _Entry]] = {}
        offset = 0
        for e in ordered:
            end = offset + e.nbytes
            header[e.name] = {"dtype": ST_NAMES[e.dtype], "shape": list(e.shape), "data_offsets": [offset, end]}
            self._slots[e.name] = (offset, e)
            offset += e.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._data_start = 8 + len(raw)
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            f.truncate(self._data_start + offset)
        self._written: set[str] = set()

    def write(self, name: str, t: torch.Tensor) -> str:
        """Write one tensor's bytes at its planned offset; returns their sha256."""
        offset, e = self._slots[name]
        if tuple(t.shape) != e.shape or t.dtype != e.dtype:
            raise CheckpointError(
                f"tensor {name}: expected {dtype_name(e.dtype)} {list(e.shape)}, produced {dtype_name(t.dtype)} "
                f"{list(t.shape)}"
            )
        if name in self._written:
            raise CheckpointError(f"tensor {name} written twice to {self.path.name}")
        t = to_file(name, t.detach())  # MXFP4 blocks in the published order
        data = t.contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        with open(self.path, "r+b") as f:
            f.seek(self._data_start + offset)
            f.write(memoryview(data))
        self._written.add(name)
        return sha256(t)

    def finish(self) -> None:
        missing = [k for k in self._slots if k not in self._written]
        if missing:
            raise CheckpointError(f"{self.path.name}: tensors {missing[:3]} were never written")
