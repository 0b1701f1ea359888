"""Decode loop: DFlash speculative output equals greedy output token for token (lossless)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.strategies import tiny_configs
from tilert.engine import GenerationError, OracleDrafter, ReferenceBackend, generate
from tilert.models.config import load_config
from tilert.models.plain import PlainModel, plain_greedy_generate
from tilert.models.weights import synthetic_weights


@pytest.mark.parametrize("model", ["tiny", "tiny-flash"])
def test_greedy_matches_plain_and_dflash_is_lossless(model):
    cfg = load_config(model)
    w = synthetic_weights(cfg, 11)
    be = ReferenceBackend(cfg, w, max_seq=128)
    prompt = [5, 17, 3, 99, 42]
    greedy = generate(be, prompt, 24)
    assert greedy.tokens == plain_greedy_generate(PlainModel(cfg, w), prompt, 24)
    spec = generate(be, prompt, 24, speculative="dflash")
    assert spec.tokens == greedy.tokens
    assert spec.steps == len(spec.accepted) and sum(spec.acceptance_lengths) >= 23


@given(cfg=tiny_configs(), seed=st.integers(0, 100), n=st.integers(1, 6), new=st.integers(1, 12))
def test_lossless_random_configs(cfg, seed, n, new):
    be = ReferenceBackend(cfg, synthetic_weights(cfg, seed), max_seq=64)
    prompt = [(seed * 3 + i) % cfg.vocab_size for i in range(n)]
    assert generate(be, prompt, new, speculative="dflash").tokens == generate(be, prompt, new).tokens


@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
def test_oracle_drafter_is_lossless_and_marked_synthetic(p):
    cfg = load_config("tiny")
    be = ReferenceBackend(cfg, synthetic_weights(cfg, 2), max_seq=128)
    prompt = [1, 2, 3]
    greedy = generate(be, prompt, 30).tokens
    od = OracleDrafter(greedy, len(prompt), p, cfg.vocab_size, cfg.dflash.block_size, seed=1)
    res = generate(be, prompt, 30, speculative="dflash", drafter=od)
    assert res.tokens == greedy and res.synthetic and res.stats()["synthetic"]
    B = cfg.dflash.block_size
    if p == 0.0:
        assert all(a == B - 1 for a in res.accepted[:-1])
    if p == 1.0:
        assert all(a == 0 for a in res.accepted)


def test_corruption_for_acceptance_inverts_expectation():
    p = OracleDrafter.corruption_for_acceptance(6.3, 8)
    q = 1 - p
    assert abs(sum(q**i for i in range(8)) - 6.3) < 1e-6
    with pytest.raises(ValueError):
        OracleDrafter.corruption_for_acceptance(9, 8)


def test_bad_requests():
    cfg = load_config("tiny")
    be = ReferenceBackend(cfg, synthetic_weights(cfg, 0), max_seq=32)
    with pytest.raises(GenerationError, match="empty"):
        generate(be, [], 3)
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        generate(be, [cfg.vocab_size], 3)
    with pytest.raises(GenerationError, match="exceeds the KV cache capacity"):
        generate(be, [1] * 20, 20)
    with pytest.raises(GenerationError, match="unknown speculative"):
        generate(be, [1], 3, speculative="medusa")
