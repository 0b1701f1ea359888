"""The task-table ABI: opcode numbers are stable across op kinds being added."""

from __future__ import annotations

import tilert.models  # noqa: F401  (registers the model ops, as a compiled plan's loader does)
from tilert.abi import FIXED_OPCODES, OP_KIND_ORDER, OPCODES
from tilert.ir.registry import all_ops


def test_every_registered_kind_has_a_frozen_opcode():
    missing = sorted(set(all_ops()) - set(OP_KIND_ORDER))
    assert not missing, f"append {missing} to tilert.abi.OP_KIND_ORDER (never sort them in)"


def test_opcode_numbers_follow_the_frozen_order():
    assert [OPCODES[n] for n in FIXED_OPCODES] == list(range(len(FIXED_OPCODES)))
    first = len(FIXED_OPCODES)
    assert [OPCODES["OP_" + k.upper()] for k in OP_KIND_ORDER] == list(range(first, first + len(OP_KIND_ORDER)))
    # numbers compiled plans and cached kernels hold: a change here breaks them
    assert (OPCODES["OP_ADD"], OPCODES["OP_ATTENTION_BLOCK"], OPCODES["OP_VOCAB_ARGMAX"]) == (19, 26, 56)
