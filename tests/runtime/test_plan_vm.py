"""Plan VM: the compiler's task tables, run tile by tile on torch in an adversarial legal order
(NaN-poisoned activations), give the reference executor's outputs on the uncompiled graph.

Two steps (a verify step of `block` tokens, then a decode step; the KV cache carries over), world
1 and 2 (simulated ranks, collectives as peer pushes + rendezvous). Deleting one wait from a
table makes the check fail, so it can fail.
"""

from __future__ import annotations

import dataclasses
import json
from importlib import resources
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tests.passes.helpers import assert_same, run_steps, two_steps
from tests.strategies import tiny_configs
from tilert.abi import FIELD, OPCODES, WAITS
from tilert.gpu_specs import H200
from tilert.kernels import moe
from tilert.models.binding import bind_params
from tilert.models.config import load_config, parse_config
from tilert.models.weights import synthetic_weights
from tilert.passes import PassContext, ShardError, compile_graph
from tilert.runtime.persistent.plan_vm import PlanVM, PlanVMError

REL = 1e-4


def compiled_steps(cfg: Any, world: int, seed: int = 0, prompt: int = 0, sms: int | None = None) -> dict[str, Any]:
    """Reference outputs of the uncompiled verify + decode steps, and the compiled rank graphs/tables
    (prompt > 0: the first step is a `prompt`-token verify-shaped step, max_seq 256; sms: the SMs
    each rank is scheduled for, the H200's by default)."""
    w = synthetic_weights(cfg, seed)
    g1, g2, inputs = two_steps(cfg, prompt or cfg.dflash.block_size, max_seq=256 if prompt else 32, seed=seed)
    ref = run_steps([([g1], inputs[0]), ([g2], inputs[1])], w)
    params: list[dict] = [{} for _ in range(world)]
    steps, bufs = [], []
    for g in (g1, g2):
        kw = {"gpu": dataclasses.replace(H200, sms=sms)} if sms else {}
        ctx = PassContext(world=world, max_seq=g.meta.get("max_seq", 32), **kw)
        graphs = compile_graph(g, ctx)
        for r, rg in enumerate(graphs):
            bind_params(rg, w, params[r])
        steps.append((graphs, [ctx.results["schedule"][r].table for r in range(world)]))
        bufs.append([ctx.results["plan_memory"][r].buffers for r in range(world)])
    return {"ref": ref, "steps": steps, "inputs": inputs, "params": params, "buffers": bufs}


def run_vm(case: dict[str, Any], policy: str, seed: int = 0, steps: list | None = None,
           shared: bool = True) -> list[list[dict]]:  # fmt: skip
    """Both steps on one VM; shared: activations share storage as the memory plan says."""
    vm = PlanVM(case["params"], policy=policy, seed=seed)
    bufs = case["buffers"] if shared else [None, None]
    return [vm.step(graphs, tables, inp, b) for (graphs, tables), inp, b in
            zip(steps or case["steps"], case["inputs"], bufs)]  # fmt: skip


def check(case: dict[str, Any], outs: list[list[dict]], where: str) -> None:
    for k, per_rank in enumerate(outs):
        for r, out in enumerate(per_rank):
            assert_same(case["ref"][k], out, f"{where}, step {k}, rank {r}", rel=REL)
            for key, a in case["ref"][k].items():  # ids equal outright (the margin check is in assert_same)
                if not a.dtype.is_floating_point:
                    assert torch.equal(a.long(), out[key].long()), f"{where}, step {k}, rank {r}: {key} differs"


_CASES: dict[tuple[str, int], dict[str, Any]] = {}


def tiny_case(model: str, world: int) -> dict[str, Any]:
    if (model, world) not in _CASES:
        _CASES[model, world] = compiled_steps(load_config(model), world)
    return _CASES[model, world]


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("model", ["tiny", "tiny-flash"])
@pytest.mark.parametrize("policy", ["random", "consumers"])
def test_tables_compute_the_reference_outputs(model: str, world: int, policy: str) -> None:
    case = tiny_case(model, world)
    check(case, run_vm(case, policy, seed=world), f"{model} world {world} {policy}")


