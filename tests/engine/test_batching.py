"""Continuous batching: every engine round is one mixed step over all running sequences' rows;
requests join and leave between steps; each sequence's tokens equal its greedy run alone; padding
rows (to the next compiled step shape) write no sequence's KV cache and change no result."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.engine.test_api import in_thread
from tilert.engine import OracleDrafter, ReferenceBackend, generate
from tilert.engine.api import Engine, EngineError, GenerationError, StepError
from tilert.models.config import load_config
from tilert.models.weights import synthetic_weights

MAX_SEQ = 96
PROMPTS = [[5, 17, 3], [99, 42], [1, 2, 3, 4, 5, 6], [150], [7, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]]
_ALONE: dict[tuple, list[int]] = {}


@pytest.fixture(scope="module")
def cfg():
    return load_config("tiny")


@pytest.fixture(scope="module")
def weights(cfg):
    return synthetic_weights(cfg, 7)


def alone(cfg: Any, weights: dict, prompt: list[int], n: int, spec: str | None = None) -> list[int]:
    """The sequence's greedy tokens run on its own (one sequence per step, no batching)."""
    key = (tuple(prompt), n, spec)
    if key not in _ALONE:
        _ALONE[key] = generate(ReferenceBackend(cfg, weights, max_seq=MAX_SEQ), prompt, n, spec).tokens
    return _ALONE[key]


class Recorder:
    """Wraps a backend's mixed_step: the rows, slots and padded shape of every step."""

    def __init__(self, backend: Any) -> None:
        self.real, self.steps = backend.mixed_step, []
        backend.mixed_step = self

    def __call__(self, tokens, positions, slots):
        self.steps.append({"rows": int(tokens.shape[0]), "slots": slots.tolist(), "positions": positions.tolist()})
        return self.real(tokens, positions, slots)


def test_one_step_serves_every_running_sequence(cfg, weights):
    """background=False: each step() is one mixed step holding a row block of every active sequence;
    a request submitted between steps joins at the next one, a finished one leaves."""

    def run():
        eng = Engine("tiny", weights, max_seq=MAX_SEQ, max_active=4, background=False)
        assert eng.batching
        rec = Recorder(eng.backend)
        a = eng.submit(PROMPTS[0], 6)
        b = eng.submit(PROMPTS[1], 3, "dflash")
        assert eng.step() == 2 and len(rec.steps) == 1  # both prefills in one step
        assert sorted(set(rec.steps[0]["slots"])) == sorted({a.slot, b.slot})
        assert rec.steps[0]["rows"] == len(PROMPTS[0]) + len(PROMPTS[1])
        c = eng.submit(PROMPTS[2], 4)  # joins between steps
        assert eng.step() == 3
        s1 = rec.steps[1]
        assert len(set(s1["slots"])) == 3 and s1["rows"] == 1 + cfg.dflash.block_size + len(PROMPTS[2])
        while not (a.done() and b.done() and c.done()):
            eng.step()
        assert all(len(set(s["slots"])) == len(s["slots"]) or s["rows"] > 1 for s in rec.steps)
        assert eng.kv_caches_live == 0 and sorted(eng._free_slots) == [0, 1, 2, 3]
        got = [a.result().tokens, b.result().tokens, c.result().tokens]
        eng.close()
        return got

    got = in_thread(run)
    assert got == [alone(cfg, weights, PROMPTS[0], 6), alone(cfg, weights, PROMPTS[1], 3, "dflash"),
                   alone(cfg, weights, PROMPTS[2], 4)]  # fmt: skip


@pytest.mark.parametrize("max_active", [1, 3, 8])
def test_batched_sequences_equal_their_runs_alone(cfg, weights, max_active):
    """Greedy and DFlash sequences mixed, more requests than slots: each one's tokens equal its
    greedy run alone (DFlash is lossless too)."""
    jobs = [(p, n, spec) for p, n in zip(PROMPTS, (9, 12, 5, 14, 7)) for spec in (None, "dflash")]

    def run():
        with Engine("tiny", weights, max_seq=MAX_SEQ, max_active=max_active) as eng:
            reqs = [eng.submit(p, n, spec) for p, n, spec in jobs]
            return [r.result(timeout=120).tokens for r in reqs], eng.counters

    got, counters = in_thread(run)
    for (p, n, spec), toks in zip(jobs, got):
        assert toks == alone(cfg, weights, p, n), f"prompt {p} ({spec})"
    assert counters["finished"] == len(jobs) and counters["failed"] == 0


