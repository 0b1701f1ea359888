"""Decode/verify attention over a KV cache: GQA, partial NeoX RoPE, sliding window, sink logit.

Cache layout is head-major [Hkv, S, D] with cache index == absolute token position, so a
split-KV kernel reads each head's keys contiguously.
Mask convention (FlashAttention window (W, 0)): a query at position p sees keys j with
j <= p (causal) and j >= p - W when W > 0. Non-causal (DFlash drafter block): every key below
kv_len, window-limited from the block's first position p0 (keys j >= p0 - W), so every block row
sees the same keys.
"""

from __future__ import annotations

import torch


def rope(x: torch.Tensor, positions: torch.Tensor, rope_dim: int, theta: float) -> torch.Tensor:
    """NeoX-style rotary embedding on the first rope_dim dims of each head; x is [T, H, D]."""
    if rope_dim == 0:
        return x.float()
    x = x.float()
    half = rope_dim // 2
    inv_freq = theta ** (-torch.arange(0, rope_dim, 2, dtype=torch.float64, device=x.device) / rope_dim)
    ang = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    cos = torch.cos(ang).float()[:, None, :]
    sin = torch.sin(ang).float()[:, None, :]
    x1, x2, rest = x[..., :half], x[..., half:rope_dim], x[..., rope_dim:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


def kv_append(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
) -> None:
    """Write new keys/values ([T, Hkv, D]) at their token positions, in place."""
    pos = positions.long()
    if not pos.is_cuda and int(pos.max()) >= k_cache.shape[1]:  # (no host sync on the GPU: graph capture)
        raise ValueError(f"KV cache overflow: position {int(pos.max())} >= capacity {k_cache.shape[1]}")
    k_cache[:, pos] = k.transpose(0, 1).to(k_cache.dtype)
    v_cache[:, pos] = v.transpose(0, 1).to(v_cache.dtype)


def attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    q_pos: torch.Tensor,
    kv_len: int | torch.Tensor,
    *,
    scale: float,
    window: int = 0,
    sink: torch.Tensor | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """q [T, Hq, Dk] over cache [Hkv, S, D] -> [T, Hq, Dv] in float32.

    kv_len as a device tensor reads the whole cache under a mask instead of slicing it, so the
    op never synchronises with the host (CUDA-graph capture).
    """
    T, Hq, _ = q.shape
    Hkv = k_cache.shape[0]
    group = Hq // Hkv
    n = k_cache.shape[1] if isinstance(kv_len, torch.Tensor) else int(kv_len)
    k = k_cache[:, :n].float().repeat_interleave(group, dim=0)  # [Hq, n, Dk]
    v = v_cache[:, :n].float().repeat_interleave(group, dim=0)
    s = torch.einsum("thd,hnd->htn", q.float(), k) * scale  # [Hq, T, n]
    j = torch.arange(n, device=q.device)[None, :]
    p = q_pos.long().to(q.device)[:, None]
    visible = j < kv_len if isinstance(kv_len, torch.Tensor) else torch.ones(T, n, dtype=torch.bool, device=q.device)
    visible = visible.expand(T, n).clone()
    if causal:
        visible &= j <= p
    if window > 0:
        visible &= j >= (p if causal else p.min()) - window
    s = s.masked_fill(~visible[None], float("-inf"))
    m = s.amax(-1, keepdim=True)
    if sink is not None:
        m = torch.maximum(m, sink.float()[:, None, None])
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    den = e.sum(-1, keepdim=True)
    if sink is not None:
        den = den + torch.exp(sink.float()[:, None, None] - m)
    out = torch.einsum("htn,hnd->thd", e / den, v)
    return out
