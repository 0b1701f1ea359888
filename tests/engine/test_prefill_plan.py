"""GPU backends run any prompt length as prefill steps of two compiled shapes (engine/backend.py)."""

from __future__ import annotations

import pytest
import torch

from tilert.engine.backend import PREFILL_CHUNK, ReferenceBackend, prefill_plan
from tilert.models.config import load_config
from tilert.models.weights import synthetic_weights


@pytest.mark.parametrize("max_seq", [64, 80, 131072])
@pytest.mark.parametrize("n", [*range(1, 41), 63, 64, 100, 1000])
def test_plan_covers_every_token_with_compiled_shapes(n: int, max_seq: int) -> None:
    if n > max_seq:
        pytest.skip("prompt longer than the cache")
    plan = prefill_plan(n, 0, max_seq, PREFILL_CHUNK)
    covered = []
    for off, real, rows in plan:
        assert rows in (1, PREFILL_CHUNK) and 1 <= real <= rows
        assert off + rows <= max_seq  # padding rows stay inside the cache
        covered += range(off, off + real)
    assert covered == list(range(n))
    assert sum(rows == 1 for _, _, rows in plan) < PREFILL_CHUNK  # one-by-one only at the cache's end


def test_plan_rejects_an_empty_prompt() -> None:
    with pytest.raises(ValueError, match="at least one token"):
        prefill_plan(0, 0, 64, PREFILL_CHUNK)


class ChunkedReference(ReferenceBackend):
    prefill_chunk = 4

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.shapes: list[int] = []

    def _step(self, tokens, positions, mode):
        self.shapes.append(int(tokens.shape[0]))
        return super()._step(tokens, positions, mode)


@pytest.mark.parametrize(("n", "max_seq"), [(3, 64), (9, 64), (11, 13)])
def test_chunked_prefill_equals_one_step(n: int, max_seq: int) -> None:
    cfg = load_config("tiny")
    w = synthetic_weights(cfg, seed=1)
    tokens = torch.randint(0, cfg.vocab_size, (n,), dtype=torch.int32)
    pos = torch.arange(n, dtype=torch.int32)
    whole = ReferenceBackend(cfg, w, max_seq=max_seq).target_step(tokens, pos)
    ch = ChunkedReference(cfg, w, max_seq=max_seq)
    part = ch.target_step(tokens, pos)
    assert set(ch.shapes) <= {1, 4} and len(ch.shapes) == len(prefill_plan(n, 0, max_seq, 4))
    assert part.keys() == whole.keys()
    for k in whole:
        assert part[k].shape == whole[k].shape, k
    rel = (part["logits"].double() - whole["logits"].double()).norm() / whole["logits"].double().norm()
    assert rel < 1e-5
    assert torch.equal(part["next_tokens"], whole["next_tokens"])
    # the next decode step sees the same cache: padding rows past the prompt were overwritten or unseen
    nxt = torch.tensor([int(whole["next_tokens"][-1])], dtype=torch.int32)
    a = ReferenceBackend(cfg, w, max_seq=max_seq)
    a.target_step(tokens, pos)
    at = torch.tensor([n], dtype=torch.int32)
    ref = a.target_step(nxt, at)["logits"]
    got = ch.target_step(nxt, at)["logits"]
    assert (got.double() - ref.double()).norm() / ref.double().norm() < 1e-5


def test_prefill_positions_must_be_consecutive() -> None:
    cfg = load_config("tiny")
    ch = ChunkedReference(cfg, synthetic_weights(cfg, seed=1), max_seq=64)
    with pytest.raises(ValueError, match="consecutive"):
        ch.target_step(torch.tensor([1, 2, 3], dtype=torch.int32), torch.tensor([0, 2, 3], dtype=torch.int32))


def test_requests_of_any_prompt_length_need_three_step_shapes() -> None:
    from tilert.engine.backend import request_shapes

    seen = set()
    for n in range(1, 300):
        seen |= request_shapes(n, 4096, 8)
    assert seen == {(1, "decode"), (PREFILL_CHUNK, "decode"), (8, "verify")}
    assert request_shapes(5, 64, None) == {(1, "decode"), (PREFILL_CHUNK, "decode")}
    assert request_shapes(60, 64, None) == {(1, "decode"), (PREFILL_CHUNK, "decode")}  # 12 tail rows one by one
