"""Greedy sampling and DFlash greedy acceptance (DESIGN §7)."""

from __future__ import annotations

import torch


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """Greedy token per row; ties go to the lowest id (torch.argmax's first-max rule)."""
    return torch.argmax(logits.float(), dim=-1).to(torch.int32)


def dflash_accept(draft: torch.Tensor, posterior: torch.Tensor) -> torch.Tensor:
    """Greedy block acceptance, all on device tensors (no host round trip).

    draft: [B] block tokens (draft[0] is the anchor, already verified); posterior: [B] argmax of the
    target logits at each block position. Returns int32 [B + 1]: out[0] = accepted (longest prefix
    with draft[1:] == posterior[:-1]), out[1 : accepted + 2] = the tokens to emit (draft[1:accepted+1]
    followed by the bonus token posterior[accepted]), the rest -1.
    """
    B = draft.shape[0]
    match = (draft[1:].long() == posterior[:-1].long()).to(torch.int32)
    accepted = torch.cumprod(match, 0).sum().to(torch.int32).view(1)
    at = accepted.long()
    seq = torch.cat([draft[1:].to(torch.int32), draft.new_zeros(1, dtype=torch.int32)])
    seq = seq.scatter(0, at, posterior.to(torch.int32).gather(0, at))
    seq = torch.where(torch.arange(B, device=draft.device) <= at, seq, torch.full_like(seq, -1))
    return torch.cat([accepted, seq])
