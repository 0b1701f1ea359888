"""Unfused MoE ops: the router pieces and per-slot expert GEMMs (the fusion pass merges them)."""

from __future__ import annotations

import math

from tilert import ops
from tilert.ir.attrs import Attrs, attrs
from tilert.ir.dtypes import F32, I32
from tilert.ir.registry import Cost, Placement, expect, op
from tilert.ir.value import Value


@attrs
class SelectAttrs(Attrs):
    top_k: int
    n_group: int = 1
    topk_group: int = 1


@attrs
class GatherWeightsAttrs(Attrs):
    normalize: bool = True
    scaling: float = 1.0


@attrs
class ExpertAttrs(Attrs):
    expert_offset: int = 0  # global id of this rank's first expert


@attrs
class CombineAttrs(Attrs):
    expert_offset: int = 0
    n_local: int


def _infer_select(ins: list[Value], a: SelectAttrs) -> list:
    (sel,) = ins
    expect(len(sel.shape) == 2 and a.top_k <= sel.shape[1], "topk_select(sel[T,E]) with top_k <= E")
    return [((sel.shape[0], a.top_k), I32)]


@op("topk_select", attrs=SelectAttrs, infer=_infer_select)
def topk_select(ctx, sel, *, top_k, n_group, topk_group):
    """Expert ids by bias-adjusted score (group-limited when n_group > 1)."""
    return (ops.select_experts(sel, top_k=top_k, n_group=n_group, topk_group=topk_group),)


def _infer_gather(ins: list[Value], a: Attrs) -> list:
    scores, idx = ins
    expect(idx.dtype == I32 and idx.shape[0] == scores.shape[0], "gather_weights(scores[T,E], idx i32[T,k])")
    return [(idx.shape, F32)]


@op("gather_weights", attrs=GatherWeightsAttrs, infer=_infer_gather)
def gather_weights(ctx, scores, idx, *, normalize, scaling):
    """The chosen experts' unbiased scores, renormalised."""
    return (ops.combine_weights(scores, idx, normalize=normalize, scaling=scaling),)


def expected_experts(tokens: int, top_k: int, n_experts: int) -> float:
    """Expected distinct experts hit by `tokens` tokens routing uniformly to top_k of n_experts."""
    return n_experts * (1.0 - (1.0 - top_k / n_experts) ** tokens)


def _infer_expert_matmul(ins: list[Value], a: Attrs) -> list:
    x, w, idx = ins
    T, k = idx.shape
    expect(
        len(w.shape) == 3 and x.shape[-1] == w.shape[2],
        f"expert_matmul: x {list(x.shape)} vs w {list(w.shape)}",
    )
    expect(x.shape in ((T, w.shape[2]), (T, k, w.shape[2])), "expert_matmul: x must be [T,K] or [T,k,K]")
    expect(not w.dtype.quantized, "expert_matmul on a quantised weight needs dequant or a fused kind")
    return [((T, k, w.shape[1]), F32)]


def expert_cost(ins: list[Value], outs: list[Value], a: Attrs, at: Placement) -> Cost:
    """Weight bytes of the experts expected to be touched (uniform routing), not all of them."""
    x, w, idx = ins[0], ins[1], ins[2]
    T, k = idx.shape
    E_local = w.shape[0]
    world = at.world
    touched = min(E_local, math.ceil(expected_experts(T, k, E_local * world) / world))
    wbytes = w.nbytes * touched // E_local
    return Cost(wbytes + x.nbytes + idx.nbytes, outs[0].nbytes, 2 * T * k * w.shape[1] * w.shape[2] // world)


@op("expert_matmul", attrs=ExpertAttrs, infer=_infer_expert_matmul, cost=expert_cost)
def expert_matmul(ctx, x, w, idx, *, expert_offset):
    """Per (token, slot) GEMM with the slot's expert if it is local; zeros otherwise."""
    return (ops.expert_linear(x, w, idx, expert_offset=expert_offset),)


def _infer_combine(ins: list[Value], a: CombineAttrs) -> list:
    y, w, idx = ins
    expect(y.shape[:2] == w.shape == idx.shape, "moe_combine(y[T,k,H], weights[T,k], idx[T,k])")
    return [((y.shape[0], y.shape[2]), F32)]


@op("moe_combine", attrs=CombineAttrs, infer=_infer_combine)
def moe_combine(ctx, y, weights, idx, *, expert_offset, n_local):
    """Weighted sum over each token's local expert slots (a partial sum when sharded)."""
    return (ops.moe_combine(y, weights, idx, expert_offset=expert_offset, n_local=n_local),)
