"""Node programs: how one graph node runs in the persistent step.

The step kernel keeps one row of device addresses per graph node (the node table,
tilert/kernels/views.py). A task kind's `program(graph, node, bindings, sms)`
(tilert/runtime/kinds/) gives the node's `NodeProgram`: the class key (nodes with equal keys share
one dispatch branch), the views its bodies read, the bodies per opcode and the tensors behind the
views. `Bindings` holds a rank graph's device tensors: params as bound, inputs, KV caches, and
activations padded to PAD_ROWS rows (the largest GEMM block_m, so tiles never read past a buffer);
`PeerGroup` holds the buffers the ranks of one process exchange through.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tilert.ir.graph import Graph, Value
from tilert.kernels import switches
from tilert.kernels.common import cdiv
from tilert.kernels.views import TORCH_DTYPES, ViewSpec
from tilert.runtime.persistent.megakernel import PersistentError

PAD_ROWS = 64  # activation rows are padded to this (the largest GEMM block_m)
PREFETCH_MAX_BYTES = 256 * 1024  # the largest weight region one task prefetches into L2 (132 SMs: 33 MB)


@dataclass
class NodeProgram:
    """How one node runs: its class key, the views its bodies read, the bodies and its tensors."""

    key: tuple
    specs: list[ViewSpec]
    bodies: Callable[[], dict[str, Any]]  # opcode name -> T.macro(V, c0, c1, c2); built lazily
    tensors: list[torch.Tensor] = field(default_factory=list)
    opcodes: tuple[str, ...] = ()  # the opcodes `bodies` provides
    # the table must hold tasks of every one of `opcodes` for this node (the fused MoE: whether its
    # top-k is a stage is a build switch, so a table built under the other switch is refused)
    exact: bool = False
    # (opcode name, c0, c1, c2) -> (address, bytes per row, rows, row stride) of the weights the task
    # reads, or None: the persistent loop prefetches the next task's region into L2 during waits
    prefetch: Callable[[str, int, int, int], tuple[int, int, int, int] | None] | None = None
    # the device-helper source its bodies need when it is more than DEVICE_PRELUDE (a superset of it:
    # the step kernel then imports this one for every body, kernels.common.using_prelude)
    prelude: str | None = None
    # (opcode name, its coordinates, tasks of the node right before it on its SM queue, the next task's
    # coordinates when the queue's next task is of the node too, else None) -> the coordinates the
    # device's copy of the table carries: a body that carries work from one task of a node to the next
    # (the streaming linear, runtime/kinds/linear.py) learns its neighbours so; None: the table's own
    chain: Callable[[str, tuple[int, int, int], int, tuple[int, int, int] | None], tuple[int, int, int]] | None = None


def tl_dtype(t: torch.Tensor) -> str:
    inv = {v: k for k, v in TORCH_DTYPES.items()}
    return inv[str(t.dtype).removeprefix("torch.")]


class PeerGroup:
    """The buffers the ranks of one process exchange through (kernels/peer_collective.py): per
    collective node, every rank's inbox (one slot per source rank) and arrival counters. Ranks ask
    for the same node in the same shapes; the first request allocates it for all of them. With
    `devices`, rank r's buffers live on devices[r] and the other ranks' kernels write them through
    peer access (NVLink P2P; `enable_peer_access`)."""

    def __init__(self, world: int, device: str | torch.device = "cuda",
                 devices: Sequence[str | torch.device] | None = None) -> None:  # fmt: skip
        self.world, self.device = world, torch.device(device)
        self.devices = [torch.device(d) for d in devices] if devices is not None else [self.device] * world
        if len(self.devices) != world:
            raise PersistentError(f"{len(self.devices)} devices for {world} ranks")
        self._bufs: dict[tuple, list[torch.Tensor]] = {}

    def buffers(self, key: tuple, shape: Sequence[int], dtype: torch.dtype) -> list[torch.Tensor]:
        """One zero-filled tensor per rank for (key, shape, dtype), rank r's on its device."""
        k = (key, tuple(shape), dtype)
        if k not in self._bufs:
            self._bufs[k] = [torch.zeros(tuple(shape), dtype=dtype, device=d) for d in self.devices]
        return self._bufs[k]


def enable_peer_access(devices: Sequence[torch.device]) -> None:
    """Let every listed GPU's kernels read and write every other's memory (cudaDeviceEnablePeerAccess,
    through cupy, the GPU extra); a pair without a P2P path raises naming it."""
    ids = sorted({d.index if d.index is not None else torch.cuda.current_device() for d in devices})
    if len(ids) < 2:
        return
    for a in ids:
        for b in ids:
            if a != b and not torch.cuda.can_device_access_peer(a, b):
                raise PersistentError(f"GPU {a} cannot access GPU {b}'s memory (no P2P path): ranks on "
                                      f"separate GPUs exchange through peer memory")  # fmt: skip
    try:
        import cupy  # the GPU extra: only ranks on separate GPUs need it
    except ImportError as e:
        raise PersistentError("ranks on separate GPUs need cupy (pip install 'tilert[gpu]') to enable "
                              "peer access") from e  # fmt: skip
    for a in ids:
        with cupy.cuda.Device(a):
            for b in ids:
                if a != b:
                    try:
                        cupy.cuda.runtime.deviceEnablePeerAccess(b)
                    except cupy.cuda.runtime.CUDARuntimeError as e:  # already enabled is fine
                        if "AlreadyEnabled" not in str(e) and "already" not in str(e).lower():
                            raise PersistentError(f"enabling GPU {a} -> GPU {b} peer access failed: {e}") from e


