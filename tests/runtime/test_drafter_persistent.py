"""The DFlash drafter step as a persistent program, checked without a GPU.

The plan VM runs the compiled drafter step's task tables (a prompt's context, then a verified
block's, the drafter's KV cache carried over) and gives the reference executor's outputs on the
uncompiled graph; a deleted wait of the block attention on the context rows' append is caught (the
drafter's caches are poisoned from the step's first position on). The step kernel compiles for
sm_90a from meta tensors, every node kind of the drafter graph with a body.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import pytest
import torch

from tests.passes.helpers import run_steps
from tests.runtime.test_persistent_moe_gemv import has_body
from tilert.abi import FIELD, OPCODES, WAITS
from tilert.kernels.common import toolchain_reason
from tilert.models.binding import bind_params
from tilert.models.config import load_config
from tilert.models.drafter import build_drafter_graph
from tilert.models.weights import synthetic_weights
from tilert.passes import PassContext, compile_graph
from tilert.runtime.persistent.plan_vm import PlanVM

REL = 1e-4
MAX_SEQ = 64


def drafter_steps(model: str, world: int, seed: int = 0) -> dict[str, Any]:
    """Two drafter steps: 8 prompt context rows at 0..7 with the block at 8.., then a verified
    block's B rows at 8.. with the next block at 10.. (rows 10.. of the context are overwritten by
    the block, as after a verify that accepted one draft). Reference outputs on the uncompiled graphs
    and the compiled rank graphs, tables and memory plans."""
    cfg = load_config(model)
    d = cfg.dflash
    B, F = d.block_size, len(d.target_layer_ids) * cfg.hidden_size
    w = synthetic_weights(cfg, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    graphs, inputs = [], []
    for C, c0, p0 in ((8, 0, 8), (B, 8, 10)):
        graphs.append(build_drafter_graph(cfg, context=C, max_seq=MAX_SEQ))
        anchor = int(torch.randint(0, cfg.vocab_size, (1,), generator=gen))
        inputs.append({
            "block_tokens": torch.tensor([anchor] + [d.mask_token_id] * (B - 1), dtype=torch.int32),
            "block_positions": torch.arange(p0, p0 + B, dtype=torch.int32),
            "ctx_features": torch.randn(C, F, generator=gen).to(torch.bfloat16),
            "ctx_positions": torch.arange(c0, c0 + C, dtype=torch.int32),
        })  # fmt: skip
    ref = run_steps([([g], x) for g, x in zip(graphs, inputs)], w)
    params: list[dict] = [{} for _ in range(world)]
    steps, bufs = [], []
    for g in graphs:
        ctx = PassContext(world=world, max_seq=MAX_SEQ)
        rgs = compile_graph(g, ctx)
        for r, rg in enumerate(rgs):
            bind_params(rg, w, params[r])
        steps.append((rgs, [ctx.results["schedule"][r].table for r in range(world)]))
        bufs.append([ctx.results["plan_memory"][r].buffers for r in range(world)])
    return {"ref": ref, "steps": steps, "inputs": inputs, "params": params, "buffers": bufs}


_CASES: dict[tuple[str, int], dict[str, Any]] = {}


def case_of(model: str, world: int) -> dict[str, Any]:
    if (model, world) not in _CASES:
        _CASES[model, world] = drafter_steps(model, world)
    return _CASES[model, world]


def run_vm(case: dict[str, Any], policy: str, seed: int = 0, steps: list | None = None) -> list[list[dict]]:
    vm = PlanVM(case["params"], policy=policy, seed=seed)
    return [vm.step(g, t, x, b) for (g, t), x, b in zip(steps or case["steps"], case["inputs"], case["buffers"])]


def check(case: dict[str, Any], outs: list[list[dict]], where: str) -> None:
    for k, per_rank in enumerate(outs):
        ref = case["ref"][k]
        for r, out in enumerate(per_rank):
            for key, a in ref.items():
                b = out[key]
                if a.dtype.is_floating_point:
                    err = float((a.float() - b.float()).abs().max() / a.float().abs().max().clamp_min(1e-6))
                    assert err <= REL, f"{where}, step {k}, rank {r}: {key} rel err {err:.2e}"
                else:
                    assert torch.equal(a.long(), b.long()), f"{where}, step {k}, rank {r}: {key} differs"


def test_drafter_graph_fuses_into_bodied_kinds() -> None:
    """After the passes the drafter step holds only kinds with a persistent body: the context rows'
    norm + rope + append fuse into rope_kv_append, the block's into attention_block."""
    (rgs, _), _ = case_of("tiny-gpu", 1)["steps"]
    kinds = {n.op for n in rgs[0].nodes}
    assert kinds == {"attention_block", "dflash_draft", "embed", "linear_bf16", "lm_head_argmax", "rope_kv_append",
                     "silu_mul"}  # fmt: skip


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("policy", ["random", "consumers"])
def test_drafter_tables_compute_the_reference_outputs(world: int, policy: str) -> None:
    case = case_of("tiny-gpu", world)
    check(case, run_vm(case, policy, seed=world), f"tiny-gpu drafter world {world} {policy}")


