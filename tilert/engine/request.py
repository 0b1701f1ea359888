"""What a generation request asks for and gets back: sampling parameters, results, errors, and
the prompt check every entry point makes."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
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
    timing: dict | None = None  # generate(): step times and measured tokens/s (tilert.engine.timing.StepClock)

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
            **({"timing": self.timing} if self.timing is not None else {}),
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
