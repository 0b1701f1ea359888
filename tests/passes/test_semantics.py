"""Every pass preserves semantics: the reference executor gives the same outputs before and after
each pass, and N simulated ranks equal the unsharded graph (random tiny configs, N = 1, 2, 4, 8)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tests.passes.helpers import assert_same, run_steps, stages, two_steps
from tests.strategies import tiny_configs
from tilert.models.binding import bind_params
from tilert.models.config import load_config
from tilert.models.drafter import build_drafter_graph
from tilert.models.weights import synthetic_weights
from tilert.passes import ShardError, shard_for_ranks
from tilert.runtime.reference import ReferenceExecutor


@st.composite
def sharded_configs(draw):  # noqa: ANN001, ANN201
    world = draw(st.sampled_from([1, 2, 4, 8]))
    hm = draw(st.sampled_from(sorted({world, max(1, world // 2)})))
    cfg = draw(tiny_configs(heads_multiple=hm))
    return cfg, world


def _check_all_passes(cfg, world: int, seed: int = 0) -> None:  # noqa: ANN001
    w = synthetic_weights(cfg, seed)
    block = cfg.dflash.block_size
    g1, g2, inputs = two_steps(cfg, block, seed=seed)
    ref = run_steps([([g1], inputs[0]), ([g2], inputs[1])], w)
    s1, s2 = stages(g1, world), stages(g2, world)
    caches = [{} for _ in range(world)]  # sharded params keep their names and slices after `shard`
    for name in s1:
        c = caches if len(s1[name]) == world else None
        out = run_steps([(s1[name], inputs[0]), (s2[name], inputs[1])], w, c)
        for k in range(2):
            assert_same(ref[k], out[k], f"after {name} on {world} rank(s), step {k}")


@given(sharded_configs(), st.integers(0, 3))
def test_every_pass_preserves_outputs(case, seed) -> None:  # noqa: ANN001
    cfg, world = case
    try:
        shard_for_ranks(two_steps(cfg, 1)[1], world)
    except ShardError:
        assume(False)
    _check_all_passes(cfg, world, seed)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_tiny_model_all_passes(world: int) -> None:
    _check_all_passes(load_config("tiny"), world)


@settings(max_examples=8)
@given(sharded_configs())
def test_drafter_sharded_equals_unsharded(case) -> None:  # noqa: ANN001
    cfg, world = case
    d = cfg.dflash
    g = build_drafter_graph(cfg, context=3, max_seq=32)
    try:
        shard_for_ranks(g, world)
    except ShardError:
        assume(False)
    w = synthetic_weights(cfg, 1)
    gen = torch.Generator().manual_seed(0)
    F = len(d.target_layer_ids) * cfg.hidden_size
    inputs = {
        "block_tokens": torch.tensor([3] + [d.mask_token_id] * (d.block_size - 1), dtype=torch.int32),
        "block_positions": torch.arange(3, 3 + d.block_size, dtype=torch.int32),
        "ctx_features": torch.randn(3, F, generator=gen),
        "ctx_positions": torch.arange(3, dtype=torch.int32),
    }
    ref = ReferenceExecutor(bind_params(g, w)).run(g, inputs)[0]
    for name, graphs in stages(g, world).items():
        out = ReferenceExecutor([bind_params(x, w) for x in graphs]).run(graphs, inputs)[0]
        scale = ref["logits"].abs().max()
        err = ((ref["logits"] - out["logits"]).abs().max() / scale).item()
        assert err < 1e-5, f"drafter after {name} on {world} ranks: rel err {err:.2e}"