def padded(shape: Sequence[int]) -> tuple[int, ...]:
    """A buffer's shape: 2-D values' rows padded to PAD_ROWS (GEMM tiles never read past a buffer)."""
    return (cdiv(shape[0], PAD_ROWS) * PAD_ROWS, *shape[1:]) if len(shape) == 2 else tuple(shape)


STATE_ROWS_PAD = 64  # KV cache rows past max_seq: a key tile (64 rows) never runs past a cache


def kv_states(g: Graph, device: torch.device, states: dict[str, torch.Tensor],
              pad: int = STATE_ROWS_PAD) -> dict[str, torch.Tensor]:  # fmt: skip
    """The graph's [Hkv, S, D] (mixed steps: [slots, Hkv, S, D]) KV caches in `states` (created as
    zeros where missing: bf16, S + pad rows, so key tiles never run past them), shared by every step
    program of a model."""
    for v in g.by_role("state"):
        *lead, s, d = v.shape
        if v.name not in states:
            states[v.name] = torch.zeros(*lead, s + pad, d, dtype=torch.bfloat16, device=device)
    return states


class Bindings:
    """Device tensors of a rank graph's values: params, inputs, KV caches, padded activations."""

    def __init__(self, g: Graph, params: Mapping[str, Any], device: torch.device,
                 states: dict[str, torch.Tensor] | None = None, state_rows_pad: int = STATE_ROWS_PAD,
                 group: PeerGroup | None = None, rank: int = 0) -> None:  # fmt: skip
        self.g, self.device = g, device
        self.group, self.rank = group, rank
        self.err = torch.zeros(4, dtype=torch.int32, device=device)
        self.epoch = torch.zeros(1, dtype=torch.int32, device=device)
        # rank-dependent numbers are data (views), never constants in the kernel: every rank of a
        # step shape runs the same kernel, so a world of N compiles it once
        self.rank_id = self.ints(rank)
        self.env: dict[str, Any] = {}
        for v in g.by_role("param"):
            if v.name not in params:
                raise PersistentError(f"param '{v.name}' is not bound")
            self.env[v.name] = params[v.name]
        for v in g.by_role("input"):  # 2-D inputs (a drafter's context features: a GEMM's x) padded as activations
            dt = torch.int32 if v.dtype.name == "i32" else torch.bfloat16
            self.env[v.name] = torch.zeros(padded(v.shape), dtype=dt, device=device)
        # [Hkv, S, D] caches, S padded so key tiles never run past them; shared by a model's graphs
        self.states = kv_states(g, device, {} if states is None else states, state_rows_pad)
        for v in g.by_role("state"):
            self.env[v.name] = self.states[v.name]
        self.workspaces: list[torch.Tensor] = []
        self.arrivals: list[torch.Tensor] = []  # counters bodies count arrivals on (zeroed with the step's)

    def activation(self, v: Value) -> torch.Tensor:
        if v.name not in self.env:
            dt = {"bf16": torch.bfloat16, "f32": torch.float32, "i32": torch.int32}[v.dtype.name]
            self.env[v.name] = torch.zeros(padded(v.shape), dtype=dt, device=self.device)
        return self.env[v.name]

    def arrival_counter(self) -> torch.Tensor:
        """A zeroed int32 [1] that a stage's tasks count their arrivals on (the last to arrive runs
        extra work: the MoE's top-k); the step zeroes it with its own counters (PersistentStep.preload)."""
        t = torch.zeros(1, dtype=torch.int32, device=self.device)
        self.arrivals.append(t)
        return t

    def ints(self, *values: int) -> torch.Tensor:
        """A small int32 tensor of per-rank numbers a body reads at run time (expert or vocab offsets)."""
        return torch.tensor(values, dtype=torch.int32, device=self.device)

    def ws(self, shape: Sequence[int], dtype: torch.dtype, fill: float = 0) -> torch.Tensor:
        t = torch.full(tuple(shape), fill, dtype=dtype, device=self.device)
        self.workspaces.append(t)
        return t


def early_loads(kind: str) -> bool:
    """Whether the tasks of `kind` ("linear": the GEMV bodies; "attention": the attention splits)
    issue their data-independent loads before their wait (megakernel.Gate), by TILERT_EARLY_LOADS
    (switches.early_choice: "1" both, "attn" the attention splits only; off by default)."""
    if kind not in ("linear", "attention"):
        raise ValueError(f"early_loads: kind {kind!r} (linear or attention)")
    v = switches.early_choice()
    return v == "1" or (v == "attn" and kind == "attention")


def view_spec(name: str, t: torch.Tensor, shape: Sequence[int] | None = None) -> ViewSpec:
    return (name, tuple(t.shape if shape is None else shape), tl_dtype(t))
