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

import torch

from tilert.models.config import ModelConfig, QuantConfig, parse_config
from tilert.models.weights import FP8_BLOCK, MXFP4_BLOCK, logical_tensors, stored_specs, weight_specs

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
    return {k: v[0] for k, v in stored_layout(need, shape).items()}


def stored_layout(need: Need, shape: tuple[int, ...], raw_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Stored tensor name -> (shape, dtype) for a need of this (already sliced) logical shape.

    Raw tensors have no format-given dtype: `raw_dtype` (their contract dtype) or None.
    """
    if need.fmt == "raw":
        return {need.name: (shape, raw_dtype)}
    w = need.name + ".weight"
    n, k = shape
    if need.fmt == "fp8":
        return {
            w: (shape, torch.float8_e4m3fn),
            w + "_scale_inv": ((-(-n // FP8_BLOCK), -(-k // FP8_BLOCK)), torch.float32),
        }
    if need.fmt == "mxfp4":
        return {w + "_blocks": ((n, k // 2), torch.uint8), w + "_scales": ((n, k // MXFP4_BLOCK), torch.uint8)}
    return {w: (shape, torch.bfloat16)}


def raw_dtypes(cfg: ModelConfig) -> dict[str, torch.dtype]:
    """Contract dtype of every raw tensor (norms, embedding, router, biases, sinks)."""
    return {t.name: stored_specs(t)[0].dtype for t in logical_tensors(cfg) if t.fmt == "raw"}


def write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")


def read_manifest(directory: str | Path) -> tuple[dict[str, Any], ModelConfig]:
    """The manifest of a `tilert quantize` output and its model config.

    Every field is type-checked; anything malformed is one CheckpointError naming the field.
    """
    from tilert.checkpoint.loader import CheckpointError

    p = Path(directory) / MANIFEST_NAME
    try:
        m = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read manifest {p}: {e}") from None
    try:
        _validate(m)
        cfg = parse_config(m["config"], name=m["model"])
    except ValueError as e:
        raise CheckpointError(f"manifest {p}: {e}") from None
    return m, cfg


def _validate(m: Any) -> None:
    """Raise ValueError naming the first field of a manifest that is missing or has the wrong type."""
    _expect(isinstance(m, dict), "", "must be a JSON object", m)
    if m.get("format") != FORMAT:
        raise ValueError(f"field 'format' must be {FORMAT!r}, got {m.get('format')!r}")
    v = m.get("version")
    if v != VERSION:
        raise ValueError(f"version {v!r} is not supported (this tilert reads version {VERSION})")
    for key, ok, what in (
        ("model", lambda x: isinstance(x, str), "a string"),
        ("world", lambda x: _int(x) and x >= 1, "an integer >= 1"),
        ("config", lambda x: isinstance(x, dict), "an object"),
        ("ranks", lambda x: isinstance(x, list), "a list"),
    ):
        _expect(key in m, key, "is missing")
        _expect(ok(m[key]), key, f"must be {what}", m[key])
    tok = m.get("tokenizer")
    _expect(tok is None or (isinstance(tok, str) and _plain_name(tok)), "tokenizer", "must be a file name or null", tok)
    _expect(len(m["ranks"]) == m["world"], "ranks", f"must list world={m['world']} ranks, got {len(m['ranks'])}")
    for r, rk in enumerate(m["ranks"]):
        at = f"ranks[{r}]"
        _expect(isinstance(rk, dict), at, "must be an object", rk)
        _expect(rk.get("rank") == r, f"{at}.rank", f"must be {r}", rk.get("rank"))
        files = rk.get("files")
        ok = isinstance(files, list) and all(isinstance(f, str) and _plain_name(f) for f in files)
        _expect(ok, f"{at}.files", "must be a list of file names in the checkpoint directory", files)
        tensors = rk.get("tensors")
        _expect(isinstance(tensors, dict), f"{at}.tensors", "must be an object", tensors)
        for name, e in tensors.items():
            _tensor_entry(f"{at}.tensors[{name!r}]", e, files)


def _tensor_entry(at: str, e: Any, files: list[str]) -> None:
    _expect(isinstance(e, dict), at, "must be an object", e)
    checks = (
        ("shape", lambda x: isinstance(x, list) and all(_int(d) and d >= 0 for d in x), "a list of sizes"),
        ("dtype", lambda x: x in _DTYPE_NAMES, f"one of {', '.join(sorted(_DTYPE_NAMES))}"),
        ("file", lambda x: x in files, "one of the rank's files"),
        ("sha256", lambda x: isinstance(x, str) and len(x) == 64 and all(c in _HEX for c in x), "a sha256 hex digest"),
        ("source", lambda x: isinstance(x, str), "a tensor name"),
        ("format", lambda x: x in ("raw", "bf16", "fp8", "mxfp4"), "raw, bf16, fp8 or mxfp4"),
        ("slice", lambda x: x is None or (isinstance(x, list) and len(x) == 3 and all(map(_int, x))),
         "null or [dim, start, stop]"),
    )  # fmt: skip
    for key, ok, what in checks:
        _expect(key in e, f"{at}.{key}", "is missing")
        _expect(ok(e[key]), f"{at}.{key}", f"must be {what}", e[key])


def _expect(ok: bool, field: str, problem: str, value: Any = ...) -> None:
    if not ok:
        got = "" if value is ... else f", got {_short(value)}"
        raise ValueError(f"field '{field}' {problem}{got}" if field else f"{problem}{got}")


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _plain_name(f: str) -> bool:
    """A file name inside the checkpoint directory (no path, so a manifest cannot point elsewhere)."""
    return bool(f) and Path(f).name == f and f not in (".", "..")


_HEX = set("0123456789abcdef")
_DTYPE_NAMES = {"bfloat16", "float16", "float32", "float8_e4m3fn", "uint8"}


def dtype_name(d: torch.dtype) -> str:
    return str(d).removeprefix("torch.")


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
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cj}: must be a JSON object")
    name = raw.get("name")
    return parse_config(raw, name=name if isinstance(name, str) and name else d.resolve().name)
