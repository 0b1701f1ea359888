"""Runtime form of a block-quantised weight: codes + scales, dequantised on demand."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tilert.ops.linear import dequant_fp8, dequant_mxfp4


@dataclass(frozen=True)
class QTensor:
    fmt: str  # "mxfp4" | "fp8"
    data: torch.Tensor  # mxfp4: uint8 [..., N, K/2]; fp8: float8_e4m3fn [..., N, K]
    scales: torch.Tensor  # mxfp4: uint8 [..., N, K/32]; fp8: f32 [..., ceil(N/bn), ceil(K/bk)]
    block: tuple[int, int] = (128, 128)  # fp8 scale block (bn, bk); finer after a slice that cuts a block

    @property
    def shape(self) -> tuple[int, ...]:
        *lead, k = self.data.shape
        return (*lead, k * 2) if self.fmt == "mxfp4" else tuple(self.data.shape)

    def dequantize(self) -> torch.Tensor:
        if self.fmt == "mxfp4":
            return dequant_mxfp4(self.data, self.scales)
        return dequant_fp8(self.data, self.scales, self.block)

    def __getitem__(self, i: int) -> QTensor:
        """One slice of a stacked [E, N, K] weight (e.g. one expert)."""
        return QTensor(self.fmt, self.data[i], self.scales[i], self.block)

    def to(self, device: torch.device | str) -> QTensor:
        return QTensor(self.fmt, self.data.to(device), self.scales.to(device), self.block)
