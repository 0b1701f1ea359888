"""Mixture-of-experts: sigmoid router with selection-only bias (noaux_tc) and SiLU-gated experts.

`route` and `moe_experts` are compositions of the smaller pieces below, which the unfused IR
ops call one by one; fused MoE references call the compositions.
"""

from __future__ import annotations

import torch

from tilert.ops.linear import linear
from tilert.ops.qtensor import QTensor

Weight = torch.Tensor | QTensor | tuple[torch.Tensor, torch.Tensor]


def select_experts(sel: torch.Tensor, *, top_k: int, n_group: int = 1, topk_group: int = 1) -> torch.Tensor:
    """Top-k expert ids (int32 [T, k]) by selection score; groups as in DeepSeek-V3 (sum of top-2)."""
    T, E = sel.shape
    sel = sel.float()
    if n_group > 1:
        per = E // n_group
        gscore = sel.view(T, n_group, per).topk(min(2, per), dim=-1).values.sum(-1)
        keep = torch.zeros_like(gscore, dtype=torch.bool)
        keep.scatter_(1, gscore.topk(topk_group, dim=-1).indices, True)
        sel = sel.masked_fill(~keep.repeat_interleave(per, dim=1), float("-inf"))
    return sel.topk(top_k, dim=-1).indices.to(torch.int32)


def combine_weights(scores: torch.Tensor, idx: torch.Tensor, *, normalize: bool, scaling: float) -> torch.Tensor:
    """The chosen experts' unbiased scores, renormalised to sum 1 when asked, times scaling."""
    w = scores.float().gather(1, idx.long())
    if normalize:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * scaling


def route(
    logits: torch.Tensor,
    bias: torch.Tensor,
    *,
    top_k: int,
    n_group: int = 1,
    topk_group: int = 1,
    normalize: bool = True,
    scaling: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] (fp32) -> (expert ids int32 [T, k], weights f32 [T, k])."""
    scores = torch.sigmoid(logits.float())
    idx = select_experts(scores + bias.float(), top_k=top_k, n_group=n_group, topk_group=topk_group)
    return idx, combine_weights(scores, idx, normalize=normalize, scaling=scaling)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2I] (gate features first, then up) -> silu(gate) * up."""
    g, u = gate_up.float().chunk(2, dim=-1)
    return torch.nn.functional.silu(g) * u


def _as_stack(w: Weight) -> torch.Tensor | QTensor:
    return QTensor("mxfp4", w[0], w[1]) if isinstance(w, tuple) else w


def expert_linear(x: torch.Tensor, w: Weight, idx: torch.Tensor, *, expert_offset: int = 0) -> torch.Tensor:
    """Per (token, slot): x @ W[idx - offset]^T for local experts, zeros elsewhere -> [T, k, N].

    x is [T, K] (same input for every slot) or [T, k, K]. Only experts that received tokens are
    touched (dequantised), as a decode kernel would.
    """
    w = _as_stack(w)
    n_local, n_out = w.shape[0], w.shape[1]
    T, k = idx.shape
    out = torch.zeros(T, k, n_out, dtype=torch.float32, device=x.device)
    local = idx.long() - expert_offset
    for e in torch.unique(local).tolist():
        if not 0 <= e < n_local:
            continue
        tok, slot = (local == e).nonzero(as_tuple=True)
        rows = x[tok] if x.dim() == 2 else x[tok, slot]
        we = w[e].dequantize() if isinstance(w, QTensor) else w[e]
        out[tok, slot] = linear(rows, we)
    return out


def moe_combine(
    y: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, *, expert_offset: int = 0, n_local: int
) -> torch.Tensor:
    """sum_k weights[t, k] * y[t, k] over the slots whose expert is local -> [T, H] f32 (a partial sum)."""
    local = idx.long() - expert_offset
    mask = ((local >= 0) & (local < n_local)).float()
    return torch.einsum("tk,tkh->th", weights.float() * mask, y.float())


def moe_experts(
    x: torch.Tensor,
    idx: torch.Tensor,
    weights: torch.Tensor,
    gate_up: Weight,
    down: Weight,
    *,
    expert_offset: int = 0,
) -> torch.Tensor:
    """The local experts of a MoE layer for routed tokens: partial [T, H] (all-reduce over ranks)."""
    n_local = _as_stack(gate_up).shape[0]
    h = silu_mul(expert_linear(x, gate_up, idx, expert_offset=expert_offset))
    y = expert_linear(h, down, idx, expert_offset=expert_offset)
    return moe_combine(y, weights, idx, expert_offset=expert_offset, n_local=n_local)