def test_attention_without_its_wait_on_the_context_append_is_caught() -> None:
    """The block attention's split tasks read the context rows the rope_kv_append task writes into the
    cache: without that wait they may run first and read the poisoned cache."""
    case = case_of("tiny-gpu", 1)
    (rgs, tables), step2 = case["steps"]
    g, t = rgs[0], tables[0].copy()
    appends = {i for i, n in enumerate(g.nodes) if n.op == "rope_kv_append"}
    attn = [i for i, n in enumerate(g.nodes) if n.op == "attention_block"]
    sig = {int(r[FIELD["signal"]]) for r in t.reshape(-1, t.shape[-1]) if r[FIELD["op"]] in appends}
    n = 0  # the split tasks' waits, or their BARRIER's when they have more than WAITS ranges
    for sm, k in zip(*np.nonzero(np.isin(t[:, :, FIELD["op"]], attn) & (t[:, :, FIELD["opcode"]] != 0))):
        for w in range(WAITS):
            c, cnt = t[sm, k, FIELD[f"wait{w}_counter"]], t[sm, k, FIELD[f"wait{w}_count"]]
            if c >= 0 and any(c <= s < c + cnt for s in sig):
                t[sm, k, FIELD[f"wait{w}_counter"]] = -1
                n += 1
    assert n, "no attention split task waits on the context append"
    caught = 0
    for seed in range(3):  # random orders (consumers-first runs the lone append as soon as it is ready)
        try:
            check(case, run_vm(case, "random", seed=seed, steps=[(rgs, [t]), step2]), "deleted append wait")
        except AssertionError:
            caught += 1
    assert caught, "a block attention that does not wait for the context rows' append went unnoticed"


@pytest.mark.skipif(toolchain_reason() is not None, reason=str(toolchain_reason()))
def test_drafter_step_kernel_compiles() -> None:
    """tiny-gpu's drafter step (context = the DFlash block) builds for sm_90a from meta tensors; the
    dispatch covers every opcode of its table; the norm scales stay out of the merged shared block."""
    from tilert.engine.persistent import precompile_drafter

    cfg = load_config("tiny-gpu")
    st = precompile_drafter(cfg, cfg.dflash.block_size, 256)
    src = st.kernel.get_kernel_source()
    assert "tma_load" not in src and "globaltimer" in src
    used = {OPCODES[name] for p in st.programs for name in p.opcodes} | {OPCODES["BARRIER"]}
    assert set(np.unique(st.table[:, :, FIELD["opcode"]])) - {0} <= used
    for name in ("ATTN_SPLIT", "ATTN_COMBINE", "OP_ROPE_KV_APPEND", "OP_DFLASH_DRAFT", "LM_HEAD_ARGMAX"):
        assert has_body(src, name), name
    merged = re.findall(r"void\* (\w+) = \(\(void\*\)\(\(char\*\)buf_dyn_shmem", src)
    assert merged and not [b for b in merged if b.startswith(("rstd", "nrs", "rs"))]


def test_persistent_backend_pads_drafter_contexts(monkeypatch: pytest.MonkeyPatch) -> None:
    """A drafter step's C context rows run as steps of the compiled context shapes: leading chunks of
    the largest, the rest padded with zero rows at positions past the block's end."""
    from tilert.engine import persistent
    from tilert.engine.backend import GraphBackend

    cfg = load_config("tiny-gpu")
    be = persistent.PersistentBackend.__new__(persistent.PersistentBackend)
    be.cfg, be.drafter_runtime = cfg, "persistent"
    calls: list[tuple[int, list[int], float]] = []

    def record(self, block, bpos, feats, cpos):  # noqa: ANN001, ANN202
        calls.append((feats.shape[0], cpos.tolist(), float(feats[-1].abs().sum())))
        return block

    monkeypatch.setattr(GraphBackend, "draft_step", record)
    B = cfg.dflash.block_size
    assert B == 4 and be.drafter_contexts() == (4, 16)
    block, bpos = torch.zeros(B, dtype=torch.int32), torch.arange(37, 41, dtype=torch.int32)
    be.draft_step(block, bpos, torch.ones(37, 8), torch.arange(37, dtype=torch.int32))
    # 37 rows: two chunks of 16, then 5 rows + 11 zero rows at 41.. (past the block's end)
    assert calls == [(16, list(range(16)), 8.0), (16, list(range(16, 32)), 8.0),
                     (16, list(range(32, 37)) + list(range(41, 52)), 0.0)]  # fmt: skip
    calls.clear()
    be.draft_step(block, bpos, torch.ones(3, 8), torch.arange(34, 37, dtype=torch.int32))
    assert calls == [(4, [34, 35, 36, 41], 0.0)]
    calls.clear()
    be.draft_step(block, bpos, torch.ones(4, 8), torch.arange(33, 37, dtype=torch.int32))
    assert calls == [(4, [33, 34, 35, 36], 8.0)]  # a verified block's rows: a compiled shape as they are
