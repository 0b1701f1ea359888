"""One logical tensor in any storage format: what `tilert quantize` writes and quantise-on-load binds.

`Source` holds one logical tensor as the checkpoint stores it (read once); `Source.to(fmt, slice)`
gives any rank's slice in any format. A linear already in the wanted format is passed through
untouched (no re-quantisation); otherwise it is dequantised to float32 once, sliced, and quantised
on the slice's own block grid. `ConvertingWeights` is the Mapping a backend binds from when linears
run in another format than they are stored in: each tensor is converted when the binder asks for
it, so memory holds one logical tensor at a time, never the checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from tilert.checkpoint.loader import CheckpointError, nan_check
from tilert.models.binding import slice_weight
from tilert.models.config import ModelConfig
from tilert.models.weights import dequantize_weight, logical_tensors, stored_specs

Slice = tuple[int, int, int] | None


def stored_names(name: str, fmt: str) -> list[str]:
    """The stored tensor names of a logical tensor (linears by prefix) in a format."""
    if fmt == "raw":
        return [name]
    w = name + ".weight"
    return {"bf16": [w], "fp8": [w, w + "_scale_inv"], "mxfp4": [w + "_blocks", w + "_scales"]}[fmt]


class Source:
    """One logical tensor as stored: `to(fmt, slice)` converts (dequantising at most once)."""

    def __init__(self, weights: Mapping[str, torch.Tensor], name: str, fmt: str) -> None:
        self.name, self.fmt = name, fmt
        self.stored = {k: weights[k] for k in stored_names(name, fmt)}
        self._f32: torch.Tensor | None = None

    def to(self, fmt: str, sl: Slice = None) -> dict[str, torch.Tensor]:
        if fmt == "raw":
            t = self.stored[self.name]
            return {self.name: slice_weight(t, *sl) if sl else t}
        if fmt == self.fmt and sl is None:
            return dict(self.stored)
        if self._f32 is None:
            self._f32 = dequantize_weight(self.stored, self.name)
        x = slice_weight(self._f32, *sl) if sl else self._f32
        w = self.name + ".weight"
        if fmt == "fp8":
            from tilert.numerics import fp8

            q, s = fp8.quantize_blocks(x)
            out = {w: q, w + "_scale_inv": s.to(torch.float32)}
        elif fmt == "mxfp4":
            from tilert.numerics import mxfp4

            blocks, scales = mxfp4.quantize(x)
            out = {w + "_blocks": blocks, w + "_scales": scales}
        elif fmt == "bf16":
            out = {w: x.to(torch.bfloat16)}
        else:
            raise CheckpointError(f"{self.name}: unknown storage format {fmt!r}")
        for k, t in out.items():
            try:
                nan_check(k, t)
            except CheckpointError:
                raise CheckpointError(f"tensor {k}: contains NaN/Inf after conversion to {fmt}") from None
        return out


class ConvertingWeights(Mapping[str, torch.Tensor]):
    """The stored tensors of `run` (a config), made from `source` (stored per `formats`) on access.

    A linear stored in its run format is read as it is; another is converted (`Source.to`) when one
    of its tensors is asked for, and its sibling (scales after blocks) is kept until asked for next.
    """

    def __init__(
        self, source: Mapping[str, torch.Tensor], run: ModelConfig, formats: Mapping[str, str], include_drafter: bool
    ) -> None:
        self.source, self.formats = source, dict(formats)
        self._of: dict[str, tuple[str, str]] = {}  # stored name -> (logical name, run format)
        for t in logical_tensors(run, include_drafter):
            for s in stored_specs(t):
                self._of[s.name] = (t.name, t.fmt)
        self._pending: dict[str, torch.Tensor] = {}

    @property
    def reader(self):  # noqa: ANN201 - the source's reader (tests count reads through it)
        return self.source.reader  # type: ignore[attr-defined]

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._of:
            raise KeyError(name)
        if name in self._pending:
            return self._pending.pop(name)
        logical, fmt = self._of[name]
        stored = self.formats[logical]
        if fmt == "raw" or stored == fmt:
            return self.source[name]
        parts = Source(self.source, logical, stored).to(fmt)
        self._pending = {k: v for k, v in parts.items() if k != name}
        return parts[name]

    def __contains__(self, name: object) -> bool:
        return name in self._of

    def __iter__(self) -> Iterator[str]:
        return iter(self._of)

    def __len__(self) -> int:
        return len(self._of)
