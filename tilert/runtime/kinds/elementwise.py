"""Elementwise tasks of the persistent step: embed, silu_mul (two inputs), concat (last dim) and
dflash_draft (a drafter step's block: the anchor, then the argmax ids).

Their tiles are the generic ones (`OP_<KIND>`, blocks of GENERIC_COLS output columns), which the
plan VM runs through the kind's reference and the eager runtime as the reference on the GPU; the
persistent step runs tilert/kernels/elementwise.py's column-block bodies.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from tilert.ir.graph import Graph, Node
from tilert.kernels import elementwise as ew
from tilert.kernels.views import ViewSpec
from tilert.runtime.kinds.registry import TaskKind, task_kind
from tilert.runtime.persistent.megakernel import PersistentError
from tilert.runtime.persistent.program import Bindings, NodeProgram, view_spec

# tilelang (the kernel compiler, slow to import) is imported only inside the functions that build kernels


def elementwise_program(cfg: Any, opcode: str, specs: list[ViewSpec], ts: list[torch.Tensor],
                         call: Callable[[Any, Any, Any], None]) -> NodeProgram:  # fmt: skip
    """A node run by one of tilert/kernels/elementwise.py's column-block bodies."""
    def bodies() -> dict[str, Any]:
        import tilelang.language as T_

        body = ew.make_body(cfg)

        @T_.macro
        def task(V, c, c1, c2):
            call(body, V, c)

        return {opcode: task}

    return NodeProgram(("elementwise", opcode, cfg, tuple(s[1:] for s in specs)), specs, bodies, ts, (opcode,))


def embed_program(g: Graph, n: Node, b: Bindings, sms: int) -> NodeProgram:
    table, tokens = b.env[g.values[n.inputs[0]].name], b.env[g.values[n.inputs[1]].name]
    (T,), (V, H) = g.values[n.inputs[1]].shape, table.shape
    out = b.activation(g.values[n.outputs[0]])
    table = table.to(torch.bfloat16).contiguous()
    specs = [view_spec("table", table), view_spec("tokens", tokens), view_spec("out", out, (T, H))]
    return elementwise_program(ew.EmbedConfig(T, V, H), "OP_EMBED", specs, [table, tokens, out],
                                lambda body, V, c: body(V.table, V.tokens, V.out, c))  # fmt: skip


def silu_mul_program(g: Graph, n: Node, b: Bindings, sms: int) -> NodeProgram:
    if len(n.inputs) != 2:
        raise PersistentError("silu_mul with one (concatenated) input has no persistent body")
    T, N = g.values[n.outputs[0]].shape
    ts = [b.activation(g.values[i]) for i in n.inputs] + [b.activation(g.values[n.outputs[0]])]
    specs = [view_spec(nm, t, (T, N)) for nm, t in zip(("gate", "up", "out"), ts)]
    return elementwise_program(ew.SiluMulConfig(T, N), "OP_SILU_MUL", specs, ts,
                                lambda body, V, c: body(V.gate, V.up, V.out, c))  # fmt: skip


def concat_program(g: Graph, n: Node, b: Bindings, sms: int) -> NodeProgram:
    out_v = g.values[n.outputs[0]]
    if n.a.dim % len(out_v.shape) != len(out_v.shape) - 1:
        raise PersistentError("concat along a dim other than the last has no persistent body")
    T = out_v.shape[0]
    widths = tuple(g.values[i].shape[-1] for i in n.inputs)
    ts = [b.activation(g.values[i]) for i in n.inputs] + [b.activation(out_v)]
    specs = [view_spec(f"in.{k}", t, (T, w)) for k, (t, w) in enumerate(zip(ts, widths))]
    specs.append(view_spec("out", ts[-1], (T, sum(widths))))
    return elementwise_program(ew.ConcatConfig(T, widths), "OP_CONCAT", specs, ts,
                                lambda body, V, c: body(tuple(V.part("in")), V.out, c))  # fmt: skip


def draft_program(g: Graph, n: Node, b: Bindings, sms: int) -> NodeProgram:
    (T,) = g.values[n.outputs[0]].shape
    ts = [b.activation(g.values[i]) for i in (*n.inputs, n.outputs[0])]
    specs = [view_spec(nm, t, (T,)) for nm, t in zip(("block", "next", "out"), ts)]
    return elementwise_program(ew.DraftConfig(T), "OP_DFLASH_DRAFT", specs, ts,
                                lambda body, V, c: body(V.block, V.next, V.out, c))  # fmt: skip


PROGRAMS = {"embed": embed_program, "silu_mul": silu_mul_program, "concat": concat_program,
            "dflash_draft": draft_program}  # fmt: skip


def program(g: Graph, n: Node, b: Bindings, sms: int) -> NodeProgram:
    return PROGRAMS[n.op](g, n, b, sms)


@task_kind
class Elementwise(TaskKind):
    kinds = tuple(PROGRAMS)
    program = program
