"""Steps chained on the device: DFlash cycles (draft -> verify -> accept -> next draft) and greedy
decode steps, with no host synchronisation between them.

A greedy DFlash cycle needs nothing from the host: the verify step computes the acceptance row in
its own launch (`accept` = [accepted, the tokens to emit..., -1...]), and the next cycle's inputs
are functions of it and of the verify step's other outputs: the anchor is the last emitted token,
the anchor's position moves by accepted + 1, the drafter's context is the verify block's rows
(features at the block's positions; rows past the accepted ones hold rejected drafts' features at
positions the next block's own rows overwrite, as on the host path). `run_cycles` enqueues `n` such
cycles through a backend's `draft_async` / `verify_async` (device tensors in, device tensors out)
and reads the n acceptance rows back once at the end; the tokens are those of n host-driven cycles
(`DecodeSequence.advance`), since every input is computed the same way, only on the device.
Greedy decoding chains the same way (`run_decodes`): a step's token is the previous step's argmax,
its position the next one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class CycleState:
    """Where the next DFlash cycle starts: the anchor token (last emitted) and its position, and the
    drafter's context (the last verify block's features and positions)."""

    anchor: torch.Tensor  # i32[1]
    pos: torch.Tensor  # i32[1]
    ctx: Any  # [C, F] features
    ctx_pos: torch.Tensor  # i32[C]


def next_cycle(state: CycleState, accept: torch.Tensor, features: Any, positions: torch.Tensor) -> CycleState:
    """The state after a verify step with acceptance row `accept` over the block at `positions`."""
    a = accept[:1].long()
    return CycleState(accept[1:].gather(0, a).to(torch.int32), state.pos + a.to(torch.int32) + 1, features, positions)


def run_cycles(backend: Any, state: CycleState, n: int, block: int, mask_id: int) -> tuple[torch.Tensor, CycleState]:
    """n greedy DFlash cycles enqueued back to back; returns their acceptance rows (host, i32[n,
    block + 1]) and the state after the last one. One host synchronisation, at the end."""
    dev = state.anchor.device
    steps = torch.arange(block, dtype=torch.int32, device=dev)
    mask = torch.full((block - 1,), mask_id, dtype=torch.int32, device=dev)
    rows = []
    for _ in range(n):
        positions = state.pos + steps
        drafted = backend.draft_async(torch.cat([state.anchor, mask]), positions, state.ctx, state.ctx_pos)
        out = backend.verify_async(drafted.to(dev), positions)
        accept = out["accept"].to(dev)
        rows.append(accept)
        state = next_cycle(state, accept, out.get("features"), positions)
    backend.finish_async()
    return torch.stack(rows).cpu(), state


def run_decodes(backend: Any, token: torch.Tensor, pos: torch.Tensor, n: int) -> torch.Tensor:
    """n greedy decode steps enqueued back to back from `token` (i32[1]) at `pos` (i32[1]): each
    step's input is the previous step's argmax. Returns the n tokens they chose (host i32[n]), read
    back once at the end."""
    chosen = []
    for _ in range(n):
        token = backend.decode_async(token, pos)["next_tokens"][-1:].to(token.device, torch.int32)
        chosen.append(token)
        pos = pos + 1
    backend.finish_async()
    return torch.cat(chosen).cpu()
