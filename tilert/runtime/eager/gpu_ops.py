"""GPU implementations of fused op kinds, used by the eager runtime in place of the references.

Each implementation has the reference's signature and returns the same outputs. It runs a
TileLang kernel when the shapes fit the kernel (`supports`), and otherwise falls back to the op's
torch reference (which also runs on the GPU), so every graph runs and the fast path is taken
where it exists. `solo` collectives: when one GPU stands in for rank 0 of N, a collective is
replaced by local work of the same size (a copy of the bytes a ring all-reduce would move), so
step times include it while results stay rank 0's partial values. A distributed context
(`runtime/eager/distributed.py`: real ranks, one per process, world > 1) runs each collective
through torch.distributed (`ctx.all_reduce`, `ctx.all_gather`, `ctx.argmax_reduce`) with the
references' semantics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from tilert.ir.opset.fused import AttentionBlockAttrs, MoeAttrs, split_extras
from tilert.ir.registry import get_op
from tilert.kernels import attention as attn
from tilert.kernels import fp8_gemm, moe, mxfp4_gemm
from tilert.ops.qtensor import QTensor

GpuImpl = Callable[..., tuple]
IMPLS: dict[str, GpuImpl] = {}


def impl(*kinds: str) -> Callable[[GpuImpl], GpuImpl]:
    def deco(fn: GpuImpl) -> GpuImpl:
        for k in kinds:
            IMPLS[k] = fn
        return fn

    return deco


def _kernels(ctx: Any) -> bool:
    """False when the runtime runs as plain torch (the baseline): references, no TileLang kernels."""
    return getattr(ctx, "kernels", True)


def _ref(kind: str) -> Callable[..., tuple]:
    return get_op(kind).reference


def _norm(ctx: Any, x: torch.Tensor, w: torch.Tensor | None, eps: float | None) -> torch.Tensor:
    return x if w is None else _ref("rms_norm")(ctx, x, w, eps=eps)[0]


def _bf16_2d(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()


def _dist(ctx: Any) -> bool:
    """True for a real multi-rank context (torch.distributed, one rank per process), not solo."""
    return bool(getattr(ctx, "distributed", False)) and not getattr(ctx, "solo", False) and ctx.world > 1


def _reduce(ctx: Any, x: torch.Tensor) -> torch.Tensor:
    """The cross-rank sum of a partial: through torch.distributed, or solo's local stand-in."""
    return ctx.all_reduce(x) if _dist(ctx) else solo_all_reduce(ctx, x)


def solo_all_reduce(ctx: Any, x: torch.Tensor) -> torch.Tensor:
    """Rank 0's stand-in for a ring all-reduce over `ctx.world` ranks: about two passes over the
    buffer (what each rank reads and writes), result left as the local partial."""
    world = getattr(ctx, "world", 1)
    for _ in range(max(1, round(2 * (world - 1) / world)) if world > 1 else 0):
        x = x.clone()
    return x


@impl("linear_mxfp4", "linear_fp8")
def linear(ctx, x, w, *extra, out_dtype, norm_eps, residual):
    norm_w, res = split_extras(extra, norm_eps, residual)
    fast = isinstance(w, QTensor) and (w.fmt == "mxfp4" or w.block == (128, 128))
    if not fast or x.shape[-1] % 32 or not x.is_cuda or not _kernels(ctx):
        kind = "linear_mxfp4" if isinstance(w, QTensor) and w.fmt == "mxfp4" else "linear_fp8"
        return get_op(kind).reference(ctx, x, w, *extra, out_dtype=out_dtype, norm_eps=norm_eps, residual=residual)

    h = _bf16_2d(_norm(ctx, x, norm_w, norm_eps))
    run = mxfp4_gemm.run if w.fmt == "mxfp4" else fp8_gemm.run
    y = run(h, w.data, w.scales).reshape(*x.shape[:-1], -1)
    return (y if res is None else res.float() + y,)


def _bf16_gemm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """bf16 tensor-core GEMM with fp32 accumulation (the reference upcasts whole weights to fp32)."""
    return torch.matmul(x.to(torch.bfloat16), w.t()).float()


