"""Collective tasks: all_reduce, all_reduce_residual and all_gather between the ranks.

Tiles: ALL_REDUCE and ALL_GATHER over column blocks of `COLLECTIVE_COLS` (tilert/kernels/
elementwise.py). Persistent: with the ranks in one PeerGroup, tilert/kernels/peer_collective.py's
bodies (push into every rank's inbox, arrive, wait, combine in rank order); without one (solo,
world > 1) rank 0's partial plus a ring's traffic through a local inbox. Eager: torch.distributed
through the rank context, or solo's local stand-in. Plan VM: every task is a rendezvous (arrive
with the local block, wait for every rank, combine); MOE_REDUCE completes the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tilert.ir.graph import Graph, Node
from tilert.ir.opset.fused import PeerValues
from tilert.ir.registry import ref
from tilert.kernels import elementwise as ew
from tilert.kernels import peer_collective as pc
from tilert.kernels.elementwise import COLLECTIVE_COLS
from tilert.runtime.eager.context import distributed, solo, solo_all_reduce
from tilert.runtime.kinds.elementwise import elementwise_program
from tilert.runtime.kinds.registry import Coords, TaskKind, task_kind
from tilert.runtime.persistent.megakernel import PersistentError
from tilert.runtime.persistent.program import Bindings, NodeProgram, tl_dtype, view_spec
from tilert.runtime.persistent.vm_rank import PlanVMError, VMRank, column_block

# tilelang (the kernel compiler, slow to import) is imported only inside the functions that build kernels


# ---- persistent --------------------------------------------------------------------------------


def all_reduce_program(g: Graph, n: Node, b: Bindings, sms: int) -> NodeProgram:
    """World 1: the residual add; world > 1 without a PeerGroup (solo): rank 0's partial plus a ring's
    traffic through a local inbox (tilert/kernels/elementwise.py); with one: the ranks' all-reduce
    through peer inboxes (peer_allreduce)."""
    part_v, out_v = g.values[n.inputs[0]], g.values[n.outputs[0]]
    T, N = out_v.shape
    res = n.op == "all_reduce_residual"
    part, out = b.activation(part_v), b.activation(out_v)
    resid = b.activation(g.values[n.inputs[1]]) if res else b.ws((1, N), torch.bfloat16)
    world = n.a.world if n.op == "all_reduce_residual" else int(g.meta.get("world", 1))
    if b.group is not None and world > 1:
        return peer_allreduce(g, n, b, "ALL_REDUCE", part, resid if res else None, out, T, N)
    inbox = b.ws((2, T, N), part.dtype) if world > 1 else b.ws((1,), part.dtype)
    cfg = ew.AllReduceConfig(T, N, world, res, tl_dtype(part), tl_dtype(resid), tl_dtype(out))
    specs = [view_spec("partial", part, (T, N)), view_spec("residual", resid, (T, N) if res else (1, N)),
             view_spec("inbox", inbox), view_spec("out", out, (T, N))]  # fmt: skip
    return elementwise_program(cfg, "ALL_REDUCE", specs, [part, resid, inbox, out],
                                lambda body, V, c: body(V.partial, V.residual, V.inbox, V.out, c))  # fmt: skip


def all_gather_program(g: Graph, n: Node, b: Bindings, sms: int) -> NodeProgram:
    """Solo all-gather (last dim): rank 0's block written to every rank's slot of the output."""
    x_v, out_v = g.values[n.inputs[0]], g.values[n.outputs[0]]
    if n.a.dim % len(out_v.shape) != len(out_v.shape) - 1:
        raise PersistentError("all_gather along a dim other than the last has no persistent body")
    T, W = x_v.shape
    world = out_v.shape[-1] // W
    cols = COLLECTIVE_COLS
    x, out = b.activation(x_v), b.activation(out_v)
    if b.group is not None and world > 1:  # every rank writes its block into every rank's output

        i = g.nodes.index(n)
        pcfg = pc.PeerConfig("allgather", T, W, world, cols, out_dtype=tl_dtype(x))
        outs = b.group.buffers(("gather_out", i), out.shape, out.dtype)
        b.env[out_v.name] = outs[b.rank]
        arrs = b.group.buffers(("arrivals", i), (pcfg.tiles,), torch.int32)
        specs = [(nm, (T, W) if nm == "x" else sh, dt) for nm, sh, dt in pc.views(pcfg)]
        ts = [x, b.epoch, b.err, b.rank_id, *pc.rotated(outs, b.rank), *pc.rotated(arrs, b.rank)]
        return NodeProgram(("peer", pcfg), specs, peer_bodies(pcfg, "ALL_GATHER"), ts, ("ALL_GATHER",))
    specs = [view_spec("x", x, (T, W)), view_spec("out", out, (T, W * world))]

    def bodies() -> dict[str, Any]:
        import tilelang.language as T_

        @T_.macro
        def gather(V, c, c1, c2):
            for i, j in T_.Parallel(T, cols):
                if c * cols + j < W:
                    for q in T_.unroll(world):
                        V.out[i, q * W + c * cols + j] = V.x[i, c * cols + j]

        return {"ALL_GATHER": gather}

    return NodeProgram(("all_gather", T, W, world, tl_dtype(x)), specs, bodies, [x, out], ("ALL_GATHER",))


def peer_bodies(pcfg: Any, opcode: str) -> Callable[[], dict[str, Any]]:
    def bodies() -> dict[str, Any]:
        import tilelang.language as T_

        body = pc.make_body(pcfg)

        @T_.macro
        def task(V, c, c1, c2):
            body(V, c)

        return {opcode: task}

    return bodies


def peer_allreduce(g: Graph, n: Node, b: Bindings, opcode: str, part: torch.Tensor, resid: torch.Tensor | None,
                    out: torch.Tensor, T: int, N: int) -> NodeProgram:  # fmt: skip
    """All-reduce (+ residual) over the ranks of b.group through peer inboxes."""
    i = g.nodes.index(n)
    world = b.group.world
    res_dt = tl_dtype(resid) if resid is not None else "bfloat16"
    pcfg = pc.PeerConfig("allreduce", T, N, world, COLLECTIVE_COLS, resid is not None,
                         tl_dtype(part), res_dt, tl_dtype(out))  # fmt: skip
    inbox = pc.rotated(b.group.buffers(("inbox", i), (world, T, N), torch.float32), b.rank)
    arrs = pc.rotated(b.group.buffers(("arrivals", i), (pcfg.tiles,), torch.int32), b.rank)
    res_t = resid if resid is not None else b.ws((1, N), torch.bfloat16)
    specs = pc.views(pcfg, res_rows=res_t.shape[0])
    return NodeProgram(("peer", opcode, pcfg, res_t.shape[0]), specs, peer_bodies(pcfg, opcode),
                       [part, res_t, out, b.epoch, b.err, b.rank_id, *inbox, *arrs], (opcode,))  # fmt: skip


def program(g: Graph, n: Node, b: Bindings, sms: int) -> NodeProgram:
    return (all_gather_program if n.op == "all_gather" else all_reduce_program)(g, n, b, sms)


# ---- plan VM -------------------------------------------------------------------------------------


def arrive(rk: VMRank, opcode: str, i: int, n: Node, ins: list[Any], c: Coords) -> Any:
    """The local block of the partial (ALL_REDUCE) or of x (ALL_GATHER)."""
    if opcode == "ALL_GATHER":
        return ins[0][..., c[0] * COLLECTIVE_COLS : (c[0] + 1) * COLLECTIVE_COLS].clone()
    lo, hi = column_block(n, c, COLLECTIVE_COLS, rk.env[n.outputs[0]].shape[-1])
    return ins[0][..., lo:hi].float().clone()


def reduce_complete(rk: VMRank, n: Node, c: Coords, parts: list[Any], residual: Any) -> None:
    """Output block c of a reduction: the ranks' partials summed in rank order (the all_reduce
    reference), plus the residual's block."""
    out = rk.env[n.outputs[0]]
    lo, hi = column_block(n, c, COLLECTIVE_COLS, out.shape[-1])
    y = ref("all_reduce")(PeerValues(rk.rank, rk.world, parts), parts[rk.rank])[0] if len(parts) > 1 else parts[0]
    if residual is not None:
        y = ref("add")(rk.ctx(), residual[..., lo:hi], y)[0]
    out[..., lo:hi] = y


