"""The whole decode step as one persistent kernel: the compiler's task table run by one CTA per SM.

Inputs are what the compiler hands over for one rank: the compiled rank graph (fused nodes), its
task table (passes/schedule: opcode, node, tile coordinates, counter waits, signal per row) and
the counters' expected counts. Nothing is restacked: each graph node gets one row of device
addresses (the node table, `tilert/kernels/views.py`), nodes with the same static shapes share
one *node class*, and the kernel dispatches a row on (opcode, class of its node) to the class's
tile body, which builds typed views of the node's tensors from its address row. The bodies are
the kernel families' own (linear_fused, attention with cp.async instead of TMA, moe, elementwise,
lm_head_tail); their standalone launchers use the same views, so a body is tested as it runs here.

One launch per step: inputs are copied into static buffers, the epoch (launch count) is bumped on
the device, the kernel runs the table (waits compare counters with expected x epoch, so counters
are never reset), and the host checks the error word only when it synchronises anyway
(`check()`); a wait past its bound raises the error flag and the kernel drains instead of hanging.

Activations are separate buffers with their rows padded to PAD_ROWS (the largest GEMM block_m),
zero-filled once, so GEMM tiles never read past a buffer. Workspaces (split-K accumulators and
arrival counters, attention partials) belong to their node.
"""

# no `from __future__ import annotations`: TileLang evaluates the prim_func annotations
import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tilert.ir.graph import Graph, Node, Value
from tilert.kernels.common import cdiv, gated, is_gated
from tilert.kernels.views import TORCH_DTYPES, ViewSpec
from tilert.ops.qtensor import QTensor
from tilert.plan import FIELD, OPCODES, WAITS
from tilert.runtime.persistent.megakernel import PersistentError

PAD_ROWS = 64
NP_OPCODE = {v: k for k, v in OPCODES.items()}


@dataclass
class NodeProgram:
    """How one node runs: its class key, the views its bodies read, the bodies and its tensors."""

    key: tuple
    specs: list[ViewSpec]
    bodies: Callable[[], dict[str, Any]]  # opcode name -> T.macro(V, c0, c1, c2); built lazily
    tensors: list[torch.Tensor] = field(default_factory=list)
    opcodes: tuple[str, ...] = ()  # the opcodes `bodies` provides
    # (opcode name, c0, c1, c2) -> (address, bytes per row, rows, row stride) of the weights the task
    # reads, or None: the persistent loop prefetches the next task's region into L2 during waits
    prefetch: Callable[[str, int, int, int], tuple[int, int, int, int] | None] | None = None


def _tl_dtype(t: torch.Tensor) -> str:
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
        import cupy
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


STATE_ROWS_PAD = 64  # KV cache rows past max_seq: a key tile (64 rows) never runs past a cache


def kv_states(g: Graph, device: torch.device, states: dict[str, torch.Tensor],
              pad: int = STATE_ROWS_PAD) -> dict[str, torch.Tensor]:  # fmt: skip
    """The graph's [Hkv, S, D] KV caches in `states` (created as zeros where missing: bf16, S + pad
    rows, so key tiles never run past them), shared by every step program of a model."""
    for v in g.by_role("state"):
        h, s, d = v.shape
        if v.name not in states:
            states[v.name] = torch.zeros(h, s + pad, d, dtype=torch.bfloat16, device=device)
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
        for v in g.by_role("input"):
            dt = torch.int32 if v.dtype.name == "i32" else torch.bfloat16
            self.env[v.name] = torch.zeros(v.shape, dtype=dt, device=device)
        # [Hkv, S, D] caches, S padded so key tiles never run past them; shared by a model's graphs
        self.states = kv_states(g, device, {} if states is None else states, state_rows_pad)
        for v in g.by_role("state"):
            self.env[v.name] = self.states[v.name]
        self.workspaces: list[torch.Tensor] = []

    def activation(self, v: Value) -> torch.Tensor:
        if v.name not in self.env:
            dt = {"bf16": torch.bfloat16, "f32": torch.float32, "i32": torch.int32}[v.dtype.name]
            shape = (cdiv(v.shape[0], PAD_ROWS) * PAD_ROWS, *v.shape[1:]) if len(v.shape) == 2 else v.shape
            self.env[v.name] = torch.zeros(shape, dtype=dt, device=self.device)
        return self.env[v.name]

    def ints(self, *values: int) -> torch.Tensor:
        """A small int32 tensor of per-rank numbers a body reads at run time (expert or vocab offsets)."""
        return torch.tensor(values, dtype=torch.int32, device=self.device)

    def ws(self, shape: Sequence[int], dtype: torch.dtype, fill: float = 0) -> torch.Tensor:
        t = torch.full(tuple(shape), fill, dtype=dtype, device=self.device)
        self.workspaces.append(t)
        return t


# ---- node programs per op kind --------------------------------------------------------------------


