"""Mixed-sequence steps: one step graph over the rows of several sequences, each row at its own
(cache slot, position), equals every sequence's own single-sequence steps.

The check runs the same two rounds both ways: a round of prefills (each sequence's prompt) and a
round of continuations (plain decode rows and DFlash-verify-shaped blocks of several tokens), on
the reference executor, on the fused and sharded rank graphs (world 1 and 2), and as compiled task
tables on the plan VM. Slot assignment, prompt lengths and block sizes are drawn by hypothesis.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.passes.helpers import run_steps
from tilert.models.binding import bind_params
from tilert.models.builder import build_step_graph
from tilert.models.config import load_config
from tilert.models.weights import synthetic_weights
from tilert.ops.attention import check_slots
from tilert.passes import PassContext, compile_graph, run_passes
from tilert.passes.manager import passes_until
from tilert.runtime.persistent.plan_vm import PlanVM

MAX_SEQ = 32
SLOTS = 6
REL = 1e-5  # float32 reference, rows in one GEMM vs alone: a few ulps
_W: dict[str, Any] = {}


def weights(model: str) -> tuple[Any, dict]:
    if model not in _W:
        cfg = load_config(model)
        _W[model] = (cfg, synthetic_weights(cfg, 7))
    return _W[model]


def alone(cfg: Any, w: dict, prompt: list[int], more: list[int]) -> list[dict]:
    """One sequence's own steps: its prompt, then `more` tokens as one step (plain graphs, no slots)."""
    steps = []
    for toks, p0 in ((prompt, 0), (more, len(prompt))):
        g = build_step_graph(cfg, tokens=len(toks), max_seq=MAX_SEQ)
        steps.append(([g], {"tokens": torch.tensor(toks), "positions": torch.arange(p0, p0 + len(toks))}))
    return run_steps(steps, w)


def mixed_inputs(seqs: list[tuple[int, list[int], list[int]]], which: int) -> dict[str, torch.Tensor]:
    """Round `which` (0: prompts, 1: continuations) of sequences (slot, prompt, more) as one step's inputs."""
    toks, pos, slots = [], [], []
    for slot, prompt, more in seqs:
        t, p0 = (prompt, 0) if which == 0 else (more, len(prompt))
        toks += t
        pos += range(p0, p0 + len(t))
        slots += [slot] * len(t)
    return {"tokens": torch.tensor(toks), "positions": torch.tensor(pos), "slots": torch.tensor(slots)}


def mixed_graphs(cfg: Any, seqs: list, n_slots: int = SLOTS) -> list[tuple[Any, dict]]:
    out = []
    for which in (0, 1):
        x = mixed_inputs(seqs, which)
        out.append((build_step_graph(cfg, tokens=len(x["tokens"]), max_seq=MAX_SEQ, slots=n_slots), x))
    return out


def compare(seqs: list, outs: dict, cfg: Any, w: dict, where: str) -> None:
    """Each sequence's rows of the mixed continuation step against its own steps."""
    row = 0
    for slot, prompt, more in seqs:
        ref = alone(cfg, w, prompt, more)[1]
        rows = slice(row, row + len(more))
        for key in ("logits", "features"):
            a, b = ref[key].double(), outs[key][rows].double()
            err = float((a - b).norm() / a.norm())
            assert err < REL, f"{where}: slot {slot} {key} rel err {err:.2e}"
        assert torch.equal(ref["next_tokens"].long(), outs["next_tokens"][rows].long()), f"{where}: slot {slot} tokens"
        row += len(more)