def complete(rk: VMRank, opcode: str, i: int, n: Node, ins: list[Any], c: Coords, parts: list[Any]) -> None:
    if opcode == "ALL_REDUCE":
        return reduce_complete(rk, n, c, parts, ins[1] if n.op == "all_reduce_residual" else None)
    out = rk.env[n.outputs[0]]
    if n.a.dim % out.dim() != out.dim() - 1:
        raise PlanVMError(f"all_gather along dim {n.a.dim} of {list(out.shape)}: only the last dim")
    W, cols = ins[0].shape[-1], COLLECTIVE_COLS
    lo, hi = c[0] * cols, min(W, (c[0] + 1) * cols)
    for q, p in enumerate(parts):
        out[..., q * W + lo : q * W + hi] = p


def collective(n: Node, opcode: str) -> bool:
    return True


# ---- eager -----------------------------------------------------------------------------------------


def all_reduce(ctx, x):
    if distributed(ctx):
        return (ctx.all_reduce(x),)
    if solo(ctx):
        return (solo_all_reduce(ctx, x),)
    return ref("all_reduce")(ctx, x)


def all_reduce_residual(ctx, partial, residual, *, world):
    if distributed(ctx):
        return (residual.float() + ctx.all_reduce(partial),)
    if solo(ctx):
        return (residual.float() + solo_all_reduce(ctx, partial).float(),)
    return ref("all_reduce_residual")(ctx, partial, residual, world=world)


def argmax_reduce(ctx, val, idx):
    if distributed(ctx):
        return (ctx.argmax_reduce(val, idx),)
    if solo(ctx):  # rank 0's local argmax stands in for the distributed one
        return (idx.to(torch.int32),)
    return ref("argmax_reduce")(ctx, val, idx)


def all_gather(ctx, x, *, dim, world):
    if distributed(ctx):
        return (ctx.all_gather(x, dim),)
    if solo(ctx):  # rank 0 alone: its shard stands in for every rank's (same bytes)
        return (torch.cat([x] * world, dim=dim),)
    return ref("all_gather")(ctx, x, dim=dim, world=world)


@task_kind
class Collective(TaskKind):
    kinds = ("all_reduce", "all_reduce_residual", "all_gather")
    opcodes = ("ALL_REDUCE", "ALL_GATHER")
    eager = {"all_reduce": all_reduce, "all_reduce_residual": all_reduce_residual, "all_gather": all_gather,
             "argmax_reduce": argmax_reduce}  # fmt: skip
    program = program
    collective = collective
    arrive = arrive
    complete = complete