def test_tables_with_a_topk_task_compute_the_reference_outputs() -> None:
    """The default: the top-k as a MOE_TOPK task after every router task."""
    case = tiny_case("tiny", 2)
    ops = {int(o) for _, tables in case["steps"] for t in tables for o in np.unique(t[:, :, FIELD["opcode"]])}
    assert OPCODES["MOE_TOPK"] in ops
    check(case, run_vm(case, "random", seed=5), "tiny world 2, top-k task")


def test_the_last_router_task_runs_the_topk(monkeypatch: pytest.MonkeyPatch) -> None:
    """TILERT_MOE_TOPK=router: no MOE_TOPK task; under every order the VM tries, the router task that
    arrives last runs it (gate/up tasks see List and Count)."""
    monkeypatch.setenv(moe.TOPK_ENV, "router")
    case = compiled_steps(load_config("tiny"), 2)
    ops = {int(o) for _, tables in case["steps"] for t in tables for o in np.unique(t[:, :, FIELD["opcode"]])}
    assert OPCODES["MOE_TOPK"] not in ops and OPCODES["MOE_ROUTER"] in ops
    for seed in range(3):
        check(case, run_vm(case, "random", seed=seed), f"tiny world 2, random order {seed}")


@pytest.mark.parametrize("world", [1, 2])
def test_long_context_uses_several_splits_and_row_blocks(world: int) -> None:
    """A 140-token first step (280 query rows: 3 row blocks of 128) then a decode step at 140 (3 key
    tiles: 3 used 1-tile old-key splits in full-attention layers)."""
    case = compiled_steps(load_config("tiny"), world, prompt=140)
    check(case, run_vm(case, "random", seed=3), f"tiny world {world}, 140-token context")


def test_eight_ranks_of_a_shared_gpu_compute_the_reference_outputs() -> None:
    """tiny-gpu-8 at world 8, each rank scheduled for 16 SMs (8 ranks on one H200, as the GPU test
    test_eight_ranks_on_one_gpu_match_unsharded runs them): the tables of all 8 ranks, their
    collectives' rendezvous included, give the unsharded reference's outputs."""
    case = compiled_steps(load_config("tiny-gpu-8"), 8, sms=16)
    check(case, run_vm(case, "random", seed=8), "tiny-gpu-8 world 8 on 16 SMs a rank")


def test_kernel_attention_tiling() -> None:
    """head_dim 16 (the persistent attention bodies cover it, so the tiles are their AttnConfig's): a
    40-token first step has 80 query rows per kv head in full layers -> one 128-row block and a wave
    of splits over the 2 kv heads (64 each; c2 up to 64, the new-key split); SWA layers one 128-row
    block too."""
    raw = json.loads((resources.files("tilert.models") / "configs" / "tiny.json").read_text())
    dims = {f"{p}{k}": 16 for p in ("", "swa_") for k in ("head_dim", "v_head_dim")}
    cfg = parse_config({**raw, **dims, "partial_rotary_factor": 0.5}, name="tiny-d16")
    case = compiled_steps(cfg, 1, prompt=40)
    graphs, tables = case["steps"][0]
    t = tables[0].reshape(-1, tables[0].shape[-1])
    split = t[t[:, FIELD["opcode"]] == OPCODES["ATTN_SPLIT"]]
    assert split[:, FIELD["c1"]].max() == 0 and split[:, FIELD["c2"]].max() == 128 // 2
    check(case, run_vm(case, "random", seed=5), "tiny-d16 world 1, 40-token context")


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=tiny_configs(heads_multiple=2), world=st.sampled_from([1, 2]), seed=st.integers(0, 100))
def test_random_tiny_configs(cfg: Any, world: int, seed: int) -> None:
    try:
        case = compiled_steps(cfg, world, seed)
    except ShardError:
        assume(False)
    check(case, run_vm(case, "random", seed), f"{cfg.name} world {world}")