@st.composite
def sequences(draw: Any, max_seqs: int = 4) -> list[tuple[int, list[int], list[int]]]:
    """(slot, prompt, continuation) per sequence: distinct slots in any order, prompts of 1..8 tokens
    (all prompts are one step's rows: at most max_seqs x 8 = MAX_SEQ), continuations of 1 token
    (plain decode) or a block of 2..4 (a verify block)."""
    n = draw(st.integers(1, max_seqs))
    slots = draw(st.permutations(range(SLOTS)))[:n]
    out = []
    for u in slots:
        prompt = draw(st.lists(st.integers(0, 159), min_size=1, max_size=MAX_SEQ // max_seqs))
        more = draw(st.lists(st.integers(0, 159), min_size=1, max_size=4))
        out.append((u, prompt, more))
    return out


FIXED = [(2, [5, 6, 7, 8, 9, 10, 11], [40]), (0, [11, 12, 13], [3]), (5, [20, 21, 22, 23, 24], [9]),
         (3, [30, 31, 32, 33], [1, 2, 3, 4]), (1, [50, 51], [60, 61, 62, 63])]  # fmt: skip


def test_three_decode_rows_and_two_verify_blocks_equal_each_sequence_alone() -> None:
    cfg, w = weights("tiny")
    outs = run_steps([([g], x) for g, x in mixed_graphs(cfg, FIXED)], w)
    compare(FIXED, outs[1], cfg, w, "reference")


@given(sequences())
def test_mixed_step_equals_alone_for_any_slots_and_positions(seqs: list) -> None:
    cfg, w = weights("tiny")
    outs = run_steps([([g], x) for g, x in mixed_graphs(cfg, seqs)], w)
    compare(seqs, outs[1], cfg, w, "reference")


@pytest.mark.parametrize("world", [1, 2])
def test_fused_and_sharded_mixed_step(world: int) -> None:
    cfg, w = weights("tiny")
    steps = [(run_passes(g, PassContext(world=world, max_seq=MAX_SEQ), passes_until("fuse_residual")), x)
             for g, x in mixed_graphs(cfg, FIXED)]  # fmt: skip
    assert any(n.op == "attention_block" and n.a.slotted for n in steps[1][0][0].nodes)
    compare(FIXED, run_steps(steps, w)[1], cfg, w, f"fused, world {world}")


@pytest.mark.parametrize("world", [1, 2])
def test_plan_vm_runs_the_compiled_mixed_step(world: int) -> None:
    """The compiler's task tables of the mixed steps, tile by tile on the plan VM (NaN-poisoned
    activations, each slot's cache poisoned from its sequence's first position in the step)."""
    cfg, w = weights("tiny")
    params: list[dict] = [{} for _ in range(world)]
    vm = PlanVM(params, policy="consumers")
    outs = []
    for g, x in mixed_graphs(cfg, FIXED):
        ctx = PassContext(world=world, max_seq=MAX_SEQ)
        graphs = compile_graph(g, ctx)
        for r, rg in enumerate(graphs):
            bind_params(rg, w, params[r])
        vm.params = [dict(p) for p in params]
        outs.append(vm.step(graphs, [ctx.results["schedule"][r].table for r in range(world)], x)[0])
    compare(FIXED, outs[1], cfg, w, f"plan VM, world {world}")


def test_rows_of_other_slots_are_not_seen() -> None:
    """Changing another sequence's tokens changes nothing in this sequence's rows (same step shape; up
    to float32 ulps: the MoE groups the rows routed to an expert into one GEMM)."""
    cfg, w = weights("tiny")
    seqs = [(0, [1, 2, 3], [4, 5]), (1, [6, 7, 8], [9, 10])]
    other = [(0, [1, 2, 3], [4, 5]), (1, [16, 17, 18], [19, 20])]
    a = run_steps([([g], x) for g, x in mixed_graphs(cfg, seqs)], w)[1]["logits"].double()
    b = run_steps([([g], x) for g, x in mixed_graphs(cfg, other)], w)[1]["logits"].double()
    assert float((a[:2] - b[:2]).norm() / a[:2].norm()) < 1e-6
    assert float((a[2:] - b[2:]).norm() / a[2:].norm()) > 1e-2


def test_a_slots_pool_of_one_is_the_single_sequence_step() -> None:
    cfg, w = weights("tiny")
    seqs = [(0, [3, 1, 4, 1, 5], [9, 2, 6])]
    outs = run_steps([([g], x) for g, x in mixed_graphs(cfg, seqs, n_slots=1)], w)[1]
    ref = alone(cfg, w, [3, 1, 4, 1, 5], [9, 2, 6])[1]
    assert torch.equal(outs["next_tokens"], ref["next_tokens"])
    assert float((outs["logits"] - ref["logits"]).abs().max()) < 1e-4


def test_graph_shape_and_contract_errors() -> None:
    cfg, _ = weights("tiny")
    g = build_step_graph(cfg, tokens=3, max_seq=MAX_SEQ, slots=4)
    assert g.values["slots"].shape == (3,) and g.meta["slots"] == 4
    assert g.values["model.layers.0.self_attn.k_cache"].shape == (4, 2, MAX_SEQ, 24)
    with pytest.raises(ValueError, match="decode mode"):
        build_step_graph(cfg, tokens=3, max_seq=MAX_SEQ, slots=4, mode="verify")
    with pytest.raises(ValueError, match="contiguous"):
        check_slots(torch.tensor([0, 1, 2]), torch.tensor([0, 1, 0]), 4, MAX_SEQ)
    with pytest.raises(ValueError, match="consecutive"):
        check_slots(torch.tensor([0, 2]), torch.tensor([1, 1]), 4, MAX_SEQ)
    with pytest.raises(ValueError, match="outside the cache pool"):
        check_slots(torch.tensor([0]), torch.tensor([4]), 4, MAX_SEQ)
    check_slots(torch.tensor([7, 8, 0, 3]), torch.tensor([2, 2, 0, 1]), 4, MAX_SEQ)
