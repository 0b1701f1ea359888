"""Bind a graph's params to checkpoint tensors (storage form, see models/weights.py).

A param's `source` names the checkpoint tensors it comes from:
- tensor=NAME: one raw tensor (norms, router, biases, sinks, the embedding);
- linear=(PREFIX, ...): linear weight(s), concatenated along N, in the param's dtype format;
- experts=PREFIX, projs=(...), count=E: per-expert linears stacked into [E, N, K].
The shard pass adds slice=(dim, start, stop) (stop may run past the end: zero padding) and, for
experts, expert_range=(start, stop). Quantised slices stay exact when they follow the format's
blocks; an FP8 slice that starts inside a 128-block gets a finer scale grid (one scale per row or
column along the cut), so every rank's values are exactly the checkpoint's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from tilert.ir.graph import Graph, Value
from tilert.models.weights import UPCASTS, WeightError
from tilert.ops.qtensor import QTensor

FP8_BLOCK = 128


def _get(weights: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    try:
        return weights[name]
    except KeyError:
        raise WeightError(f"checkpoint tensor '{name}' is missing") from None


def load_linear(weights: Mapping[str, torch.Tensor], prefix: str, fmt: str) -> torch.Tensor | QTensor:
    if fmt == "mxfp4":
        return QTensor("mxfp4", _get(weights, f"{prefix}.weight_blocks"), _get(weights, f"{prefix}.weight_scales"))
    if fmt == "fp8_e4m3b":
        return QTensor("fp8", _get(weights, f"{prefix}.weight"), _get(weights, f"{prefix}.weight_scale_inv"))
    return _get(weights, f"{prefix}.weight")


def slice_weight(w: torch.Tensor | QTensor, dim: int, start: int, stop: int) -> torch.Tensor | QTensor:
    """Rows (dim 0) or columns (dim 1) [start, stop) of a [.., N, K] weight; past the end is zero."""
    if not isinstance(w, QTensor):
        n = w.shape[dim]
        part = w.narrow(dim, start, max(0, min(stop, n) - start))
        if stop > n:
            pad = list(part.shape)
            pad[dim] = stop - max(start, n)
            part = torch.cat([part, part.new_zeros(pad)], dim=dim)
        return part
    ax = dim % 2 - 2  # -2 = rows (N), -1 = K
    n = w.shape[ax]
    if w.fmt == "mxfp4":
        if ax == -1 and (start % 32 or stop % 32):
            raise WeightError(f"MXFP4 K-slice [{start}, {stop}) is not a multiple of the 32-element block")
        f = 2 if ax == -1 else 1
        g = 32 if ax == -1 else 1
        data = slice_weight(w.data, ax, start // f, stop // f)
        scales = slice_weight(w.scales, ax, start // g, stop // g)
        if stop > n:  # padded rows/cols: e8m0 0x7F = 1.0 keeps zeros zero
            scales.narrow(ax, (min(stop, n) - start) // g, (stop - max(start, n)) // g).fill_(127)
        return QTensor("mxfp4", data, scales)
    # fp8 with block scales: a slice that starts inside a scale block (or cuts a block of a wider
    # one) keeps every value exact by refining the scale grid to one scale per row (or column) along
    # the sliced axis; slices that follow the blocks keep the block grid.
    blk = w.block[ax]
    if start % blk and start // blk != (min(stop, n) - 1) // blk:
        scales = w.scales.repeat_interleave(blk, dim=ax).narrow(ax, 0, n)
        block = (1, w.block[1]) if ax == -2 else (w.block[0], 1)
        w, blk = QTensor("fp8", w.data, scales, block), 1
    data = slice_weight(w.data.view(torch.uint8), ax, start, stop).view(torch.float8_e4m3fn)
    b0 = start // blk
    nb = -(-(stop - start) // blk) if start % blk == 0 else 1
    scales = slice_weight(w.scales, ax, b0, b0 + nb)
    if scales.shape[ax] and stop > n:
        have = -(-(min(stop, n) - start) // blk)
        scales.narrow(ax, have, scales.shape[ax] - have).fill_(1.0)
    return QTensor("fp8", data, scales, w.block)


def _cat(ws: list[torch.Tensor | QTensor], dim: int = 0) -> torch.Tensor | QTensor:
    if len(ws) == 1:
        return ws[0]
    if isinstance(ws[0], QTensor):
        if ws[0].fmt == "fp8" and (
            any(w.shape[-2] % w.block[0] for w in ws[:-1]) or len({w.block for w in ws}) > 1
        ):
            raise WeightError("cannot concatenate FP8 weights whose rows are not whole scale blocks")
        return QTensor(ws[0].fmt, torch.cat([w.data for w in ws], dim), torch.cat([w.scales for w in ws], dim),
                       ws[0].block)
    return torch.cat(ws, dim)


def _stack(ws: list[torch.Tensor | QTensor]) -> torch.Tensor | QTensor:
    if isinstance(ws[0], QTensor):
        return QTensor(ws[0].fmt, torch.stack([w.data for w in ws]), torch.stack([w.scales for w in ws]))
    return torch.stack(ws)


def bind_param(v: Value, weights: Mapping[str, torch.Tensor]) -> torch.Tensor | QTensor:
    src = v.src()
    sl = src.get("slice")
    if "tensor" in src:
        t = _get(weights, src["tensor"])
        if v.dtype.name == "f32" and t.dtype in UPCASTS[torch.float32]:
            t = t.float()  # a bf16-stored router/sink bias, upcast as upstream loaders do
        out = slice_weight(t, sl[0], sl[1], sl[2]) if sl else t
    elif "linear" in src:
        parts = [load_linear(weights, p, v.dtype.name) for p in src["linear"]]
        if sl and sl[0] == 0:
            parts = [slice_weight(p, 0, sl[1], sl[2]) for p in parts]
        out = _cat(parts)
        if sl and sl[0] == 1:
            out = slice_weight(out, 1, sl[1], sl[2])
    elif "experts" in src:
        e0, e1 = src.get("expert_range", (0, src["count"]))
        per_expert = [
            _cat([load_linear(weights, f"{src['experts']}.{e}.{p}", v.dtype.name) for p in src["projs"]])
            for e in range(e0, e1)
        ]
        out = _stack(per_expert)
    else:
        raise WeightError(f"param '{v.name}' has no weight source")
    shape = tuple(out.shape)
    if shape != v.shape:
        raise WeightError(f"param '{v.name}' expects shape {list(v.shape)}, checkpoint gives {list(shape)}")
    return out


LOAD_BAR_BYTES = 1 << 30  # a load of at least this much shows a progress bar (on a terminal)


def bind_params(
    graph: Graph, weights: Mapping[str, torch.Tensor], cache: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Runtime objects for every param of the graph (reusing `cache` entries by name)."""
    from tilert.progress import progress

    cache = {} if cache is None else cache
    todo = [v for v in graph.by_role("param") if v.name not in cache]
    nbytes = sum(v.nbytes for v in todo)
    rank = graph.meta.get("rank")
    desc = "load weights" + (f" (rank {rank})" if rank is not None else "")
    with progress(total=nbytes if nbytes >= LOAD_BAR_BYTES else 0, desc=desc, unit="B", unit_scale=True) as bar:
        for v in todo:
            cache[v.name] = bind_param(v, weights)
            bar.update(v.nbytes)
    return cache