@impl("matmul")
def matmul_bf16(ctx, x, w, *, out_dtype):
    if not (x.is_cuda and w.dtype == torch.bfloat16):
        return get_op("matmul").reference(ctx, x, w, out_dtype=out_dtype)
    return (_bf16_gemm(x, w),)


@impl("linear_bf16")
def linear_bf16(ctx, x, w, *extra, out_dtype, norm_eps, residual):
    if not (x.is_cuda and w.dtype == torch.bfloat16):
        return get_op("linear_bf16").reference(ctx, x, w, *extra, out_dtype=out_dtype, norm_eps=norm_eps,
                                               residual=residual)  # fmt: skip
    norm_w, res = split_extras(extra, norm_eps, residual)
    y = _bf16_gemm(_norm(ctx, x, norm_w, norm_eps), w)
    return (y if res is None else res.float() + y,)


@impl("fused_moe_mxfp4")
def fused_moe(ctx, x, gate, bias, w_gu, w_d, *extra, **kw):
    a = MoeAttrs(**kw)
    norm_w, res = split_extras(extra, a.norm_eps, a.residual)
    if a.reduce and a.world > 1 and not getattr(ctx, "solo", False) and not _dist(ctx):
        raise NotImplementedError("fused_moe with a cross-rank reduce needs a distributed context or solo mode")
    cfg = None
    if _kernels(ctx) and x.is_cuda and isinstance(w_gu, QTensor) and w_gu.fmt == "mxfp4":
        cfg = moe_config(x.shape[0], x.shape[-1], w_d.shape[-1], gate.shape[0], a)
    if cfg is None:  # the reference of this rank's partial, then the collective and the residual here
        local = dataclasses.replace(a, reduce=False, residual=False)
        norm = () if norm_w is None else (norm_w,)
        y = get_op("fused_moe_mxfp4").reference(ctx, x, gate, bias, w_gu, w_d, *norm, **local.kwargs())[0]
    else:
        h = _bf16_2d(_norm(ctx, x, norm_w, a.norm_eps))
        y, _, _ = moe.run(h, gate, bias, (w_gu.data, w_gu.scales), (w_d.data, w_d.scales), top_k=a.top_k,
                          expert_offset=a.expert_offset, normalize=a.normalize, scaling=a.scaling, cfg=cfg)  # fmt: skip
    if a.reduce:
        y = _reduce(ctx, y)
    return (y if res is None else res.float() + y,)


def attn_config(a: AttentionBlockAttrs, B: int) -> Any:
    """The attention kernel's config for an attention_block node's attrs and B tokens, or None when
    the kernel does not cover it (`tilert.kernels.attention.supports`)."""
    return attn.AttnConfig.for_node(a, B) if attn.supports(a, B) is None else None


def moe_config(tokens: int, hidden: int, inter: int, n_experts: int, a: MoeAttrs) -> Any:
    """The fused-MoE kernel's config for a fused_moe node, or None when the standalone kernel does not
    cover it (`tilert.kernels.moe.supports`)."""
    if moe.supports(tokens, hidden, inter, a.n_group) is not None:
        return None
    return moe.Config.for_node(a, tokens, hidden, inter, n_experts)


@impl("attention_block")
def attention_block(ctx, q, k, v, k_cache, v_cache, pos, *extra, **kw):
    a = AttentionBlockAttrs(**kw)
    cfg = attn_config(a, q.shape[0]) if _kernels(ctx) and q.is_cuda and k_cache.dtype == torch.bfloat16 else None
    if cfg is None:
        return get_op("attention_block").reference(ctx, q, k, v, k_cache, v_cache, pos, *extra, **kw)
    H, Hkv, D, Dv, B = a.heads, a.kv_heads, a.head_dim, a.v_head_dim, q.shape[0]
    if a.v_scale is not None:
        v = v.float() * a.v_scale
    sink = extra[0].float().contiguous() if a.has_sink else None
    bf = torch.bfloat16
    o = attn.run(
        cfg,
        q.to(bf).reshape(B, H, D),
        k.to(bf).reshape(B, Hkv, D),
        v.to(bf).reshape(B, Hkv, Dv),
        k_cache,
        v_cache,
        pos.to(torch.int32),
        sink,
        validate=False,
    )
    return (o.reshape(B, H * Dv), k_cache, v_cache)


