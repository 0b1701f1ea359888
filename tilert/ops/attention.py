"""Decode/verify attention over a KV cache: GQA, partial NeoX RoPE, sliding window, sink logit.

Cache layout is head-major [Hkv, S, D] with cache index == absolute token position, so a
split-KV kernel reads each head's keys contiguously.
Mask (`visible`): `window` W is the number of keys a query sees on its side, itself included (the
config turns a model's sliding_window_size into W by its convention: models/config.window_keys).
Causal: the query at position p sees keys j with j <= p and, when W > 0, p - j < W (keys
p-W+1 .. p). Non-causal (DFlash drafter layers): every key below kv_len and, when W > 0, |p - j| < W:
each query row has its own window.

Mixed-sequence steps keep one cache per sequence slot, stacked: [slots, Hkv, S, D], slot u's
cache is the single-sequence layout. Row i of the step belongs to slot `slots[i]` at position
`positions[i]`; it writes its k/v into its own slot and attends over its own slot's cache only, so
rows of different sequences never see each other (`kv_append_slots`, `attention_slots`).
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


def visible(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int, causal: bool) -> torch.Tensor:
    """[T, S] bool: which keys (positions k_pos [S]) each query (positions q_pos [T]) sees."""
    d = q_pos.long()[:, None] - k_pos.long()[None, :].to(q_pos.device)  # query - key
    ok = d >= 0 if causal else torch.ones_like(d, dtype=torch.bool)
    if window > 0:
        ok = ok & (d < window) if causal else ok & (d.abs() < window)
    return ok


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
    j = torch.arange(n, device=q.device)
    ok = visible(q_pos.to(q.device), j, window, causal)
    if isinstance(kv_len, torch.Tensor):
        ok = ok & (j[None, :] < kv_len)
    p = softmax_with_sink(s, ok[None], None if sink is None else sink.float()[:, None, None])
    out = torch.einsum("htn,hnd->thd", p, v)
    return out


def softmax_with_sink(s: torch.Tensor, ok: torch.Tensor, sink: torch.Tensor | None) -> torch.Tensor:
    """Softmax of scores s over the last dim, keys where `ok` only (rows with none give 0), with the
    sink logit (shaped to broadcast against s's rows) in the denominator only."""
    s = s.masked_fill(~ok, float("-inf"))
    m = s.amax(-1, keepdim=True)
    if sink is not None:
        m = torch.maximum(m, sink)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    den = e.sum(-1, keepdim=True)
    if sink is not None:
        den = den + torch.exp(sink - m)
    return e / den


def check_slots(positions: torch.Tensor, slots: torch.Tensor, n_slots: int, capacity: int) -> None:
    """Raise ValueError when a mixed step's rows are off the contract: slots in [0, n_slots), positions
    in [0, capacity), and one slot's rows contiguous at consecutive positions (a decode row, a verify
    block or a prefill chunk). Host tensors only (it reads them)."""
    pos, sl = positions.long().tolist(), slots.long().tolist()
    if len(pos) != len(sl):
        raise ValueError(f"{len(sl)} slots for {len(pos)} rows")
    seen: set[int] = set()
    for i, (u, p) in enumerate(zip(sl, pos)):
        if not 0 <= u < n_slots:
            raise ValueError(f"row {i}: slot {u} outside the cache pool [0, {n_slots})")
        if not 0 <= p < capacity:
            raise ValueError(f"row {i}: position {p} outside the KV cache [0, {capacity})")
        if i and sl[i - 1] == u:
            if p != pos[i - 1] + 1:
                raise ValueError(f"row {i}: slot {u}'s positions must be consecutive ({pos[i - 1]} then {p})")
        elif u in seen:
            raise ValueError(f"row {i}: slot {u}'s rows must be contiguous in the step")
        seen.add(u)


def kv_append_slots(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """Write each row's key/value ([T, Hkv, D]) into its slot's cache ([slots, Hkv, S, D]) at its position."""
    pos, sl = positions.long(), slots.long()
    if not pos.is_cuda and (int(pos.max()) >= k_cache.shape[2] or int(sl.max()) >= k_cache.shape[0]):
        raise ValueError(
            f"KV cache overflow: slot {int(sl.max())} / position {int(pos.max())} outside "
            f"{k_cache.shape[0]} slots x {k_cache.shape[2]}"
        )
    k_cache[sl, :, pos] = k.to(k_cache.dtype)
    v_cache[sl, :, pos] = v.to(v_cache.dtype)


def attention_slots(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    q_pos: torch.Tensor,
    slots: torch.Tensor,
    *,
    scale: float,
    window: int = 0,
    sink: torch.Tensor | None = None,
    causal: bool = True,
) -> torch.Tensor:
    """q [T, Hq, Dk] over stacked caches [slots, Hkv, S, D] -> [T, Hq, Dv] float32: each row attends
    over its own slot's cache, below its sequence's end in the step (kv_len of that sequence), with
    `visible`'s mask: `attention`'s math with a cache gathered per row. Reads the first max
    position + 1 keys of every slot (host positions), or all of them (device: no host sync)."""
    T, Hq, _ = q.shape
    group = Hq // k_cache.shape[1]
    n = k_cache.shape[2] if q_pos.is_cuda else int(q_pos.max()) + 1
    sl, pos = slots.long(), q_pos.long()
    k = k_cache[sl, :, :n].float().repeat_interleave(group, dim=1)  # [T, Hq, n, Dk]
    v = v_cache[sl, :, :n].float().repeat_interleave(group, dim=1)
    s = torch.einsum("thd,thnd->thn", q.float(), k) * scale
    j = torch.arange(n, device=q.device)
    end = torch.zeros(k_cache.shape[0], dtype=torch.long, device=q.device).scatter_reduce(0, sl, pos, "amax")
    ok = visible(pos, j, window, causal) & (j[None, :] <= end[sl][:, None])  # [T, n]: its sequence's keys
    p = softmax_with_sink(s, ok[:, None, :], None if sink is None else sink.float()[None, :, None])
    v = torch.where(ok[:, None, :, None], v, 0.0)  # another sequence's or a stale key: never 0 x NaN
    return torch.einsum("thn,thnd->thd", p, v)
