"""One simulated rank of the plan VM, as its tile bodies see it (tilert/runtime/kinds/).

A body of task (opcode, node, coordinates) reads the node's input buffers and writes its tile of
the output buffers in `VMRank.env`, keeps the kernel's workspaces per node (`workspace`), reads
params dequantised once (`weight`) and calls collective references through `ctx()`. Buffers start
poisoned (NaN, or INT_POISON for int buffers), so a task that runs before data it reads was
written leaves a wrong value behind.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tilert.ir.graph import Graph, Node
from tilert.ir.opset.fused import PeerValues
from tilert.ir.registry import ref
from tilert.ops.qtensor import QTensor

INT_POISON = torch.iinfo(torch.int32).min


class PlanVMError(RuntimeError):
    """The tables deadlock, or a row names something the VM cannot run."""


@dataclass
class VMRank:
    rank: int
    world: int
    sms: int  # SM queues the tables were scheduled for (the tiles' wave size)
    graph: Graph
    rows: list[list[list[int]]]  # per SM: non-NOP rows in queue order
    weights: dict[str, torch.Tensor]  # params dequantised to float32, kept by the VM across steps
    env: dict[str, Any] = field(default_factory=dict)
    ws: dict[int, dict[str, Any]] = field(default_factory=dict)  # per node: workspaces
    counters: np.ndarray | None = None
    epoch: int = 1

    def weight(self, name: str) -> torch.Tensor:
        """Param `name` as float32 (quantised ones dequantised once)."""
        if name not in self.weights:
            w = self.env[name]
            self.weights[name] = (ref("dequant")(None, w)[0] if isinstance(w, QTensor) else w).float()
        return self.weights[name]

    def ctx(self) -> PeerValues:
        return PeerValues(self.rank, self.world)

    def workspace(self, i: int) -> dict[str, Any]:
        """Node i's workspaces (a body creates them, poisoned, on first use)."""
        return self.ws.setdefault(i, {})


def column_block(n: Node, c: tuple[int, int, int], cols: int, width: int) -> tuple[int, int]:
    """Columns [lo, hi) of column block c[0] of `cols` columns in an output `width` wide."""
    if c[0] * cols >= width:
        raise PlanVMError(f"{n.op} column block {c[0]} past width {width}")
    return c[0] * cols, min(width, (c[0] + 1) * cols)
