"""The eager runtime's rank context and what every eager implementation asks of it.

`GpuContext`: rank, world size, whether this GPU stands in alone for rank 0 of `world` (solo), and
whether TileLang kernels run (False: the references on the GPU, the plain-torch baseline). A
distributed context (`runtime/eager/distributed.py`: real ranks, one per process, world > 1) runs
each collective through torch.distributed (`ctx.all_reduce`, `ctx.all_gather`,
`ctx.argmax_reduce`) with the references' semantics. `solo`: a collective is replaced by local work
of the same size (a copy of the bytes a ring all-reduce would move), so step times include it
while results stay rank 0's partial values.
"""

from __future__ import annotations

from typing import Any

import torch

from tilert.ir.graph import IRError
from tilert.ir.registry import get_op


class GpuContext:
    """Rank, world size and whether this GPU stands in alone for rank 0 of `world` (solo)."""

    def __init__(self, rank: int, world: int, solo: bool, kernels: bool = True) -> None:
        self.rank, self.world, self.solo, self.kernels = rank, world, solo, kernels

    def peers(self, i: int) -> list[Any]:
        raise IRError(
            "the eager runtime runs one rank per process: collectives need a DistContext "
            "(runtime/eager/distributed.py) or solo mode"
        )


def kernels_on(ctx: Any) -> bool:
    """False when the runtime runs as plain torch (the baseline): references, no TileLang kernels."""
    return getattr(ctx, "kernels", True)


def distributed(ctx: Any) -> bool:
    """True for a real multi-rank context (torch.distributed, one rank per process), not solo."""
    return bool(getattr(ctx, "distributed", False)) and not getattr(ctx, "solo", False) and ctx.world > 1


def solo(ctx: Any) -> bool:
    return bool(getattr(ctx, "solo", False))


def reduce_partial(ctx: Any, x: torch.Tensor) -> torch.Tensor:
    """The cross-rank sum of a partial: through torch.distributed, or solo's local stand-in."""
    return ctx.all_reduce(x) if distributed(ctx) else solo_all_reduce(ctx, x)


def solo_all_reduce(ctx: Any, x: torch.Tensor) -> torch.Tensor:
    """Rank 0's stand-in for a ring all-reduce over `ctx.world` ranks: about two passes over the
    buffer (what each rank reads and writes), result left as the local partial."""
    world = getattr(ctx, "world", 1)
    for _ in range(max(1, round(2 * (world - 1) / world)) if world > 1 else 0):
        x = x.clone()
    return x


def ref(kind: str) -> Any:
    return get_op(kind).reference


def norm(ctx: Any, x: torch.Tensor, w: torch.Tensor | None, eps: float | None) -> torch.Tensor:
    """x, or with an RMSNorm prologue rms_norm(x, w)."""
    return x if w is None else ref("rms_norm")(ctx, x, w, eps=eps)[0]


def rows_bf16(x: torch.Tensor) -> torch.Tensor:
    """x as contiguous bf16 rows [-1, last dim]: what the standalone kernels take."""
    return x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
