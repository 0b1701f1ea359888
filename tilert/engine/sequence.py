"""One decoding sequence as a resumable state machine, so a scheduler can interleave many.

`DecodeSequence.advance()` is exactly one step of a request (prefill, a plain decode step, or one
DFlash draft + verify) and returns the tokens it accepted; `generate()` runs one sequence to the
end. Each sequence owns its KV cache (`cache`), which the engine binds into the backend before
advancing it, so sequences never see each other's state.

`plan()` and `take()` split the same step in two for a scheduler that runs the rows of several
sequences as one mixed step (`StepBackend.mixed_step`, continuous batching): `plan` says which rows
this sequence adds to the next step (a prefill chunk, a decode row, or a drafted DFlash block,
drafting first), `take` turns the step's outputs for those rows into tokens. Greedy acceptance of
a block is then `dflash_accept` over its rows' next tokens, on the host.

Token choice: greedy takes the step's own argmax (`next_tokens`, and the device-side `accept` of
a verify step); sampling draws from the step's logits on the host with the request's generator,
and a sampled verify step uses the rejection rule (`tilert.ops.sampling.speculative_accept`).
Every step's logits are checked for NaN/Inf before a token is taken from them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tilert.engine.backend import StepBackend
from tilert.engine.cycles import CycleState, run_cycles, run_decodes
from tilert.engine.request import (
    GenerationError,
    GenerationResult,
    SamplingParams,
    StepError,
    TokenLogprob,
    check_prompt,
)
from tilert.ops.sampling import dflash_accept, sample, sampling_probs, speculative_accept, token_logprobs

MAX_LOGPROBS = 20  # top-N alternatives per token, at most (as OpenAI's API)


def _ids(xs: Sequence[int]) -> torch.Tensor:
    return torch.tensor(list(xs), dtype=torch.int32)


@dataclass(frozen=True)
class StepRows:
    """A sequence's rows in a mixed step: tokens at consecutive positions, and what they are
    ("prefill": a chunk of the prompt, "decode": the last token, "verify": a drafted DFlash block)."""

    tokens: list[int]
    start: int
    kind: str

    @property
    def positions(self) -> list[int]:
        return list(range(self.start, self.start + len(self.tokens)))


@dataclass
class DecodeSequence:
    """Prompt + generated tokens + where the next step starts; `cache` is this sequence's KV state."""

    prompt: list[int]
    max_new_tokens: int
    speculative: str | None = None
    stop_token_ids: frozenset[int] = frozenset()
    cache: Any = None
    drafter: Any = None  # optional (anchor, anchor_pos, B) -> block, as in generate(); benchmarks/tests
    sampling: SamplingParams = field(default_factory=SamplingParams)
    logprobs: int | None = None  # record each token's logprob and this many alternatives (None: off)
    prompt_logprobs: bool = False  # also the prompt tokens' logprobs (from the prefill's logits)
    # greedy decoding (DFlash with the model's drafter too): steps chained on the device per advance
    # (engine/cycles.py), the host reading their tokens once after the last; 1: one host-driven step
    cycles_per_sync: int = 1
    result: GenerationResult = field(init=False)
    finish_reason: str | None = None  # "length" | "stop" once done
    _pos: int = 0  # position of the anchor (last emitted token) in DFlash mode
    _ctx: Any = None
    _ctx_pos: Any = None
    _gen: Any = None
    _prefilled: int = 0  # prompt tokens already in the cache (mixed steps run a long prompt in chunks)
    _prefill_out: dict[str, list[Any]] = field(default_factory=dict)  # the chunks' outputs so far

    def __post_init__(self) -> None:
        self.result = GenerationResult(
            [], speculative=self.speculative, synthetic=bool(getattr(self.drafter, "synthetic", False))
        )
        if self.max_new_tokens == 0 and not self.prompt_logprobs:  # else the prefill still runs, for them
            self.finish_reason = "length"

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def prefilling(self) -> bool:
        """Its prompt is not (wholly) in the cache yet: its next rows are a prompt chunk."""
        return not self.result.tokens and not self.done

    def check(self, backend: StepBackend) -> None:
        """Raise GenerationError for a request this backend cannot serve (before it is queued)."""
        if self.speculative not in (None, "dflash"):
            raise GenerationError(f"unknown speculative method {self.speculative!r} (known: dflash)")
        if self.speculative and backend.cfg.dflash is None and self.drafter is None:
            raise GenerationError(f"model '{backend.cfg.name}' has no DFlash drafter config")
        if not isinstance(self.sampling, SamplingParams):
            raise GenerationError(f"sampling must be a SamplingParams, got {type(self.sampling).__name__}")
        c = self.cycles_per_sync
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise GenerationError(f"cycles_per_sync must be an integer >= 1, got {c!r}")
        n = self.logprobs
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_LOGPROBS):
            raise GenerationError(f"logprobs must be an integer in [0, {MAX_LOGPROBS}], got {n!r}")
        V = backend.cfg.vocab_size
        bad = [t for t in self.stop_token_ids if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < V]
        if bad:
            raise GenerationError(f"stop token id {bad[0]!r} is outside the vocabulary [0, {V})")
        check_prompt(backend, self.prompt, self.max_new_tokens)

    def advance(self, backend: StepBackend) -> list[int]:
        """Run one target step (plus a draft in DFlash mode); return the newly accepted tokens."""
        if self.done:
            return []
        if self._gen is None and not self.sampling.greedy:
            self._gen = self.sampling.generator()
        res, n = self.result, len(self.prompt)
        if not res.tokens:  # prefill
            out = backend.target_step(_ids(self.prompt), torch.arange(n, dtype=torch.int32))
            logits = _logits(out, 0, slice(0, n) if self.prompt_logprobs else slice(n - 1, n))
            new, rows_used = self._after_prompt(out, logits)
        elif not self.speculative and self._chains(backend, "decode_async"):
            return self._advance_decodes(backend)
        elif not self.speculative:
            p = n + len(res.tokens) - 1
            out = backend.target_step(_ids(res.tokens[-1:]), _ids([p]))
            logits = _logits(out, p, slice(0, 1))
            new = [self._choose(out, logits)]
            rows_used = logits
            res.steps += 1
        elif self._chains(backend, "verify_async"):
            return self._advance_cycles(backend)
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
            new, logits = self._verified(out, block.tolist(), pos, out["accept"] if self.sampling.greedy else None)
            rows_used = None if logits is None else logits[: len(new)]
            self._ctx, self._ctx_pos, self._pos = out.get("features"), positions, pos + len(new)
        return self._emit(new, rows_used)

    def _chains(self, backend: StepBackend, method: str) -> bool:
        """Steps chained on the device (engine/cycles.py): greedy, no logprobs, the model's own
        drafter in DFlash mode, more than one step a sync, and a backend with `method`."""
        return (self.cycles_per_sync > 1 and self.drafter is None and self.sampling.greedy and self.logprobs is None
                and callable(getattr(backend, method, None)))  # fmt: skip

    def _advance_decodes(self, backend: StepBackend) -> list[int]:
        """Greedy decode steps chained on the device, then their tokens (`_take_chain`)."""
        dev, n = self._chain(backend)
        pos = len(self.prompt) + len(self.result.tokens) - 1
        chosen = run_decodes(backend, _ids(self.result.tokens[-1:]).to(dev), _ids([pos]).to(dev), n)
        return self._take_chain([[t] for t in chosen.tolist()], dflash=False)

    def _advance_cycles(self, backend: StepBackend) -> list[int]:
        """DFlash cycles chained on the device, then their tokens (`_take_chain`)."""
        cfg = backend.cfg.dflash
        assert cfg is not None
        dev, n = self._chain(backend)
        state = CycleState(_ids(self.result.tokens[-1:]).to(dev), _ids([self._pos]).to(dev), self._ctx,
                           torch.as_tensor(self._ctx_pos).to(dev))  # fmt: skip
        rows, state = run_cycles(backend, state, n, cfg.block_size, cfg.mask_token_id)
        self._ctx, self._ctx_pos = state.ctx, state.ctx_pos
        return self._take_chain([acc[1 : acc[0] + 2] for acc in rows.tolist()], dflash=True)

    def _chain(self, backend: StepBackend) -> tuple[torch.device, int]:
        """The backend's device and the chain's length: cycles_per_sync steps, at most one per token
        still wanted (every step emits at least one)."""
        n = max(1, min(self.cycles_per_sync, self.max_new_tokens - len(self.result.tokens)))
        return torch.device(getattr(backend, "device", "cpu")), n

    def _take_chain(self, steps: list[list[int]], dflash: bool) -> list[int]:
        """Each chained step's tokens in order, as `advance` takes one step's, stopping where the
        sequence ends (steps past a stop or the length limit are dropped; their cache entries lie
        past the sequence's end and are never read)."""
        out: list[int] = []
        for new in steps:
            if dflash:
                self.result.accepted.append(len(new) - 1)
                self._pos += len(new)
            self.result.steps += 1
            out += self._emit(new, None)
            if self.done:
                break
        return out

    # ---- one step as a part of a mixed step -----------------------------------------------------

    def plan(self, backend: StepBackend, budget: int) -> StepRows | None:
        """The rows this sequence adds to the next mixed step, at most `budget` of them (None: none
        fit, or it is done). A DFlash sequence drafts its block here (`backend.draft_step` on its own
        drafter cache, which the caller has bound), only when the block fits."""
        if self.done or budget < 1:
            return None
        if self._gen is None and not self.sampling.greedy:
            self._gen = self.sampling.generator()
        res, n = self.result, len(self.prompt)
        if not res.tokens:  # the prompt, in chunks of what fits
            k = min(budget, n - self._prefilled)
            return StepRows(self.prompt[self._prefilled : self._prefilled + k], self._prefilled, "prefill")
        if not self.speculative:
            return StepRows(res.tokens[-1:], n + len(res.tokens) - 1, "decode")
        cfg, pos = backend.cfg.dflash, self._pos
        B = cfg.block_size if cfg is not None else self.drafter.block_size
        most = getattr(backend, "batch_rows", (B,))[-1]
        if B > most:
            raise GenerationError(f"a DFlash block of {B} tokens exceeds the largest mixed step ({most} rows)")
        if B > budget:
            return None
        if self.drafter is not None:
            block = list(self.drafter(res.tokens[-1], pos, B))
        else:
            assert cfg is not None
            positions = pos + torch.arange(B, dtype=torch.int32)
            anchor = _ids([res.tokens[-1]] + [cfg.mask_token_id] * (B - 1))
            block = backend.draft_step(anchor, positions, self._ctx, self._ctx_pos).tolist()
        return StepRows(block, pos, "verify")

    def take(self, rows: StepRows, out: dict[str, Any]) -> list[int]:
        """The tokens the mixed step's outputs for `rows` (logits, next_tokens, features of just these
        rows) accept; as `advance` after the same step."""
        res, n = self.result, len(self.prompt)
        if rows.kind == "prefill":
            keep = ("next_tokens", "features") + (("logits",) if self.prompt_logprobs else ())
            for k in keep:
                if k in out:
                    self._prefill_out.setdefault(k, []).append(out[k])
            self._prefilled += len(rows.tokens)
            if self._prefilled < n:
                return []
            whole = {k: torch.cat(v) for k, v in self._prefill_out.items()}
            self._prefill_out = {}
            whole.setdefault("logits", out.get("logits"))  # the last chunk's rows end at the prompt's end
            if not self.prompt_logprobs and whole["logits"] is not None:
                whole["logits"] = whole["logits"][-1:]
            return self._emit(*self._after_prompt(whole, _logits(whole, 0, slice(None))))
        if rows.kind == "decode":
            logits = _logits(out, rows.start, slice(0, 1))
            res.steps += 1
            return self._emit([self._choose(out, logits)], logits)
        B, pos = len(rows.tokens), rows.start
        block = _ids(rows.tokens)
        acc = dflash_accept(block, out["next_tokens"].to(torch.int32).cpu()) if self.sampling.greedy else None
        new, logits = self._verified(out, rows.tokens, pos, acc)
        positions = pos + torch.arange(B, dtype=torch.int32)
        self._ctx, self._ctx_pos, self._pos = out.get("features"), positions, pos + len(new)
        return self._emit(new, None if logits is None else logits[: len(new)])

    def _verified(self, out: dict[str, Any], block: list[int], pos: int,
                  accept: torch.Tensor | None) -> tuple[list[int], torch.Tensor | None]:  # fmt: skip
        """A verify step's tokens: greedy from the acceptance row `accept` ([accepted, tokens...]),
        sampling by the rejection rule on the step's logits; the logits rows they came from."""
        B = len(block)
        if accept is not None:
            acc = accept.tolist()
            new = acc[1 : acc[0] + 2]
            logits = _logits(out, pos, slice(0, len(new)))
        else:
            logits = _logits(out, pos, slice(0, B))
            if logits is None:
                raise GenerationError("this backend returns no logits; sampling needs them (use temperature 0)")
            host = logits.cpu()
            new = speculative_accept(block, lambda i: self._probs(host[i]), self._gen)
        self.result.accepted.append(len(new) - 1)
        self.result.steps += 1
        return new, logits

    def _after_prompt(self, out: dict[str, Any], logits: torch.Tensor | None) -> tuple[list[int], torch.Tensor | None]:
        """After the prompt's step(s): its token (and the prompt's logprobs when asked), the drafter's
        context (the prompt's features); the logits row the token came from."""
        n = len(self.prompt)
        new = [self._choose(out, logits)]
        if self.prompt_logprobs:
            assert logits is not None
            rows = token_logprobs(logits[:-1].cpu(), self.prompt[1:], self.logprobs or 0)
            lps = [TokenLogprob(t, lp, top) for t, (lp, top) in zip(self.prompt[1:], rows)]
            self.result.prompt_logprobs = [None, *lps]
        self._ctx, self._ctx_pos, self._pos = out.get("features"), torch.arange(n, dtype=torch.int32), n
        return new, None if logits is None else logits[-1:]

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        s = self.sampling
        return sampling_probs(logits, s.temperature, s.top_k, s.top_p)

    def _choose(self, out: dict[str, Any], logits: torch.Tensor | None) -> int:
        """The next token after the last row: the step's argmax (greedy) or a draw (sampling)."""
        if self.sampling.greedy:
            return int(out["next_tokens"][-1])
        if logits is None:
            raise GenerationError("this backend returns no logits; sampling needs them (use temperature 0)")
        return sample(self._probs(logits[-1].cpu()), self._gen)

    def _emit(self, new: list[int], rows: torch.Tensor | None) -> list[int]:
        room = self.max_new_tokens - len(self.result.tokens)
        new = new[:room]
        for i, t in enumerate(new):
            if t in self.stop_token_ids:
                new = new[: i + 1]
                self.finish_reason = "stop"
                break
        if self.logprobs is not None and new:
            if rows is None:
                raise GenerationError("this backend returns no logits; logprobs need them")
            lps = token_logprobs(rows[: len(new)].cpu(), new, self.logprobs)
            self.result.logprobs.extend(TokenLogprob(t, lp, top) for t, (lp, top) in zip(new, lps))
        self.result.tokens.extend(new)
        if self.finish_reason is None and len(self.result.tokens) >= self.max_new_tokens:
            self.finish_reason = "length"
        return new

    def stop_after(self, n_tokens: int) -> None:
        """End the sequence with finish_reason 'stop', keeping its first n_tokens (a stop string ended there)."""
        self.result.tokens = self.result.tokens[:n_tokens]
        self.result.logprobs = self.result.logprobs[:n_tokens]
        self.finish_reason = "stop"


def _logits(out: dict[str, Any], position: int, rows: slice) -> torch.Tensor | None:
    """The step's logits rows that tokens are taken from, checked for NaN/Inf where they are: a GPU
    backend's stay on the device (a verify step's rows are megabytes), and only sampling and
    logprobs copy the rows they read to the host."""
    logits = out.get("logits")
    if logits is None:
        return None
    logits = logits[rows]
    if not bool(torch.isfinite(logits).all()):
        raise StepError(
            f"the step at position {position} produced non-finite logits (NaN/Inf); the weights or the runtime "
            "are broken, so no token was taken from it"
        )
    return logits
