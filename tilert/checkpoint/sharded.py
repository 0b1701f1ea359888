"""Load a `tilert quantize` output: per-rank shards checked against the manifest and the config.

Opening checks structure from headers (every file present, every tensor of the manifest present
with its shape and dtype, nothing extra, and the manifest agrees with what the shard pass gives
each rank); reading a tensor checks its sha256 and NaN/Inf. `ShardedReferenceBackend` binds each
rank's params from that rank's files: the stored tensors are already the rank's slices.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tilert.checkpoint.loader import (
    ST_DTYPES,
    CheckpointError,
    CheckpointReader,
    LazyWeights,
    nonfinite,
    raise_problems,
    role_of,
    sha256,
)
from tilert.checkpoint.manifest import (
    MANIFEST_NAME,
    dtype_name,
    logical_shapes,
    rank_needs,
    raw_dtypes,
    read_manifest,
    sliced_shape,
    stored_layout,
)
from tilert.engine.backend import ReferenceBackend
from tilert.ir.graph import Graph, Value
from tilert.models.binding import bind_param
from tilert.models.config import ModelConfig

_DTYPES = {str(d).removeprefix("torch."): d for d in ST_DTYPES.values()}


class RankWeights:
    """Per-rank lazy weights of a sharded checkpoint, plus the slice each stored tensor holds."""

    def __init__(self, directory: Path, manifest: dict[str, Any], ranks: list[LazyWeights]) -> None:
        self.directory, self.manifest, self.ranks = directory, manifest, ranks
        self.world = len(ranks)
        self._slices = [
            {t["source"]: (tuple(t["slice"]) if t["slice"] else None) for t in rk["tensors"].values()}
            for rk in manifest["ranks"]
        ]

    def __getitem__(self, rank: int) -> LazyWeights:
        return self.ranks[rank]

    def unsliced(self, rank: int, v: Value) -> Value:
        """`v` with its slice dropped (the rank's file holds exactly that slice); checks they agree."""
        from tilert.checkpoint.manifest import param_needs

        for n in param_needs(v):
            if n.name not in self._slices[rank]:
                raise CheckpointError(f"rank {rank} shard has no tensor {n.name} (needed by param '{v.name}')")
            if self._slices[rank][n.name] != n.slice:
                raise CheckpointError(
                    f"rank {rank} stores {n.name} slice {self._slices[rank][n.name]}, the graph wants {n.slice}"
                )
        return dataclasses.replace(v, source=tuple((k, x) for k, x in v.source if k != "slice"))

    def bytes_read(self) -> list[str]:
        return [n for w in self.ranks for n in w.reader.reads]


SHARD_PATTERN = "rank[0-9][0-9][0-9]-[0-9][0-9][0-9][0-9][0-9].safetensors"


def shard_file_name(rank: int, index: int) -> str:
    return f"rank{rank:03d}-{index:05d}.safetensors"


def shard_files(directory: Path) -> list[Path]:
    """The per-rank files `tilert quantize` writes, if `directory` holds any."""
    return sorted(directory.glob(SHARD_PATTERN)) if directory.is_dir() else []


def open_sharded(
    directory: str | Path,
    cfg: ModelConfig | None = None,
    device: str = "cpu",
    verify: bool | None = None,
    checksums: bool = True,
) -> tuple[ModelConfig, RankWeights]:
    """Open and structurally validate a sharded checkpoint; verify=True also reads and checks every value
    (None: only when the whole checkpoint is under 1 GiB).

    checksums=False skips the sha256 checks and lets a directory whose manifest is missing load from
    its shard files and config.json (structure is still checked against the config).
    """
    d = Path(directory)
    if (d / MANIFEST_NAME).is_file():
        manifest, mcfg = read_manifest(d)
    elif checksums:
        found = shard_files(d)
        names = ", ".join(f.name for f in found[:3]) + (", ..." if len(found) > 3 else "")
        raise CheckpointError(
            f"{d / MANIFEST_NAME} is missing: {d} holds tilert shard files ({names}) whose checksums it "
            "records; restore it, or load without checksums (--no-verify-checksums, verify_checksums=False)"
        )
    else:
        manifest, mcfg = _manifest_from_files(d, cfg)
    if cfg is not None and cfg.to_dict() | {"name": ""} != mcfg.to_dict() | {"name": ""}:
        raise CheckpointError(f"{d}: the checkpoint was quantised for a different config than '{cfg.name}'")
    cfg = mcfg if cfg is None else cfg
    world = manifest["world"]
    _check_against_config(cfg, manifest, world)
    ranks = []
    for r, rk in enumerate(manifest["ranks"]):
        for f in rk["files"]:
            if not (d / f).is_file():
                raise CheckpointError(f"rank {r}: shard file {f} is missing")
        reader = _RankReader(d, rk["files"], device)
        problems = []
        for name, t in rk["tensors"].items():
            if name not in reader:
                problems.append(f"missing tensor {name}")
                continue
            shape, dtype = reader.info(name)
            want = (tuple(t["shape"]), _DTYPES.get(t["dtype"], t["dtype"]))
            if (shape, dtype) != want:
                problems.append(
                    f"tensor {name}: manifest says {want[1]} {list(want[0])}, file has {dtype} {list(shape)}"
                )
        problems += [f"unexpected tensor {k}" for k in reader.keys() if k not in rk["tensors"]]
        raise_problems(problems, f"{d} rank {r}")
        ranks.append(LazyWeights(reader, _value_check(r, rk["tensors"], checksums), names=list(rk["tensors"])))
    rw = RankWeights(d, manifest, ranks)
    if verify is None:
        nbytes = sum((d / f).stat().st_size for rk in manifest["ranks"] for f in rk["files"])
        verify = nbytes < 1 << 30
    if verify:
        from tilert.progress import progress

        with progress(total=sum(len(w) for w in ranks), desc="verify checkpoint", unit="tensor") as bar:
            for w in ranks:
                for name in w:
                    w[name]
                    bar.update(1)
                w.reader.reads.clear()
    return cfg, rw


def _manifest_from_files(d: Path, cfg: ModelConfig | None) -> tuple[dict[str, Any], ModelConfig]:
    """What the manifest would say, from the shard files' headers, config.json and the shard pass
    (no checksums): for a directory whose manifest was lost, loaded on the user's explicit request."""
    from tilert.checkpoint.convert import stored_names
    from tilert.checkpoint.manifest import config_next_to

    cfg = cfg if cfg is not None else config_next_to(d)
    by_rank: dict[int, list[str]] = {}
    for f in shard_files(d):
        by_rank.setdefault(int(f.name[4:7]), []).append(f.name)
    world = len(by_rank)
    if sorted(by_rank) != list(range(world)):
        raise CheckpointError(f"{d}: shard files for ranks {sorted(by_rank)}; expected ranks 0..{world - 1}")
    needs = rank_needs(cfg, world)
    ranks = []
    for r in range(world):
        source = {}
        for n in needs[r].values():
            for k in stored_names(n.name, n.fmt):
                source[k] = n
        reader = _RankReader(d, by_rank[r], "cpu")
        tensors = {}
        for k in reader.keys():
            shape, dtype = reader.info(k)
            n = source.get(k)
            tensors[k] = {
                "shape": list(shape), "dtype": dtype_name(dtype) if isinstance(dtype, torch.dtype) else str(dtype),
                "file": reader.file_of(k).name, "sha256": None, "source": n.name if n else k,
                "format": n.fmt if n else "raw", "slice": list(n.slice) if n and n.slice else None,
            }  # fmt: skip
        ranks.append({"rank": r, "files": by_rank[r], "tensors": tensors})
    return {"format": "tilert-sharded-checkpoint", "world": world, "model": cfg.name, "ranks": ranks}, cfg


class _RankReader(CheckpointReader):
    """A reader over an explicit file list (one rank's shards), not a whole directory."""

    def __init__(self, directory: Path, files: list[str], device: str) -> None:
        self.path = directory
        self._open([directory / f for f in files], device)


def _value_check(rank: int, entries: Mapping[str, Any], checksums: bool) -> Any:
    def check(name: str, t: torch.Tensor) -> None:
        if nonfinite(t, role_of(name)):
            raise CheckpointError(f"tensor {name} (rank {rank}): contains NaN/Inf")
        if checksums and sha256(t) != entries[name]["sha256"]:
            raise CheckpointError(f"tensor {name} (rank {rank}): checksum mismatch (file corrupted or edited)")

    return check


def _check_against_config(cfg: ModelConfig, manifest: dict[str, Any], world: int) -> None:
    """The manifest must list exactly what the shard pass gives each rank, in the configured formats
    (names, shapes and dtypes), so a checkpoint that cannot run is refused at load, not per request."""
    needs, shapes, raw = rank_needs(cfg, world), logical_shapes(cfg), raw_dtypes(cfg)
    for r, (rn, rk) in enumerate(zip(needs, manifest["ranks"])):
        want: dict[str, Any] = {}
        for n in rn.values():
            want.update(stored_layout(n, sliced_shape(shapes[n.name], n.slice), raw.get(n.name)))
        have = rk["tensors"]
        problems = [f"missing tensor {k}" for k in want if k not in have]
        problems += [f"unexpected tensor {k}" for k in have if k not in want]
        for k, (shape, dtype) in want.items():
            if k not in have:
                continue
            if tuple(have[k]["shape"]) != shape:
                problems.append(f"tensor {k}: expected {list(shape)}, got {have[k]['shape']}")
            if dtype is not None and have[k]["dtype"] != dtype_name(dtype):
                problems.append(f"tensor {k}: expected {dtype_name(dtype)}, got {have[k]['dtype']}")
        raise_problems(problems, f"manifest rank {r} does not match config '{cfg.name}'")


class ShardedReferenceBackend(ReferenceBackend):
    """The reference backend over a sharded checkpoint: rank r binds only rank r's files."""

    def __init__(self, cfg: ModelConfig, weights: RankWeights, *, max_seq: int = 1024, device: str = "cpu") -> None:
        super().__init__(cfg, {}, max_seq=max_seq, world=weights.world, device=device)
        self.rank_weights = weights

    def _bind(self, graphs: list[Graph]) -> None:
        """Rank r's params come from rank r's files, which hold exactly its slices."""
        for r, gr in enumerate(graphs):
            params = self.executor.params[r]
            for v in gr.by_role("param"):
                if v.name not in params:
                    params[v.name] = bind_param(self.rank_weights.unsliced(r, v), self.rank_weights[r])
