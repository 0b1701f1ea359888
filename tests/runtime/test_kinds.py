"""Task kinds (tilert/runtime/kinds/): one registration per kind covers every runtime, and the
compiler's tables and the registry agree on which kind runs which opcode. CPU only."""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest

from tilert.abi import FIELD, OPCODE_NAMES, OPCODES
from tilert.ir.registry import all_ops, get_op
from tilert.models.builder import build_step_graph
from tilert.models.config import load_config
from tilert.passes import PassContext, compile_graph
from tilert.runtime.kinds import TaskKind, eager_impl, for_node, for_opcode, linear, lm_head, registered, task_kind


def test_kinds_name_registered_op_kinds_and_opcodes() -> None:
    kinds = set(registered().values())
    assert {k.__name__ for k in kinds} == {"Linear", "LmHead", "Attention", "Moe", "Collective", "Elementwise",
                                          "RopeKvAppend"}
    for k in kinds:
        assert set(k.kinds) <= set(all_ops()), k.__name__
        assert set(k.opcodes) <= set(OPCODES), k.__name__
        for op in k.opcodes:
            assert for_opcode(op) is k
    assert for_node("rms_norm") is TaskKind and for_opcode("OP_RMS_NORM") is None  # generic: the VM's own


def test_eager_implementations_take_the_attrs() -> None:
    """An eager implementation has its reference's keywords (the attributes, no defaults of its own)."""
    for kind in ("linear_fp8", "linear_bf16", "matmul", "lm_head_accept", "all_reduce_residual", "all_gather"):
        params = inspect.signature(eager_impl(kind)).parameters.values()
        kw = {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
        assert kw == {f.name for f in dataclasses.fields(get_op(kind).attrs)}, kind
        assert all(p.default is inspect.Parameter.empty for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)
    assert eager_impl("linear_mxfp4") is linear.linear and eager_impl("lm_head_argmax") is lm_head.lm_head
    assert eager_impl("rms_norm") is None  # the reference runs on the GPU


def test_a_kind_registers_once() -> None:
    class Twice(TaskKind):
        kinds = ("embed_override", "linear_fp8")  # linear_fp8 is Linear's
        opcodes = ("CAST_BF16",)

    with pytest.raises(ValueError, match="'linear_fp8' is registered already"):
        task_kind(Twice)
    assert for_node("embed_override") is TaskKind and for_opcode("CAST_BF16") is None  # nothing half-registered


@pytest.mark.parametrize(("model", "world"), [("tiny", 2), ("tiny-gpu", 1), ("tiny-flash", 2)])
def test_every_table_opcode_has_the_node_kinds_task_kind(model: str, world: int) -> None:
    cfg = load_config(model)
    for tokens, mode in ((1, "decode"), (cfg.dflash.block_size, "verify")):
        ctx = PassContext(world=world, max_seq=128)
        graphs = compile_graph(build_step_graph(cfg, tokens=tokens, mode=mode, max_seq=128), ctx)
        for r, g in enumerate(graphs):
            table = ctx.results["schedule"][r].table
            rows = table[table[:, :, FIELD["opcode"]] != 0]
            for code, i in {(int(c), int(i)) for c, i in rows[:, [FIELD["opcode"], FIELD["op"]]]}:
                name, kind = OPCODE_NAMES[code], g.nodes[i].op
                if name == "BARRIER" or name.startswith("OP_"):
                    assert for_opcode(name) is None, name
                    continue
                assert kind in for_opcode(name).kinds and for_node(kind) is for_opcode(name), (name, kind)
        assert np.any(table)