def _without_wait(case: dict[str, Any], sm: int, k: int, w: int) -> list[list[dict]]:
    """The two steps with wait slot w of task (sm, k) of the decode table deleted, consumers first."""
    graphs, tables = case["steps"][1]
    bad = tables[0].copy()
    bad[sm, k, FIELD[f"wait{w}_counter"]] = -1
    return run_vm(case, "consumers", steps=[case["steps"][0], (graphs, [bad])])


def _fails(case: dict[str, Any], sm: int, k: int, w: int) -> bool:
    """Whether the VM catches the deleted wait: wrong outputs, or a tile body that finds its input
    missing (an MoE slot task before the top-k task wrote Count and the active-expert list)."""
    try:
        check(case, _without_wait(case, sm, k, w), "deleted wait")
    except (AssertionError, PlanVMError):
        return True
    return False


def test_a_deleted_wait_is_caught() -> None:
    """A GEMM tile heading its SM's queue with a single wait: without the wait it is ready at once,
    and the consumers-first order runs it before its producer, so it reads NaN."""
    case = tiny_case("tiny", 1)
    t = case["steps"][1][1][0]
    heads = [sm for sm in range(t.shape[0]) if t[sm, 0, FIELD["opcode"]] == OPCODES["LINEAR_FP8"]
             and sum(t[sm, 0, FIELD[f"wait{i}_counter"]] >= 0 for i in range(WAITS)) == 1]  # fmt: skip
    assert heads, "no GEMM tile heads a queue with a single wait"
    w = next(i for i in range(WAITS) if t[heads[0], 0, FIELD[f"wait{i}_counter"]] >= 0)
    assert _fails(case, heads[0], 0, w)


@pytest.mark.parametrize(
    "opcode", ["ATTN_COMBINE", "MOE_TOPK", "MOE_GATE_UP", "MOE_DOWN", "MOE_REDUCE", "LM_HEAD_ARGMAX"]
)
def test_deleted_waits_of_other_kinds_are_caught(opcode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deleting the last wait (the op's own stage or nearest producer) of one of the first 3 tasks of
    a kind is caught at least once (a wait can be redundant: SM program order or a transitive wait
    may already cover it). MOE_TOPK: in a plan with the top-k as a task of its own (the default)."""
    if opcode == "MOE_TOPK":
        monkeypatch.setenv(moe.TOPK_ENV, "task")
        case = compiled_steps(load_config("tiny"), 1)
    else:
        case = tiny_case("tiny", 1)
    t = case["steps"][1][1][0]
    found = [(sm, k) for sm in range(t.shape[0]) for k in range(t.shape[1]) if t[sm, k, 0] == OPCODES[opcode]][:3]
    assert found
    caught = 0
    for sm, k in found:
        w = max(i for i in range(WAITS) if t[sm, k, FIELD[f"wait{i}_counter"]] >= 0)
        caught += _fails(case, sm, k, w)
    assert caught, f"no deleted {opcode} wait was caught"


def test_a_wait_nothing_satisfies_deadlocks() -> None:
    case = tiny_case("tiny", 1)
    graphs, tables = case["steps"][0]
    bad = tables[0].copy()
    bad[0, 0, FIELD["wait0_counter"]], bad[0, 0, FIELD["wait0_count"]] = 0, 1
    bad[0, 0, FIELD["wait0_expected"]] = 10**6
    with pytest.raises(PlanVMError, match="deadlock"):
        PlanVM(case["params"]).step(graphs, [bad], case["inputs"][0])


def test_a_tile_outside_the_op_is_reported() -> None:
    case = tiny_case("tiny", 1)
    graphs, tables = case["steps"][1]
    bad = tables[0].copy()
    t = bad.reshape(-1, bad.shape[-1])
    k = int(np.nonzero(t[:, FIELD["opcode"]] == OPCODES["LINEAR_FP8"])[0][0])
    t[k, FIELD["c0"]] = 99
    with pytest.raises(PlanVMError, match="outside"):
        PlanVM(case["params"]).step(graphs, [bad], case["inputs"][1])