@settings(max_examples=6)
@given(st.lists(st.tuples(st.lists(st.integers(0, 159), min_size=1, max_size=20), st.integers(1, 10),
                          st.sampled_from([None, "dflash"])), min_size=1, max_size=6),
       st.sampled_from([(1, 2, 4), (1, 2, 3, 5, 8), None]))  # fmt: skip
def test_any_requests_and_step_shapes_are_lossless(cfg, weights, jobs, shapes):
    """Random prompts (longer ones prefill in chunks across steps when the step shapes are small),
    lengths and modes: every sequence equals its run alone."""

    def run():
        with Engine("tiny", weights, max_seq=MAX_SEQ, max_active=4) as eng:
            if shapes is not None:
                eng.backend.batch_rows = shapes
            return [r.result(timeout=120).tokens for r in [eng.submit(p, n, s) for p, n, s in jobs]]

    for (p, n, _), toks in zip(jobs, in_thread(run)):
        assert toks == alone(cfg, weights, p, n)


def test_sampled_and_logprob_requests_match_their_runs_alone(cfg, weights):
    """Sampling draws from each request's own generator on its own rows' logits; logprobs and
    prompt logprobs come from its rows too (equal to the unbatched engine's to float32 ulps)."""
    kw = [dict(temperature=0.9, top_p=0.9, seed=3), dict(temperature=0.7, seed=5, speculative="dflash"),
          dict(logprobs=2, prompt_logprobs=True)]  # fmt: skip

    def run(batching):
        with Engine("tiny", weights, max_seq=MAX_SEQ, max_active=4, batching=batching) as eng:
            eng.backend.batch_rows = (1, 2, 4, 8)  # the 11-token prompt prefills in two chunks
            reqs = [eng.submit(PROMPTS[4], 8, **k) for k in kw]
            return [r.result(timeout=120) for r in reqs]

    one, many = in_thread(lambda: run(False)), in_thread(lambda: run(True))
    for a, b in zip(one, many):
        assert a.tokens == b.tokens
    lp = [x.logprob for x in one[2].logprobs], [x.logprob for x in many[2].logprobs]
    assert max(abs(x - y) for x, y in zip(*lp)) < 1e-4
    plp = [x.logprob for x in one[2].prompt_logprobs[1:]], [x.logprob for x in many[2].prompt_logprobs[1:]]
    assert len(plp[1]) == len(PROMPTS[4]) - 1 and max(abs(x - y) for x, y in zip(*plp)) < 1e-4


def test_padding_rows_change_no_sequence(cfg, weights):
    """A step of 3 rows padded to a 4-row shape (one row in the scratch slot) against the same rows
    in an exact 3-row shape: the same outputs, and the pool's real slots hold the same caches (the
    padding row wrote the scratch slot only)."""
    rows = {"tokens": torch.tensor([5, 6, 7]), "positions": torch.tensor([0, 1, 0]), "slots": torch.tensor([1, 1, 0])}

    def run(shapes):
        be = ReferenceBackend(cfg, weights, max_seq=MAX_SEQ)
        be.batch_rows = shapes
        be.open_pool(3)
        out = be.mixed_step(rows["tokens"], rows["positions"], rows["slots"])
        return out, be.pool.states[0]

    (padded, pool_p), (exact, pool_e) = in_thread(lambda: run((4,))), in_thread(lambda: run((3,)))
    assert padded["logits"].shape[0] == 3
    assert float((padded["logits"] - exact["logits"]).abs().max()) < 1e-5
    assert torch.equal(padded["next_tokens"], exact["next_tokens"])
    for name, cache in pool_p.items():
        assert cache.shape[0] == 4  # 3 sequence slots + the scratch slot
        assert float((cache[:3] - pool_e[name][:3]).abs().max()) < 1e-5, name
        written = cache[:3].abs().sum(dim=(1, 3))  # [slot, position]: only the real rows' entries
        assert set(map(tuple, written.nonzero().tolist())) == {(1, 0), (1, 1), (0, 0)}, name
        assert cache[3, :, 0].abs().sum() > 0 and cache[3, :, 1:].abs().sum() == 0, name  # the padding row


def test_a_step_failure_fails_its_requests_and_the_engine_goes_on(cfg, weights):
    def run():
        with Engine("tiny", weights, max_seq=MAX_SEQ, max_active=4) as eng:
            real = eng.backend.mixed_step

            def poisoned(tokens, positions, slots):
                out = real(tokens, positions, slots)
                bad = (positions >= 7).nonzero()[:, 0]  # rows of sequences that got that far
                logits = out["logits"].clone()
                logits[bad] = float("nan")
                return dict(out, logits=logits)

            eng.backend.mixed_step = poisoned
            long, short = eng.submit(PROMPTS[0], 9), eng.submit(PROMPTS[1], 3)
            with pytest.raises(StepError, match="non-finite logits"):
                long.result(timeout=60)
            return short.result(timeout=60).tokens, eng.kv_caches_live

    toks, live = in_thread(run)
    assert toks == alone(cfg, weights, PROMPTS[1], 3) and live == 0


