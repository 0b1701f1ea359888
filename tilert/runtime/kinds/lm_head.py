"""LM-head tasks: the LM head's GEMM, then the greedy tail (argmax, distributed over vocabulary
shards when world > 1, and the DFlash acceptance) in the same step.

Tiles: LM_HEAD_GEMM as a linear (`tilert.kernels.linear_tiling`), one LM_HEAD_ARGMAX or
LM_HEAD_ACCEPT task. Persistent: the linear body and tilert/kernels/lm_head_tail.py's bodies (the
cross-rank argmax through peer inboxes, tilert/kernels/peer_collective.py). Eager: local logits and
argmax, then the distributed argmax of the rank context. Plan VM: the tail is a collective when
world > 1 (each rank publishes its (value, id) and combines every rank's).
"""

from __future__ import annotations

from typing import Any

import torch

from tilert.ir.graph import Graph, Node
from tilert.ir.opset.fused import PeerValues, split_extras
from tilert.ir.registry import ref
from tilert.kernels import lm_head_tail as lt
from tilert.kernels import peer_collective as pc
from tilert.kernels.common import gated, is_gated
from tilert.kernels.views import ViewSpec, prefixed
from tilert.ops.qtensor import QTensor
from tilert.runtime.eager.context import distributed, norm, solo
from tilert.runtime.kinds import linear
from tilert.runtime.kinds.registry import Coords, TaskKind, task_kind
from tilert.runtime.persistent.megakernel import PersistentError
from tilert.runtime.persistent.program import Bindings, NodeProgram
from tilert.runtime.persistent.vm_rank import VMRank

# tilelang (the kernel compiler, slow to import) is imported only inside the functions that build kernels

TAILS = ("LM_HEAD_ARGMAX", "LM_HEAD_ACCEPT")


# ---- persistent --------------------------------------------------------------------------------


def program(g: Graph, n: Node, b: Bindings, sms: int) -> NodeProgram:
    """The LM head: its GEMM (the linear body) and the argmax / DFlash acceptance tail."""
    gemm = linear.program(g, n, b, sms)
    logits = b.activation(g.values[n.outputs[0]])
    nxt = b.activation(g.values[n.outputs[1]])
    T, V = g.values[n.outputs[0]].shape
    world, vocab = n.a.world, n.a.vocab_size
    valid = min(V, vocab) if world == 1 else min(V, vocab - n.a.vocab_offset)
    accept = n.op == "lm_head_accept"
    peer = b.group is not None and world > 1
    if world > 1 and not peer and n.a.vocab_offset > 0:
        raise PersistentError("the LM head tail of a rank > 0 needs its peers (a PeerGroup: MultiRankStep)")
    offset = n.a.vocab_offset if world > 1 else 0
    cfg = lt.Config(T, V, 0 if peer else valid)  # with peers valid and offset are read at run time
    ts = [logits, nxt]
    tail_specs: list[ViewSpec] = [("logits", (T, V), "float32"), ("next", (T,), "int32")]
    if accept:
        draft, acc = b.env[g.values[n.inputs[2]].name], b.activation(g.values[n.outputs[2]])
        ts += [draft, acc]
        tail_specs += [("draft", (T,), "int32"), ("accept", (T + 1,), "int32")]
    pcfg = None
    if peer:  # local argmax -> (value, id) pushed to every rank -> the cross-rank argmax

        i = g.nodes.index(n)
        world = b.group.world
        pcfg = pc.PeerConfig("argmax", T, 0, world)
        val, idx = b.ws((T,), torch.float32), b.ws((T,), torch.int32)
        inv = pc.rotated(b.group.buffers(("in_val", i), (world, T), torch.float32), b.rank)
        ini = pc.rotated(b.group.buffers(("in_idx", i), (world, T), torch.int32), b.rank)
        arrs = pc.rotated(b.group.buffers(("arrivals", i), (1,), torch.int32), b.rank)
        ts += [val, idx, nxt, b.epoch, b.err, b.rank_id, *inv, *ini, *arrs, b.ints(offset, valid)]
        tail_specs += [*prefixed("peer", pc.views(pcfg)), ("vocab", (2,), "int32")]
    tail_op = "LM_HEAD_ACCEPT" if accept else "LM_HEAD_ARGMAX"

    def bodies() -> dict[str, Any]:
        import tilelang.language as T_

        gemm_body = gemm.bodies()["LM_HEAD_GEMM"]
        argmax_body, accept_body, local_argmax_body, dflash_accept_body = lt.make_bodies(cfg)
        if pcfg is not None:
            cross = pc.make_body(pcfg)

        @T_.macro
        def gemm_part(V, c0, c1, c2):
            gemm_body(V.part("gemm"), c0, c1, c2)

        @T_.macro
        def gemm_part_gated(V, c0, c1, c2, gate):
            gemm_body(V.part("gemm"), c0, c1, c2, gate)

        @T_.macro
        def tail_part(V, c0, c1, c2):
            if pcfg is not None:
                peers, vocab = V.part("peer"), V.vocab  # vocab: (offset, valid) of this rank's slice
                local_argmax_body(V.logits, peers.val, peers.idx, vocab[1], vocab[0])
                T_.sync_threads()
                cross(peers, 0)
                if accept:
                    T_.sync_threads()
                    dflash_accept_body(V.draft, V.next, V.accept)
            elif accept:
                accept_body(V.logits, V.draft, V.next, V.accept, valid)
            else:
                argmax_body(V.logits, V.next, valid)

        gemm_task = gated(gemm_part_gated) if is_gated(gemm_body) else gemm_part
        return {"LM_HEAD_GEMM": gemm_task, tail_op: tail_part}

    key = ("lm_head", gemm.key, cfg, accept, pcfg, None if peer else offset)
    return NodeProgram(key, prefixed("gemm", gemm.specs) + tail_specs, bodies, gemm.tensors + ts,
                       ("LM_HEAD_GEMM", tail_op))  # fmt: skip


