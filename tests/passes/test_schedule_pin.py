"""TILERT_PIN: the schedule pass keeps the sliding-window attention splits (and MOE_TOPK tasks) on SMs
of their own, whose instruction cache then holds their code from one layer to the next ("swa"), and
with "moe" the MoE's tasks on half of the other SMs."""

from __future__ import annotations

import numpy as np
import pytest

from tests.passes.helpers import run_counter_vm
from tilert.abi import OPCODES, TASK_FIELDS
from tilert.engine.persistent import compile_step
from tilert.kernels import moe, switches
from tilert.models.builder import build_step_graph
from tilert.models.config import load_config
from tilert.passes.schedule import GENERAL, MOE_GROUP, MOE_KINDS, PINNED, Task, sm_groups

F = {f: i for i, f in enumerate(TASK_FIELDS)}


def _compile(tokens: int, env: dict[str, str]):  # noqa: ANN202
    cfg = load_config("mimo-v2.5-pro").first_layers(4)
    g = build_step_graph(cfg, tokens=tokens, max_seq=256, mode="decode" if tokens == 1 else "verify")
    with switches.applied(env):
        return compile_step(g, 256, world=8)


def _swa_split(rg, row: np.ndarray) -> bool:  # noqa: ANN001
    n = rg.nodes[int(row[F["op"]])]
    return int(row[F["opcode"]]) == OPCODES["ATTN_SPLIT"] and n.op == "attention_block" and n.a.window > 0


@pytest.mark.parametrize("tokens", [1, 8])
@pytest.mark.parametrize("topk", moe.TOPK_PLACES)
def test_pinned_tasks_have_their_own_sms(tokens: int, topk: str) -> None:
    rg, s = _compile(tokens, {switches.PIN_ENV: "swa", moe.TOPK_ENV: topk})
    pinned = [[_swa_split(rg, r) or int(r[F["opcode"]]) == OPCODES["MOE_TOPK"]
               for r in q if int(r[F["opcode"]]) != OPCODES["NOP"]] for q in s.table]  # fmt: skip
    p = sum(1 for q in pinned if q and all(q))
    assert p > 0, "no SM holds only pinned tasks"
    # SMs 0..p-1 run pinned tasks only, the others none
    assert all(all(q) for q in pinned[:p]) and not any(any(q) for q in pinned[p:])
    # as many pinned SMs as the widest pinned stage has tasks
    widths: dict[tuple[int, int], int] = {}
    for q in s.table[:p]:
        for r in q:
            if int(r[F["opcode"]]) != OPCODES["NOP"]:
                k = (int(r[F["op"]]), int(r[F["opcode"]]))
                widths[k] = widths.get(k, 0) + 1
    assert p == max(widths.values())
    ran, counters = run_counter_vm(s.table, s.counter_expected)
    assert ran == s.tasks and (counters == s.counter_expected).all()


def test_no_pin_leaves_the_schedule_alone() -> None:
    _, a = _compile(1, {})
    _, b = _compile(1, {switches.PIN_ENV: "none"})
    assert np.array_equal(a.table, b.table)
    assert switches.current()[switches.PIN_ENV] == "none"


def test_moe_group_holds_the_moe_tasks_only() -> None:
    rg, s = _compile(8, {switches.PIN_ENV: "moe"})
    moe_codes = {OPCODES[k] for k in MOE_KINDS}
    kinds = [{int(r[F["opcode"]]) for r in q} - {OPCODES["NOP"]} for q in s.table]
    swa = [any(_swa_split(rg, r) for r in q) for q in s.table]
    p = sum(swa)
    assert p and all(swa[:p])
    sms = len(kinds)
    m = (sms - p) // 2
    assert all(k <= moe_codes for k in kinds[p : p + m]) and any(kinds[p : p + m])
    assert all(not (k & moe_codes) for k in kinds[p + m :])
    ran, counters = run_counter_vm(s.table, s.counter_expected)
    assert ran == s.tasks and (counters == s.counter_expected).all()


def test_sm_groups_leave_the_rest_enough() -> None:
    def t(stage: int, group: int) -> Task:
        return Task(1, 0, (0, 0, 0), 1.0, stage, 0, [], 0.0, 0.0, group)

    g = sm_groups([t(0, PINNED)] * 3 + [t(1, PINNED)] + [t(2, GENERAL)], 8)
    assert g == [[3, 4, 5, 6, 7], [0, 1, 2], []]
    assert sm_groups([t(0, PINNED)] * 5, 8)[PINNED] == []  # 5 pinned SMs would leave 3 for the rest
    assert sm_groups([t(0, PINNED), t(1, MOE_GROUP)], 9) == [[5, 6, 7, 8], [0], [1, 2, 3, 4]]
    assert sm_groups([t(0, GENERAL)], 4) == [[0, 1, 2, 3], [], []]


def test_unknown_pin_is_refused() -> None:
    with pytest.raises(ValueError, match="TILERT_PIN"):
        with switches.applied({switches.PIN_ENV: "everything"}):
            pass