def test_blocks_larger_than_every_step_shape_fail_the_request(cfg, weights):
    def run():
        with Engine("tiny", weights, max_seq=MAX_SEQ) as eng:
            eng.backend.batch_rows = (1, 2)  # the DFlash block (4) never fits
            with pytest.raises(GenerationError, match="exceeds the largest mixed step"):
                eng.generate(PROMPTS[0], 5, "dflash")
            return eng.generate(PROMPTS[0], 5).tokens

    assert in_thread(run) == alone(cfg, weights, PROMPTS[0], 5)


def test_batching_needs_a_backend_with_mixed_steps(cfg, weights):
    with Engine("tiny", weights, max_seq=MAX_SEQ, batching=False) as eng:
        assert not eng.batching
    be = ReferenceBackend(cfg, weights, max_seq=MAX_SEQ)
    with pytest.raises(ValueError, match="open_pool"):
        be.mixed_step(torch.tensor([1]), torch.tensor([0]), torch.tensor([0]))
    be.open_pool(2)
    with pytest.raises(ValueError, match="outside the cache pool"):
        be.mixed_step(torch.tensor([1]), torch.tensor([0]), torch.tensor([2]))  # slot 2 is the scratch slot
    with pytest.raises(ValueError, match="exceeds the largest"):
        be.mixed_step(torch.zeros(65, dtype=torch.int32), torch.arange(65), torch.zeros(65, dtype=torch.int32))


def test_oracle_drafter_batched_is_lossless(cfg, weights):
    """DFlash with the benchmark oracle drafter (high acceptance), several users in one step."""
    B = cfg.dflash.block_size

    def run():
        with Engine("tiny", weights, max_seq=MAX_SEQ, max_active=4) as eng:
            reqs = []
            for p in PROMPTS[:4]:
                od = OracleDrafter(alone(cfg, weights, p, 12), len(p), 0.1, cfg.vocab_size, B, seed=1)
                reqs.append(eng.submit(p, 12, "dflash", drafter=od))
            return [r.result(timeout=120) for r in reqs]

    res = in_thread(run)
    for p, r in zip(PROMPTS[:4], res):
        assert r.tokens == alone(cfg, weights, p, 12)
        assert r.stats["mean_acceptance_length"] > 1.5 and r.stats["synthetic"]


def test_engine_rejects_batching_without_mixed_steps(weights):
    from tilert.engine.api import _BACKENDS, register_backend

    class OneAtATime:
        def __init__(self, inner):
            self.cfg, self.max_seq = inner.cfg, inner.max_seq
            self.target_step, self.draft_step, self.reset = inner.target_step, inner.draft_step, inner.reset

    @register_backend("one-at-a-time-test")
    def factory(cfg, weights, *, max_seq, world, device, plan=None):
        return OneAtATime(ReferenceBackend(cfg, weights, max_seq=max_seq))

    try:
        with pytest.raises(EngineError, match="cannot run mixed-sequence steps"):
            Engine("tiny", weights, max_seq=MAX_SEQ, backend="one-at-a-time-test", batching=True)
        with Engine("tiny", weights, max_seq=MAX_SEQ, backend="one-at-a-time-test") as eng:
            assert not eng.batching and eng.max_active == 1
    finally:
        _BACKENDS.pop("one-at-a-time-test", None)


def test_a_long_prompt_never_holds_back_decoding_sequences(cfg, weights):
    """With 8-row steps, three decoding sequences get their row in every step while a 30-token
    prompt that arrives later prefills in the rows left over (5 a step)."""

    def run():
        eng = Engine("tiny", weights, max_seq=MAX_SEQ, max_active=4, background=False)
        eng.backend.batch_rows = (1, 2, 4, 8)
        rec = Recorder(eng.backend)
        short = [eng.submit(p, 12) for p in PROMPTS[:3]]
        eng.step()  # their prefills
        long = eng.submit(list(range(1, 31)), 4)
        while not long.done():
            eng.step()
        out = [r.result().tokens for r in [*short, long]]
        eng.close()
        return out, rec.steps

    toks, steps = in_thread(run)
    assert all(len(set(s["slots"])) == 4 and s["rows"] == 8 for s in steps[1:7])  # 3 decode rows + 5 prompt rows
    assert toks == [alone(cfg, weights, p, 12) for p in PROMPTS[:3]] + [alone(cfg, weights, list(range(1, 31)), 4)]