# ---- plan VM -------------------------------------------------------------------------------------


def tile(rk: VMRank, opcode: str, i: int, n: Node, ins: list[Any], c: Coords) -> None:
    if opcode == "LM_HEAD_GEMM":
        return linear.gemm_tile(rk, opcode, i, n, ins, c)
    return complete(rk, opcode, i, n, ins, c, [arrive(rk, opcode, i, n, ins, c)])  # world 1: no peers


def collective(n: Node, opcode: str) -> bool:
    return opcode in TAILS and n.a.world > 1


def arrive(rk: VMRank, opcode: str, i: int, n: Node, ins: list[Any], c: Coords) -> Any:
    """The local argmax: (max logit, global id) over this rank's vocabulary slice."""
    logits = rk.env[n.outputs[0]]
    if n.a.world == 1:
        return ref("argmax")(rk.ctx(), logits)[0]
    vloc, vocab, r = logits.shape[-1], n.a.vocab_size, rk.rank
    val, idx = ref("vocab_argmax")(rk.ctx(), logits, vocab_offset=r * vloc, vocab_valid=min(vloc, vocab - r * vloc))
    return val.clone(), idx.clone()


def complete(rk: VMRank, opcode: str, i: int, n: Node, ins: list[Any], c: Coords, parts: list[Any]) -> None:
    """The ranks' argmax (largest value, ties to the lowest id), then the DFlash acceptance."""
    env, r = rk.env, rk.rank
    if n.a.world == 1:
        nxt = parts[0]
    else:
        vals, ids = [p[0] for p in parts], [p[1] for p in parts]
        nxt = ref("argmax_reduce")(PeerValues(r, rk.world, vals, ids), vals[r], ids[r])[0]
    env[n.outputs[1]][...] = nxt
    if opcode == "LM_HEAD_ACCEPT":
        env[n.outputs[2]][...] = ref("dflash_accept")(rk.ctx(), ins[2], nxt)[0]


# ---- eager -----------------------------------------------------------------------------------------


def lm_head(ctx, x, w, *rest, world, vocab_size, vocab_offset, norm_eps, out_dtype):
    """Local logits + argmax; with `solo` the distributed argmax is rank 0's local one, with a
    distributed context it is vocab_argmax here + argmax_reduce over the ranks."""
    accept = len(rest) > int(norm_eps is not None)
    tokens = rest[0] if accept else None
    extra = rest[1:] if accept else rest
    kind = "lm_head_accept" if accept else "lm_head_argmax"
    if not solo(ctx) and not distributed(ctx) and world > 1:
        return ref(kind)(ctx, x, w, *rest, world=world, vocab_size=vocab_size, vocab_offset=vocab_offset,
                         norm_eps=norm_eps, out_dtype=out_dtype)  # fmt: skip
    norm_w, _ = split_extras(extra, norm_eps, False)
    h = norm(ctx, x, norm_w, norm_eps)
    if isinstance(w, QTensor):
        logits = linear.linear(ctx, h, w, out_dtype="f32", norm_eps=None, residual=False)[0]
    else:
        logits = torch.matmul(h.to(w.dtype), w.t()).float()
    if distributed(ctx):
        nxt = dist_argmax(ctx, logits, vocab_size)
    else:
        valid = logits[:, : min(logits.shape[-1], vocab_size)]
        nxt = ref("argmax")(ctx, valid)[0] + (vocab_offset if world > 1 else 0)
    out = (logits, nxt.to(torch.int32))
    return out + (ref("dflash_accept")(ctx, tokens, nxt)[0],) if accept else out


def dist_argmax(ctx: Any, logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Greedy ids over vocabulary-parallel logits [T, V/world] (rank r holds ids r*V/world..., the
    padding past vocab_size ignored): the largest logit over ranks, ties to the lowest id."""
    vloc = logits.shape[-1]
    valid = min(vloc, vocab_size - ctx.rank * vloc)
    if valid > 0:
        val, idx = ref("vocab_argmax")(ctx, logits, vocab_offset=ctx.rank * vloc, vocab_valid=valid)
    else:  # a rank holding only padding never wins
        val = torch.full(logits.shape[:1], float("-inf"), device=logits.device)
        idx = torch.full(logits.shape[:1], vocab_size, dtype=torch.int32, device=logits.device)
    return ctx.argmax_reduce(val, idx)


@task_kind
class LmHead(TaskKind):
    kinds = ("lm_head_argmax", "lm_head_accept")
    opcodes = ("LM_HEAD_GEMM", *TAILS)
    eager = {"lm_head_argmax": lm_head, "lm_head_accept": lm_head}
    program = program
    tile = tile
    collective = collective
    arrive = arrive
    complete = complete