def _linear(g: Graph, n: Node, b: Bindings, sms: int) -> NodeProgram:
    from tilert.kernels import linear_fused as lf
    from tilert.passes.tile import gemm_shape, uses_gemv

    x, w = g.values[n.inputs[0]], g.values[n.inputs[1]]
    M, K, N = x.shape[0], x.shape[-1], w.shape[0]
    wt = b.env[w.name]
    gemv = uses_gemv(n.op, M, K)  # as the plan's tiling (passes/tile.py) decided it
    if gemv and not (isinstance(wt, QTensor) and wt.fmt == "fp8"):
        raise PersistentError(f"{n.op} node bound to {type(wt).__name__} weights; its plan tiles expect fp8")
    bm, bn, bk, split = gemm_shape(M, N, K, sms, gemv)
    if isinstance(wt, QTensor):
        if wt.fmt != "fp8":
            raise PersistentError(f"{n.op}: {wt.fmt} weights have no persistent linear body yet")
        w_dtype, scale_rows, wtensors = "float8_e4m3", 1 if wt.scales.shape[0] == N else 128, [wt.data, wt.scales]
    else:
        w_dtype, scale_rows, wtensors = "bfloat16", 128, [wt.to(torch.bfloat16).contiguous()]
    lm = n.op.startswith("lm_head_")
    out = g.values[n.outputs[0]]
    res = None if lm or not n.a.get("residual") else g.values[n.inputs[-1]]
    eps = n.a.get("norm_eps")
    spec = lf.LinearSpec(
        M, N, K, bm, bn, bk, split, w_dtype, scale_rows, eps,
        None if res is None else _tl_dtype(b.activation(res)), _tl_dtype(b.activation(out)), gemv=gemv,
    )  # fmt: skip
    if (K // bk) % split or (eps is not None and K % 128):
        raise PersistentError(f"{n.op} {M}x{N}x{K}: tile shape {bm}x{bn}x{bk} split {split} is off the body's contract")
    ts: list[torch.Tensor] = [b.activation(x), *wtensors]
    if eps is not None:
        gamma_i = 3 if n.op == "lm_head_accept" else 2
        ts.append(b.env[g.values[n.inputs[gamma_i]].name].to(torch.bfloat16).contiguous())
    if res is not None:
        ts.append(b.activation(res))
    ts.append(b.activation(out))
    if split > 1:
        ts += [b.ws((spec.mp, N), torch.float32), b.ws((spec.tiles,), torch.int32), b.epoch]
    opcode = "LM_HEAD_GEMM" if lm else {"float8_e4m3": "LINEAR_FP8", "bfloat16": "LINEAR_BF16"}[w_dtype]
    w0, esz, kt = wtensors[0], wtensors[0].element_size(), K // split

    def prefetch(name: str, n_tile: int, m_tile: int, k_split: int) -> tuple[int, int, int, int] | None:
        r0 = n_tile * bn
        rows = min(bn, N - r0)
        if name != opcode or rows * kt * esz > PREFETCH_MAX_BYTES:  # e.g. an LM-head tile: DRAM-bound anyway
            return None
        return w0.data_ptr() + (r0 * K + k_split * kt) * esz, kt * esz, rows, K * esz

    early = early_loads()
    return NodeProgram(("linear", opcode, spec, early), lf.views(spec), lambda: {opcode: lf.make_body(spec, early)}, ts,
                       (opcode,), prefetch=prefetch)  # fmt: skip


def _lm_head_tail(g: Graph, n: Node, b: Bindings, sms: int) -> NodeProgram:
    from tilert.kernels import lm_head_tail as lt

    gemm = _linear(g, n, b, sms)
    logits = b.activation(g.values[n.outputs[0]])
    nxt = b.activation(g.values[n.outputs[1]])
    T, V = g.values[n.outputs[0]].shape
    world, vocab = int(n.a.get("world", 1)), n.a["vocab_size"]
    valid = min(V, vocab) if world == 1 else min(V, vocab - int(n.a.get("vocab_offset", 0)))
    accept = n.op == "lm_head_accept"
    peer = b.group is not None and world > 1
    if world > 1 and not peer and int(n.a.get("vocab_offset", 0)) > 0:
        raise PersistentError("the LM head tail of a rank > 0 needs its peers (a PeerGroup: MultiRankStep)")
    offset = int(n.a.get("vocab_offset", 0)) if world > 1 else 0
    cfg = lt.Config(T, V, 0 if peer else valid)  # with peers valid and offset are read at run time
    ts = [logits, nxt]
    tail_specs: list[ViewSpec] = [("logits", (T, V), "float32"), ("next", (T,), "int32")]
    if accept:
        draft, acc = b.env[g.values[n.inputs[2]].name], b.activation(g.values[n.outputs[2]])
        ts += [draft, acc]
        tail_specs += [("draft", (T,), "int32"), ("accept", (T + 1,), "int32")]
    pcfg = None
    if peer:  # local argmax -> (value, id) pushed to every rank -> the cross-rank argmax
        from tilert.kernels import peer_collective as pc

        i = g.nodes.index(n)
        world = b.group.world
        pcfg = pc.PeerConfig("argmax", T, 0, world)
        val, idx = b.ws((T,), torch.float32), b.ws((T,), torch.int32)
        inv = pc.rotated(b.group.buffers(("in_val", i), (world, T), torch.float32), b.rank)
        ini = pc.rotated(b.group.buffers(("in_idx", i), (world, T), torch.int32), b.rank)
        arrs = pc.rotated(b.group.buffers(("arrivals", i), (1,), torch.int32), b.rank)
        ts += [val, idx, nxt, b.epoch, b.err, b.rank_id, *inv, *ini, *arrs, b.ints(offset, valid)]
        tail_specs += [*pc.views(pcfg), ("vocab", (2,), "int32")]
    tail_op = "LM_HEAD_ACCEPT" if accept else "LM_HEAD_ARGMAX"

    def bodies() -> dict[str, Any]:
        import tilelang.language as T_

        gemm_body = gemm.bodies()["LM_HEAD_GEMM"]
        argmax_body, accept_body, local_argmax_body, dflash_accept_body = lt.make_bodies(cfg)
        k = len(gemm.specs)
        p0 = k + (4 if accept else 2)  # first view of the cross-rank argmax
        if pcfg is not None:
            from tilert.kernels import peer_collective as pc

            cross = pc.make_body(pcfg)

        @T_.macro
        def gemm_part(V_, c0, c1, c2):
            gemm_body(V_[:k], c0, c1, c2)

        @T_.macro
        def gemm_part_gated(V_, c0, c1, c2, gate):
            gemm_body(V_[:k], c0, c1, c2, gate)

        @T_.macro
        def tail_part(V_, c0, c1, c2):
            if pcfg is not None:
                vocab = V_[len(V_) - 1]  # (offset, valid) of this rank's vocabulary slice
                local_argmax_body(V_[k], V_[p0], V_[p0 + 1], vocab[1], vocab[0])
                T_.sync_threads()
                cross(V_[p0:], 0)
                if accept:
                    T_.sync_threads()
                    dflash_accept_body(V_[k + 2], V_[k + 1], V_[k + 3])
            elif accept:
                accept_body(V_[k], V_[k + 2], V_[k + 1], V_[k + 3], valid)
            else:
                argmax_body(V_[k], V_[k + 1], valid)

        gemm_task = gated(gemm_part_gated) if is_gated(gemm_body) else gemm_part
        return {"LM_HEAD_GEMM": gemm_task, tail_op: tail_part}

    key = ("lm_head", gemm.key, cfg, accept, pcfg, None if peer else offset)
    return NodeProgram(key, gemm.specs + tail_specs, bodies, gemm.tensors + ts, ("LM_HEAD_GEMM", tail_op))


def _attention(g: Graph, n: Node, b: Bindings, sms: int) -> NodeProgram:
    from tilert.kernels import attention as attn

    a = n.a
    q = g.values[n.inputs[0]]
    B = q.shape[0]
    cfg = persistent_attn_config(a, B)
    if cfg is None:
        raise PersistentError(f"attention_block {a}: no persistent attention body for these shapes")
    kc, vc = b.env[g.values[n.inputs[3]].name], b.env[g.values[n.inputs[4]].name]
    S = kc.shape[1]
    Hq, Hkv, DK, DV = cfg.q_heads, cfg.kv_heads, cfg.head_dim, cfg.v_head_dim
    o_part = b.ws((Hkv, cfg.rows, cfg.splits + 1, DV), torch.float32)
    lse = b.ws((Hkv, cfg.rows, cfg.splits + 1), torch.float32)
    sink = b.env[g.values[n.inputs[6]].name].float().contiguous() if cfg.sink else b.ws((max(1, Hq),), torch.float32)
    specs: list[ViewSpec] = [
        ("q", (B, Hq, DK), "bfloat16"), ("k", (B, Hkv, DK), "bfloat16"), ("v", (B, Hkv, DV), "bfloat16"),
        ("k_cache", (Hkv, S, DK), "bfloat16"), ("v_cache", (Hkv, S, DV), "bfloat16"), ("positions", (B,), "int32"),
        ("o_part", tuple(o_part.shape), "float32"), ("lse", tuple(lse.shape), "float32"),
        ("sink", (max(1, Hq),), "float32"), ("out", (B, Hq, DV), "bfloat16"),
    ]  # fmt: skip
    ts = [b.activation(g.values[i]) for i in n.inputs[:3]] + [kc, vc, b.env[g.values[n.inputs[5]].name]]
    ts += [o_part, lse, sink, b.activation(g.values[n.outputs[0]])]
    for o, st in zip(n.outputs[1:], (kc, vc)):  # the updated caches are the caches
        b.env[g.values[o].name] = st

    early = early_loads()

    def bodies() -> dict[str, Any]:
        import tilelang.language as T_

        split, combine = attn.make_bodies(cfg, tma=False, gated=early)

        @T_.macro
        def split_task(V, h, rb, s, gate):  # gated: its first KV tiles fly while it waits for q
            split(V[0], V[1], V[2], V[3], V[4], V[5], V[6], V[7], h, rb, s, gate)

        @T_.macro
        def split_task_plain(V, h, rb, s):
            split(V[0], V[1], V[2], V[3], V[4], V[5], V[6], V[7], h, rb, s)

        @T_.macro
        def combine_task(V, h, r, c2):
            combine(V[5], V[8], V[6], V[7], V[9], h, r)

        return {"ATTN_SPLIT": gated(split_task) if early else split_task_plain, "ATTN_COMBINE": combine_task}

    return NodeProgram(("attention", cfg, S, early), specs, bodies, ts, ("ATTN_SPLIT", "ATTN_COMBINE"))


def persistent_attn_config(a: Mapping[str, Any], B: int) -> Any:
    """The attention kernel config the persistent bodies use for a node (256-thread CTAs: 128 query
    rows per CTA), or None when the kernel does not cover the node."""
    from tilert.kernels import attention as attn
    from tilert.runtime.eager.gpu_ops import attn_config

    cfg = attn_config(dict(a), B)
    if cfg is None:
        return None
    import dataclasses

    return dataclasses.replace(cfg, rows_per_cta=128, min_tiles=attn.PERSISTENT_MIN_TILES,
                               v_scale=float(a.get("v_scale") or 1.0))


def early_loads() -> bool:
    """Whether GEMV and attention-split tasks issue their data-independent loads before their wait
    (megakernel.Gate), opt-in with TILERT_EARLY_LOADS=1: it gains nothing at B=1 and costs ~10% at
    B=8 on the H200 (docs/performance.md), so every body is waited for first by default."""
    return os.environ.get("TILERT_EARLY_LOADS", "0") == "1"


PREFETCH_MAX_BYTES = 256 * 1024  # the largest weight region one task prefetches into L2 (132 SMs: 33 MB)
MOE_STAGE_BYTES = 96 * 1024  # the most shared memory an MoE body stages its x rows in (B = 8 at H = 6144)


def _moe(g: Graph, n: Node, b: Bindings, sms: int) -> NodeProgram:
    """Fused MoE as five stages: router (with the norm prologue), top-k, gate/up and down tasks that
    stride over the active slots' items (moe.MoeTiling) into an fp32 partial, reduce per column block
    (+ residual)."""
    from tilert.kernels import elementwise as ew
    from tilert.kernels import moe
    from tilert.ops.qtensor import QTensor as Q

    a = n.a
    x, gate, bias, gu, dn = (g.values[i] for i in n.inputs[:5])
    T, H = x.shape
    E, EL, k = gate.shape[0], a["n_local"], a["top_k"]
    I2 = gu.shape[1]
    In = I2 // 2
    w_gu, w_d = b.env[gu.name], b.env[dn.name]
    if not (isinstance(w_gu, Q) and w_gu.fmt == "mxfp4" and isinstance(w_d, Q)):
        raise PersistentError(f"{n.op}: the persistent MoE body needs MXFP4 expert stacks")
    if a.get("n_group", 1) > 1 or T > moe.TP or H % 256 or In % 128:
        raise PersistentError(f"{n.op} T={T} H={H} I={In} groups={a.get('n_group', 1)}: off the MoE body's contract")
    # x (gate/up) and Hb[slot] (down) staged in shared memory: the mainloop then reads x there
    # instead of paying an L2 round trip per k chunk
    stage_x, stage_h = T * H * 2 <= MOE_STAGE_BYTES, T * In * 2 <= MOE_STAGE_BYTES
    eps = a.get("norm_eps")
    # expert_offset 0 in the kernel's config: the rank's offset is a view (every rank, one kernel)
    cfg = moe.Config(T, H, In, E, EL, k, 0, a.get("scaling", 1.0), a.get("normalize", True),
                     cta_threads=256, x_stage=stage_h, norm_eps=eps)  # fmt: skip
    til = moe.tiling(T, H, In, EL, k)
    extra = list(n.inputs[5:])
    gamma = b.env[g.values[extra.pop(0)].name] if eps is not None else None
    norm_w = gamma.to(torch.bfloat16).contiguous() if gamma is not None else None
    res = b.activation(g.values[extra.pop(0)]) if a.get("residual") else None
    TP, S = moe.TP, cfg.max_slots
    xa = b.activation(x)
    xh = b.ws((TP, H), torch.bfloat16) if eps is not None else xa
    out = b.activation(g.values[n.outputs[0]])
    world = int(a.get("world", 1)) if a.get("reduce") else 1
    router_w = b.env[gate.name].float()
    if gamma is not None:  # the norm's gamma folded into the router weight (moe.router_tile)
        router_w = router_w * gamma.float()
    ts = [xa, xh, router_w.contiguous(), b.env[bias.name].float().contiguous(),
          w_gu.data, w_gu.scales, w_d.data, w_d.scales,
          b.ws((TP, E), torch.float32), b.ws((TP, k), torch.int32), b.ws((TP, k), torch.float32),
          b.ws((EL, TP), torch.float32), b.ws((EL,), torch.int32), b.ws((1,), torch.int32),
          b.ws((S, TP, In), torch.bfloat16), b.ws((T, H), torch.float32),
          norm_w if norm_w is not None else b.ws((H,), torch.bfloat16),
          res if res is not None else b.ws((1, H), torch.bfloat16), out]  # fmt: skip
    ts.append(b.ws((2, T, H), torch.float32) if world > 1 else b.ws((1,), torch.float32))
    specs: list[ViewSpec] = [
        ("x", (xa.shape[0], H), "bfloat16"), ("xh", (TP, H), "bfloat16"), ("router", (E, H), "float32"),
        ("bias", (E,), "float32"), ("gu", tuple(w_gu.data.shape), "uint8"), ("gu_s", tuple(w_gu.scales.shape), "uint8"),
        ("dn", tuple(w_d.data.shape), "uint8"), ("dn_s", tuple(w_d.scales.shape), "uint8"),
        ("logits", (TP, E), "float32"), ("idx", (TP, k), "int32"), ("wt", (TP, k), "float32"),
        ("tokw", (EL, TP), "float32"), ("list", (EL,), "int32"), ("count", (1,), "int32"),
        ("hb", (S, TP, In), "bfloat16"), ("y", (T, H), "float32"), ("gamma", (H,), "bfloat16"),
        ("residual", (ts[17].shape[0], H), "bfloat16"), ("out", (out.shape[0], H), _tl_dtype(out)),
    ]  # fmt: skip
    specs.append(("inbox", tuple(ts[-1].shape), "float32"))
    peer = None
    if b.group is not None and world > 1:  # the reduce is a real all-reduce over the ranks' Y
        peer = _peer_allreduce(g, n, b, "MOE_REDUCE", ts[15], res, out, T, H)
        specs, ts = specs + peer.specs, ts + peer.tensors
    off_view = len(specs)
    specs.append(("expert_offset", (1,), "int32"))
    ts.append(b.ints(int(a.get("expert_offset", 0))))

    def bodies() -> dict[str, Any]:
        import tilelang.language as T_

        router_tile, route_body, gate_up_tile, down_tile = moe.make_bodies(cfg)
        reduce_body = ew.make_body(ew.AllReduceConfig(T, H, world, res is not None, "float32", "bfloat16",
                                                      _tl_dtype(out)))  # fmt: skip
        peer_body = None if peer is None else peer.bodies()["MOE_REDUCE"]

        # A stage is read by every item of the task's loop, and the items' own buffers (the mainloop's
        # reduction, c_s) are written in between. TileLang's merge places buffers by first and last
        # use in statement order, so a stage touched last inside the loop could share their bytes
        # from the second item on: `keep` touches it once more after the loop (Count is never
        # negative), which makes it live across the whole loop.
        @T_.macro
        def keep(buf, V):
            if V[13][0] < 0:
                buf[0, 0] = T_.cast(0, "bfloat16")

        # With the fused pre-MoE RMSNorm the router tasks read the raw rows and the router weight
        # times gamma (bound below) and scale their logits by rstd (moe.router_tile); each writes
        # its slice of the normalised bf16 rows to xh for the gate/up tasks (they wait for the
        # top-k, which waits for every router task).
        @T_.macro
        def router(V, e_tile, c1, c2):
            if eps is not None:
                router_tile(V[0], V[2], V[8], V[15], e_tile, V[16], V[1])
            else:
                router_tile(V[1], V[2], V[8], V[15], e_tile, None, None)

        @T_.macro
        def topk(V, c0, c1, c2):
            route_body(V[8], V[3], V[9], V[10], V[11], V[12], V[13], V[off_view][0])

        per_slot = til.down_tiles * til.down_split

        @T_.macro
        def gate_up(V, j, c1, c2):  # items j, j + gu_tasks, ... of the Count x gu_tiles active ones
            count = T_.alloc_var("int32")  # read once: the items' bounds would re-read it otherwise
            count = V[13][0]
            if stage_x:  # the x rows once per task (every item of the task reads all of them)
                xs = T_.alloc_shared((T, H), "bfloat16")
                for i, c in T_.Parallel(T, H):
                    xs[i, c] = V[1][i, c]
                T_.sync_threads()
            steps = T_.alloc_var("int32")  # this task's items: the loop runs no step past them
            steps = T_.min((count * til.gu_tiles - j + til.gu_tasks - 1) // til.gu_tasks, til.gu_steps)
            for u in T_.serial(steps):
                w = j + u * til.gu_tasks
                if w < count * til.gu_tiles:
                    gate_up_tile(xs if stage_x else V[1], V[4], V[5], V[12], V[13], V[14], w // til.gu_tiles,
                                 w % til.gu_tiles)  # fmt: skip
            if stage_x:
                keep(xs, V)

        @T_.macro
        def down(V, j, c1, c2):
            count = T_.alloc_var("int32")
            count = V[13][0]
            if stage_h:
                hs = T_.alloc_shared((T, In), "bfloat16")
                staged = T_.alloc_var("int32")
                staged = -1
                keep(hs, V)
            # this task's items only (bounded by Count, not by the most slots: at B=8 the most slots
            # mean 144 steps of two barriers each for the 3 items one active expert gives a task)
            steps = T_.alloc_var("int32")
            steps = T_.min((count * per_slot - j + til.down_tasks - 1) // til.down_tasks, til.down_steps)
            for u in T_.serial(steps):
                w = j + u * til.down_tasks
                if stage_h:  # Hb[slot] rows into the stage when the slot changes (barriers outside the if)
                    T_.sync_threads()
                    if w < count * per_slot and w // per_slot != staged:
                        for i, c in T_.Parallel(T, In):
                            hs[i, c] = V[14][w // per_slot, i, c]
                        staged = w // per_slot
                    T_.sync_threads()
                if w < count * per_slot:
                    down_tile(hs if stage_h else V[14], V[6], V[7], V[12], V[13], V[11], V[15], w // per_slot,
                              (w % per_slot) // til.down_split, w % til.down_split)  # fmt: skip
            if stage_h:
                keep(hs, V)

        @T_.macro
        def reduce(V, c, c1, c2):
            if peer is None:
                reduce_body(V[15], V[17], V[19], V[18], c)
            else:
                peer_body(V[20:20 + len(peer.specs)], c, 0, 0)

        return {"MOE_ROUTER": router, "MOE_TOPK": topk, "MOE_GATE_UP": gate_up, "MOE_DOWN": down, "MOE_REDUCE": reduce}

    key = ("moe", cfg, til, eps, res is not None, world, xa.shape[0], out.shape[0], _tl_dtype(out),
           None if peer is None else peer.key)
    wr = ts[2]

    def prefetch(name: str, e_tile: int, c1: int, c2: int) -> tuple[int, int, int, int] | None:
        if name != "MOE_ROUTER":  # the experts' rows are known only on the device, after the top-k
            return None
        e0 = e_tile * moe.ROUTER_E
        return wr.data_ptr() + e0 * H * 4, H * 4, min(moe.ROUTER_E, E - e0), H * 4

    return NodeProgram(key, specs, bodies, ts, ("MOE_ROUTER", "MOE_TOPK", "MOE_GATE_UP", "MOE_DOWN", "MOE_REDUCE"),
                       prefetch=prefetch)  # fmt: skip


def _elementwise_program(cfg: Any, opcode: str, specs: list[ViewSpec], ts: list[torch.Tensor],
                         call: Callable[[Any, Any, Any], None]) -> NodeProgram:  # fmt: skip
    """A node run by one of tilert/kernels/elementwise.py's column-block bodies."""
    from tilert.kernels import elementwise as ew

    def bodies() -> dict[str, Any]:
        import tilelang.language as T_

        body = ew.make_body(cfg)

        @T_.macro
        def task(V, c, c1, c2):
            call(body, V, c)

        return {opcode: task}

    return NodeProgram(("elementwise", opcode, cfg, tuple(s[1:] for s in specs)), specs, bodies, ts, (opcode,))


def _spec(name: str, t: torch.Tensor, shape: Sequence[int] | None = None) -> ViewSpec:
    return (name, tuple(t.shape if shape is None else shape), _tl_dtype(t))


def _embed(g: Graph, n: Node, b: Bindings, sms: int) -> NodeProgram:
    from tilert.kernels import elementwise as ew

    table, tokens = b.env[g.values[n.inputs[0]].name], b.env[g.values[n.inputs[1]].name]
    (T,), (V, H) = g.values[n.inputs[1]].shape, table.shape
    out = b.activation(g.values[n.outputs[0]])
    table = table.to(torch.bfloat16).contiguous()
    specs = [_spec("table", table), _spec("tokens", tokens), _spec("out", out, (T, H))]
    return _elementwise_program(ew.EmbedConfig(T, V, H), "OP_EMBED", specs, [table, tokens, out],
                                lambda body, V_, c: body(V_[0], V_[1], V_[2], c))  # fmt: skip


def _silu_mul(g: Graph, n: Node, b: Bindings, sms: int) -> NodeProgram:
    from tilert.kernels import elementwise as ew

    if len(n.inputs) != 2:
        raise PersistentError("silu_mul with one (concatenated) input has no persistent body")
    T, N = g.values[n.outputs[0]].shape
    ts = [b.activation(g.values[i]) for i in n.inputs] + [b.activation(g.values[n.outputs[0]])]
    specs = [_spec(nm, t, (T, N)) for nm, t in zip(("gate", "up", "out"), ts)]
    return _elementwise_program(ew.SiluMulConfig(T, N), "OP_SILU_MUL", specs, ts,
                                lambda body, V_, c: body(V_[0], V_[1], V_[2], c))  # fmt: skip


def _concat(g: Graph, n: Node, b: Bindings, sms: int) -> NodeProgram:
    from tilert.kernels import elementwise as ew

    out_v = g.values[n.outputs[0]]
    if n.a.get("dim", -1) % len(out_v.shape) != len(out_v.shape) - 1:
        raise PersistentError("concat along a dim other than the last has no persistent body")
    T = out_v.shape[0]
    widths = tuple(g.values[i].shape[-1] for i in n.inputs)
    ts = [b.activation(g.values[i]) for i in n.inputs] + [b.activation(out_v)]
    specs = [_spec(f"in{k}", t, (T, w)) for k, (t, w) in enumerate(zip(ts, widths))]
    specs.append(_spec("out", ts[-1], (T, sum(widths))))
    k = len(widths)
    return _elementwise_program(ew.ConcatConfig(T, widths), "OP_CONCAT", specs, ts,
                                lambda body, V_, c: body(tuple(V_[:k]), V_[k], c))  # fmt: skip


def _all_reduce(g: Graph, n: Node, b: Bindings, sms: int) -> NodeProgram:
    """World 1: the residual add; world > 1 without a PeerGroup (solo): rank 0's partial plus a ring's
    traffic through a local inbox (tilert/kernels/elementwise.py); with one: the ranks' all-reduce
    through peer inboxes (_peer_allreduce)."""
    from tilert.kernels import elementwise as ew

    part_v, out_v = g.values[n.inputs[0]], g.values[n.outputs[0]]
    T, N = out_v.shape
    res = n.op == "all_reduce_residual"
    part, out = b.activation(part_v), b.activation(out_v)
    resid = b.activation(g.values[n.inputs[1]]) if res else b.ws((1, N), torch.bfloat16)
    world = int(n.a.get("world", g.meta.get("world", 1)))
    if b.group is not None and world > 1:
        return _peer_allreduce(g, n, b, "ALL_REDUCE", part, resid if res else None, out, T, N)
    inbox = b.ws((2, T, N), part.dtype) if world > 1 else b.ws((1,), part.dtype)
    cfg = ew.AllReduceConfig(T, N, world, res, _tl_dtype(part), _tl_dtype(resid), _tl_dtype(out))
    specs = [_spec("partial", part, (T, N)), _spec("residual", resid, (T, N) if res else (1, N)),
             _spec("inbox", inbox), _spec("out", out, (T, N))]  # fmt: skip
    return _elementwise_program(cfg, "ALL_REDUCE", specs, [part, resid, inbox, out],
                                lambda body, V_, c: body(V_[0], V_[1], V_[2], V_[3], c))  # fmt: skip


def _all_gather(g: Graph, n: Node, b: Bindings, sms: int) -> NodeProgram:
    """Solo all-gather (last dim): rank 0's block written to every rank's slot of the output."""
    from tilert.passes.tile import TILE_CONFIG

    x_v, out_v = g.values[n.inputs[0]], g.values[n.outputs[0]]
    if n.a.get("dim", -1) % len(out_v.shape) != len(out_v.shape) - 1:
        raise PersistentError("all_gather along a dim other than the last has no persistent body")
    T, W = x_v.shape
    world = out_v.shape[-1] // W
    cols = TILE_CONFIG["collective"]["cols"]
    x, out = b.activation(x_v), b.activation(out_v)
    if b.group is not None and world > 1:  # every rank writes its block into every rank's output
        from tilert.kernels import peer_collective as pc

        i = g.nodes.index(n)
        pcfg = pc.PeerConfig("allgather", T, W, world, cols, out_dtype=_tl_dtype(x))
        outs = b.group.buffers(("gather_out", i), out.shape, out.dtype)
        b.env[out_v.name] = outs[b.rank]
        arrs = b.group.buffers(("arrivals", i), (pcfg.tiles,), torch.int32)
        specs = [(nm, (T, W) if nm == "x" else sh, dt) for nm, sh, dt in pc.views(pcfg)]
        ts = [x, b.epoch, b.err, b.rank_id, *pc.rotated(outs, b.rank), *pc.rotated(arrs, b.rank)]
        return NodeProgram(("peer", pcfg), specs, _peer_bodies(pcfg, "ALL_GATHER"), ts, ("ALL_GATHER",))
    specs = [_spec("x", x, (T, W)), _spec("out", out, (T, W * world))]

    def bodies() -> dict[str, Any]:
        import tilelang.language as T_

        @T_.macro
        def gather(V, c, c1, c2):
            for i, j in T_.Parallel(T, cols):
                if c * cols + j < W:
                    for q in T_.unroll(world):
                        V[1][i, q * W + c * cols + j] = V[0][i, c * cols + j]

        return {"ALL_GATHER": gather}

    return NodeProgram(("all_gather", T, W, world, _tl_dtype(x)), specs, bodies, [x, out], ("ALL_GATHER",))


def _peer_bodies(pcfg: Any, opcode: str) -> Callable[[], dict[str, Any]]:
    def bodies() -> dict[str, Any]:
        import tilelang.language as T_

        from tilert.kernels import peer_collective as pc

        body = pc.make_body(pcfg)

        @T_.macro
        def task(V, c, c1, c2):
            body(V, c)

        return {opcode: task}

    return bodies


def _peer_allreduce(g: Graph, n: Node, b: Bindings, opcode: str, part: torch.Tensor, resid: torch.Tensor | None,
                    out: torch.Tensor, T: int, N: int) -> NodeProgram:  # fmt: skip
    """All-reduce (+ residual) over the ranks of b.group through peer inboxes."""
    from tilert.kernels import peer_collective as pc
    from tilert.passes.tile import TILE_CONFIG

    i = g.nodes.index(n)
    world = b.group.world
    res_dt = _tl_dtype(resid) if resid is not None else "bfloat16"
    pcfg = pc.PeerConfig("allreduce", T, N, world, TILE_CONFIG["collective"]["cols"], resid is not None,
                         _tl_dtype(part), res_dt, _tl_dtype(out))  # fmt: skip
    inbox = pc.rotated(b.group.buffers(("inbox", i), (world, T, N), torch.float32), b.rank)
    arrs = pc.rotated(b.group.buffers(("arrivals", i), (pcfg.tiles,), torch.int32), b.rank)
    res_t = resid if resid is not None else b.ws((1, N), torch.bfloat16)
    specs = pc.views(pcfg, res_rows=res_t.shape[0])
    return NodeProgram(("peer", opcode, pcfg, res_t.shape[0]), specs, _peer_bodies(pcfg, opcode),
                       [part, res_t, out, b.epoch, b.err, b.rank_id, *inbox, *arrs], (opcode,))  # fmt: skip


PROGRAMS: dict[str, Callable[[Graph, Node, Bindings, int], NodeProgram]] = {
    "linear_fp8": _linear,
    "linear_bf16": _linear,
    "lm_head_argmax": _lm_head_tail,
    "lm_head_accept": _lm_head_tail,
    "attention_block": _attention,
    "fused_moe_mxfp4": _moe,
    "embed": _embed,
    "silu_mul": _silu_mul,
    "concat": _concat,
    "all_reduce": _all_reduce,
    "all_reduce_residual": _all_reduce,
    "all_gather": _all_gather,
}


def register_program(*kinds: str) -> Callable:
    def deco(fn: Callable) -> Callable:
        for k in kinds:
            PROGRAMS[k] = fn
        return fn

    return deco


# ---- the kernel -------------------------------------------------------------------------------------


def make_step_kernel(classes: Sequence[NodeProgram], num_sms: int, max_tasks: int, n_nodes: int, n_counters: int,
                     max_views: int, timeout_ns: int | None = None) -> Any:  # fmt: skip
    """The persistent prim_func: (Tasks, NodeClass, Ptrs, Counters, Err, Epoch, Trace, Prefetch)."""
    import tilelang.language as T

    from tilert.kernels.views import PERSISTENT_THREADS, make_views
    from tilert.runtime.persistent.megakernel import DEFAULT_TIMEOUT_NS, if_chain, make_persistent_loop

    built = [c.bodies() for c in classes]
    by_opcode: dict[str, list[tuple[int, Any, list[ViewSpec]]]] = {}
    for k, (c, bodies) in enumerate(zip(classes, built)):
        for name, body in bodies.items():
            by_opcode.setdefault(name, []).append((k, body, c.specs))

    def opcode_body(cases: list[tuple[int, Any, list[ViewSpec]]]) -> Any:
        def case(k: int, body: Any, specs: list[ViewSpec]) -> tuple[Any, Any]:
            if is_gated(body):  # it waits for its inputs itself (megakernel.Gate)

                @T.macro
                def run_gate(bufs, op, c0, c1, c2, gate):
                    body(make_views(bufs[1], op, specs), c0, c1, c2, gate)

                return k, gated(run_gate)

            @T.macro
            def run(bufs, op, c0, c1, c2):
                body(make_views(bufs[1], op, specs), c0, c1, c2)

            return k, run

        return if_chain([case(*c) for c in cases], selector=lambda bufs, op: bufs[0][op])

    bodies = {name: opcode_body(cases) for name, cases in by_opcode.items()}
    bodies.setdefault("BARRIER", _noop())
    loop = make_persistent_loop(bodies, max_tasks=max_tasks, timeout_ns=timeout_ns or DEFAULT_TIMEOUT_NS,
                                prefetch=True)  # fmt: skip

    @T.prim_func
    def tilert_step(
        Tasks: T.Tensor((num_sms, max_tasks, len(FIELD)), "int32"),
        NodeClass: T.Tensor((n_nodes,), "int32"),
        Ptrs: T.Tensor((n_nodes, max_views), T.ptr),
        Counters: T.Tensor((n_counters,), "int32"),
        Err: T.Tensor((4,), "int32"),
        Epoch: T.Tensor((1,), "int32"),
        Trace: T.Tensor((num_sms, max_tasks, 3), "int64"),
        Prefetch: T.Tensor((num_sms, max_tasks, 4), "int64"),
    ):
        with T.Kernel(num_sms, threads=PERSISTENT_THREADS) as sm:
            # Never runs (epochs start at 1); its presence makes this a cooperative launch
            # (TileLang marks kernels that can grid-sync), and the driver then starts the kernel only
            # with every CTA resident at once, or refuses it: CTAs spin on each other's counters, so
            # one CTA left waiting for an SM another kernel holds would stall the step.
            if Epoch[0] < 0:
                T.sync_grid()
            loop(sm, Tasks, Counters, Err, Epoch, Trace, (NodeClass, Ptrs), Prefetch)

    return tilert_step


def _noop() -> Any:
    import tilelang.language as T

    @T.macro
    def nop(bufs, op, c0, c1, c2):
        T.evaluate(0)

    return nop


_STEP_KERNELS: dict[tuple, Any] = {}  # compiled step kernels of this process, by classes and shape


class PersistentStep:
    """One rank's step graph as one persistent launch per step.

    graph: the compiled rank graph; table/expected: its schedule (int32 rows, counters' expected
    counts); params: the rank's bound weights on the GPU. `run(inputs)` enqueues one step and
    returns the graph outputs (device tensors, valid once the stream reaches them); `check()`
    raises if any launch so far hit a bounded wait or an unknown opcode.
    """

    def __init__(self, graph: Graph, table: np.ndarray, expected: np.ndarray, params: Mapping[str, Any],
                 device: str = "cuda", num_sms: int | None = None, out_dir: str | None = None,
                 states: dict[str, torch.Tensor] | None = None, group: PeerGroup | None = None,
                 rank: int = 0) -> None:  # fmt: skip
        from tilert.kernels.common import build
        from tilert.runtime.persistent.megakernel import PERSISTENT_PASS_CONFIGS

        self.g = graph
        self.device = torch.device(device)
        sms = num_sms or torch.cuda.get_device_properties(self.device).multi_processor_count
        if table.shape[0] > sms:
            raise PersistentError(f"the table has {table.shape[0]} SM queues; this GPU has {sms} SMs")
        self.sms = table.shape[0]
        b = self.bind = Bindings(graph, params, self.device, states, group=group, rank=rank)
        self.programs: list[NodeProgram] = []
        for n in graph.nodes:
            fn = PROGRAMS.get(n.op)
            if fn is None:
                raise PersistentError(f"no persistent body for op kind '{n.op}' (node {len(self.programs)})")
            self.programs.append(fn(graph, n, b, self.sms))
        self._check_table(table, expected)
        keys: dict[tuple, int] = {}
        classes: list[NodeProgram] = []
        node_class = []
        for p in self.programs:
            if p.key not in keys:
                keys[p.key] = len(classes)
                classes.append(p)
            node_class.append(keys[p.key])
        max_views = max(len(p.specs) for p in self.programs)
        ptrs = torch.zeros(len(self.programs), max_views, dtype=torch.int64)
        for i, p in enumerate(self.programs):
            from tilert.kernels.views import pointer_row

            ptrs[i, : len(p.specs)] = pointer_row(p.tensors, p.specs, f"node {i} ({graph.nodes[i].op})")[0]
        self.ptrs = ptrs.to(self.device)
        self._ptrs_host = ptrs
        self.classes = classes
        # where each KV cache sits in the node table, so another sequence's caches can be swapped in
        own = {name: t for name, t in b.states.items() if name in graph.values}
        self._state_slots = [(i, j, name) for name, t in own.items() for i, p in enumerate(self.programs)
                             for j, u in enumerate(p.tensors) if u is t]  # fmt: skip
        self.node_class = torch.tensor(node_class, dtype=torch.int32, device=self.device)
        self.table = np.ascontiguousarray(table)  # host copy (the profiler's and the tests' view)
        self.tasks = torch.from_numpy(self.table).to(self.device)
        self.counters = torch.zeros(max(1, len(expected)), dtype=torch.int32, device=self.device)
        self.err = b.err
        self.trace = torch.zeros(self.sms, table.shape[1], 3, dtype=torch.int64, device=self.device)
        self.prefetch = torch.from_numpy(self._prefetch_table()).to(self.device)
        self.n_classes = len(classes)
        shape = (self.sms, table.shape[1], len(self.programs), len(self.counters), max_views)
        # the kernel follows from its classes' keys and its shape: built (traced) once per process,
        # so another backend, sequence or server worker with the same step shape reuses it
        kernel_key = (tuple(c.key for c in classes), shape, early_loads(), str(out_dir))
        if kernel_key not in _STEP_KERNELS:
            func = make_step_kernel(classes, *shape)
            kinds = ", ".join(sorted({n.op for n in graph.nodes}))
            what = f"persistent step of '{graph.name}' (node bodies: {kinds})"
            _STEP_KERNELS[kernel_key] = build(func, pass_configs=PERSISTENT_PASS_CONFIGS, out_dir=out_dir,
                                              name="tilert_step", what=what)  # fmt: skip
        self.kernel = _STEP_KERNELS[kernel_key]
        self.steps = 0
        self.launches_per_step = 1

    def _prefetch_table(self) -> np.ndarray:
        """int64 [sms, tasks, 4]: each task's weight region (NodeProgram.prefetch), rows 0 if none."""
        from tilert.runtime.persistent.megakernel import PREFETCH_ROWS

        tb = self.table
        pf = np.zeros((*tb.shape[:2], 4), dtype=np.int64)
        for s_, t_ in zip(*np.nonzero(tb[:, :, FIELD["opcode"]])):
            row = tb[s_, t_]
            p = self.programs[int(row[FIELD["op"]])]
            name = NP_OPCODE.get(int(row[FIELD["opcode"]]))
            r = p.prefetch(name, *(int(row[FIELD[c]]) for c in ("c0", "c1", "c2"))) if p.prefetch else None
            if r is not None:
                addr, nbytes, rows, stride = r
                if addr % 16 or nbytes % 16 or stride % 16:
                    raise PersistentError(f"node {int(row[FIELD['op']])} {name}: prefetch region {r} is not "
                                          f"16-byte aligned")  # fmt: skip
                pf[s_, t_] = (addr, nbytes, min(rows, PREFETCH_ROWS), stride)
        return pf

    def _check_table(self, table: np.ndarray, expected: np.ndarray) -> None:
        """Every row names a node of this graph with a body for its opcode; counters in range."""
        ops, nodes = table[:, :, FIELD["opcode"]], table[:, :, FIELD["op"]]
        for code, i in {(int(c), int(i)) for c, i in zip(ops[ops != 0].ravel(), nodes[ops != 0].ravel())}:
            name = NP_OPCODE.get(code, f"#{code}")
            if not 0 <= i < len(self.programs):
                raise PersistentError(f"task {name} names node {i}; the graph has {len(self.programs)}")
            if name != "BARRIER" and name not in self.programs[i].opcodes:
                raise PersistentError(f"task {name} on node {i} ({self.g.nodes[i].op}): its body has "
                                      f"{sorted(self.programs[i].opcodes)}")  # fmt: skip
        sig = table[:, :, FIELD["signal"]]
        if sig.max(initial=-1) >= len(expected):
            raise PersistentError(f"a task signals counter {int(sig.max())}; the table has {len(expected)} counters")

    def launch(self, inputs: Mapping[str, Any]) -> None:
        """Copy inputs into the static buffers, bump the epoch and launch (no host sync)."""
        for v in self.g.by_role("input"):
            if v.name not in inputs:
                raise ValueError(f"graph '{self.g.name}' needs input '{v.name}' ({v.dtype.name}{list(v.shape)})")
            t = torch.as_tensor(inputs[v.name])
            if tuple(t.shape) != v.shape:
                raise ValueError(f"input '{v.name}' has shape {list(t.shape)}, graph expects {list(v.shape)}")
            self.bind.env[v.name].copy_(t, non_blocking=True)
        self.steps += 1
        self.bind.epoch.fill_(self.steps)
        self._enqueue()

    def _enqueue(self) -> None:
        try:
            self.kernel(self.tasks, self.node_class, self.ptrs, self.counters, self.err, self.bind.epoch, self.trace,
                        self.prefetch)  # fmt: skip
        except Exception as e:  # the cooperative launch refuses a grid that cannot be resident at once
            msg = str(e).strip().splitlines()
            if any("COOPERATIVE" in m.upper() for m in msg):
                raise PersistentError(
                    f"the persistent step needs its {self.sms} CTAs (one per SM queue) resident at once, and this "
                    f"GPU cannot hold them together (another kernel's share of the SMs, an MPS or MIG limit, or "
                    f"a schedule for more SMs than the GPU has): {msg[-1] if msg else e}"
                ) from None
            raise

    def preload(self) -> None:
        """One dry launch (the error word preset, so every task skips its waits and body), then the
        counters and the error word are cleared. It makes CUDA load the kernel now: under lazy module
        loading a first launch may wait for the device to go idle, which never happens while another
        rank's program spins on this one's arrivals (MultiRankStep preloads every rank)."""
        from tilert.runtime.persistent.megakernel import ERR_DRY

        self.err.fill_(ERR_DRY)
        self._enqueue()
        torch.cuda.synchronize(self.device)
        self.err.zero_()
        self.counters.zero_()

    def outputs(self) -> dict[str, torch.Tensor]:
        out = {}
        for name in self.g.outputs:
            v = self.g.values[name]
            t = self.bind.env[name]
            out[name] = t[: v.shape[0]] if len(v.shape) == 2 else t
        return out

    def measured_trace(self, process: str = "rank 0 (measured)") -> dict[str, Any]:
        """Chrome/Perfetto trace of the last launch: one track per SM, one event per task, from the
        kernel's own %globaltimer stamps (a 'wait' event until the task's waits are met, then the
        task until its signal)."""
        from tilert.plan import TASK_FIELDS
        from tilert.profile.timeline import trace_json

        torch.cuda.synchronize(self.device)
        tr = self.trace.cpu().numpy()
        table = self.table
        used = table[:, :, FIELD["opcode"]] != 0
        start = np.where(used, tr[:, :, 0], -1)
        end = np.where(used, tr[:, :, 1], -1)
        ready = np.where(used, tr[:, :, 2], -1)
        names = [n.op for n in self.g.nodes]
        return trace_json(table, start, end, TASK_FIELDS, names, NP_OPCODE, process=process, pid=1,
                          meta={"source": "persistent kernel %globaltimer", "graph": self.g.name},
                          ready_ns=ready)  # fmt: skip

    def check(self) -> None:
        from tilert.runtime.persistent.megakernel import ERR_TIMEOUT, raise_on_error

        err = self.err.tolist()
        try:
            raise_on_error(err)
        except PersistentError as e:
            if err[0] != ERR_TIMEOUT or not 0 <= err[1] < self.sms:
                raise
            raise PersistentError(f"{e}: {self.describe_wait(err[1], err[2], err[3])}") from None

    def describe_wait(self, sm: int, slot: int, counter: int) -> str:
        """Which task waited on which counter for what count: a timed-out wait's report."""
        row = self.table[sm, slot]
        name = NP_OPCODE.get(int(row[FIELD["opcode"]]), f"#{int(row[FIELD['opcode']])}")
        node = int(row[FIELD["op"]])
        need = None
        for w in range(WAITS):
            first, count = int(row[FIELD[f"wait{w}_counter"]]), int(row[FIELD[f"wait{w}_count"]])
            if first >= 0 and first <= counter < first + max(count, 1):
                need = int(row[FIELD[f"wait{w}_expected"]]) * self.steps
        op = self.g.nodes[node].op if 0 <= node < len(self.g.nodes) else "?"
        where = ", ".join(f"{c}={int(row[FIELD[c]])}" for c in ("c0", "c1", "c2"))
        # (the counter's value now says nothing: after a timeout every CTA drains and still signals)
        return (f"task {name} of node {node} ({op}, {where}) waited for counter {counter} to reach {need} "
                f"(step {self.steps} of this program)")  # fmt: skip

    def run(self, inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        self.launch(inputs)
        torch.cuda.synchronize(self.device)
        self.check()
        return self.outputs()

    def reset(self) -> None:
        for t in self.bind.states.values():
            t.zero_()

    def use_states(self, states: dict[str, torch.Tensor]) -> None:
        """Point the node table at another set of KV caches (another sequence's): tensors missing from
        `states` are created (zeros, same shape). One small host-to-device copy of the table."""
        for name, t in list(self.bind.states.items()):
            if name not in states:
                states[name] = torch.zeros_like(t)
        for i, j, name in self._state_slots:
            self._ptrs_host[i, j] = states[name].data_ptr()
            self.programs[i].tensors[j] = states[name]
        for name in self.bind.states:
            self.bind.env[name] = states[name]
        self.bind.states = states
        self.ptrs.copy_(self._ptrs_host)


class MultiRankStep:
    """The ranks of one step in one process: one persistent program per rank, each on its own CUDA
    stream so all are resident at once, exchanging through a PeerGroup (kernels/peer_collective.py).
    On one GPU (`device`) each rank is compiled for its share of the SMs (`compile_ranks`); with
    `devices` rank r runs on devices[r] with the whole GPU (`compile_ranks(..., gpus=world)`) and
    the collectives write the other GPUs' inboxes through peer access. Every rank gets the same
    inputs (SPMD), as with torchrun; `states[r]` are rank r's KV caches, shared by the programs of
    every step shape; `params[r]` must live on rank r's device."""

    def __init__(self, graphs: Sequence[Graph], schedules: Sequence[Any], params: Sequence[Mapping[str, Any]],
                 device: str = "cuda", states: Sequence[dict[str, torch.Tensor]] | None = None,
                 num_sms: int | None = None, devices: Sequence[str] | None = None) -> None:  # fmt: skip
        world = len(graphs)
        devs = [torch.device(d) for d in devices] if devices is not None else [torch.device(device)] * world
        if len(devs) != world:
            raise PersistentError(f"{len(devs)} devices for {world} ranks")
        for d in set(devs):
            total = sum(int(s.table.shape[0]) for s, dr in zip(schedules, devs) if dr == d)
            sms = num_sms or torch.cuda.get_device_properties(d).multi_processor_count
            if total > sms:
                n = devs.count(d)
                raise PersistentError(f"{n} ranks on {d} need {total} SM queues together; it has {sms} SMs "
                                      f"(compile each rank for {sms // n} SMs)")  # fmt: skip
        if devices is not None and devs[0].type == "cuda":
            enable_peer_access(devs)
        self.devices = devs
        self.group = PeerGroup(world, devs[0], devices=devs if devices is not None else None)
        states = states if states is not None else [{} for _ in range(world)]
        self.ranks = [PersistentStep(g, s.table, s.counter_expected, p, str(d), states=st, group=self.group, rank=r,
                                     num_sms=num_sms)  # fmt: skip
                      for r, (g, s, p, st, d) in enumerate(zip(graphs, schedules, params, states, devs))]
        self.multi_gpu = devices is not None
        self.streams = [torch.cuda.Stream(d) for d in devs] if devs[0].type == "cuda" else []
        if devs[0].type == "cuda":  # every rank's kernel loaded before any runs: they spin on each other
            for st in self.ranks:
                with self._on(st):
                    st.preload()

    def _on(self, st: PersistentStep) -> Any:
        """The rank's GPU as the current device (ranks on separate GPUs; a no-op on one GPU)."""
        return torch.cuda.device(st.device) if self.multi_gpu else contextlib.nullcontext()

    def launch(self, inputs: Mapping[str, Any]) -> None:
        """Enqueue one step on every rank (no host sync): a benchmark launches several, then syncs."""
        for st, stream in zip(self.ranks, self.streams):
            with self._on(st), torch.cuda.stream(stream):
                st.launch(inputs)

    def synchronize(self) -> None:
        """Wait for every rank's GPU."""
        if self.multi_gpu:
            for d in dict.fromkeys(self.devices):
                torch.cuda.synchronize(d)
        else:
            torch.cuda.synchronize()

    def run(self, inputs: Mapping[str, Any]) -> list[dict[str, torch.Tensor]]:
        """One step on every rank (all launched before any is waited for); outputs per rank."""
        self.launch(inputs)
        self.synchronize()
        for r, st in enumerate(self.ranks):
            try:
                st.check()
            except RuntimeError as e:
                raise RuntimeError(f"rank {r}/{len(self.ranks)}: {e}") from None
        return [st.outputs() for st in self.ranks]
