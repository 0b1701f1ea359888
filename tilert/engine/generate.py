"""The decode loop: plain greedy decoding and DFlash block speculative decoding (DESIGN §7).

Speculative output is identical to greedy output (lossless). Per verify step the device computes
the acceptance (accepted length, bonus token) inside the step; the host only reads the result
to know where the next block starts. KV rollback is free: cache index == token position, so
rejected entries are simply overwritten by the next block.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from tilert.engine.backend import StepBackend


class GenerationError(ValueError):
    """Bad generation request (empty prompt, ids out of range, context too long)."""


@dataclass
class GenerationResult:
    tokens: list[int]
    steps: int = 0  # target forward passes after the prefill
    accepted: list[int] = field(default_factory=list)  # accepted drafts per verify step
    speculative: str | None = None
    synthetic: bool = False  # True when an oracle drafter produced the drafts (benchmarks only)

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
    bad = [t for t in prompt_ids if not isinstance(t, int) or not 0 <= t < cfg.vocab_size]
    if bad:
        raise GenerationError(f"token id {bad[0]!r} is outside the vocabulary [0, {cfg.vocab_size})")
    if max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    block = cfg.dflash.block_size if cfg.dflash else 1
    if len(prompt_ids) + max_new_tokens + block > backend.max_seq:
        raise GenerationError(
            f"prompt ({len(prompt_ids)}) + max_new_tokens ({max_new_tokens}) + block ({block}) exceeds the "
            f"KV cache capacity max_seq={backend.max_seq}"
        )


def _ids(xs: Sequence[int], device: torch.device | None = None) -> torch.Tensor:
    return torch.tensor(list(xs), dtype=torch.int32, device=device)


def generate(
    backend: StepBackend,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    speculative: str | None = None,
    drafter: Callable | None = None,
) -> GenerationResult:
    """Greedy decoding, or DFlash speculative decoding when speculative == 'dflash'.

    `drafter` (optional) replaces the model's DFlash drafter: a callable
    (anchor, anchor_pos, backend) -> block token list; used by the oracle drafter in benchmarks.
    """
    if speculative not in (None, "dflash"):
        raise GenerationError(f"unknown speculative method {speculative!r} (known: dflash)")
    if speculative and backend.cfg.dflash is None and drafter is None:
        raise GenerationError(f"model '{backend.cfg.name}' has no DFlash drafter config")
    check_prompt(backend, prompt_ids, max_new_tokens)
    backend.reset()
    res = GenerationResult([], speculative=speculative, synthetic=getattr(drafter, "synthetic", False))
    if max_new_tokens == 0:
        return res
    n = len(prompt_ids)
    out = backend.target_step(_ids(prompt_ids), torch.arange(n, dtype=torch.int32))
    res.tokens.append(int(out["next_tokens"][-1]))
    if not speculative:
        while len(res.tokens) < max_new_tokens:
            p = n + len(res.tokens) - 1
            out = backend.target_step(_ids(res.tokens[-1:]), _ids([p]))
            res.tokens.append(int(out["next_tokens"][-1]))
            res.steps += 1
        return res
    B = backend.cfg.dflash.block_size if backend.cfg.dflash else drafter.block_size
    ctx, ctx_pos = out.get("features"), torch.arange(n, dtype=torch.int32)
    pos = n  # position of the anchor res.tokens[-1]
    while len(res.tokens) < max_new_tokens:
        anchor = res.tokens[-1]
        if drafter is not None:
            block = _ids(drafter(anchor, pos, B))
        else:
            mask = backend.cfg.dflash.mask_token_id
            block = backend.draft_step(
                _ids([anchor] + [mask] * (B - 1)), pos + torch.arange(B, dtype=torch.int32), ctx, ctx_pos
            )
        out = backend.target_step(block, pos + torch.arange(B, dtype=torch.int32), mode="verify")
        acc = out["accept"].tolist()
        a = acc[0]
        res.tokens.extend(acc[1 : a + 2])
        res.accepted.append(a)
        res.steps += 1
        ctx, ctx_pos = out.get("features"), pos + torch.arange(B, dtype=torch.int32)
        pos += a + 1
    res.tokens = res.tokens[:max_new_tokens]
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
