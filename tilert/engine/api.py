"""The embedding API: `tilert.Engine`.

An Engine owns one step backend (the runtime that runs decode steps) and schedules requests
over it: each request is a `DecodeSequence` with its own KV cache, so many sequences share the
weights but never a cache. With continuous batching (the default on the reference backend, asked
for with `batching=True` on the GPU backends) every round runs one step over the rows of all
running sequences (decode rows, DFlash verify blocks, prefill chunks), each sequence in its own
slot of a KV cache pool; requests join and leave between steps. Otherwise sequences advance one
step at a time in round-robin. Requests are submitted from any thread; a worker thread (or the
caller, with `background=False`) calls `step()`. Nothing is global: two Engines in one process
share nothing but the backend factory registry.
"""

from __future__ import annotations

import importlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tilert.checkpoint import open_checkpoint
from tilert.checkpoint.drafter import attach_drafter, find_drafter
from tilert.checkpoint.sharded import RankWeights
from tilert.engine.backend import ReferenceBackend, ShardedReferenceBackend, StepBackend
from tilert.engine.memory import KVMemoryError, check_kv_memory, default_budget, kv_bytes_per_sequence
from tilert.engine.request import GenerationError, SamplingParams, StepError, TokenLogprob
from tilert.engine.sequence import DecodeSequence, StepRows
from tilert.engine.text import TextStream, find_eos_token_ids
from tilert.models.config import ModelConfig, load_config
from tilert.models.weights import synthetic_weights
from tilert.plan import load_plan
from tilert.tokenizer import check_vocab, load_tokenizer

log = logging.getLogger(__name__)


class EngineError(ValueError):
    """A bad Engine argument (unknown backend, device without a GPU, text without a tokenizer)."""


class EngineClosedError(RuntimeError):
    """The engine was closed before this request finished."""


class RequestCancelled(RuntimeError):
    """The request was cancelled (e.g. its HTTP client went away)."""


# ---- backend registry -------------------------------------------------------------------------

BackendFactory = Callable[..., StepBackend]
_BACKENDS: dict[str, BackendFactory] = {}
# the GPU runtimes' backends, "module:factory", imported when first asked for by name
_BUILT_IN = {
    "eager": "tilert.engine.eager:eager_backend",
    "eager-dist": "tilert.engine.eager:eager_dist_backend",
    "persistent": "tilert.engine.persistent:persistent_backend",
}


def register_backend(name: str) -> Callable[[BackendFactory], BackendFactory]:
    """Decorator: `factory(cfg, weights, *, max_seq, world, device, plan) -> StepBackend`, so the
    Engine, the CLI and the server pick a backend of one's own by name."""

    def deco(fn: BackendFactory) -> BackendFactory:
        _BACKENDS[name] = fn
        return fn

    return deco


def backend_names() -> list[str]:
    return sorted(set(_BACKENDS) | set(_BUILT_IN))


def _backend_factory(name: str) -> BackendFactory:
    if name not in _BACKENDS and name in _BUILT_IN:
        module, factory = _BUILT_IN[name].split(":")
        try:
            _BACKENDS[name] = getattr(importlib.import_module(module), factory)
        except ImportError as e:
            raise EngineError(f"backend {name!r} is not available in this build: {e}") from None
    if name not in _BACKENDS:
        raise EngineError(f"unknown backend {name!r} (registered: {', '.join(backend_names())})")
    return _BACKENDS[name]


@register_backend("reference")
def _reference_backend(
    cfg: ModelConfig, weights: Any, *, max_seq: int, world: int, device: str, plan: Any = None
) -> StepBackend:
    if isinstance(weights, RankWeights):
        return ShardedReferenceBackend(cfg, weights, max_seq=max_seq, device=device)
    return ReferenceBackend(cfg, weights, max_seq=max_seq, world=world, device=device)


# ---- per-sequence KV caches -------------------------------------------------------------------


