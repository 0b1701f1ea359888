"""Drafter-only ops: the mask-embedding override of a DFlash drafter's block embedding."""

from __future__ import annotations

import torch

from tilert.ir.dtypes import I32
from tilert.ir.graph import Value
from tilert.ir.registry import expect, op


def _infer_override(ins: list[Value], a: dict) -> list:
    x, ids, row = ins
    expect(ids.dtype == I32 and ids.shape == (x.shape[0],), "embed_override: ids must be i32[T]")
    expect(row.shape == (x.shape[-1],), f"embed_override: row {list(row.shape)} does not match x {list(x.shape)}")
    return [(x.shape, x.dtype)]


@op("embed_override", infer=_infer_override)
def embed_override(ctx, x, ids, row, *, token):
    """x with every row whose id is `token` replaced by `row` (a drafter's trained mask embedding,
    which MiMo ships as mask_embedding.pt instead of the target's untrained table row)."""
    hit = (ids.long() == token)[:, None]
    return (torch.where(hit, row.float()[None, :], x.float()),)
