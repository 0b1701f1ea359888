"""One decoding sequence as a resumable state machine, so a scheduler can interleave many.

`generate()` runs a whole request in one loop; a server needs to run one step of one request,
then one step of another. `DecodeSequence.advance()` is exactly one iteration of that loop
(prefill, a greedy step, or one DFlash draft + verify) and returns the tokens it accepted; the
token stream is identical to `generate()` (tests check it). Each sequence owns its KV cache
(`cache`), which the engine binds into the backend before advancing it, so sequences never see
each other's state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tilert.engine.backend import StepBackend
from tilert.engine.generate import GenerationError, GenerationResult, check_prompt


def _ids(xs: Sequence[int]) -> torch.Tensor:
    return torch.tensor(list(xs), dtype=torch.int32)


@dataclass
class DecodeSequence:
    """Prompt + generated tokens + where the next step starts; `cache` is this sequence's KV state."""

    prompt: list[int]
    max_new_tokens: int
    speculative: str | None = None
    stop_token_ids: frozenset[int] = frozenset()
    cache: Any = None
    drafter: Any = None  # optional (anchor, anchor_pos, B) -> block, as in generate(); benchmarks/tests
    result: GenerationResult = field(init=False)
    finish_reason: str | None = None  # "length" | "stop" once done
    _pos: int = 0  # position of the anchor (last emitted token) in DFlash mode
    _ctx: Any = None
    _ctx_pos: Any = None

    def __post_init__(self) -> None:
        self.result = GenerationResult(
            [], speculative=self.speculative, synthetic=bool(getattr(self.drafter, "synthetic", False))
        )
        if self.max_new_tokens == 0:
            self.finish_reason = "length"

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def check(self, backend: StepBackend) -> None:
        """Raise GenerationError for a request this backend cannot serve (before it is queued)."""
        if self.speculative not in (None, "dflash"):
            raise GenerationError(f"unknown speculative method {self.speculative!r} (known: dflash)")
        if self.speculative and backend.cfg.dflash is None and self.drafter is None:
            raise GenerationError(f"model '{backend.cfg.name}' has no DFlash drafter config")
        check_prompt(backend, self.prompt, self.max_new_tokens)

    def advance(self, backend: StepBackend) -> list[int]:
        """Run one target step (plus a draft in DFlash mode); return the newly accepted tokens."""
        if self.done:
            return []
        res, n = self.result, len(self.prompt)
        if not res.tokens:  # prefill
            out = backend.target_step(_ids(self.prompt), torch.arange(n, dtype=torch.int32))
            new = [int(out["next_tokens"][-1])]
            self._ctx, self._ctx_pos, self._pos = out.get("features"), torch.arange(n, dtype=torch.int32), n
        elif not self.speculative:
            p = n + len(res.tokens) - 1
            out = backend.target_step(_ids(res.tokens[-1:]), _ids([p]))
            new = [int(out["next_tokens"][-1])]
            res.steps += 1
        else:
            cfg, pos = backend.cfg.dflash, self._pos
            B = cfg.block_size if cfg is not None else self.drafter.block_size
            positions = pos + torch.arange(B, dtype=torch.int32)
            if self.drafter is not None:
                block = _ids(self.drafter(res.tokens[-1], pos, B))
            else:
                assert cfg is not None
                block = backend.draft_step(
                    _ids([res.tokens[-1]] + [cfg.mask_token_id] * (B - 1)), positions, self._ctx, self._ctx_pos
                )
            out = backend.target_step(block, positions, mode="verify")
            acc = out["accept"].tolist()
            a = acc[0]
            new = acc[1 : a + 2]
            res.accepted.append(a)
            res.steps += 1
            self._ctx, self._ctx_pos, self._pos = out.get("features"), positions, pos + a + 1
        return self._emit(new)

    def _emit(self, new: list[int]) -> list[int]:
        room = self.max_new_tokens - len(self.result.tokens)
        new = new[:room]
        for i, t in enumerate(new):
            if t in self.stop_token_ids:
                new = new[: i + 1]
                self.finish_reason = "stop"
                break
        self.result.tokens.extend(new)
        if self.finish_reason is None and len(self.result.tokens) >= self.max_new_tokens:
            self.finish_reason = "length"
        return new
