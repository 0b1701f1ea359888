"""Sharding propagation: the output sharding of each op kind from its inputs' (SPMD rules).

R = replicated, S(d) = split along dim d, P(sum) = partial sums (sum over ranks is the value),
P(argmax) = per-rank candidates of a distributed argmax. Kinds not listed need every input R
and give R. Shared by `shard` (to decide where collectives go) and `infer_shapes` (to check).
"""

from __future__ import annotations

from collections.abc import Callable

from tilert.ir.graph import REPLICATED, IRError, Node, Sharding

R = REPLICATED
PSUM = Sharding("P", reduce="sum")
PARGMAX = Sharding("P", reduce="argmax")

# kinds that read partial sums as they are (expert-parallel values: one rank owns each slot)
ACCEPTS_PARTIAL = {"expert_matmul", "expert_matmul_fp8", "expert_matmul_mxfp4", "silu_mul", "moe_combine",
                   "all_reduce", "all_reduce_residual"}  # fmt: skip
EXPERT_KINDS = ("expert_matmul", "expert_matmul_fp8", "expert_matmul_mxfp4")
LINEAR_KINDS = ("matmul", "linear_bf16", "linear_fp8", "linear_mxfp4")


def S(dim: int) -> Sharding:
    return Sharding("S", dim)


def _matmul(n: Node, ins: list[Sharding], ranks: list[int]) -> list[Sharding]:
    x, w = ins[0], ins[1]
    last = ranks[0] - 1
    if w.kind == "R" and x.kind == "R":
        return [R]
    if w == S(0) and x.kind == "R":
        return [S(last)]
    if w == S(1) and x == S(last):
        return [PSUM]
    raise IRError(f"{n.op}: no rule for x {x} with weight {w}")


def _same(n: Node, ins: list[Sharding], ranks: list[int]) -> list[Sharding]:
    return [ins[0]] * len(n.outputs)


def _kv_append(n: Node, ins: list[Sharding], ranks: list[int]) -> list[Sharding]:
    return [ins[0], ins[1]]


def _attention(n: Node, ins: list[Sharding], ranks: list[int]) -> list[Sharding]:
    out = [S(1) if ins[0] == S(1) else R]
    return out + ([ins[3], ins[4]] if n.op == "attention_block" else [])


def _experts(n: Node, ins: list[Sharding], ranks: list[int]) -> list[Sharding]:
    return [PSUM if ins[1] == S(0) or ins[0] == PSUM else R]


def _combine(n: Node, ins: list[Sharding], ranks: list[int]) -> list[Sharding]:
    return [PSUM if ins[0] == PSUM else R]


def _moe(n: Node, ins: list[Sharding], ranks: list[int]) -> list[Sharding]:
    return [R if n.a.reduce or ins[3].kind == "R" else PSUM]


def _reduced(n: Node, ins: list[Sharding], ranks: list[int]) -> list[Sharding]:
    return [R] * len(n.outputs)


def _vocab_argmax(n: Node, ins: list[Sharding], ranks: list[int]) -> list[Sharding]:
    return [PARGMAX, PARGMAX]


def _lm_head(n: Node, ins: list[Sharding], ranks: list[int]) -> list[Sharding]:
    return [S(1) if ins[1] == S(0) else R] + [R] * (len(n.outputs) - 1)


RuleFn = Callable[[Node, list[Sharding], list[int]], list[Sharding]]
RULES: dict[str, RuleFn] = {
    **{k: _matmul for k in LINEAR_KINDS},
    **{k: _same for k in ("rope", "scale", "head_rms_norm", "silu_mul", "dequant")},
    "kv_append": _kv_append,
    "rope_kv_append": _kv_append,
    "attention": _attention,
    "attention_block": _attention,
    **{k: _experts for k in EXPERT_KINDS},
    "moe_combine": _combine,
    **{f"fused_moe_{f}": _moe for f in ("bf16", "fp8", "mxfp4")},
    **{k: _reduced for k in ("all_reduce", "all_reduce_residual", "all_gather", "argmax_reduce")},
    "vocab_argmax": _vocab_argmax,
    "lm_head_argmax": _lm_head,
    "lm_head_accept": _lm_head,
}


def propagate(n: Node, ins: list[Sharding], ranks: list[int]) -> list[Sharding]:
    """Output shardings of node `n` given its inputs' shardings and ranks (dims)."""
    rule = RULES.get(n.op)
    if rule is not None:
        return rule(n, ins, ranks)
    for i, s in enumerate(ins):
        if s.kind != "R":
            raise IRError(f"{n.op}: input {i} is {s}, the kind needs a replicated input")
    return [R] * len(n.outputs)