@impl("all_reduce")
def all_reduce(ctx, x):
    if _dist(ctx):
        return (ctx.all_reduce(x),)
    if getattr(ctx, "solo", False):
        return (solo_all_reduce(ctx, x),)
    return _ref("all_reduce")(ctx, x)


@impl("all_reduce_residual")
def all_reduce_residual(ctx, partial, residual, *, world):
    if _dist(ctx):
        return (residual.float() + ctx.all_reduce(partial),)
    if getattr(ctx, "solo", False):
        return (residual.float() + solo_all_reduce(ctx, partial).float(),)
    return _ref("all_reduce_residual")(ctx, partial, residual, world=world)


@impl("lm_head_argmax", "lm_head_accept")
def lm_head(ctx, x, w, *rest, world, vocab_size, vocab_offset, norm_eps, out_dtype):
    """Local logits + argmax; with `solo` the distributed argmax is rank 0's local one, with a
    distributed context it is vocab_argmax here + argmax_reduce over the ranks."""
    accept = len(rest) > int(norm_eps is not None)
    tokens = rest[0] if accept else None
    extra = rest[1:] if accept else rest
    kind = "lm_head_accept" if accept else "lm_head_argmax"
    if not getattr(ctx, "solo", False) and not _dist(ctx) and world > 1:
        return get_op(kind).reference(
            ctx,
            x,
            w,
            *rest,
            world=world,
            vocab_size=vocab_size,
            vocab_offset=vocab_offset,
            norm_eps=norm_eps,
            out_dtype=out_dtype,
        )
    norm_w, _ = split_extras(extra, norm_eps, False)
    h = _norm(ctx, x, norm_w, norm_eps)
    if isinstance(w, QTensor):
        logits = linear(ctx, h, w, out_dtype="f32", norm_eps=None, residual=False)[0]
    else:
        logits = torch.matmul(h.to(w.dtype), w.t()).float()
    if _dist(ctx):
        nxt = dist_argmax(ctx, logits, vocab_size)
    else:
        valid = logits[:, : min(logits.shape[-1], vocab_size)]
        nxt = _ref("argmax")(ctx, valid)[0] + (vocab_offset if world > 1 else 0)
    out = (logits, nxt.to(torch.int32))
    return out + (_ref("dflash_accept")(ctx, tokens, nxt)[0],) if accept else out


def dist_argmax(ctx: Any, logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Greedy ids over vocabulary-parallel logits [T, V/world] (rank r holds ids r*V/world..., the
    padding past vocab_size ignored): the largest logit over ranks, ties to the lowest id."""
    vloc = logits.shape[-1]
    valid = min(vloc, vocab_size - ctx.rank * vloc)
    if valid > 0:
        val, idx = _ref("vocab_argmax")(ctx, logits, vocab_offset=ctx.rank * vloc, vocab_valid=valid)
    else:  # a rank holding only padding never wins
        val = torch.full(logits.shape[:1], float("-inf"), device=logits.device)
        idx = torch.full(logits.shape[:1], vocab_size, dtype=torch.int32, device=logits.device)
    return ctx.argmax_reduce(val, idx)


@impl("argmax_reduce")
def argmax_reduce(ctx, val, idx):
    if _dist(ctx):
        return (ctx.argmax_reduce(val, idx),)
    if getattr(ctx, "solo", False):  # rank 0's local argmax stands in for the distributed one
        return (idx.to(torch.int32),)
    return _ref("argmax_reduce")(ctx, val, idx)


@impl("all_gather")
def all_gather(ctx, x, *, dim, world):
    if _dist(ctx):
        return (ctx.all_gather(x, dim),)
    if getattr(ctx, "solo", False):  # rank 0 alone: its shard stands in for every rank's (same bytes)
        return (torch.cat([x] * world, dim=dim),)
    return _ref("all_gather")(ctx, x, dim=dim, world=world)
