"""Elementwise, normalisation, embedding, matmul, dequant and sampling ops."""

from __future__ import annotations

import torch

from tilert import ops
from tilert.ir.attrs import Attrs, attrs
from tilert.ir.dtypes import BF16, I32, dtype
from tilert.ir.registry import Cost, Placement, expect, io_cost, op, same_as
from tilert.ir.value import Value
from tilert.ops.qtensor import QTensor


@attrs
class NormAttrs(Attrs):
    eps: float


@attrs
class HeadNormAttrs(Attrs):
    heads: int
    eps: float


@attrs
class ScaleAttrs(Attrs):
    factor: float


@attrs
class ConcatAttrs(Attrs):
    dim: int = -1


@attrs
class MatmulAttrs(Attrs):
    out_dtype: str = "bf16"


def _elementwise(ins: list[Value], outs: list[Value], a: Attrs, at: Placement) -> Cost:
    c = io_cost(ins, outs, a, at)
    return Cost(c.bytes_read, c.bytes_written, sum(v.nbytes for v in outs) // 2)


def _infer_embed(ins: list[Value], a: Attrs) -> list:
    table, ids = ins
    expect(len(table.shape) == 2 and ids.dtype == I32 and len(ids.shape) == 1, "embed(table[V,H], ids i32[T])")
    return [((ids.shape[0], table.shape[1]), BF16)]


def _embed_cost(ins: list[Value], outs: list[Value], a: Attrs, at: Placement) -> Cost:
    row = ins[0].nbytes // ins[0].shape[0]
    return Cost(ins[1].nbytes + row * ins[1].shape[0], outs[0].nbytes)


@op("embed", infer=_infer_embed, cost=_embed_cost)
def embed(ctx, table, ids):
    """Row lookup of the token embedding table."""
    return (table[ids.long()].float(),)


def _infer_norm(ins: list[Value], a: NormAttrs) -> list:
    x, w = ins
    expect(w.shape == (x.shape[-1],), f"rms_norm weight {list(w.shape)} does not match x {list(x.shape)}")
    return [(x.shape, x.dtype)]


@op("rms_norm", attrs=NormAttrs, infer=_infer_norm, cost=_elementwise)
def rms_norm(ctx, x, w, *, eps):
    return (ops.rms_norm(x, w, eps),)


def _infer_head_norm(ins: list[Value], a: HeadNormAttrs) -> list:
    x, w = ins
    expect(x.shape[-1] == a.heads * w.shape[0], "head_rms_norm: x width != heads * head_dim")
    return [(x.shape, x.dtype)]


@op("head_rms_norm", attrs=HeadNormAttrs, infer=_infer_head_norm, cost=_elementwise)
def head_rms_norm(ctx, x, w, *, heads, eps):
    """Per-head RMSNorm over [T, heads*D] (the drafter's q_norm / k_norm)."""
    T = x.shape[0]
    return (ops.rms_norm(x.view(T, heads, -1), w, eps).reshape(T, -1),)


def _infer_binary(ins: list[Value], a: Attrs) -> list:
    x, y = ins
    expect(x.shape == y.shape or y.shape == (x.shape[-1],), f"shapes {list(x.shape)} and {list(y.shape)} differ")
    return [(x.shape, x.dtype)]


@op("add", infer=_infer_binary, cost=_elementwise)
def add(ctx, x, y):
    return (x.float() + y.float(),)


@op("scale", attrs=ScaleAttrs, infer=same_as(0), cost=_elementwise)
def scale(ctx, x, *, factor):
    return (x.float() * factor,)


@op("sigmoid", infer=same_as(0), cost=_elementwise)
def sigmoid(ctx, x):
    return (torch.sigmoid(x.float()),)


def _infer_silu_mul(ins: list[Value], a: Attrs) -> list:
    x = ins[0]
    if len(ins) == 2:
        expect(ins[1].shape == x.shape, f"silu_mul: gate {list(x.shape)} and up {list(ins[1].shape)} differ")
        return [(x.shape, x.dtype)]
    expect(x.shape[-1] % 2 == 0, "silu_mul needs an even last dim (gate then up)")
    return [((*x.shape[:-1], x.shape[-1] // 2), x.dtype)]


@op("silu_mul", infer=_infer_silu_mul, cost=_elementwise)
def silu_mul(ctx, x, up=None):
    """silu(gate) * up, from one [..., 2I] tensor (gate first) or from (gate, up)."""
    return (ops.silu_mul(x if up is None else torch.cat([x.float(), up.float()], dim=-1)),)


def _infer_concat(ins: list[Value], a: ConcatAttrs) -> list:
    d = a.dim
    base = list(ins[0].shape)
    for v in ins[1:]:
        s = list(v.shape)
        expect(
            len(s) == len(base) and all(i == j for k, (i, j) in enumerate(zip(s, base)) if k != d % len(s)),
            "concat: shapes differ outside the concat dim",
        )
    base[d] = sum(v.shape[d] for v in ins)
    return [(tuple(base), ins[0].dtype)]


@op("concat", attrs=ConcatAttrs, infer=_infer_concat)
def concat(ctx, *xs, dim):
    return (torch.cat([x.float() for x in xs], dim=dim),)


def _infer_dequant(ins: list[Value], a: Attrs) -> list:
    expect(ins[0].dtype.quantized, f"dequant of a non-quantised {ins[0].dtype.name} value")
    return [(ins[0].shape, BF16)]


@op("dequant", infer=_infer_dequant)
def dequant(ctx, w: QTensor):
    """Materialise a quantised weight as bf16 (fusion removes every one of these)."""
    return (w.dequantize(),)


def matmul_infer(ins: list[Value], a: MatmulAttrs) -> list:
    x, w = ins[0], ins[1]
    expect(x.shape[-1] == w.shape[-1], f"matmul: x {list(x.shape)} and w {list(w.shape)} disagree on K")
    return [((*x.shape[:-1], w.shape[-2]), dtype(a.out_dtype))]


def matmul_cost(ins: list[Value], outs: list[Value], a: Attrs, at: Placement) -> Cost:
    x, w = ins[0], ins[1]
    m = x.nbytes // max(1, x.dtype.bits * x.shape[-1] // 8)
    return io_cost(ins, outs, a, at) + Cost(flops=2 * m * w.shape[-2] * w.shape[-1])


def _infer_matmul(ins: list[Value], a: MatmulAttrs) -> list:
    expect(not ins[1].dtype.quantized, f"matmul on a {ins[1].dtype.name} weight needs dequant or a fused kind")
    return matmul_infer(ins, a)


@op("matmul", attrs=MatmulAttrs, infer=_infer_matmul, cost=matmul_cost)
def matmul(ctx, x, w, *, out_dtype):
    """y = x @ w^T with w [N, K]."""
    return (ops.linear(x, w),)


def _infer_argmax(ins: list[Value], a: Attrs) -> list:
    return [(ins[0].shape[:-1], I32)]


@op("argmax", infer=_infer_argmax)
def argmax(ctx, logits):
    return (ops.argmax(logits),)


def _infer_accept(ins: list[Value], a: Attrs) -> list:
    draft, post = ins
    expect(draft.shape == post.shape and len(draft.shape) == 1, "dflash_accept(draft i32[B], posterior i32[B])")
    return [((draft.shape[0] + 1,), I32)]


@op("dflash_accept", infer=_infer_accept)
def dflash_accept(ctx, draft, posterior):
    """Greedy block acceptance on device: [accepted, tokens to emit..., -1 padding]."""
    return (ops.dflash_accept(draft, posterior),)


def _infer_draft(ins: list[Value], a: Attrs) -> list:
    block, nxt = ins
    expect(block.shape == nxt.shape and len(block.shape) == 1, "dflash_draft(block i32[B], argmax i32[B])")
    return [(block.shape, I32)]


@op("dflash_draft", infer=_infer_draft)
def dflash_draft(ctx, block, nxt):
    """The drafted block: the anchor, then the drafter's argmax at positions 1..B-1."""
    return (torch.cat([block[:1].to(torch.int32), nxt[1:].to(torch.int32)]),)
