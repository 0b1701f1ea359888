"""Eager GPU runtime: one launch per fused op, optional CUDA-graph capture of a whole step."""

from tilert.runtime.eager.runtime import EagerRuntime

__all__ = ["EagerRuntime"]
