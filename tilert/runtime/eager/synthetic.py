"""Synthetic weights for a rank graph, generated directly on the GPU (full scale: ~70 GB/rank).

Random codes rather than quantised random floats: MXFP4 blocks are random bytes (every E2M1 code
is valid) with e8m0 scales near 2^-8, FP8 weights are random normals cast to e4m3 with unit block
scales, norms are ones. Values are realistic in magnitude and bytes, which is what step timing
needs; they are not a trained model.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch

from tilert.ir.graph import Graph
from tilert.ops.qtensor import QTensor


def synthetic_params(graph: Graph, seed: int = 0, device: str = "cuda", skip: Collection[str] = ()) -> dict[str, Any]:
    """Random weights for every param of `graph` not named in `skip` (a backend with several step
    graphs generates each name once: a full-scale rank holds tens of GB)."""
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    out: dict[str, Any] = {}
    for v in graph.by_role("param"):
        if v.name in skip:
            continue
        shape = v.shape
        if v.dtype.name == "mxfp4":
            *lead, n, k = shape
            blocks = torch.randint(0, 256, (*lead, n, k // 2), dtype=torch.uint8, device=device, generator=g)
            scales = torch.randint(118, 121, (*lead, n, k // 32), dtype=torch.uint8, device=device, generator=g)
            out[v.name] = QTensor("mxfp4", blocks, scales)
        elif v.dtype.name == "fp8_e4m3b":
            *lead, n, k = shape
            q = (torch.randn(shape, device=device, generator=g) * (k**-0.5 * 8)).to(torch.float8_e4m3fn)
            s = torch.full((*lead, -(-n // 128), -(-k // 128)), 0.125, device=device)
            out[v.name] = QTensor("fp8", q, s)
        elif len(shape) == 1 and ("norm" in v.name or "layernorm" in v.name):
            out[v.name] = torch.ones(shape, dtype=torch.bfloat16, device=device)
        else:
            dt = torch.float32 if v.dtype.name == "f32" else torch.bfloat16
            out[v.name] = (torch.randn(shape, device=device, generator=g) * (shape[-1] ** -0.5)).to(dt)
    return out


def meta_params(graph: Graph) -> dict[str, Any]:
    """Tensors with synthetic_params' shapes and dtypes on the meta device (no memory): enough to
    build and compile a rank's kernels without its weights."""
    out: dict[str, Any] = {}
    for v in graph.by_role("param"):
        shape = v.shape
        if v.dtype.name == "mxfp4":
            *lead, n, k = shape
            out[v.name] = QTensor("mxfp4", torch.empty((*lead, n, k // 2), dtype=torch.uint8, device="meta"),
                                  torch.empty((*lead, n, k // 32), dtype=torch.uint8, device="meta"))  # fmt: skip
        elif v.dtype.name == "fp8_e4m3b":
            *lead, n, k = shape
            out[v.name] = QTensor("fp8", torch.empty(shape, dtype=torch.float8_e4m3fn, device="meta"),
                                  torch.empty((*lead, -(-n // 128), -(-k // 128)), device="meta"))  # fmt: skip
        else:
            dt = torch.float32 if v.dtype.name == "f32" else torch.bfloat16
            out[v.name] = torch.empty(shape, dtype=dt, device="meta")
    return out
