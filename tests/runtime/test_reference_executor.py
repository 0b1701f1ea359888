"""The IR reference executor agrees with the independent plain-PyTorch model.

Bound: relative Frobenius error of logits <= 1e-4 (both compute in float32 from the same
quantised weights; observed ~3e-7), over a prefill and several decode/verify steps.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tests.strategies import tiny_configs
from tilert.engine import ReferenceBackend
from tilert.models.config import load_config
from tilert.models.plain import PlainDFlashDrafter, PlainModel
from tilert.models.weights import synthetic_weights

REL = 1e-4


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def ids(xs):
    return torch.tensor(xs, dtype=torch.int32)


def check_against_plain(cfg, seed: int, prompt: list[int], steps: list[int]):
    w = synthetic_weights(cfg, seed)
    be, pm = ReferenceBackend(cfg, w, max_seq=128), PlainModel(cfg, w)
    out = be.target_step(ids(prompt), torch.arange(len(prompt), dtype=torch.int32))
    ref, hidden = pm(list(prompt), 0, return_hidden=True)
    assert rel(out["logits"], ref) < REL
    feats = torch.cat([hidden[i] for i in cfg.dflash.target_layer_ids], dim=-1)
    assert rel(out["features"], feats) < REL
    pos = len(prompt)
    g = torch.Generator().manual_seed(seed)
    for B in steps:  # B-token steps with random tokens (verify-shaped when B > 1)
        toks = torch.randint(0, cfg.vocab_size, (B,), generator=g).tolist()
        out = be.target_step(ids(toks), pos + torch.arange(B, dtype=torch.int32), mode="verify" if B > 1 else "decode")
        ref = pm(toks, pos)
        assert rel(out["logits"], ref) < REL, (B, pos)
        assert torch.equal(out["next_tokens"].long(), ref.argmax(-1))
        pos += B


@pytest.mark.parametrize("model", ["tiny", "tiny-flash"])
def test_matches_plain_model_over_steps(model):
    cfg = load_config(model)
    check_against_plain(cfg, seed=int(torch.randint(0, 10**6, ())), prompt=[3, 1, 4, 1, 5, 9], steps=[1, 1, 4, 1, 3, 1])


@given(cfg=tiny_configs(), seed=st.integers(0, 1000), n=st.integers(1, 7))
def test_matches_plain_model_random_configs(cfg, seed, n):
    prompt = [(seed + 7 * i) % cfg.vocab_size for i in range(n)]
    check_against_plain(cfg, seed, prompt, steps=[1, cfg.dflash.block_size, 1])


def test_drafter_matches_plain_drafter():
    cfg = load_config("tiny")
    w = synthetic_weights(cfg, 5)
    be, pm = ReferenceBackend(cfg, w, max_seq=128), PlainModel(cfg, w)
    dr = PlainDFlashDrafter(cfg, w, pm)
    prompt = list(range(10, 30))  # long enough that the drafter window (16) matters
    out = be.target_step(ids(prompt), torch.arange(len(prompt), dtype=torch.int32))
    _, hidden = pm(prompt, 0, return_hidden=True)
    dr.append_context(hidden, 0)
    B, anchor, pos = cfg.dflash.block_size, 7, len(prompt)
    block = ids([anchor] + [cfg.dflash.mask_token_id] * (B - 1))
    draft = be.draft_step(
        block, pos + torch.arange(B, dtype=torch.int32), out["features"], torch.arange(len(prompt), dtype=torch.int32)
    )
    assert draft.tolist() == [anchor] + dr.draft_tokens(anchor, pos)


def test_executor_errors_name_the_problem():
    cfg = load_config("tiny")
    be = ReferenceBackend(cfg, synthetic_weights(cfg, 0), max_seq=16)
    with pytest.raises(ValueError, match="KV cache overflow"):
        be.target_step(ids([1, 2]), ids([15, 16]), mode="verify")
    from tilert.models.weights import WeightError

    w = synthetic_weights(cfg, 0)
    del w["model.layers.1.self_attn.q_proj.weight"]
    with pytest.raises(WeightError, match="model.layers.1.self_attn.q_proj.weight"):
        ReferenceBackend(cfg, w, max_seq=16).target_step(ids([1]), ids([0]))