class _Caches:
    """Gives each sequence its own KV state and binds it into the backend before a step.

    A backend may implement `new_cache()` / `use_cache(cache)` itself (GPU runtimes: a slot in a
    preallocated pool); the reference backend's cache is its executor's per-rank state dicts, which
    are swapped. Any other backend gets one live sequence at a time, reset between sequences.
    """

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        if hasattr(backend, "new_cache") and hasattr(backend, "use_cache"):
            self.kind, self.slots = "native", None
        elif hasattr(getattr(backend, "executor", None), "states"):
            self.kind, self.slots = "swap", None
        else:
            self.kind, self.slots = "single", 1
        self._current: Any = None
        self.live = 0  # caches handed out and not freed

    def new(self) -> Any:
        if self.kind == "native":
            cache = self.backend.new_cache()
        elif self.kind == "swap":
            cache = [{} for _ in range(self.backend.executor.world)]
        else:
            cache = object()  # a token: reset the backend when the live sequence changes
        self.live += 1
        return cache

    def use(self, cache: Any) -> None:
        if self.kind == "native":
            self.backend.use_cache(cache)
        elif self.kind == "swap":
            self.backend.executor.states = cache
        elif cache is not self._current:
            self.backend.reset()
        self._current = cache

    def free(self, cache: Any) -> None:
        if cache is None:
            return
        self.live -= 1
        if self.kind == "native" and hasattr(self.backend, "free_cache"):
            self.backend.free_cache(cache)
        if cache is self._current:
            self._current = None
            if self.kind == "swap":  # the executor must not keep the freed tensors alive
                self.backend.executor.states = [{} for _ in range(self.backend.executor.world)]


# ---- requests ----------------------------------------------------------------------------------


@dataclass
class Chunk:
    """Tokens accepted by one step (several per DFlash verify step), their text (with a tokenizer;
    text that may still begin a stop string is held back) and logprobs (when asked for)."""

    tokens: list[int]
    text: str | None = None
    logprobs: list[TokenLogprob] | None = None


@dataclass
class EngineResult:
    tokens: list[int]
    text: str | None
    finish_reason: str
    stats: dict[str, Any] = field(default_factory=dict)
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    prompt: list[int] = field(default_factory=list)


_DONE = object()
_POLL_S = 0.25  # how often a waiting caller checks that the worker is still alive


