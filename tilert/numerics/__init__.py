"""Reference numerics for tilert's quantised formats: MXFP4 (OCP MX) and FP8 e4m3 with block scales."""

from tilert.numerics import fp8, mxfp4

__all__ = ["fp8", "mxfp4"]
