"""The decode loop: plain decoding and DFlash block speculative decoding (DESIGN §7).

Greedy speculative output is identical to greedy output (lossless): per verify step the device
computes the acceptance (accepted length, bonus token) inside the step and the host only reads
the result. Sampled speculative decoding verifies on the host with the rejection rule
(`tilert.ops.sampling.speculative_accept`), which keeps the target's distribution exactly. KV
rollback is free: cache index == token position, so rejected entries are simply overwritten by
the next block.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from tilert.engine.backend import StepBackend
from tilert.engine.request import GenerationResult, SamplingParams
from tilert.engine.sequence import DecodeSequence
from tilert.engine.timing import StepClock


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
    cycles_per_sync: int = 1,
) -> GenerationResult:
    """Greedy decoding (or sampling, with `sampling`), or DFlash speculative decoding when
    speculative == 'dflash': one `DecodeSequence` advanced to the end on a freshly reset backend.
    The result's `timing` holds the step times and the loop's measured tokens/s (engine/timing.py).

    `drafter` (optional) replaces the model's DFlash drafter: a callable
    (anchor, anchor_pos, B) -> block token list; used by the oracle drafter in benchmarks.
    `cycles_per_sync` > 1 (greedy; DFlash with the model's drafter): that many decode steps or
    draft/verify cycles chained on the device between host synchronisations (engine/cycles.py);
    the same tokens.
    """
    seq = DecodeSequence(
        list(prompt_ids),
        max_new_tokens,
        speculative,
        frozenset(stop_token_ids),
        drafter=drafter,
        sampling=sampling or SamplingParams(),
        logprobs=logprobs,
        cycles_per_sync=cycles_per_sync,
    )
    seq.check(backend)
    clock = StepClock()
    timed = clock.wrap(backend)
    timed.reset()
    while not seq.done:
        seq.advance(timed)
    clock.finish()
    res = seq.result
    res.timing = clock.summary(res.mean_acceptance_length, len(res.tokens))
    return res


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
