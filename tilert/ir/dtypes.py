"""IR dtypes: plain element types plus the two block-scaled weight formats.

A quantised value has a logical shape ([..., N, K]); its storage is a pair (codes, scales) whose
sizes follow from the format. Byte counts here feed the cost model and the memory planner.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class DType:
    name: str
    bits: int  # storage bits per logical element, scales excluded
    quantized: bool = False
    block: tuple[int, ...] = ()  # scale block over the trailing dims

    def __repr__(self) -> str:
        return self.name

    def nbytes(self, shape: tuple[int, ...]) -> int:
        """Storage bytes for a value of this dtype and logical shape (scales included)."""
        n = math.prod(shape)
        data = (n * self.bits + 7) // 8
        if self.name == "mxfp4":
            return data + n // 32
        if self.name == "fp8_e4m3b":
            lead = math.prod(shape[:-2])
            return data + 4 * lead * math.ceil(shape[-2] / 128) * math.ceil(shape[-1] / 128)
        return data


BF16 = DType("bf16", 16)
F32 = DType("f32", 32)
I32 = DType("i32", 32)
FP8 = DType("fp8_e4m3b", 8, quantized=True, block=(128, 128))  # e4m3 + f32 scale per 128x128 block
MXFP4 = DType("mxfp4", 4, quantized=True, block=(32,))  # e2m1 + e8m0 scale per 32 along K

DTYPES: dict[str, DType] = {d.name: d for d in (BF16, F32, I32, FP8, MXFP4)}
WEIGHT_FORMATS: dict[str, DType] = {"bf16": BF16, "fp8": FP8, "mxfp4": MXFP4}


def dtype(name: str) -> DType:
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown IR dtype '{name}' (known: {', '.join(DTYPES)})") from None
