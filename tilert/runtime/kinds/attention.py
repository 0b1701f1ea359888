"""Attention tasks: the attention_block kind (q/k RoPE, the value scale, the KV append and split-KV
decode attention with its combine).

Tiles: ATTN_SPLIT (kv head, row block, split), split `splits` = the new keys (RoPE + cache write),
then ATTN_COMBINE (kv head, query row), at `tilert.kernels.attention.tiling`'s geometry.
Persistent and eager: tilert/kernels/attention.py where it takes the node (`supports`), else the
eager runtime runs the reference. Plan VM: each split's softmax partial and log-sum-exp over its
keys, merged with the sink by the combine task (the only math here that is not a reference call,
as the TileLang `attn_split_body` / `combine_body` do it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tilert import ops
from tilert.ir.graph import Graph, Node
from tilert.ir.opset.fused import AttentionBlockAttrs
from tilert.ir.registry import ref
from tilert.kernels import attention as attn
from tilert.kernels.common import cdiv, gated
from tilert.kernels.views import ViewSpec
from tilert.ops.attention import visible as attention_visible
from tilert.runtime.eager.context import kernels_on
from tilert.runtime.kinds.registry import Coords, TaskKind, task_kind
from tilert.runtime.persistent.megakernel import PersistentError
from tilert.runtime.persistent.program import Bindings, NodeProgram, early_loads
from tilert.runtime.persistent.vm_rank import PlanVMError, VMRank

# tilelang (the kernel compiler, slow to import) is imported only inside the functions that build kernels


# ---- persistent --------------------------------------------------------------------------------


def program(g: Graph, n: Node, b: Bindings, sms: int) -> NodeProgram:
    """Split-KV decode attention: ATTN_SPLIT (kv head, row block, split) and ATTN_COMBINE (kv head,
    query row) bodies of tilert/kernels/attention.py (cp.async, no TMA); a drafter block's q/k norms
    and non-causal mask inside the same bodies."""
    a = n.a
    q = g.values[n.inputs[0]]
    B = q.shape[0]
    why = attn.supports(a, B, persistent=True)
    if why is not None:
        raise PersistentError(f"attention_block {a}: no persistent attention body for these shapes ({why})")
    cfg = attn.AttnConfig.for_node(a, B, persistent=True)
    kc, vc = b.env[g.values[n.inputs[3]].name], b.env[g.values[n.inputs[4]].name]
    S = kc.shape[-2]
    Hq, Hkv, DK, DV = cfg.q_heads, cfg.kv_heads, cfg.head_dim, cfg.v_head_dim
    SH = kc.shape[0] * Hkv if cfg.mixed else Hkv  # mixed: the pool's slots x kv heads cache rows
    o_part = b.ws((Hkv, cfg.rows, cfg.splits + 1, DV), torch.float32)
    lse = b.ws((Hkv, cfg.rows, cfg.splits + 1), torch.float32)
    sink = b.env[g.values[n.inputs[6]].name].float().contiguous() if cfg.sink else b.ws((max(1, Hq),), torch.float32)
    specs: list[ViewSpec] = [
        ("q", (B, Hq, DK), "bfloat16"), ("k", (B, Hkv, DK), "bfloat16"), ("v", (B, Hkv, DV), "bfloat16"),
        ("k_cache", (SH, S, DK), "bfloat16"), ("v_cache", (SH, S, DV), "bfloat16"), ("positions", (B,), "int32"),
        ("o_part", tuple(o_part.shape), "float32"), ("lse", tuple(lse.shape), "float32"),
        ("sink", (max(1, Hq),), "float32"), ("out", (B, Hq, DV), "bfloat16"),
    ]  # fmt: skip
    ts = [b.activation(g.values[i]) for i in n.inputs[:3]] + [kc, vc, b.env[g.values[n.inputs[5]].name]]
    ts += [o_part, lse, sink, b.activation(g.values[n.outputs[0]])]
    if cfg.mixed:  # each row's cache slot (a step input, last)
        specs.append(("slots", (B,), "int32"))
        ts.append(b.env[g.values[n.inputs[-1]].name])
    norm = cfg.qk_norm_eps is not None
    if norm:  # the q and k head-norm weights (after the sink)
        for nm, i in (("q_norm", 6 + int(cfg.sink)), ("k_norm", 7 + int(cfg.sink))):
            w = b.env[g.values[n.inputs[i]].name].to(torch.bfloat16).contiguous()
            specs.append((nm, (DK,), "bfloat16"))
            ts.append(w)
    for o, st in zip(n.outputs[1:], (kc, vc)):  # the updated caches are the caches
        b.env[g.values[o].name] = st

    early = early_loads("attention")

    def bodies() -> dict[str, Any]:
        import tilelang.language as T_

        split, combine = attn.make_bodies(cfg, tma=False, gated=early)
        if cfg.mixed:

            @T_.macro
            def split_task(V, h, rb, s, gate):
                split(V.q, V.k, V.v, V.k_cache, V.v_cache, V.positions, V.slots, V.o_part, V.lse, h, rb, s, gate)

            @T_.macro
            def split_task_plain(V, h, rb, s):
                split(V.q, V.k, V.v, V.k_cache, V.v_cache, V.positions, V.slots, V.o_part, V.lse, h, rb, s)

            @T_.macro
            def combine_task(V, h, r, c2):
                combine(V.positions, V.slots, V.sink, V.o_part, V.lse, V.out, h, r)

        elif norm:  # a drafter block: the head norms' weights too

            @T_.macro
            def split_task(V, h, rb, s, gate):
                split(V.q, V.k, V.v, V.k_cache, V.v_cache, V.positions, V.o_part, V.lse, h, rb, s, gate,
                      Qn=V.q_norm, Kn=V.k_norm)  # fmt: skip

            @T_.macro
            def split_task_plain(V, h, rb, s):
                split(V.q, V.k, V.v, V.k_cache, V.v_cache, V.positions, V.o_part, V.lse, h, rb, s,
                      Qn=V.q_norm, Kn=V.k_norm)  # fmt: skip

            @T_.macro
            def combine_task(V, h, r, c2):
                combine(V.positions, V.sink, V.o_part, V.lse, V.out, h, r)

        else:

            @T_.macro
            def split_task(V, h, rb, s, gate):  # gated: its first KV tiles fly while it waits for q
                split(V.q, V.k, V.v, V.k_cache, V.v_cache, V.positions, V.o_part, V.lse, h, rb, s, gate)

            @T_.macro
            def split_task_plain(V, h, rb, s):
                split(V.q, V.k, V.v, V.k_cache, V.v_cache, V.positions, V.o_part, V.lse, h, rb, s)

            @T_.macro
            def combine_task(V, h, r, c2):
                combine(V.positions, V.sink, V.o_part, V.lse, V.out, h, r)

        return {"ATTN_SPLIT": gated(split_task) if early else split_task_plain, "ATTN_COMBINE": combine_task}

    return NodeProgram(("attention", cfg, S, early, attn.q_load_choice()), specs, bodies, ts,
                       ("ATTN_SPLIT", "ATTN_COMBINE"))  # fmt: skip


# ---- plan VM -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Splits:
    """A node's split geometry this step: kv heads, query rows per kv head (G per token), rows per
    block, NS splits over the old keys [lo, start) of `per` key tiles of BN keys (n_used of them
    reach a key), plus split NS for the new keys; window W. A mixed step (slotted node) has one per
    row block: the chunk of tokens t0..t1-1 of one sequence (rows a..t1-1 of the step are its new
    keys so far; slot `slot`; `active`: whether row block t0 starts a chunk), start = its sequence's
    first position in the step."""

    T: int
    Hkv: int
    G: int
    rows: int
    bm: int
    NS: int
    W: int
    start: int
    lo: int
    per: int
    BN: int
    n_used: int
    D: int
    Dv: int
    t0: int = 0
    t1: int = 0
    first: int = 0
    slot: int | None = None
    active: bool = True

    @staticmethod
    def of(n: Node, ins: list[Any], rb: int = 0) -> Splits:
        a, q, kc = n.a, ins[0], ins[3]
        T, Hkv = q.shape[0], kc.shape[-3]
        rows, bm, NS = attn.tiling(a, T, Hkv)
        G = a.heads // Hkv
        chunk: dict[str, Any] = {}
        if a.slotted:  # the chunk row block rb (a token) would take: as the kernel's chunk_of
            slots = ins[-1].long().tolist()
            first = rb
            while first > 0 and slots[first - 1] == slots[rb]:
                first -= 1
            end = rb + 1
            while end < T and slots[end] == slots[rb]:
                end += 1
            tpb = max(1, bm // G)
            chunk = dict(t0=rb, t1=min(rb + tpb, end), first=first, slot=slots[rb], active=(rb - first) % tpb == 0)
        start, W, BN = int(ins[5][chunk.get("first", 0)]), a.window, attn.BLOCK_N
        lo = max(start - W + 1, 0) if W else 0  # the block's first row sees keys start-W+1 .. start
        tiles = cdiv(start - lo, BN)
        per = max(cdiv(tiles, NS), attn.PERSISTENT_MIN_TILES)
        return Splits(T, Hkv, G, rows, bm, NS, W, start, lo, per, BN, cdiv(tiles, per), a.head_dim, a.v_head_dim,
                      **chunk)  # fmt: skip


def _partials(rk: VMRank, i: int, g: Splits) -> dict[str, Any]:
    """The split partials o [Hkv, rows, NS + 1, Dv] and lse [Hkv, rows, NS + 1], poisoned."""
    ws = rk.workspace(i)
    if "o" not in ws:
        ws["o"] = torch.full((g.Hkv, g.rows, g.NS + 1, g.Dv), float("nan"))
        ws["lse"] = torch.full((g.Hkv, g.rows, g.NS + 1), float("nan"))
    return ws


def split_tile(rk: VMRank, i: int, n: Node, ins: list[Any], c: Coords) -> None:
    a, ctx = n.a, rk.ctx()
    h, rb, s = c
    g = Splits.of(n, ins, rb)
    blocks = attn.row_blocks(a, g.T, g.Hkv)
    if not (h < g.Hkv and rb < blocks and s <= g.NS):
        raise PlanVMError(f"attention split tile {c} outside ({g.Hkv}, {blocks}, {g.NS})")
    if not g.active:
        return  # a mixed step's row block that starts no chunk exits without writing
    q, k, v, kcache, vcache, pos = ins[:6]
    extra = ins[6:]
    G, D, Dv, T = g.G, g.D, g.Dv, g.T
    eps = a.qk_norm_eps
    norms = extra[int(a.has_sink) : int(a.has_sink) + 2] if eps is not None else ()
    if g.slot is not None:  # a mixed step: this chunk's sequence's cache slot
        kcache, vcache = kcache[g.slot], vcache[g.slot]
    rope = dict(head_dim=D, rope_dim=a.rope_dim, theta=a.theta)
    qh = q[:, h * G * D : (h + 1) * G * D]
    if eps is not None:
        qh = ref("head_rms_norm")(ctx, qh, norms[0], heads=G, eps=eps)[0]
    qh = ref("rope")(ctx, qh, pos, heads=G, **rope)[0].reshape(T * G, D)
    # rows of this block, the tokens whose keys it appends, and the new keys it sees
    if g.slot is not None:
        r0, r1, mine, new = g.t0 * G, g.t1 * G, slice(g.t0, g.t1), slice(g.first, g.t1)
    else:
        r0, r1, mine, new = rb * g.bm, min(g.rows, (rb + 1) * g.bm), slice(0, T if rb == 0 else 0), slice(0, T)
    qr = qh[r0:r1]
    qpos = pos.long()[torch.arange(r0, r1) // G]
    if s < g.NS:
        if s >= g.n_used:
            return  # an unused split exits without writing
        s_lo = g.lo + s * g.per * g.BN
        s_hi = min(s_lo + g.per * g.BN, g.start)
        keys, vals, kpos = kcache[h, s_lo:s_hi], vcache[h, s_lo:s_hi], torch.arange(s_lo, s_hi)
    else:  # the new keys: rope on k, v scale, and the cache append of the block's own tokens
        kh = k[:, h * D : (h + 1) * D]
        if eps is not None:
            kh = ref("head_rms_norm")(ctx, kh, norms[1], heads=1, eps=eps)[0]
        kh = ref("rope")(ctx, kh, pos, heads=1, **rope)[0]
        vh = v[:, h * Dv : (h + 1) * Dv]
        if a.v_scale is not None:
            vh = ref("scale")(ctx, vh, factor=a.v_scale)[0]
        m = mine.stop - mine.start
        if m:
            ops.kv_append(kcache[h : h + 1], vcache[h : h + 1], kh[mine].reshape(m, 1, D), vh[mine].reshape(m, 1, Dv),
                          pos[mine])  # fmt: skip
        keys, vals, kpos = kh[new].float(), vh[new].float(), pos[new].long()
    o, lse = _split_partial(qr, qpos, keys, vals, kpos, a.scale, g.W, a.causal)
    ws = _partials(rk, i, g)
    ws["o"][h, r0:r1, s] = o
    ws["lse"][h, r0:r1, s] = lse


def combine_tile(rk: VMRank, i: int, n: Node, ins: list[Any], c: Coords) -> None:
    h, row, _ = c
    g = Splits.of(n, ins, row // (n.a.heads // ins[3].shape[-3]))  # mixed: the splits of the row's sequence
    if not (h < g.Hkv and row < g.rows):
        raise PlanVMError(f"attention combine tile {c} outside ({g.Hkv}, {g.rows})")
    ws = _partials(rk, i, g)
    slots = [*range(g.n_used), g.NS]
    G, Dv = g.G, g.Dv
    t, hq = row // G, h * G + row % G
    sink = ins[6][hq] if n.a.has_sink else None
    out = rk.env[n.outputs[0]]
    out[t, hq * Dv : (hq + 1) * Dv] = _merge(ws["o"][h, row, slots], ws["lse"][h, row, slots], sink)


def tile(rk: VMRank, opcode: str, i: int, n: Node, ins: list[Any], c: Coords) -> None:
    (split_tile if opcode == "ATTN_SPLIT" else combine_tile)(rk, i, n, ins, c)


def _split_partial(
    q: torch.Tensor, qpos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kpos: torch.Tensor,
    scale: float, window: int, causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """One split of flash-decoding: (softmax-normalised partial output, log-sum-exp) of rows q over
    keys k at positions kpos, with the mask of tilert.ops.attention; rows with no visible key give
    (0, -inf)."""
    s = (q.float() @ k.float().T) * scale
    s = s.masked_fill(~attention_visible(qpos, kpos, window, causal), float("-inf"))
    m = s.amax(-1, keepdim=True) if s.shape[1] else torch.full((s.shape[0], 1), float("-inf"))
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    den = e.sum(-1, keepdim=True)
    o = torch.where(den > 0, (e @ v.float()) / den.clamp_min(1e-30), torch.zeros(()))
    lse = torch.where(den[:, 0] > 0, m[:, 0] + torch.log(den[:, 0].clamp_min(1e-30)), torch.tensor(float("-inf")))
    return o, lse


def _merge(o: torch.Tensor, lse: torch.Tensor, sink: torch.Tensor | None) -> torch.Tensor:
    """Combine split partials [S, Dv] with their log-sum-exps [S] and the sink logit (denominator only)."""
    m = lse.max()
    if sink is not None:
        m = torch.maximum(m, sink.float())
    m = torch.where(torch.isfinite(m), m, torch.zeros(()))
    w = torch.exp(lse - m)
    tot = w.sum() + (torch.exp(sink.float() - m) if sink is not None else 0.0)
    return (w[:, None] * o).sum(0) / tot


# ---- eager -----------------------------------------------------------------------------------------


def attention_block(ctx, q, k, v, k_cache, v_cache, pos, *extra, **kw):
    a = AttentionBlockAttrs(**kw)
    take = kernels_on(ctx) and q.is_cuda and k_cache.dtype == torch.bfloat16 and attn.supports(a, q.shape[0]) is None
    if not take:
        return ref("attention_block")(ctx, q, k, v, k_cache, v_cache, pos, *extra, **kw)
    cfg = attn.AttnConfig.for_node(a, q.shape[0])
    H, Hkv, D, Dv, B = a.heads, a.kv_heads, a.head_dim, a.v_head_dim, q.shape[0]
    if a.v_scale is not None:
        v = v.float() * a.v_scale
    sink = extra[0].float().contiguous() if a.has_sink else None
    slots = extra[-1].to(torch.int32) if a.slotted else None  # a mixed step: each row's cache slot
    bf = torch.bfloat16
    o = attn.run(cfg, q.to(bf).reshape(B, H, D), k.to(bf).reshape(B, Hkv, D), v.to(bf).reshape(B, Hkv, Dv), k_cache,
                 v_cache, pos.to(torch.int32), sink, validate=False, slots=slots)  # fmt: skip
    return (o.reshape(B, H * Dv), k_cache, v_cache)


def kernel_builds(g: Graph, n: Node) -> dict[Any, Callable[[], Any]]:
    T = g.values[n.inputs[0]].shape[0]
    if attn.supports(n.a, T) is not None:
        return {}
    cfg = attn.AttnConfig.for_node(n.a, T)
    return {("attn", cfg): lambda: attn.compiled(cfg)}


@task_kind
class Attention(TaskKind):
    kinds = ("attention_block",)
    opcodes = ("ATTN_SPLIT", "ATTN_COMBINE")
    eager = {"attention_block": attention_block}
    program = program
    tile = tile
    kernel_builds = kernel_builds
