"""Sampling: the distribution ops against written-out references, and speculative sampling
against plain sampling (the rejection rule keeps the target's distribution exactly)."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

import tilert.ops.sampling as S
from tests.engine.test_api import in_thread
from tilert.engine import ReferenceBackend, generate
from tilert.engine.api import Engine
from tilert.engine.generate import GenerationError, SamplingParams
from tilert.models.config import load_config
from tilert.models.weights import synthetic_weights


def chi_square_p(a: Counter, b: Counter, min_count: int = 8) -> float:
    """p-value of a two-sample chi-square test that a and b come from one distribution (sparse
    cells pooled into one)."""
    na, nb = sum(a.values()), sum(b.values())
    cells, rest = [], [0, 0]
    for k in set(a) | set(b):
        if a[k] + b[k] >= min_count:
            cells.append((a[k], b[k]))
        else:
            rest[0] += a[k]
            rest[1] += b[k]
    if sum(rest):
        cells.append(tuple(rest))
    stat = 0.0
    for x, y in cells:
        tot = x + y
        for obs, n in ((x, na), (y, nb)):
            exp = tot * n / (na + nb)
            stat += (obs - exp) ** 2 / exp
    df = len(cells) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2)))


# ---- the ops ------------------------------------------------------------------------------------


def test_sampling_probs_against_written_out_reference():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 3.0])
    e = [math.exp(x / 0.5) for x in logits.tolist()]
    full = [x / sum(e) for x in e]
    assert torch.allclose(S.sampling_probs(logits, 0.5), torch.tensor(full, dtype=torch.float64), rtol=1e-12)
    # top-k 2 keeps ids 4 and 0
    k2 = [full[0] / (full[0] + full[4]), 0, 0, 0, full[4] / (full[0] + full[4])]
    assert torch.allclose(S.sampling_probs(logits, 0.5, top_k=2), torch.tensor(k2, dtype=torch.float64))
    # top-p: the smallest most-likely set whose mass reaches p
    order = sorted(range(5), key=lambda i: -full[i])
    for p in (0.3, full[order[0]] + 1e-9, 0.9, 0.999999, 1.0):
        keep, mass = [], 0.0
        for i in order:
            if mass >= p and keep:
                break
            keep.append(i)
            mass += full[i]
        want = [full[i] / mass if i in keep else 0.0 for i in range(5)]
        got = S.sampling_probs(logits, 0.5, top_p=p)
        assert torch.allclose(got, torch.tensor(want, dtype=torch.float64)), p
    both = S.sampling_probs(logits, 0.5, top_k=3, top_p=0.5)  # top-k first, then top-p within it
    assert (both > 0).sum() == 1 and both[4] == 1.0


def test_sample_follows_the_distribution_and_never_draws_zero_mass():
    probs = torch.tensor([0.5, 0.0, 0.2, 0.3, 0.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    draws = Counter(S.sample(probs, g) for _ in range(6000))
    assert draws[1] == 0 and draws[4] == 0
    for i in (0, 2, 3):
        assert abs(draws[i] / 6000 - float(probs[i])) < 0.03


@pytest.mark.parametrize("greedy_draft", [True, False])
def test_rejection_rule_keeps_the_target_distribution(greedy_draft):
    """Op level: draft x ~ q (or a fixed x, q one-hot); the emitted first token is distributed as p."""
    g = torch.Generator().manual_seed(1)
    p = torch.tensor([[0.1, 0.6, 0.3, 0.0], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    q = torch.tensor([[0.5, 0.1, 0.1, 0.3]], dtype=torch.float64)
    n = 6000
    first = Counter()
    for _ in range(n):
        if greedy_draft:
            out = S.speculative_accept([7, 0], p, g)  # always proposes token 0 (p = 0.1)
        else:
            out = S.speculative_accept([7, S.sample(q[0], g)], p, g, draft_probs=q)
        first[out[0]] += 1
    for i in range(4):
        assert abs(first[i] / n - float(p[0, i])) < 0.025, (i, first)
    assert first[3] == 0


# ---- the engine: speculative sampling vs plain sampling on the tiny model -----------------------


class PrefixModel:
    """A StepBackend whose logits for a step are rows of one full forward over the history, memoised
    by prefix: plain and speculative decoding see the very same target distribution, and each
    distinct prefix costs one forward of the tiny model."""

    def __init__(self, inner: ReferenceBackend) -> None:
        self.inner, self.cfg, self.max_seq = inner, inner.cfg, inner.max_seq
        self.rows: dict[tuple[int, ...], torch.Tensor] = {}
        self.hist: list[int] = []

    def reset(self) -> None:
        self.hist = []

    def row(self, prefix: tuple[int, ...]) -> torch.Tensor:
        if prefix not in self.rows:
            self.inner.reset()
            logits = self.inner.target_step(torch.tensor(prefix), torch.arange(len(prefix)))["logits"]
            for i in range(len(prefix)):
                self.rows.setdefault(prefix[: i + 1], logits[i])
        return self.rows[prefix]

    def target_step(self, tokens: torch.Tensor, positions: torch.Tensor, mode: str = "decode") -> dict:
        p0 = int(positions[0])
        self.hist = self.hist[:p0] + tokens.tolist()
        self.row(tuple(self.hist))
        logits = torch.stack([self.row(tuple(self.hist[: p0 + i + 1])) for i in range(len(tokens))])
        return {"logits": logits, "next_tokens": S.argmax(logits)}

    def drafter(self, anchor: int, pos: int, B: int) -> list[int]:
        """The target's own greedy continuation, except that the second draft is its runner-up:
        blocks where both acceptance and rejection matter."""
        h = self.hist[:pos] + [anchor]
        for i in range(B - 1):
            ranked = torch.argsort(self.row(tuple(h)), descending=True).tolist()
            h.append(ranked[1] if i == 1 else ranked[0])
        return h[pos:]


@pytest.fixture(scope="module")
def prefix_model() -> PrefixModel:
    cfg = load_config("tiny")
    return PrefixModel(ReferenceBackend(cfg, synthetic_weights(cfg, 5), max_seq=64))


def token_frequencies(model: PrefixModel, speculative: str | None, seeds: range, n_tokens: int = 3) -> Counter:
    params = dict(temperature=1.3, top_k=3)

    def run() -> Counter:
        out = Counter()
        for s in seeds:
            res = generate(
                model, [5, 17, 3], n_tokens, speculative, drafter=model.drafter if speculative else None,
                sampling=SamplingParams(seed=s, **params),
            )  # fmt: skip
            out[tuple(res.tokens[1:])] += 1  # the tokens the verify step decides (the first comes from the prefill)
        return out

    return in_thread(run)


def test_speculative_sampling_matches_plain_sampling(prefix_model, monkeypatch):
    n = 1500
    plain = token_frequencies(prefix_model, None, range(n))
    spec = token_frequencies(prefix_model, "dflash", range(n, 2 * n))
    assert len(plain) > 10  # a real distribution, not one sequence
    assert chi_square_p(plain, spec) > 1e-3
    # the same statistic catches greedy acceptance (keep drafts equal to the target's argmax)
    def greedy_accept(draft: list[int], target_probs, generator: torch.Generator) -> list[int]:
        best = [int(torch.argmax(target_probs(i))) for i in range(len(draft))]
        out: list[int] = []
        for i in range(1, len(draft)):
            if draft[i] != best[i - 1]:
                break
            out.append(draft[i])
        return out + [best[len(out)]]

    monkeypatch.setattr("tilert.engine.sequence.speculative_accept", greedy_accept)
    wrong = token_frequencies(prefix_model, "dflash", range(n, 2 * n))
    assert chi_square_p(plain, wrong) < 1e-6


# ---- the engine: seeds, greedy, bad parameters -----------------------------------------------------


def test_seeded_sampling_is_reproducible_and_greedy_is_unchanged():
    def run() -> dict:
        with Engine("tiny", 4, max_seq=128) as eng:
            out = {}
            for spec in (None, "dflash"):
                for seed in (1, 1, 2):
                    out.setdefault((spec, seed), []).append(
                        eng.generate([5, 17, 3], 12, spec, temperature=0.9, top_p=0.95, seed=seed).tokens
                    )
                out[(spec, "greedy")] = eng.generate([5, 17, 3], 12, spec, temperature=0.0, top_k=3, seed=9).tokens
            return out

    out = in_thread(run)
    cfg = load_config("tiny")
    greedy = generate(ReferenceBackend(cfg, synthetic_weights(cfg, 4), max_seq=128), [5, 17, 3], 12).tokens
    for spec in (None, "dflash"):
        a, b = out[(spec, 1)]
        assert a == b and a != out[(spec, 2)][0]
        assert out[(spec, "greedy")] == greedy


@pytest.mark.parametrize(
    "kw, needle",
    [
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"seed": 1.5}, "seed"),
        ({"logprobs": 21}, "logprobs"),
        ({"stop_token_ids": [999]}, "stop token id"),
        ({"stop": ["x"]}, "tokenizer"),
    ],
)
def test_bad_sampling_parameters_raise_at_submit(kw, needle):
    eng = Engine("tiny", 0, max_seq=64, background=False)
    with pytest.raises(GenerationError, match=needle):
        eng.submit([1, 2], 3, **kw)
    assert eng.idle()


def test_logprobs_are_the_models_log_softmax():
    cfg = load_config("tiny")
    be = ReferenceBackend(cfg, synthetic_weights(cfg, 4), max_seq=64)

    def run() -> tuple:
        with Engine("tiny", 4, max_seq=64) as eng:
            r = eng.submit([5, 17, 3], 3, logprobs=2, prompt_logprobs=True, temperature=0.7, seed=3).result(60)
        be.reset()
        full = be.target_step(torch.tensor([5, 17, 3] + r.tokens[:2]), torch.arange(5))["logits"]
        return r, torch.log_softmax(full.double(), -1)

    r, lp = in_thread(run)
    assert r.prompt_logprobs[0] is None and len(r.prompt_logprobs) == 3 and len(r.logprobs) == 3
    for i, e in enumerate(r.prompt_logprobs[1:]):
        assert e.token == [17, 3][i] and abs(e.logprob - float(lp[i, e.token])) < 1e-4
    for i, e in enumerate(r.logprobs):
        assert e.token == r.tokens[i] and abs(e.logprob - float(lp[2 + i, e.token])) < 1e-4
        top = torch.topk(lp[2 + i], 2)
        assert [t for t, _ in e.top] == top.indices.tolist()


def test_chunk_logprobs_follow_the_tokens():
    def run() -> list:
        with Engine("tiny", 4, max_seq=64) as eng:
            return list(eng.stream([5, 17, 3], 9, "dflash", logprobs=0, temperature=1.0, seed=1))

    chunks = in_thread(run)
    assert all(c.logprobs is not None and [e.token for e in c.logprobs] == c.tokens for c in chunks)


def test_cli_generate_sampling_flags(capsys):
    from tilert.cli import main

    args = ["generate", "--prompt-ids", "5,17,3", "--max-new-tokens", "6", "--temperature", "0.9", "--top-k", "50"]
    outs = []
    for seed in ("3", "3", "4"):
        assert main(args + ["--sample-seed", seed, "--speculative", "dflash"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] != outs[2]
    assert main(args[:-4] + ["--temperature", "-1"]) == 2
    assert "temperature must be" in capsys.readouterr().err