class Request:
    """A submitted generation: iterate it for chunks, or wait for `result()`; `cancel()` drops it."""

    def __init__(
        self,
        engine: Engine,
        seq: DecodeSequence,
        on_chunk: Callable[[Chunk | None], None] | None = None,
        stop: Sequence[str] = (),
    ) -> None:
        self._engine, self.seq, self._on_chunk = engine, seq, on_chunk
        self._chunks: queue.Queue[Any] = queue.Queue()
        self._done = threading.Event()
        self._error: BaseException | None = None
        tok = engine.tokenizer
        self._text = TextStream(tok, stop) if tok is not None else None
        self.cancelled = False
        self.slot: int | None = None  # its sequence slot in the KV cache pool (continuous batching)
        self.t_submit = time.perf_counter()
        self.t_first: float | None = None
        self.t_done: float | None = None

    # -- called by the engine (worker thread) --
    def _push(self, tokens: list[int]) -> None:
        """Hand out one step's tokens; a stop string in their text ends the sequence there.
        Raises whatever on_chunk raises (the engine then fails this request with it)."""
        if not tokens:
            return
        if self.t_first is None:
            self.t_first = time.perf_counter()
        seq, text = self.seq, None
        if self._text is not None:
            ends_on_stop_id = seq.finish_reason == "stop" and tokens[-1] in seq.stop_token_ids
            for i, t in enumerate(tokens[:-1] if ends_on_stop_id else tokens):  # a stop token has no text
                if self._text.add(t):
                    seq.stop_after(len(seq.result.tokens) - len(tokens) + i + 1)
                    tokens = tokens[: i + 1]
                    break
            if seq.done:
                self._text.finish()
            text = self._text.delta(final=seq.done)
        lps = seq.result.logprobs[len(seq.result.tokens) - len(tokens) :] if seq.logprobs is not None else None
        chunk = Chunk(list(tokens), text, lps)
        self._chunks.put(chunk)
        if self._on_chunk is not None:
            self._on_chunk(chunk)

    def _finish(self, error: BaseException | None = None) -> None:
        if self._done.is_set():
            return
        self._error, self.t_done = error, time.perf_counter()
        self._done.set()
        self._chunks.put(_DONE)
        if self._on_chunk is not None:
            try:
                self._on_chunk(None)
            except Exception as e:  # the request is already complete; nothing else to fail
                log.warning("on_chunk(None) raised %r", e)

    # -- called by the user --
    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Stop generating; the engine drops the sequence (and frees its cache) at its next step."""
        self.cancelled = True
        self._engine._wake()

    def result(self, timeout: float | None = None) -> EngineResult:
        """Wait for the whole generation; raises the request's error (bad step, engine closed, cancelled)
        and TimeoutError after `timeout` seconds."""
        self._engine._check_not_in_step()
        self._engine._drive_until(self._done, timeout)
        t_end = None if timeout is None else time.perf_counter() + timeout
        while not self._done.is_set():
            left = _POLL_S if t_end is None else min(_POLL_S, t_end - time.perf_counter())
            if left <= 0:
                raise TimeoutError(f"generation did not finish within {timeout} s")
            if not self._done.wait(left):
                self._engine._check_worker()
        if self._error is not None:
            raise self._error
        return self._make_result()

    def chunks(self, timeout: float | None = None) -> Iterator[Chunk]:
        """The chunks as steps produce them; TimeoutError when none comes within `timeout` seconds."""
        self._engine._check_not_in_step()
        while True:
            if self._engine._background:
                item = self._next_chunk(timeout)
            else:
                while self._chunks.empty():
                    self._engine.step()
                item = self._chunks.get_nowait()
            if item is _DONE:
                if self._error is not None:
                    raise self._error
                return
            yield item

    def __iter__(self) -> Iterator[Chunk]:
        return self.chunks()

    def _next_chunk(self, timeout: float | None) -> Any:
        t_end = None if timeout is None else time.perf_counter() + timeout
        while True:
            left = _POLL_S if t_end is None else min(_POLL_S, t_end - time.perf_counter())
            if left <= 0:
                raise TimeoutError(f"no tokens within {timeout} s")
            try:
                return self._chunks.get(timeout=left)
            except queue.Empty:
                if not self._done.is_set():
                    self._engine._check_worker()

    def _make_result(self) -> EngineResult:
        seq, r = self.seq, self.seq.result
        t_done = self.t_done or time.perf_counter()
        lat = t_done - self.t_submit
        stats = dict(r.stats())
        stats.update(
            prompt_tokens=len(seq.prompt),
            finish_reason=seq.finish_reason,
            latency_s=round(lat, 6),
            time_to_first_token_s=round((self.t_first or t_done) - self.t_submit, 6),
            tokens_per_s=round(len(r.tokens) / lat, 3) if lat > 0 else 0.0,
        )
        if self._text is not None:
            self._text.finish()
        return EngineResult(
            list(r.tokens),
            self._text.text if self._text is not None else None,
            seq.finish_reason or "length",
            stats,
            logprobs=list(r.logprobs) if seq.logprobs is not None else None,
            prompt_logprobs=list(r.prompt_logprobs) if seq.prompt_logprobs else None,
            prompt=list(seq.prompt),
        )


# ---- the engine --------------------------------------------------------------------------------


class Engine:
    """Greedy / sampled / DFlash decoding of one model, many sequences at once, thread-safe submission.

    model: a shipped model name, a config.json path or a ModelConfig; None takes the config of a
    checkpoint directory given as `weights`. weights: a dict of storage-form tensors, a checkpoint
    path (HF safetensors file/dir, or a `tilert quantize` output dir), an int seed for synthetic
    weights, or None (seed 0; tiny models only). plan: a compiled plan directory, handed to the
    backend (GPU runtimes run it; the reference backend takes its world size).
    quantize ("auto" | "on-load" | "none") and verify_checksums apply to a checkpoint path: see
    `tilert.checkpoint.open_checkpoint` and docs/checkpoints.md. drafter: a DFlash
    drafter directory in a published layout (tilert.checkpoint.drafter); by default a checkpoint
    directory's own `dflash/` drafter, if it has one and its config names none.
    eos_token_id: ids that end a generation (default: what the checkpoint and tokenizer declare).
    kv_memory: bytes the KV caches may use (default: see tilert.engine.memory); max_active caches
    of max_seq tokens must fit, or the constructor raises KVMemoryError.
    batching: run every round as one mixed step over all running sequences (continuous batching;
    None: wherever the backend has mixed steps and per-sequence caches and batches by default, the
    CPU reference backend; the GPU backends batch when asked), else one sequence per step.
    """

    def __init__(
        self,
        model: str | Path | ModelConfig | None = "tiny",
        weights: Mapping[str, Any] | str | Path | int | None = None,
        *,
        plan: str | Path | None = None,
        backend: str = "reference",
        device: str = "cpu",
        world: int = 1,
        max_seq: int = 1024,
        max_active: int = 8,
        tokenizer: Any = None,
        background: bool = True,
        quantize: str = "auto",
        verify_checksums: bool = True,
        drafter: str | Path | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        kv_memory: int | None = None,
        batching: bool | None = None,
        cycles_per_sync: int = 1,
    ) -> None:
        factory = _backend_factory(backend)
        if device.startswith("cuda"):
            if not torch.cuda.is_available():
                raise EngineError(f"device {device!r}: no CUDA GPU is visible; use device='cpu'")
        elif device != "cpu":
            raise EngineError(f"unknown device {device!r} (cpu or cuda)")
        if max_active < 1:
            raise EngineError(f"max_active must be >= 1, got {max_active}")
        if isinstance(cycles_per_sync, bool) or not isinstance(cycles_per_sync, int) or cycles_per_sync < 1:
            raise EngineError(f"cycles_per_sync must be an integer >= 1, got {cycles_per_sync!r}")
        self.cycles_per_sync = cycles_per_sync
        if isinstance(max_seq, bool) or not isinstance(max_seq, int) or max_seq < 2:
            raise EngineError(f"max_seq must be an integer >= 2, got {max_seq!r}")
        if kv_memory is not None and (isinstance(kv_memory, bool) or not isinstance(kv_memory, int) or kv_memory < 0):
            raise EngineError(f"kv_memory must be a number of bytes >= 0, got {kv_memory!r}")
        self.plan = load_plan(plan) if plan is not None else None
        if self.plan is not None and world == 1:
            world = int(getattr(self.plan, "world", 1) or 1)
        self.cfg, self.weights, tok_path = _resolve(model, weights, device, quantize, verify_checksums)
        self.cfg, self.weights = _attach_drafter(self.cfg, self.weights, drafter, weights, device)
        world = getattr(self.weights, "world", world)
        self.backend_name, self.device, self.world, self.max_seq = backend, device, world, max_seq
        self.backend: StepBackend = factory(
            self.cfg, self.weights, max_seq=max_seq, world=world, device=device, plan=self.plan
        )
        self.tokenizer = _resolve_tokenizer(tokenizer if tokenizer is not None else tok_path, self.cfg.vocab_size)
        self._caches = _Caches(self.backend)
        self.max_active = self._caches.slots or max_active
        self.batching = self._open_pool(batching)
        self.kv_bytes_per_sequence = kv_bytes_per_sequence(self.backend)
        if self.kv_bytes_per_sequence is not None:
            if kv_memory is not None:
                budget, source = kv_memory, "kv_memory / --kv-cache-gb"
            else:
                budget, source = default_budget(device, self.weights)
            check_kv_memory(self.kv_bytes_per_sequence, self.max_active, max_seq, budget, source)
        self.eos_token_ids = self._eos_ids(eos_token_id, weights)
        self._background = background
        self._cond = threading.Condition()
        self._step_lock = threading.Lock()
        self._stepping: int | None = None  # thread id inside step()
        self._pending: deque[Request] = deque()
        self._active: list[Request] = []
        self._closed = False
        self._worker: threading.Thread | None = None
        self.counters = {"finished": 0, "failed": 0, "cancelled": 0, "steps": 0}

    @property
    def model_name(self) -> str:
        return self.cfg.name

    def _open_pool(self, batching: bool | None) -> bool:
        """Continuous batching: a KV cache pool of max_active slots in the backend (mixed steps)."""
        can = callable(getattr(self.backend, "mixed_step", None)) and self._caches.kind != "single"
        if batching and not can:
            raise EngineError(f"backend {self.backend_name!r} cannot run mixed-sequence steps (batching=True)")
        if batching is False or not can or (batching is None and not getattr(self.backend, "auto_batching", True)):
            return False
        planned = ((self.plan.extra.get("summary") or {}).get("batch") if self.plan is not None else None) or {}
        if planned:  # a plan compiled with --batch: its step shapes, for at most its sequences
            if self.max_active > planned["slots"]:
                n = planned["slots"]
                raise EngineError(f"max_active={self.max_active} exceeds the plan's {n} batched sequences (--batch)")
            self.backend.batch_rows = tuple(planned["rows"])  # type: ignore[attr-defined]
        self.backend.open_pool(self.max_active)  # type: ignore[attr-defined]
        self._free_slots = list(range(self.max_active))
        self._rr = 0  # which active sequence plans first (rotates, so none waits for rows forever)
        return True

    def _eos_ids(self, given: int | Sequence[int] | None, weights: Any) -> frozenset[int]:
        if given is not None:
            ids = [given] if isinstance(given, int) else list(given)
        else:
            dirs = []
            if isinstance(weights, (str, Path)):
                p = Path(weights)
                dirs.append(p if p.is_dir() else p.parent)
            ids = find_eos_token_ids(dirs, self.cfg, self.tokenizer)
            # a checkpoint's files may name an id this vocabulary lacks (a cut-down model keeping its
            # parent's generation_config): such an id can never be generated, so it is dropped
            outside = [t for t in ids if not _in_vocab(t, self.cfg.vocab_size)]
            if outside:
                log.warning("ignoring eos token id(s) %s: outside the vocabulary [0, %d)", outside, self.cfg.vocab_size)
                ids = [t for t in ids if _in_vocab(t, self.cfg.vocab_size)]
        bad = [t for t in ids if not _in_vocab(t, self.cfg.vocab_size)]
        if bad:
            raise EngineError(f"eos token id {bad[0]!r} is outside the vocabulary [0, {self.cfg.vocab_size})")
        return frozenset(ids)

    @property
    def kv_caches_live(self) -> int:
        """KV caches currently allocated (one per admitted, unfinished sequence)."""
        return self._caches.live

    # -- submission --
    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids of a prompt given as text (needs a tokenizer) or as ids."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise EngineError("prompt is text but this engine has no tokenizer; pass token ids")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def submit(
        self,
        prompt: str | Sequence[int],
        max_new_tokens: int = 16,
        speculative: str | None = None,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        ignore_eos: bool = False,
        logprobs: int | None = None,
        prompt_logprobs: bool = False,
        on_chunk: Callable[[Chunk | None], None] | None = None,
        drafter: Callable[..., list[int]] | None = None,
    ) -> Request:
        """Queue a request (from any thread); bad requests raise GenerationError here, not later.

        temperature 0 is greedy; > 0 samples (top_p, top_k, seed: see SamplingParams); with
        speculative="dflash" sampled drafts are verified by the rejection rule (distribution-exact).
        Generation ends at max_new_tokens, at an EOS id (unless ignore_eos), at a stop_token_ids id
        (kept in tokens, not in text) or when the text reaches a stop string (text cut before it).
        logprobs=N records each token's logprob and its N most likely alternatives; prompt_logprobs
        also the prompt's. on_chunk(chunk) is called from the worker thread for every chunk and with
        None at the end; if it raises, the request fails with that error and the engine goes on.
        drafter replaces the model's DFlash drafter (as in `generate`; e.g. the benchmark OracleDrafter).
        """
        if isinstance(stop, str):
            stop = [stop]
        if stop and self.tokenizer is None:
            raise GenerationError("stop strings need a tokenizer; use stop_token_ids")
        if any(not isinstance(s, str) or not s for s in stop):
            raise GenerationError("stop strings must be non-empty strings")
        stops = frozenset(stop_token_ids) | (frozenset() if ignore_eos else self.eos_token_ids)
        seq = DecodeSequence(
            self.encode(prompt),
            max_new_tokens,
            speculative,
            stops,
            drafter=drafter,
            sampling=SamplingParams(temperature, top_p, top_k, seed),
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            cycles_per_sync=self.cycles_per_sync,
        )
        seq.check(self.backend)
        req = Request(self, seq, on_chunk, stop)
        with self._cond:
            if self._closed:
                raise EngineClosedError("engine is closed")
            self._pending.append(req)
            if self._background and self._worker is None:
                self._worker = threading.Thread(target=self._run, name=f"tilert-engine-{id(self):x}", daemon=True)
                self._worker.start()
            self._cond.notify_all()
        return req

    def generate(
        self, prompt: str | Sequence[int], max_new_tokens: int = 16, speculative: str | None = None, **kw: Any
    ) -> EngineResult:
        """Generate and wait: tokens (+ text with a tokenizer) and stats."""
        return self.submit(prompt, max_new_tokens, speculative, **kw).result()

    def stream(
        self, prompt: str | Sequence[int], max_new_tokens: int = 16, speculative: str | None = None, **kw: Any
    ) -> Iterator[Chunk]:
        """Yield chunks as steps accept tokens (a DFlash verify step yields several at once)."""
        return iter(self.submit(prompt, max_new_tokens, speculative, **kw))

    # -- scheduling --
    def step(self) -> int:
        """Admit pending requests and advance every active sequence by one step; returns how many ran.

        A failing step, or an on_chunk callback that raises, fails only its request. close() from
        inside a step (e.g. from on_chunk) stops the round; the unfinished requests fail.
        """
        with self._step_lock:
            self._stepping = threading.get_ident()
            try:
                return self._round()
            finally:
                self._stepping = None
                if self._closed:
                    self._fail_unfinished(EngineClosedError("engine was closed before the request finished"))

    def _admit(self) -> None:
        with self._cond:
            while self._pending and len(self._active) < self.max_active and not self._closed:
                req = self._pending.popleft()
                if req.cancelled:  # gone before it started: no cache for it
                    err = RequestCancelled("request was cancelled")
                    self._count(err)
                    req._finish(err)
                    continue
                try:
                    req.seq.cache = self._caches.new()
                except Exception as e:  # no cache for it (out of memory): fail it, keep the others
                    self._count(e)
                    req._finish(e)
                    continue
                if self.batching:
                    req.slot = self._free_slots.pop()
                self._active.append(req)

    def _round(self) -> int:
        if self.batching:
            return self._round_batched()
        self._admit()
        ran = 0
        for req in list(self._active):
            if self._closed:
                break
            if req.cancelled:
                self._retire(req, RequestCancelled("request was cancelled"))
                continue
            if not req.seq.done:
                ran += self._deliver(req, lambda r=req: self._advance_one(r))
            elif req.seq.done:
                self._retire(req)
        self.counters["steps"] += ran
        return ran

    def _advance_one(self, req: Request) -> list[int]:
        self._caches.use(req.seq.cache)
        return req.seq.advance(self.backend)

    def _deliver(self, req: Request, step: Callable[[], list[int]]) -> int:
        """Run one step of `req` and hand its tokens over; a failing step or callback fails this
        request, not the engine; a finished request retires. Returns 1 if the step ran."""
        ran = 0
        try:
            new = step()
            ran = 1
            req._push(new)
        except Exception as e:
            log.debug("request failed: %r", e)
            self._retire(req, e)
            return ran
        if req.seq.done:
            self._retire(req)
        return ran

    def _round_batched(self) -> int:
        """One mixed step over every running sequence's rows (as many as fit the largest step shape:
        decoding sequences first, then prompts in chunks; the first to plan rotates each round), then
        each sequence takes its rows' outputs. A failing plan or take fails its request; a failing
        step fails the requests that had rows in it."""
        self._admit()
        budget = self.backend.batch_rows[-1]  # type: ignore[attr-defined]
        order = list(self._active)
        if order:
            k = self._rr % len(order)
            order, self._rr = order[k:] + order[:k], self._rr + 1
        # decode rows and DFlash blocks first (their users wait for every step), prompts fill the rest
        order.sort(key=lambda r: r.seq.prefilling)
        planned: list[tuple[Request, StepRows]] = []
        used = 0
        for req in order:
            if self._closed:
                break
            if req.cancelled:
                self._retire(req, RequestCancelled("request was cancelled"))
                continue
            if req.seq.done:
                self._retire(req)
                continue
            try:
                if req.seq.speculative and req.seq.drafter is None:
                    self._caches.use(req.seq.cache)  # its drafter's cache, for the draft
                rows = req.seq.plan(self.backend, budget - used)
            except Exception as e:
                log.debug("request failed: %r", e)
                self._retire(req, e)
                continue
            if rows is not None:
                planned.append((req, rows))
                used += len(rows.tokens)
        if not planned or self._closed:
            return 0
        try:
            out = self.backend.mixed_step(  # type: ignore[attr-defined]
                torch.tensor([t for _, r in planned for t in r.tokens], dtype=torch.int32),
                torch.tensor([p for _, r in planned for p in r.positions], dtype=torch.int32),
                torch.tensor([q.slot for q, r in planned for _ in r.tokens], dtype=torch.int32),
            )
        except Exception as e:  # the step failed: every request in it fails, the engine goes on
            log.debug("mixed step failed: %r", e)
            for req, _ in planned:
                self._retire(req, e)
            return 0
        ran, row = 0, 0
        for req, rows in planned:
            part = {k: v[row : row + len(rows.tokens)] for k, v in out.items()}
            row += len(rows.tokens)
            if self._closed:
                break
            if req not in self._active:
                continue
            ran += self._deliver(req, lambda r=req, rows=rows, part=part: r.seq.take(rows, part))
        self.counters["steps"] += ran
        return ran

    def _count(self, error: BaseException | None) -> None:
        key = "finished" if error is None else "cancelled" if isinstance(error, RequestCancelled) else "failed"
        self.counters[key] += 1

    def _retire(self, req: Request, error: BaseException | None = None) -> None:
        if req in self._active:
            self._active.remove(req)
        self._caches.free(req.seq.cache)
        req.seq.cache = None
        if req.slot is not None:
            self._free_slots.append(req.slot)
            req.slot = None
        self._count(error)
        req._finish(error)

    def _fail_unfinished(self, error: BaseException) -> None:
        with self._cond:
            active, pending = list(self._active), list(self._pending)
            self._pending.clear()
        for req in active:
            self._retire(req, error)
        for req in pending:
            self._count(error)
            req._finish(error)

    def idle(self) -> bool:
        with self._cond:
            return not self._pending and not self._active

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and not self._pending and not self._active:
                    self._cond.wait()
                if self._closed:
                    break
            try:
                self.step()
            except Exception as e:  # an engine-level failure: fail what is queued, keep serving
                log.exception("engine step failed")
                with self._step_lock:
                    self._fail_unfinished(e)

    def _check_worker(self) -> None:
        """Raise EngineClosedError if no worker will ever finish the caller's request."""
        w = self._worker
        if self._background and (w is None or not w.is_alive()):
            raise EngineClosedError("the engine's worker is not running (engine closed)")

    def _check_not_in_step(self) -> None:
        """Waiting for a request from inside a step (an on_chunk callback) would wait for itself."""
        if self._stepping == threading.get_ident():
            raise EngineError("cannot wait for a request from inside the engine's step (an on_chunk callback)")

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _drive_until(self, ev: threading.Event, timeout: float | None) -> None:
        if self._background:
            return
        t_end = None if timeout is None else time.perf_counter() + timeout
        while not ev.is_set() and (t_end is None or time.perf_counter() < t_end):
            self.step()

    # -- shutdown --
    def close(self) -> None:
        """Stop the worker; every unfinished request fails with EngineClosedError. Idempotent, and
        safe from inside a step (an on_chunk callback): the running round stops and cleans up."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            worker = self._worker
        if self._stepping == threading.get_ident():
            return  # called from inside step(): its epilogue fails the unfinished requests
        if worker is not None and worker is not threading.current_thread():
            worker.join()
        with self._step_lock:
            self._fail_unfinished(EngineClosedError("engine was closed before the request finished"))

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- construction helpers ----------------------------------------------------------------------


def _resolve(
    model: str | Path | ModelConfig | None,
    weights: Any,
    device: str,
    quantize: str = "auto",
    verify_checksums: bool = True,
) -> tuple[ModelConfig, Any, Path | None]:
    """(config, weights for the backend, tokenizer.json path or None)."""
    if isinstance(weights, (str, Path)):
        cfg = model if isinstance(model, ModelConfig) else (load_config(model) if model is not None else None)
        ck = open_checkpoint(weights, cfg, device=device, quantize=quantize, verify_checksums=verify_checksums)
        return ck.config, ck.weights, ck.tokenizer_path
    if model is None:
        raise EngineError("model=None needs a checkpoint directory as weights")
    cfg = model if isinstance(model, ModelConfig) else load_config(model)
    if isinstance(weights, Mapping):
        return cfg, weights, None
    if weights is not None and (isinstance(weights, bool) or not isinstance(weights, int)):
        raise EngineError(f"weights must be a dict, a checkpoint path or an int seed, got {type(weights).__name__}")
    if cfg.num_hidden_layers * cfg.hidden_size * cfg.n_routed_experts > 64 * 4096 * 64:
        raise EngineError(f"model '{cfg.name}' is too large for synthetic weights; pass a checkpoint")
    return cfg, synthetic_weights(cfg, weights or 0, device=device), None


def _in_vocab(t: Any, vocab: int) -> bool:
    return not isinstance(t, bool) and isinstance(t, int) and 0 <= t < vocab


def _attach_drafter(cfg: ModelConfig, w: Any, drafter: Any, weights_arg: Any, device: str) -> tuple[ModelConfig, Any]:
    if drafter is None and cfg.dflash is None and isinstance(weights_arg, (str, Path)) and Path(weights_arg).is_dir():
        drafter = find_drafter(Path(weights_arg) / "dflash")
    return (cfg, w) if drafter is None else attach_drafter(cfg, w, drafter, device=device)


def _resolve_tokenizer(tok: Any, vocab_size: int) -> Any:
    if tok is None:
        return tok
    if hasattr(tok, "decode"):
        check_vocab(tok, vocab_size)
        return tok
    return load_tokenizer(tok, vocab_size)


__all__ = [
    "Chunk",
    "Engine",
    "EngineClosedError",
    "EngineError",
    "EngineResult",
    "GenerationError",
    "KVMemoryError",
    "Request",
    "RequestCancelled",
    "SamplingParams",
    "StepError",
    "TokenLogprob",
    "backend_names",
    "register_backend",
]
