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

from tilert.checkpoint.loader import ST_DTYPES, CheckpointError, CheckpointReader, LazyWeights, nonfinite, sha256
from tilert.checkpoint.manifest import logical_shapes, rank_needs, read_manifest, sliced_shape, stored_shapes
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


def open_sharded(
    directory: str | Path, cfg: ModelConfig | None = None, device: str = "cpu", verify: bool | None = None
) -> tuple[ModelConfig, RankWeights]:
    """Open and structurally validate a sharded checkpoint; verify=True also reads and checks every value
    (None: only when the whole checkpoint is under 1 GiB)."""
    d = Path(directory)
    manifest, mcfg = read_manifest(d)
    if cfg is not None and cfg.to_dict() | {"name": ""} != mcfg.to_dict() | {"name": ""}:
        raise CheckpointError(f"{d}: the checkpoint was quantised for a different config than '{cfg.name}'")
    cfg = mcfg if cfg is None else cfg
    world = int(manifest["world"])
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
        if problems:
            raise CheckpointError(f"{d} rank {r}: " + "; ".join(problems[:10]))
        ranks.append(LazyWeights(reader, _value_check(r, rk["tensors"]), names=list(rk["tensors"])))
    rw = RankWeights(d, manifest, ranks)
    if verify is None:
        nbytes = sum((d / f).stat().st_size for rk in manifest["ranks"] for f in rk["files"])
        verify = nbytes < 1 << 30
    if verify:
        for w in ranks:
            for name in w:
                w[name]
            w.reader.reads.clear()
    return cfg, rw


class _RankReader(CheckpointReader):
    """A reader over an explicit file list (one rank's shards), not a whole directory."""

    def __init__(self, directory: Path, files: list[str], device: str) -> None:
        self.path = directory
        self._open([directory / f for f in files], device)


def _value_check(rank: int, entries: Mapping[str, Any]) -> Any:
    def check(name: str, t: torch.Tensor) -> None:
        e = entries[name]
        role = "mxfp4_blocks" if name.endswith("_blocks") else "mxfp4_scales" if name.endswith("_scales") else ""
        if nonfinite(t, role):
            raise CheckpointError(f"tensor {name} (rank {rank}): contains NaN/Inf")
        if sha256(t) != e["sha256"]:
            raise CheckpointError(f"tensor {name} (rank {rank}): checksum mismatch (file corrupted or edited)")

    return check


def _check_against_config(cfg: ModelConfig, manifest: dict[str, Any], world: int) -> None:
    """The manifest must list exactly what the shard pass gives each rank, in the configured formats."""
    needs, shapes = rank_needs(cfg, world), logical_shapes(cfg)
    for r, (rn, rk) in enumerate(zip(needs, manifest["ranks"])):
        want: dict[str, tuple[int, ...]] = {}
        for n in rn.values():
            want.update(stored_shapes(n, sliced_shape(shapes[n.name], n.slice)))
        have = {k: tuple(t["shape"]) for k, t in rk["tensors"].items()}
        problems = [f"missing tensor {k}" for k in want if k not in have]
        problems += [f"unexpected tensor {k}" for k in have if k not in want]
        problems += [
            f"tensor {k}: expected {list(s)}, got {list(have[k])}" for k, s in want.items() if have.get(k, s) != s
        ]
        if problems:
            raise CheckpointError(f"manifest rank {r} does not match config '{cfg.name}': " + "; ".join(problems[:10]))


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
