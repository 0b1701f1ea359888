"""Collectives between tensor/expert-parallel ranks.

References see every rank's copy of an input through `ctx.peers(i)` (the simulated-rank executor
runs ranks in lockstep; with one rank it is just the local value). GPU runtimes implement these
with NCCL (eager) or peer-memory tile tasks (persistent).
"""

from __future__ import annotations

import torch

from tilert.ir.attrs import Attrs, attrs
from tilert.ir.dtypes import F32, I32
from tilert.ir.registry import Cost, Placement, expect, op, same_as
from tilert.ir.value import Value


@attrs
class GatherAttrs(Attrs):
    dim: int
    world: int


@attrs
class VocabArgmaxAttrs(Attrs):
    vocab_offset: int
    vocab_valid: int


def _ring_cost(ins: list[Value], outs: list[Value], a: Attrs, at: Placement) -> Cost:
    """Ring all-reduce: each rank sends 2 (n-1)/n of the buffer."""
    n = at.world
    b = ins[0].nbytes
    return Cost(b, outs[0].nbytes, b, comm_bytes=2 * (n - 1) * b // max(n, 1))


@op("all_reduce", infer=same_as(0), cost=_ring_cost, collective=True)
def all_reduce(ctx, x):
    """Sum of a partial value over all ranks."""
    return (torch.stack([p.float() for p in ctx.peers(0)]).sum(0),)


def _infer_gather(ins: list[Value], a: GatherAttrs) -> list:
    s = list(ins[0].shape)
    s[a.dim] *= a.world
    return [(tuple(s), ins[0].dtype)]


def _gather_cost(ins: list[Value], outs: list[Value], a: GatherAttrs, at: Placement) -> Cost:
    n = at.world
    return Cost(ins[0].nbytes, outs[0].nbytes, comm_bytes=(n - 1) * ins[0].nbytes)


@op("all_gather", attrs=GatherAttrs, infer=_infer_gather, cost=_gather_cost, collective=True)
def all_gather(ctx, x, *, dim, world):
    return (torch.cat(list(ctx.peers(0)), dim=dim),)


def _infer_vocab_argmax(ins: list[Value], a: VocabArgmaxAttrs) -> list:
    T = ins[0].shape[0]
    return [((T,), F32), ((T,), I32)]


@op("vocab_argmax", attrs=VocabArgmaxAttrs, infer=_infer_vocab_argmax)
def vocab_argmax(ctx, logits, *, vocab_offset, vocab_valid):
    """Argmax over this rank's vocabulary slice -> (max logit, global id); padding columns ignored."""
    x = logits.float()[:, :vocab_valid]
    val, idx = x.max(dim=-1)
    return (val, (idx + vocab_offset).to(torch.int32))


def _infer_argmax_reduce(ins: list[Value], a: Attrs) -> list:
    expect(ins[0].shape == ins[1].shape, "argmax_reduce(val f32[T], idx i32[T])")
    return [(ins[1].shape, I32)]


def _argmax_reduce_cost(ins: list[Value], outs: list[Value], a: Attrs, at: Placement) -> Cost:
    n = at.world
    b = ins[0].nbytes + ins[1].nbytes
    return Cost(b, outs[0].nbytes, comm_bytes=(n - 1) * b)


@op("argmax_reduce", infer=_infer_argmax_reduce, cost=_argmax_reduce_cost, collective=True)
def argmax_reduce(ctx, val, idx):
    """Distributed argmax: the largest logit over ranks; ties go to the lowest token id."""
    vals = torch.stack([v.float() for v in ctx.peers(0)])  # [R, T]
    ids = torch.stack([i.long() for i in ctx.peers(1)])
    best = vals.max(0).values
    cand = torch.where(vals == best, ids, torch.full_like(ids, torch.iinfo(torch.int64).max))
    return (cand.min(0).values.to(torch.int32),)
