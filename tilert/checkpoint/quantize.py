"""`tilert quantize`: a bf16 (or already quantised) HF checkpoint -> per-rank quantised shards.

Each rank's file holds exactly what the shard pass gives that rank (its attention heads, its
experts, its vocabulary slice of lm_head; replicated tensors duplicated), each linear quantised
per `cfg.quantization` on the slice's own block grid, so no runtime ever re-quantises. Memory
stays bounded: tensors are read one at a time and a rank's output is flushed to a new file every
`max_file_bytes`.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tilert.checkpoint.loader import CheckpointError, CheckpointReader, LazyWeights, nonfinite, sha256
from tilert.checkpoint.manifest import (
    FORMAT,
    VERSION,
    Need,
    logical_shapes,
    rank_needs,
    stored_shapes,
    write_manifest,
)
from tilert.models.binding import slice_weight
from tilert.models.config import ModelConfig
from tilert.models.weights import dequantize_weight
from tilert.tokenizer import find_tokenizer

Progress = Callable[[str], None]


def quantize_need(weights: LazyWeights, need: Need) -> dict[str, torch.Tensor]:
    """Read one logical tensor, cut the rank's slice, store it in the need's format."""
    if need.fmt == "raw":
        t = weights[need.name]
        return {need.name: slice_weight(t, *need.slice) if need.slice else t}
    x = dequantize_weight(weights, need.name)  # any input form -> f32 [out, in]
    if need.slice:
        x = slice_weight(x, *need.slice)
    w = need.name + ".weight"
    if need.fmt == "fp8":
        from tilert.numerics import fp8

        q, s = fp8.quantize_blocks(x)
        return {w: q, w + "_scale_inv": s.to(torch.float32)}
    if need.fmt == "mxfp4":
        from tilert.numerics import mxfp4

        blocks, scales = mxfp4.quantize(x)
        return {w + "_blocks": blocks, w + "_scales": scales}
    return {w: x.to(torch.bfloat16)}


def _input_config(src: Path, cfg: ModelConfig | None) -> ModelConfig:
    from tilert.checkpoint.manifest import config_next_to

    return cfg if cfg is not None else config_next_to(src)


def quantize_checkpoint(
    src: str | Path,
    out: str | Path,
    world: int,
    cfg: ModelConfig | None = None,
    *,
    max_file_bytes: int = 4 << 30,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Write per-rank shards + tilert-manifest.json + config.json (+ tokenizer.json) to `out`."""
    src, out = Path(src), Path(out)
    if not src.exists():
        raise CheckpointError(f"checkpoint not found: {src}")
    if world < 1:
        raise CheckpointError(f"--gpus must be >= 1, got {world}")
    cfg = _input_config(src, cfg)
    reader = CheckpointReader(src)
    weights = LazyWeights(reader)
    needs = rank_needs(cfg, world)
    shapes = logical_shapes(cfg)
    _check_inputs(reader, cfg, needs)
    out.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda _m: None)
    ranks = []
    total = sum(len(n) for n in needs)
    done = 0
    for r, rneeds in enumerate(needs):
        w = _RankWriter(out, r, max_file_bytes)
        for need in rneeds.values():
            want = stored_shapes(need, _sliced(shapes[need.name], need))
            for k, t in quantize_need(weights, need).items():
                if tuple(t.shape) != want[k]:
                    raise CheckpointError(f"tensor {k}: expected {want[k]} for rank {r}, produced {list(t.shape)}")
                if nonfinite(t, _role(k, need)):
                    raise CheckpointError(f"tensor {k} (rank {r}): contains NaN/Inf after quantisation")
                w.add(k, t, need)
            done += 1
            if done % 200 == 0 or done == total:
                say(f"quantize: {done}/{total} tensors (rank {r}/{world})")
        w.flush()
        ranks.append({"rank": r, "files": w.files, "tensors": w.tensors})
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
    tok = find_tokenizer(src)
    if tok is not None:
        shutil.copyfile(tok, out / "tokenizer.json")
        manifest["tokenizer"] = "tokenizer.json"
    (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")
    write_manifest(out, manifest)
    return manifest


class _RankWriter:
    """Collects one rank's tensors and writes a new safetensors file every `max_bytes`."""

    def __init__(self, out: Path, rank: int, max_bytes: int) -> None:
        self.out, self.rank, self.max_bytes = out, rank, max_bytes
        self.files: list[str] = []
        self.tensors: dict[str, dict[str, Any]] = {}
        self._buf: dict[str, torch.Tensor] = {}
        self._bytes = 0

    def add(self, name: str, t: torch.Tensor, need: Need) -> None:
        self.tensors[name] = {
            "shape": list(t.shape),
            "dtype": str(t.dtype).removeprefix("torch."),
            "source": need.name,
            "format": need.fmt,
            "slice": list(need.slice) if need.slice else None,
            "sha256": sha256(t),
        }
        self._buf[name] = t
        self._bytes += t.numel() * t.element_size()
        if self._bytes >= self.max_bytes:
            self.flush()

    def flush(self) -> None:
        if not self._buf:
            return
        from safetensors.torch import save_file

        fname = f"rank{self.rank:03d}-{len(self.files):05d}.safetensors"
        save_file({k: v.contiguous() for k, v in self._buf.items()}, str(self.out / fname), metadata={"format": "pt"})
        for k in self._buf:
            self.tensors[k]["file"] = fname
        self.files.append(fname)
        self._buf, self._bytes = {}, 0


def _sliced(shape: tuple[int, ...], need: Need) -> tuple[int, ...]:
    from tilert.checkpoint.manifest import sliced_shape

    return sliced_shape(shape, need.slice)


def _role(stored: str, need: Need) -> str:
    if stored.endswith("_blocks"):
        return "mxfp4_blocks"
    if stored.endswith("_scales"):
        return "mxfp4_scales"
    return need.fmt


def _check_inputs(reader: CheckpointReader, cfg: ModelConfig, needs: list[dict[str, Need]]) -> None:
    """Every needed tensor is present in some storage form with its logical shape; nothing is extra."""
    shapes = logical_shapes(cfg)
    fmts = {n.name: n.fmt for rn in needs for n in rn.values()}
    problems, used = [], set()
    for name, shape in shapes.items():
        forms = [name] if name in reader else [name + s for s in (".weight", ".weight_blocks") if name + s in reader]
        if not forms:
            if name in fmts:
                problems.append(f"missing tensor {name}" + ("" if fmts[name] == "raw" else ".weight"))
            continue
        f = forms[0]
        used.update({f, f + "_scale_inv", name + ".weight_scales"} & set(reader.keys()))
        got = reader.info(f)[0]
        exp = shape if not f.endswith("_blocks") else (shape[0], shape[1] // 2)
        if got != exp:
            problems.append(f"tensor {f}: expected shape {list(exp)}, got {list(got)}")
    problems += [f"unexpected tensor {k}" for k in reader.keys() if k not in used]
    if problems:
        more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
        raise CheckpointError(f"input checkpoint {reader.path}: " + "; ".join(problems[:10]) + more)
