"""Cache-append tasks: the rope_kv_append kind (a DFlash drafter's context rows: head norm, RoPE, value
scale and the cache write, attending to nothing in this step).

Tiles: the generic one (`OP_ROPE_KV_APPEND`, one task: the output is the cache, one column block),
which the plan VM runs through the op reference and the eager runtime as the reference on the GPU;
the persistent step runs tilert/kernels/kv_append.py's body.
"""

from __future__ import annotations

from typing import Any

import torch

from tilert.ir.graph import Graph, Node
from tilert.kernels import kv_append as kva
from tilert.runtime.kinds.registry import TaskKind, task_kind
from tilert.runtime.persistent.program import Bindings, NodeProgram, view_spec


def program(g: Graph, n: Node, b: Bindings, sms: int) -> NodeProgram:
    a = n.a
    kc, vc = b.env[g.values[n.inputs[0]].name], b.env[g.values[n.inputs[1]].name]
    k, v = g.values[n.inputs[2]], g.values[n.inputs[3]]
    (T,) = g.values[n.inputs[4]].shape
    cfg = kva.RopeKvAppendConfig(T, kc.shape[0], a.head_dim, vc.shape[-1], a.rope_dim, a.theta, a.v_scale, a.norm_eps)
    pos = b.env[g.values[n.inputs[4]].name]
    kn = (b.env[g.values[n.inputs[5]].name].to(torch.bfloat16).contiguous() if a.norm_eps is not None
          else b.ws((a.head_dim,), torch.bfloat16))  # fmt: skip
    ts = [b.activation(k), b.activation(v), pos, kn, kc, vc]
    specs = [view_spec("k", ts[0], k.shape), view_spec("v", ts[1], v.shape), view_spec("positions", pos),
             view_spec("k_norm", kn), view_spec("k_cache", kc), view_spec("v_cache", vc)]  # fmt: skip
    for o, st in zip(n.outputs, (kc, vc)):  # the updated caches are the caches
        b.env[g.values[o].name] = st

    def bodies() -> dict[str, Any]:
        import tilelang.language as T_

        body = kva.make_body(cfg)

        @T_.macro
        def task(V, c, c1, c2):
            body(V.k, V.v, V.positions, V.k_norm, V.k_cache, V.v_cache, c)

        return {"OP_ROPE_KV_APPEND": task}

    key = ("rope_kv_append", cfg, tuple(s[1:] for s in specs))
    return NodeProgram(key, specs, bodies, ts, ("OP_ROPE_KV_APPEND",))


@task_kind
class RopeKvAppend(TaskKind):
    kinds = ("rope_kv_append",)
    program = program
