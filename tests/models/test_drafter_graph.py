"""The drafter graph with every per-layer attention type and MiMo extra through the compiler: each
rewriting pass keeps its outputs on 1 and 2 simulated ranks, and the compiled task tables on the
plan VM give the reference executor's outputs over two drafter steps (the context cache carries
over). Bound: max relative error of the logits 1e-4 of their scale."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tests.models.drafter_fixtures import mimo_config
from tests.passes.helpers import stages
from tilert.checkpoint.drafter import drafter_config
from tilert.models.binding import bind_params
from tilert.models.config import load_config
from tilert.models.drafter import build_drafter_graph
from tilert.models.weights import synthetic_weights
from tilert.passes import PassContext, compile_graph
from tilert.runtime.persistent.plan_vm import PlanVM
from tilert.runtime.reference import ReferenceExecutor

REL = 1e-4
C, MAX_SEQ = 6, 32


def drafter_model(**over):
    """tiny with a MiMo-style drafter: sliding bidirectional + full layer, sinks, value scale,
    partial RoPE, own eps, mask embedding; window 2 < block 4 so rows mask each other."""
    cfg = load_config("tiny")
    raw = mimo_config(cfg, window=2, layer_types=["sliding_attention", "full_attention"], **over)
    return replace(cfg, dflash=replace(drafter_config(raw, cfg), mask_embedding=True))


def steps(cfg):
    """Two drafter passes: context 0..C-1 + block at C, then 2 more context rows + block at C+2."""
    d = cfg.dflash
    g = torch.Generator().manual_seed(0)
    F = len(d.target_layer_ids) * cfg.hidden_size
    out = []
    for ctx0, n in ((0, C), (C, 2)):
        start = ctx0 + n
        out.append((build_drafter_graph(cfg, context=n, max_seq=MAX_SEQ), {
            "block_tokens": torch.tensor([3] + [d.mask_token_id] * (d.block_size - 1), dtype=torch.int32),
            "block_positions": torch.arange(start, start + d.block_size, dtype=torch.int32),
            "ctx_features": torch.randn(n, F, generator=g).to(torch.bfloat16),
            "ctx_positions": torch.arange(ctx0, start, dtype=torch.int32),
        }))  # fmt: skip
    return out


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / a.float().abs().max())


@pytest.mark.parametrize("over", [{}, {"is_causal": None}])
def test_every_pass_keeps_the_drafter_outputs(over):
    cfg = drafter_model(**over)
    w = synthetic_weights(cfg, 2)
    (g, inputs), _ = steps(cfg)
    ref = ReferenceExecutor(bind_params(g, w)).run(g, inputs)[0]
    for world in (1, 2):
        for name, graphs in stages(g, world).items():
            out = ReferenceExecutor([bind_params(x, w) for x in graphs]).run(graphs, inputs)[0]
            assert max_rel(ref["logits"], out["logits"]) < REL, f"after {name} on {world} ranks"
            assert torch.equal(ref["draft"], out["draft"]), f"after {name} on {world} ranks"


@pytest.mark.parametrize("world", [1, 2])
def test_plan_vm_runs_the_drafter(world):
    cfg = drafter_model(is_causal=None)
    w = synthetic_weights(cfg, 3)
    two = steps(cfg)
    ex = ReferenceExecutor(bind_params(two[0][0], w))
    bind_params(two[1][0], w, ex.params[0])
    refs = [ex.run(g, inp)[0] for g, inp in two]
    params: list[dict] = [{} for _ in range(world)]
    vm = PlanVM(params, policy="random", seed=world)
    for (g, inp), ref in zip(two, refs):
        ctx = PassContext(world=world, max_seq=MAX_SEQ)
        graphs = compile_graph(g, ctx)
        for r, rg in enumerate(graphs):
            bind_params(rg, w, params[r])
        vm.params = [dict(p) for p in params]
        tables = [ctx.results["schedule"][r].table for r in range(world)]
        bufs = [ctx.results["plan_memory"][r].buffers for r in range(world)]
        for r, out in enumerate(vm.step(graphs, tables, inp, bufs)):
            assert max_rel(ref["logits"], out["logits"]) < REL, f"rank {r}"
            assert torch.equal(ref["draft"].long(), out["draft"].long()), f"rank {r}"
