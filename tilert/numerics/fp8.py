"""FP8 e4m3 (``torch.float8_e4m3fn``) with per-block float32 scales: the DeepSeek-V3 weight format.

Two groupings share one rule:

* weights: ``[..., N, K]`` in 2-D tiles (default 128 x 128), scales ``[..., ceil(N/128), ceil(K/128)]``;
* activations: per token, 1 x 128 groups along K, scales ``[..., ceil(K/128)]`` (the W8A8 path and
  the ``torch._scaled_mm`` baselines).

Rule, per block: ``scale = amax / 448`` (448 is the largest e4m3fn value), stored as float32 and
named ``scale_inv`` after the DeepSeek-V3 checkpoints (it is the multiplier that *dequantises*);
``q = round_to_nearest_even(w / scale)`` saturated to +-448; ``w ~= q.float() * scale``.

Conventions chosen here:

* ``amax == 0``: scale 1 (q is all zeros, signs of -0.0 kept).
* a tiny non-zero ``amax`` whose ``amax / 448`` would fall below the smallest normal float32
  (~1.2e-38) gets that smallest normal as its scale, so the division never overflows.
* a block holding NaN or +-Inf: scale NaN and q all zeros; the dequantisers refuse NaN/Inf scales.
* Partial edge blocks (N or K not a multiple of the block) are allowed; their amax covers only the
  real elements.
* Arithmetic is float32 (float64 inputs are rounded to float32 first), as DeepSeek's reference does.
"""

from __future__ import annotations

import torch

__all__ = [
    "FP8_DTYPE",
    "FP8_MAX",
    "quantize_blocks",
    "dequantize_blocks",
    "quantize_rows",
    "dequantize_rows",
]

FP8_DTYPE = torch.float8_e4m3fn
#: Largest finite float8_e4m3fn magnitude.
FP8_MAX = 448.0
_TINY = torch.finfo(torch.float32).tiny


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _check_block(block: tuple[int, int]) -> tuple[int, int]:
    try:
        bn, bk = (int(b) for b in block)
    except (TypeError, ValueError):
        raise TypeError(f"block must be a pair of positive ints, got {block!r}") from None
    if bn <= 0 or bk <= 0:
        raise ValueError(f"block must be a pair of positive ints, got {block!r}")
    return bn, bk


def _check_float_input(name: str, w: torch.Tensor, min_dim: int) -> None:
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"FP8 {name} expects a torch.Tensor, got {type(w).__name__}")
    if not w.dtype.is_floating_point:
        raise TypeError(f"FP8 {name} expects a floating-point tensor, got dtype {w.dtype}")
    if w.dim() < min_dim:
        raise ValueError(f"FP8 {name} expects at least {min_dim} dims, got shape {tuple(w.shape)}")


def _check_finite_scales(scale: torch.Tensor, what: str) -> None:
    bad = ~torch.isfinite(scale)
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"FP8 {what} scale is {float(scale[idx])} (NaN/Inf) at block index {idx} "
            f"({int(bad.sum())} non-finite scale(s) in total); the quantised block held NaN/Inf"
        )


