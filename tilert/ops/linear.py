"""Linear layers over bf16, FP8 (128x128 block scales) and MXFP4 weights."""

from __future__ import annotations

import torch

from tilert.numerics import fp8, mxfp4


def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """y = x @ w^T in float32; w is [N, K] (or [E, N, K] with x [E, T, K])."""
    return torch.matmul(x.float(), w.float().transpose(-1, -2))


def dequant_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return mxfp4.dequantize(blocks, scales, dtype=torch.float32)


def dequant_fp8(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    return fp8.dequantize_blocks(q, scale_inv, dtype=torch.float32, block=block)


def mxfp4_linear(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return linear(x, dequant_mxfp4(blocks, scales))


def fp8_linear(x: torch.Tensor, q: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    return linear(x, dequant_fp8(q, scale_inv))
