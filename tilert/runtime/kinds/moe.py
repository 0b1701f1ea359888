"""MoE tasks: the fused_moe_* kinds (router, top-k, experts, weighted combine, cross-rank reduce).

Tiles at the kernel's coordinates (`tilert.kernels.moe.tiling`, passes/tile.py): MOE_ROUTER (e_tile)
[-> MOE_TOPK] -> MOE_GATE_UP (task) -> MOE_DOWN (task) -> MOE_REDUCE (column block); gate/up and down
tasks stride over the items of the active slots the top-k lists on the device. The top-k runs in the
router task that arrives last (an arrival count; no stage of its own), or with TILERT_MOE_TOPK=task
in a MOE_TOPK task that waits for every router task (moe.topk_place). Persistent:
tilert/kernels/moe.py's bodies (MXFP4 expert stacks; the gate/up and down tasks run the MXFP4
mainloop, or with TILERT_MOE_BODY=gemv the streaming GEMV's expert tasks, moe.make_gemv_tasks), the
reduce through peer inboxes when ranks share a PeerGroup. Eager: the standalone fused-MoE kernel
where `moe.supports` holds, else the reference. Plan VM: the kernel's buffers (L, Idx, Wt, TokW,
List, Count, Hb, Y), poisoned; the routers zero Y, the down tasks add into it; MOE_REDUCE is a
collective only for a reducing node over several ranks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch

from tilert import ops
from tilert.ir.graph import Graph, Node
from tilert.ir.opset.fused import MOE_CORE, MoeAttrs, split_extras
from tilert.ir.registry import ref
from tilert.kernels import elementwise as ew
from tilert.kernels import gemv, moe
from tilert.kernels.common import cdiv
from tilert.kernels.elementwise import COLLECTIVE_COLS
from tilert.kernels.views import ViewSpec, prefixed
from tilert.ops.qtensor import QTensor
from tilert.runtime.eager.context import distributed, kernels_on, norm, reduce_partial, rows_bf16, solo
from tilert.runtime.kinds.collective import peer_allreduce, reduce_complete
from tilert.runtime.kinds.registry import Coords, TaskKind, task_kind
from tilert.runtime.persistent.megakernel import PersistentError
from tilert.runtime.persistent.program import Bindings, NodeProgram, tl_dtype
from tilert.runtime.persistent.vm_rank import INT_POISON, PlanVMError, VMRank, column_block

# tilelang (the kernel compiler, slow to import) is imported only inside the functions that build kernels

KINDS = ("fused_moe_bf16", "fused_moe_fp8", "fused_moe_mxfp4")
MOE_STAGE_BYTES = 96 * 1024  # the most shared memory an MoE body stages its x rows in (B = 8 at H = 6144)


# ---- persistent --------------------------------------------------------------------------------


def program(g: Graph, n: Node, b: Bindings, sms: int) -> NodeProgram:
    """Fused MoE as five stages: router (with the norm prologue), top-k, gate/up and down tasks that
    stride over the active slots' items (moe.MoeTiling) into an fp32 partial, reduce per column block
    (+ residual)."""
    a = n.a
    x, gate, bias, gu, dn = (g.values[i] for i in n.inputs[:5])
    T, H = x.shape
    E, EL, k = gate.shape[0], a.n_local, a.top_k
    I2 = gu.shape[1]
    In = I2 // 2
    w_gu, w_d = b.env[gu.name], b.env[dn.name]
    if not (isinstance(w_gu, QTensor) and w_gu.fmt == "mxfp4" and isinstance(w_d, QTensor)):
        raise PersistentError(f"{n.op}: the persistent MoE body needs MXFP4 expert stacks")
    if (why := moe.supports(T, H, In, a.n_group, persistent=True)) is not None:
        raise PersistentError(f"{n.op} T={T} H={H} I={In}: off the MoE body's contract: {why}")
    # x (gate/up) and Hb[slot] (down) staged in shared memory: the mainloop then reads x there
    # instead of paying an L2 round trip per k chunk
    stage_x, stage_h = T * H * 2 <= MOE_STAGE_BYTES, T * In * 2 <= MOE_STAGE_BYTES
    eps = a.norm_eps
    # expert_offset 0 in the kernel's config: the rank's offset is a view (every rank, one kernel)
    cfg = moe.Config.for_node(a, T, H, In, E, expert_offset=0, cta_threads=256, x_stage=stage_h, norm_eps=eps)
    til = moe.tiling(T, H, In, EL, k)  # the expert body: TILERT_MOE_BODY (moe.body_choice)
    extra = list(n.inputs[5:])
    gamma = b.env[g.values[extra.pop(0)].name] if eps is not None else None
    norm_w = gamma.to(torch.bfloat16).contiguous() if gamma is not None else None
    res = b.activation(g.values[extra.pop(0)]) if a.residual else None
    TP, S = moe.TP, cfg.max_slots
    xa = b.activation(x)
    xh = b.ws((TP, H), torch.bfloat16) if eps is not None else xa
    out = b.activation(g.values[n.outputs[0]])
    world = a.world if a.reduce else 1
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
        ("residual", (ts[17].shape[0], H), "bfloat16"), ("out", (out.shape[0], H), tl_dtype(out)),
    ]  # fmt: skip
    specs.append(("inbox", tuple(ts[-1].shape), "float32"))
    peer = None
    if b.group is not None and world > 1:  # the reduce is a real all-reduce over the ranks' Y
        peer = peer_allreduce(g, n, b, "MOE_REDUCE", ts[15], res, out, T, H)
        specs, ts = specs + prefixed("peer", peer.specs), ts + peer.tensors
    specs.append(("expert_offset", (1,), "int32"))
    ts.append(b.ints(a.expert_offset))
    n_router = cdiv(E, moe.ROUTER_E)
    if til.topk_in_router:  # the router tasks count their arrivals here; the last one runs the top-k
        specs.append(("arrivals", (1,), "int32"))
        ts.append(b.arrival_counter())

    def bodies() -> dict[str, Any]:
        import tilelang.language as T_

        router_tile, route_body, gate_up_tile, down_tile = moe.make_bodies(cfg)
        if til.gemv is not None:  # the streaming GEMV's expert tasks (moe.make_gemv_tasks)
            gate_up_task, down_task = moe.make_gemv_tasks(cfg, til, import_prelude=False)
        reduce_body = ew.make_body(ew.AllReduceConfig(T, H, world, res is not None, "float32", "bfloat16",
                                                      tl_dtype(out)))  # fmt: skip
        peer_body = None if peer is None else peer.bodies()["MOE_REDUCE"]

        # A stage is read by every item of the task's loop, and the items' own buffers (the mainloop's
        # reduction, c_s) are written in between. TileLang's merge places buffers by first and last
        # use in statement order, so a stage touched last inside the loop could share their bytes
        # from the second item on: `keep` touches it once more after the loop (Count is never
        # negative), which makes it live across the whole loop.
        @T_.macro
        def keep(buf, V):
            if V.count[0] < 0:
                buf[0, 0] = T_.cast(0, "bfloat16")

        # With the fused pre-MoE RMSNorm the router tasks read the raw rows and the router weight
        # times gamma (bound below) and scale their logits by rstd (moe.router_tile); each writes
        # its slice of the normalised bf16 rows to xh for the gate/up tasks (which wait for every
        # router task, the top-k's too).
        @T_.macro
        def router_logits(V, e_tile):
            if eps is not None:
                router_tile(V.x, V.router, V.logits, V.y, e_tile, V.gamma, V.xh)
            else:
                router_tile(V.xh, V.router, V.logits, V.y, e_tile, None, None)

        @T_.macro
        def topk(V, c0, c1, c2):
            route_body(V.logits, V.bias, V.idx, V.wt, V.tokw, V.list, V.count, V.expert_offset[0])

        # The top-k in the router's last-arriving task (moe.topk_place "router"): after its logits,
        # thread 0 adds one arrival (acq_rel at device scope: the CTA's logits, ordered before it by
        # the barrier, are released; the other tasks' are acquired by the task that arrives last,
        # which then runs the top-k). Arrivals are never reset between steps: n_router per step, so
        # the last one of each step sees a multiple of n_router. Its task signals only after the
        # top-k, and the gate/up tasks wait for every router task, so they see List and Count.
        @T_.macro
        def router_then_topk(V, e_tile, c1, c2):
            router_logits(V, e_tile)
            last = T_.alloc_local((1,), "int32")
            last[0] = 0
            T_.sync_threads()
            if T_.get_thread_binding() == 0:
                prev = T_.atomic_add(V.arrivals[0], 1, memory_order="acq_rel", return_prev=True)
                last[0] = T_.if_then_else((prev + 1) % n_router == 0, 1, 0)
            if T_.call_extern("int32", "__syncthreads_or", last[0]) != 0:
                topk(V, 0, 0, 0)

        @T_.macro
        def router(V, e_tile, c1, c2):
            router_logits(V, e_tile)

        per_slot = til.down_tiles * til.down_split

        @T_.macro
        def gate_up_gemv(V, j, c1, c2):
            gate_up_task(V.xh, V.gu, V.gu_s, V.list, V.count, V.hb, j)

        @T_.macro
        def down_gemv(V, j, c1, c2):
            down_task(V.hb, V.dn, V.dn_s, V.list, V.count, V.tokw, V.y, j)

        @T_.macro
        def gate_up(V, j, c1, c2):  # items j, j + gu_tasks, ... of the Count x gu_tiles active ones
            count = T_.alloc_var("int32")  # read once: the items' bounds would re-read it otherwise
            count = V.count[0]
            if stage_x:  # the x rows once per task (every item of the task reads all of them)
                xs = T_.alloc_shared((T, H), "bfloat16")
                for i, c in T_.Parallel(T, H):
                    xs[i, c] = V.xh[i, c]
                T_.sync_threads()
            steps = T_.alloc_var("int32")  # this task's items: the loop runs no step past them
            steps = T_.min((count * til.gu_tiles - j + til.gu_tasks - 1) // til.gu_tasks, til.gu_steps)
            for u in T_.serial(steps):
                w = j + u * til.gu_tasks
                if w < count * til.gu_tiles:
                    gate_up_tile(xs if stage_x else V.xh, V.gu, V.gu_s, V.list, V.count, V.hb, w // til.gu_tiles,
                                 w % til.gu_tiles)  # fmt: skip
            if stage_x:
                keep(xs, V)

        @T_.macro
        def down(V, j, c1, c2):
            count = T_.alloc_var("int32")
            count = V.count[0]
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
                            hs[i, c] = V.hb[w // per_slot, i, c]
                        staged = w // per_slot
                    T_.sync_threads()
                if w < count * per_slot:
                    down_tile(hs if stage_h else V.hb, V.dn, V.dn_s, V.list, V.count, V.tokw, V.y, w // per_slot,
                              (w % per_slot) // til.down_split, w % til.down_split)  # fmt: skip
            if stage_h:
                keep(hs, V)

        @T_.macro
        def reduce(V, c, c1, c2):
            if peer is None:
                reduce_body(V.y, V.residual, V.inbox, V.out, c)
            else:
                peer_body(V.part("peer"), c, 0, 0)

        if til.gemv is not None:
            gate_up, down = gate_up_gemv, down_gemv
        if til.topk_in_router:
            return {"MOE_ROUTER": router_then_topk, "MOE_GATE_UP": gate_up, "MOE_DOWN": down, "MOE_REDUCE": reduce}
        return {"MOE_ROUTER": router, "MOE_TOPK": topk, "MOE_GATE_UP": gate_up, "MOE_DOWN": down, "MOE_REDUCE": reduce}

    key = ("moe", cfg, til, eps, res is not None, world, xa.shape[0], out.shape[0], tl_dtype(out),
           None if peer is None else peer.key)  # fmt: skip
    wr = ts[2]

    def prefetch(name: str, e_tile: int, c1: int, c2: int) -> tuple[int, int, int, int] | None:
        if name == "MOE_TOPK":  # the selection bias (its only weight)
            return ts[3].data_ptr(), E * 4, 1, E * 4
        if name != "MOE_ROUTER":  # the experts' rows are known only on the device, after the top-k
            return None
        e0 = e_tile * moe.ROUTER_E
        return wr.data_ptr() + e0 * H * 4, H * 4, min(moe.ROUTER_E, E - e0), H * 4

    prelude = None if til.gemv is None else gemv.BULK_PRELUDE if til.gemv.gu.bulk else gemv.GEMV_PRELUDE
    return NodeProgram(key, specs, bodies, ts, til.stages, exact=True, prefetch=prefetch, prelude=prelude)


# ---- plan VM -------------------------------------------------------------------------------------


def _rows(rk: VMRank, n: Node, ins: list[Any]) -> torch.Tensor:
    """x, or with a norm prologue (norm_eps) rms_norm(x): the router and gate/up tasks each
    normalise the whole rows they read (no extra task, no extra buffer)."""
    norm_w, _ = split_extras(tuple(ins[MOE_CORE:]), n.a.norm_eps, n.a.residual)
    x = ins[0]
    return x.float() if norm_w is None else ref("rms_norm")(rk.ctx(), x, norm_w, eps=n.a.norm_eps)[0]


def _tiling(n: Node, ins: list[Any]) -> moe.MoeTiling:
    (T, H), In = ins[0].shape, ins[4].shape[2]
    return moe.tiling(T, H, In, n.a.n_local, n.a.top_k)


def _buffers(rk: VMRank, i: int, n: Node, ins: list[Any]) -> dict[str, Any]:
    """The kernel's buffers (tilert/kernels/moe.py), poisoned: L [T, E] logits, Idx/Wt [T, k],
    TokW [E_local, max(TP, T)], List [E_local], Count [1], Hb [max_slots, T, In] (fp32 here, bf16
    on the GPU), Y [T, H] fp32 (zeroed by the router tasks, then the down tasks' atomics)."""
    ws = rk.workspace(i)
    if "L" not in ws:
        T, H = ins[0].shape
        E, k, EL, In = ins[1].shape[0], n.a.top_k, n.a.n_local, ins[4].shape[2]
        nan = float("nan")
        ws["L"] = torch.full((T, E), nan)
        ws["Idx"] = torch.full((T, k), INT_POISON, dtype=torch.int32)
        ws["Wt"] = torch.full((T, k), nan)
        ws["TokW"] = torch.full((EL, max(moe.TP, T)), nan)
        ws["List"] = torch.full((EL,), INT_POISON, dtype=torch.int32)
        ws["Count"] = torch.full((1,), INT_POISON, dtype=torch.int32)
        ws["Hb"] = torch.full((_tiling(n, ins).max_slots, T, In), nan)
        ws["Y"] = torch.full((T, H), nan)
    return ws


def router_tile(rk: VMRank, i: int, n: Node, ins: list[Any], c: Coords) -> None:
    """router_tile(e_tile): L[:, 4 experts] and the zeroing of this task's slice of Y; with the top-k
    in the router (moe.topk_place), the step's last router task to arrive then runs the top-k."""
    ws, ctx = _buffers(rk, i, n, ins), rk.ctx()
    E = ins[1].shape[0]
    if c[0] * moe.ROUTER_E >= E:
        raise PlanVMError(f"MoE router tile {c} outside ({cdiv(E, moe.ROUTER_E)})")
    rows = slice(c[0] * moe.ROUTER_E, min(E, (c[0] + 1) * moe.ROUTER_E))
    ws["L"][:, rows] = ref("matmul")(ctx, _rows(rk, n, ins), ins[1][rows], out_dtype="f32")[0]
    y = ws["Y"].view(-1)
    zper = cdiv(y.numel(), cdiv(E, moe.ROUTER_E))
    y[c[0] * zper : (c[0] + 1) * zper] = 0.0
    if _tiling(n, ins).topk_in_router:
        ws["arrivals"] = (ws.get("arrivals", 0) + 1) % cdiv(E, moe.ROUTER_E)
        if ws["arrivals"] == 0:
            topk_tile(rk, i, n, ins, (0, 0, 0))


def topk_tile(rk: VMRank, i: int, n: Node, ins: list[Any], c: Coords) -> None:
    """route_body: Idx/Wt, TokW (a token's weight per local expert, 0 if not routed there), the
    active list List[0:Count] of local experts with >= 1 token, in increasing order."""
    ws, a = _buffers(rk, i, n, ins), n.a
    idx, wt = ops.route(ws["L"], ins[2], top_k=a.top_k, n_group=a.n_group, topk_group=a.topk_group,
                        normalize=a.normalize, scaling=a.scaling)  # fmt: skip
    ws["Idx"][...], ws["Wt"][...] = idx, wt
    local = idx.long() - a.expert_offset
    mine = (local >= 0) & (local < a.n_local)
    tok = torch.arange(idx.shape[0])[:, None].expand_as(idx)
    ws["TokW"].zero_()
    ws["TokW"][local[mine], tok[mine]] = wt[mine].float()
    act = torch.unique(local[mine])  # sorted
    ws["List"][: len(act)] = act.to(torch.int32)
    ws["Count"][0] = len(act)


def _count(ws: dict[str, Any], c: Coords) -> int:
    """Count (active slots) as the top-k task wrote it; List[0:Count] are their local experts."""
    count = int(ws["Count"][0])
    if count == INT_POISON:
        raise PlanVMError(f"MoE expert task {c} ran before the top-k task wrote the active-expert list")
    return count


def gate_up_tile(rk: VMRank, i: int, n: Node, ins: list[Any], c: Coords) -> None:
    """Gate/up task c[0]: its items (slot, n_tile) of the active slots (moe.MoeTiling.gu_items),
    each Hb[slot, :, gu_cols(n_tile)] = silu(g) * u for expert List[slot]."""
    ws, geo = _buffers(rk, i, n, ins), _tiling(n, ins)
    if c[0] >= geo.gu_tasks or c[1] or c[2]:
        raise PlanVMError(f"MoE gate/up task {c} outside ({geo.gu_tasks}, 1, 1)")
    w = rk.weight(n.inputs[3])  # [E_local, 2In, H]: gate rows, then up rows
    off = n.a.expert_offset
    x = _rows(rk, n, ins)
    for slot, nt in geo.gu_items(c[0], _count(ws, c)):
        e = int(ws["List"][slot])
        lo, hi = geo.gu_cols(nt)
        we = torch.cat([w[:, lo:hi], w[:, geo.inter + lo : geo.inter + hi]], dim=1)
        every = torch.full((x.shape[0], 1), e + off, dtype=torch.int32)  # every token through expert e
        ws["Hb"][slot, :, lo:hi] = ops.silu_mul(ops.expert_linear(x, we, every, expert_offset=off))[:, 0]


def down_tile(rk: VMRank, i: int, n: Node, ins: list[Any], c: Coords) -> None:
    """Down task c[0]: its items (slot, n_tile, k split), each Y[:, down_cols] += (Hb[slot] @
    Wdown[e]^T) x TokW[e, t] (the GPU's fp32 atomics)."""
    ws, geo, a = _buffers(rk, i, n, ins), _tiling(n, ins), n.a
    if c[0] >= geo.down_tasks or c[1] or c[2]:
        raise PlanVMError(f"MoE down task {c} outside ({geo.down_tasks}, 1, 1)")
    off, T = a.expert_offset, geo.tokens
    wd = rk.weight(n.inputs[4])
    for slot, j, q in geo.down_items(c[0], _count(ws, c)):
        e = int(ws["List"][slot])
        (lo, hi), (klo, khi) = geo.down_cols(j), geo.down_k(q)
        every = torch.full((T, 1), e + off, dtype=torch.int32)
        y = ops.expert_linear(ws["Hb"][slot][:, klo:khi], wd[:, lo:hi, klo:khi], every, expert_offset=off)
        tokw = ws["TokW"][e, :T, None]
        ws["Y"][:, lo:hi] += ops.moe_combine(y, tokw, every, expert_offset=off, n_local=a.n_local)


def tile(rk: VMRank, opcode: str, i: int, n: Node, ins: list[Any], c: Coords) -> None:
    if opcode == "MOE_REDUCE":  # no all-reduce: no peers to wait for
        return complete(rk, opcode, i, n, ins, c, [arrive(rk, opcode, i, n, ins, c)])
    if opcode == "MOE_TOPK" and _tiling(n, ins).topk_in_router:
        raise PlanVMError("a MOE_TOPK task in a plan whose router tasks run the top-k (TILERT_MOE_TOPK=router)")
    {"MOE_ROUTER": router_tile, "MOE_TOPK": topk_tile, "MOE_GATE_UP": gate_up_tile, "MOE_DOWN": down_tile}[opcode](
        rk, i, n, ins, c)  # fmt: skip


def collective(n: Node, opcode: str) -> bool:
    return opcode == "MOE_REDUCE" and n.a.reduce and n.a.world > 1


def arrive(rk: VMRank, opcode: str, i: int, n: Node, ins: list[Any], c: Coords) -> Any:
    """This rank's block of Y, the partial sum over its experts."""
    lo, hi = column_block(n, c, COLLECTIVE_COLS, rk.env[n.outputs[0]].shape[-1])
    return _buffers(rk, i, n, ins)["Y"][:, lo:hi].clone()


def complete(rk: VMRank, opcode: str, i: int, n: Node, ins: list[Any], c: Coords, parts: list[Any]) -> None:
    reduce_complete(rk, n, c, parts, ins[-1] if n.a.residual else None)


# ---- eager -----------------------------------------------------------------------------------------


def fused_moe(ctx, x, gate, bias, w_gu, w_d, *extra, **kw):
    a = MoeAttrs(**kw)
    norm_w, res = split_extras(extra, a.norm_eps, a.residual)
    if a.reduce and a.world > 1 and not solo(ctx) and not distributed(ctx):
        raise NotImplementedError("fused_moe with a cross-rank reduce needs a distributed context or solo mode")
    cfg = None
    if kernels_on(ctx) and x.is_cuda and isinstance(w_gu, QTensor) and w_gu.fmt == "mxfp4":
        cfg = moe_config(x.shape[0], x.shape[-1], w_d.shape[-1], gate.shape[0], a)
    if cfg is None:  # the reference of this rank's partial, then the collective and the residual here
        local = dataclasses.replace(a, reduce=False, residual=False)
        norm_arg = () if norm_w is None else (norm_w,)
        y = ref("fused_moe_mxfp4")(ctx, x, gate, bias, w_gu, w_d, *norm_arg, **local.kwargs())[0]
    else:
        h = rows_bf16(norm(ctx, x, norm_w, a.norm_eps))
        y, _, _ = moe.run(h, gate, bias, (w_gu.data, w_gu.scales), (w_d.data, w_d.scales), top_k=a.top_k,
                          expert_offset=a.expert_offset, normalize=a.normalize, scaling=a.scaling, cfg=cfg)  # fmt: skip
    if a.reduce:
        y = reduce_partial(ctx, y)
    return (y if res is None else res.float() + y,)


def moe_config(tokens: int, hidden: int, inter: int, n_experts: int, a: MoeAttrs) -> moe.Config | None:
    """The standalone fused-MoE kernel's config for a node, or None when it does not take it."""
    if moe.supports(tokens, hidden, inter, a.n_group) is not None:
        return None
    return moe.Config.for_node(a, tokens, hidden, inter, n_experts)


def kernel_builds(g: Graph, n: Node) -> dict[Any, Callable[[], Any]]:
    x, gate, _, _, d = (g.values[v] for v in n.inputs[:MOE_CORE])
    cfg = moe_config(x.shape[0], x.shape[1], d.shape[2], gate.shape[0], n.a) if n.op == "fused_moe_mxfp4" else None
    return {} if cfg is None else {("moe", cfg): lambda: moe.compiled(cfg)}


@task_kind
class Moe(TaskKind):
    kinds = KINDS
    opcodes = ("MOE_ROUTER", "MOE_TOPK", "MOE_GATE_UP", "MOE_DOWN", "MOE_REDUCE")
    eager = {"fused_moe_mxfp4": fused_moe}
    program = program
    tile = tile
    collective = collective
    arrive = arrive
    complete = complete
    kernel_builds = kernel_builds
