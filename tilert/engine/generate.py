"""The decode loop: plain decoding and DFlash block speculative decoding (DESIGN §7).

Greedy speculative output is identical to greedy output (lossless): per verify step the device
computes the acceptance (accepted length, bonus token) inside the step and the host only reads
the result. Sampled speculative decoding verifies on the host with the rejection rule
(`tilert.ops.sampling.speculative_accept`), which keeps the target's distribution exactly. KV
rollback is free: cache index == token position, so rejected entries are simply overwritten by
the next block.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from tilert.engine.backend import StepBackend


class GenerationError(ValueError):
    """Bad generation request (empty prompt, ids out of range, context too long, bad sampling)."""


class StepError(RuntimeError):
    """A step produced unusable output (non-finite logits): the request fails, the engine goes on."""


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are chosen. temperature 0 is greedy (the step's own argmax, token-identical to
    plain greedy decoding); > 0 samples from `tilert.ops.sampling.sampling_probs` (temperature,
    then top-k, then top-p) with a generator seeded by `seed` (None: a fresh random seed)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k cut
    seed: int | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise GenerationError(f"temperature must be a finite number >= 0, got {t!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {p!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise GenerationError(f"top_k must be an integer >= 0 (0: off), got {self.top_k!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise GenerationError(f"seed must be an integer, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def generator(self) -> torch.Generator:
        seed = self.seed if self.seed is not None else random.SystemRandom().getrandbits(63)
        return torch.Generator().manual_seed(seed % (1 << 64))


@dataclass
class TokenLogprob:
    """A token's log-probability under the model (log_softmax of the raw logits) and the top-N
    alternatives at its position, most likely first."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class GenerationResult:
    tokens: list[int]
    steps: int = 0  # target forward passes after the prefill
    accepted: list[int] = field(default_factory=list)  # accepted drafts per verify step
    speculative: str | None = None
    synthetic: bool = False  # True when an oracle drafter produced the drafts (benchmarks only)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token, when asked for
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)  # first is None, when asked for

    @property
    def acceptance_lengths(self) -> list[int]:
        """Tokens emitted per verify step (accepted drafts + the bonus token)."""
        return [a + 1 for a in self.accepted]

    @property
    def mean_acceptance_length(self) -> float:
        n = self.acceptance_lengths
        return sum(n) / len(n) if n else 0.0

    def stats(self) -> dict:
        return {
            "steps": self.steps,
            "new_tokens": len(self.tokens),
            "speculative": self.speculative,
            "acceptance_lengths": self.acceptance_lengths,
            "mean_acceptance_length": round(self.mean_acceptance_length, 4),
            "synthetic": self.synthetic,
        }


def check_prompt(backend: StepBackend, prompt_ids: Sequence[int], max_new_tokens: int) -> None:
    cfg = backend.cfg
    if not prompt_ids:
        raise GenerationError("prompt is empty: give at least one token id")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    block = cfg.dflash.block_size if cfg.dflash else 1
    if len(prompt_ids) + max_new_tokens + block > backend.max_seq:  # before the per-token check: cheap
        raise GenerationError(
            f"prompt ({len(prompt_ids)}) + max_new_tokens ({max_new_tokens}) + block ({block}) exceeds the "
            f"KV cache capacity max_seq={backend.max_seq}"
        )
    bad = [t for t in prompt_ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < cfg.vocab_size]
    if bad:
        raise GenerationError(f"token id {bad[0]!r} is outside the vocabulary [0, {cfg.vocab_size})")


def generate(
    backend: StepBackend,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    speculative: str | None = None,
    drafter: Callable | None = None,
    *,
    sampling: SamplingParams | None = None,
    stop_token_ids: Sequence[int] = (),
    logprobs: int | None = None,
) -> GenerationResult:
    """Greedy decoding (or sampling, with `sampling`), or DFlash speculative decoding when
    speculative == 'dflash': one `DecodeSequence` advanced to the end on a freshly reset backend.

    `drafter` (optional) replaces the model's DFlash drafter: a callable
    (anchor, anchor_pos, B) -> block token list; used by the oracle drafter in benchmarks.
    """
    from tilert.engine.sequence import DecodeSequence

    seq = DecodeSequence(
        list(prompt_ids),
        max_new_tokens,
        speculative,
        frozenset(stop_token_ids),
        drafter=drafter,
        sampling=sampling or SamplingParams(),
        logprobs=logprobs,
    )
    seq.check(backend)
    backend.reset()
    while not seq.done:
        seq.advance(backend)
    return seq.result


class OracleDrafter:
    """Benchmark-only drafter: proposes the target's own greedy continuation, corrupted with a set
    probability per token, so throughput can be measured at a chosen acceptance length.
    Results it touches are marked synthetic."""

    synthetic = True

    def __init__(
        self,
        greedy_tokens: Sequence[int],
        prompt_len: int,
        corrupt_p: float,
        vocab: int,
        block_size: int,
        seed: int = 0,
    ) -> None:
        self.truth = list(greedy_tokens)
        self.prompt_len, self.p, self.vocab, self.block_size = prompt_len, corrupt_p, vocab, block_size
        self.rng = random.Random(seed)

    def __call__(self, anchor: int, anchor_pos: int, B: int) -> list[int]:
        block = [anchor]
        for i in range(1, B):
            k = anchor_pos + i - self.prompt_len  # index into the greedy continuation
            t = self.truth[k] if 0 <= k < len(self.truth) else 0
            if self.rng.random() < self.p:
                t = (t + 1 + self.rng.randrange(self.vocab - 1)) % self.vocab
            block.append(t)
        return block

    @staticmethod
    def corruption_for_acceptance(accept_len: float, block: int) -> float:
        """Per-token corruption p giving expected tokens/step = accept_len (bisection on the closed form)."""

        def expected(p: float) -> float:
            q = 1.0 - p
            return sum(q**i for i in range(block))  # E[accepted+1] = sum_{i<B} q^i

        if not 1.0 <= accept_len <= block:
            raise ValueError(f"acceptance length must be in [1, {block}], got {accept_len}")
        lo, hi = 0.0, 1.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if expected(mid) > accept_len else (lo, mid)
        return (lo + hi) / 2