def _quantize_2d(w: torch.Tensor, bn: int, bk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Core of both quantisers: ``w [..., N, K]`` in ``bn x bk`` tiles."""
    n, k = w.shape[-2], w.shape[-1]
    lead = w.shape[:-2]
    nb, kb = _ceil_div(n, bn), _ceil_div(k, bk)
    wf = w.to(torch.float32)
    # Zero padding does not change any block's amax.
    wp = torch.nn.functional.pad(wf, (0, kb * bk - k, 0, nb * bn - n))
    tiles = wp.reshape(*lead, nb, bn, kb, bk)
    amax = tiles.abs().amax(dim=(-3, -1))  # [..., nb, kb]; NaN propagates
    finite = torch.isfinite(amax)
    scale = torch.clamp(amax / FP8_MAX, min=_TINY)
    scale = torch.where(amax == 0, torch.ones_like(scale), scale)
    scale = torch.where(finite, scale, torch.full_like(scale, float("nan")))

    s = scale.unsqueeze(-1).unsqueeze(-3)  # [..., nb, 1, kb, 1]
    q = (tiles / s).clamp(-FP8_MAX, FP8_MAX)
    q = torch.where(finite.unsqueeze(-1).unsqueeze(-3), q, torch.zeros_like(q))
    q = q.reshape(*lead, nb * bn, kb * bk)[..., :n, :k]
    return q.to(FP8_DTYPE), scale


def _dequantize_2d(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, bn: int, bk: int) -> torch.Tensor:
    n, k = q.shape[-2], q.shape[-1]
    work = torch.float64 if dtype == torch.float64 else torch.float32
    s = scale.to(work).repeat_interleave(bn, dim=-2).repeat_interleave(bk, dim=-1)[..., :n, :k]
    return (q.to(work) * s).to(dtype)


def _check_dequant_inputs(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, min_dim: int) -> None:
    if not isinstance(q, torch.Tensor) or not isinstance(scale, torch.Tensor):
        raise TypeError("FP8 dequantize expects torch.Tensor q and scales")
    if q.dtype != FP8_DTYPE:
        raise TypeError(f"FP8 dequantize expects q of dtype {FP8_DTYPE}, got {q.dtype}")
    if not scale.dtype.is_floating_point:
        raise TypeError(f"FP8 dequantize expects floating-point scales (float32), got {scale.dtype}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"FP8 dequantize dtype must be a floating-point torch.dtype, got {dtype}")
    if q.dim() < min_dim:
        raise ValueError(f"FP8 dequantize expects q with at least {min_dim} dims, got shape {tuple(q.shape)}")


def quantize_blocks(w: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise weights ``[..., N, K]`` to e4m3fn with one float32 scale per ``block`` tile.

    Returns ``(q, scale_inv)``: ``q`` float8_e4m3fn ``[..., N, K]`` and ``scale_inv`` float32
    ``[..., ceil(N/bn), ceil(K/bk)]`` such that ``w ~= q.float() * scale_inv`` (per tile).
    """
    bn, bk = _check_block(block)
    _check_float_input("quantize_blocks", w, 2)
    return _quantize_2d(w, bn, bk)


def dequantize_blocks(
    q: torch.Tensor,
    scale_inv: torch.Tensor,
    dtype: torch.dtype = torch.float32,
    block: tuple[int, int] = (128, 128),
) -> torch.Tensor:
    """``q [..., N, K]`` x per-tile ``scale_inv`` -> ``dtype``; refuses NaN/Inf scales and bad shapes."""
    bn, bk = _check_block(block)
    _check_dequant_inputs(q, scale_inv, dtype, 2)
    n, k = q.shape[-2], q.shape[-1]
    expected = (*q.shape[:-2], _ceil_div(n, bn), _ceil_div(k, bk))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"FP8 dequantize_blocks: scale_inv shape {tuple(scale_inv.shape)} does not match q shape "
            f"{tuple(q.shape)} with block {(bn, bk)}; expected {expected}"
        )
    _check_finite_scales(scale_inv, "block")
    return _dequantize_2d(q, scale_inv, dtype, bn, bk)


def quantize_rows(x: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token activation quantisation: 1 x ``group`` groups along the last dim.

    Returns ``(q, scales)``: float8_e4m3fn ``[..., K]`` and float32 ``[..., ceil(K/group)]``.
    """
    _, g = _check_block((1, group))
    _check_float_input("quantize_rows", x, 1)
    q, s = _quantize_2d(x.unsqueeze(-2), 1, g)
    return q.squeeze(-2), s.squeeze(-2)


def dequantize_rows(
    q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32, group: int = 128
) -> torch.Tensor:
    """Inverse of :func:`quantize_rows`; refuses NaN/Inf scales and bad shapes."""
    _, g = _check_block((1, group))
    _check_dequant_inputs(q, scales, dtype, 1)
    expected = (*q.shape[:-1], _ceil_div(q.shape[-1], g))
    if tuple(scales.shape) != expected:
        raise ValueError(
            f"FP8 dequantize_rows: scales shape {tuple(scales.shape)} does not match q shape "
            f"{tuple(q.shape)} with group {g}; expected {expected}"
        )
    _check_finite_scales(scales, "row-group")
    return _dequantize_2d(q.unsqueeze(-2), scales.unsqueeze(-2), dtype, 1, g).squeeze(-2)
