"""What each rank stores, and the manifest that records it.

`rank_needs` asks the compiler's shard pass (not a second copy of its rules) which checkpoint
tensors each rank's params come from and which slice of them; `tilert quantize` writes exactly
those slices, quantised on their own block grid, and the manifest records per rank the files and,
per stored tensor, its shape, dtype, slice and sha256, so loading can check every byte.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tilert.models.config import ModelConfig, QuantConfig, parse_config
from tilert.models.weights import FP8_BLOCK, MXFP4_BLOCK, weight_specs

MANIFEST_NAME = "tilert-manifest.json"
FORMAT = "tilert-sharded-checkpoint"
VERSION = 1
_FMT = {"mxfp4": "mxfp4", "fp8_e4m3b": "fp8"}  # IR dtype of a linear param -> storage format


@dataclass(frozen=True)
class Need:
    """One logical checkpoint tensor a rank needs: its format and the slice (dim, start, stop) or None."""

    name: str  # linears: the prefix without ".weight"; raw tensors: the stored name
    fmt: str  # "raw" | "bf16" | "fp8" | "mxfp4"
    slice: tuple[int, int, int] | None = None


def bf16_config(cfg: ModelConfig) -> ModelConfig:
    """The same model with every linear stored in bf16 (the input form of `tilert quantize`)."""
    return replace(cfg, quantization=QuantConfig("bf16", "bf16", "bf16", "bf16"))


def logical_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Logical shape per need name (linears by prefix, raw tensors by stored name)."""
    out = {}
    for n, s in weight_specs(bf16_config(cfg), include_drafter=True).items():
        out[n.removesuffix(".weight") if s.role == "bf16_weight" else n] = s.shape
    return out


def rank_graphs(cfg: ModelConfig, world: int) -> list[list[Any]]:
    """Per graph kind (decode, verify, drafter), the rank graphs a runtime binds."""
    from tilert.models.builder import build_step_graph
    from tilert.models.drafter import build_drafter_graph

    graphs = [build_step_graph(cfg, tokens=1, max_seq=64)]
    if cfg.dflash is not None:
        graphs.append(build_step_graph(cfg, tokens=cfg.dflash.block_size, max_seq=64, mode="verify"))
        graphs.append(build_drafter_graph(cfg, context=1, max_seq=64))
    if world == 1:
        return [[g] for g in graphs]
    try:
        from tilert.passes import shard_for_ranks
    except ImportError:
        raise ValueError(
            "sharding needs the shard pass (tilert.passes.shard_for_ranks), absent in this build"
        ) from None
    return [shard_for_ranks(g, world) for g in graphs]


def param_needs(v: Any) -> list[Need]:
    """The checkpoint tensors one (possibly sharded) param is built from."""
    src = v.src()
    sl = tuple(src["slice"]) if src.get("slice") else None
    if "tensor" in src:
        return [Need(src["tensor"], "raw", sl)]
    fmt = _FMT.get(v.dtype.name, "bf16")
    if "linear" in src:
        return [Need(p, fmt, sl) for p in src["linear"]]
    if "experts" in src:
        e0, e1 = src.get("expert_range", (0, src["count"]))
        return [Need(f"{src['experts']}.{e}.{p}", fmt) for e in range(e0, e1) for p in src["projs"]]
    raise ValueError(f"param '{v.name}' has no weight source")


def rank_needs(cfg: ModelConfig, world: int) -> list[dict[str, Need]]:
    """Per rank, every logical tensor it needs (in first-use order); one slice per tensor per rank."""
    out: list[dict[str, Need]] = [{} for _ in range(world)]
    for per_rank in rank_graphs(cfg, world):
        for r, g in enumerate(per_rank):
            for v in g.by_role("param"):
                for n in param_needs(v):
                    old = out[r].setdefault(n.name, n)
                    if old != n:
                        raise ValueError(f"rank {r} needs {n.name} as both {old} and {n}")
    return out


def sliced_shape(shape: tuple[int, ...], sl: tuple[int, int, int] | None) -> tuple[int, ...]:
    if sl is None:
        return shape
    s = list(shape)
    s[sl[0]] = sl[2] - sl[1]
    return tuple(s)


def stored_shapes(need: Need, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """Stored tensor names and shapes for a need of this (already sliced) logical shape."""
    if need.fmt == "raw":
        return {need.name: shape}
    w = need.name + ".weight"
    n, k = shape
    if need.fmt == "fp8":
        return {w: shape, w + "_scale_inv": (-(-n // FP8_BLOCK), -(-k // FP8_BLOCK))}
    if need.fmt == "mxfp4":
        return {w + "_blocks": (n, k // 2), w + "_scales": (n, k // MXFP4_BLOCK)}
    return {w: shape}


def write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")


def read_manifest(directory: str | Path) -> tuple[dict[str, Any], ModelConfig]:
    """The manifest of a `tilert quantize` output and its model config; ValueError if malformed."""
    from tilert.checkpoint.loader import CheckpointError

    p = Path(directory) / MANIFEST_NAME
    try:
        m = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read manifest {p}: {e}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT or m.get("version") != VERSION:
        raise CheckpointError(f"{p}: not a {FORMAT} v{VERSION} manifest")
    for key in ("model", "config", "world", "ranks"):
        if key not in m:
            raise CheckpointError(f"{p}: field '{key}' is missing")
    if len(m["ranks"]) != m["world"]:
        raise CheckpointError(f"{p}: world is {m['world']} but {len(m['ranks'])} ranks are listed")
    return m, parse_config(m["config"], name=m["model"])


def is_sharded_checkpoint(path: str | Path) -> bool:
    return (Path(path) / MANIFEST_NAME).is_file()


def config_next_to(path: str | Path) -> ModelConfig:
    """The config.json beside a checkpoint; its model name is the config's `name` field or the directory's."""
    from tilert.checkpoint.loader import CheckpointError

    p = Path(path)
    d = p if p.is_dir() else p.parent
    cj = d / "config.json"
    if not cj.is_file():
        raise CheckpointError(f"no config.json next to {p}: pass a model name or a config")
    try:
        raw = json.loads(cj.read_text())
    except ValueError as e:
        raise CheckpointError(f"{cj}: not valid JSON ({e})") from None
    return parse_config(raw, name=str(raw.get("name") or d.resolve().name))
