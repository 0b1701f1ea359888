"""tilert.Engine: same tokens as generate(), per-sequence KV isolation, threads, shutdown."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

import tilert
from tilert.engine import OracleDrafter, ReferenceBackend, generate
from tilert.engine.api import (
    _BACKENDS,
    Engine,
    EngineClosedError,
    EngineError,
    GenerationError,
    RequestCancelled,
    backend_names,
    register_backend,
)
from tilert.models.config import load_config
from tilert.models.weights import synthetic_weights

PROMPTS = [[5, 17, 3], [99, 42], [1, 2, 3, 4, 5, 6], [150]]


def in_thread(fn):
    """Run fn in a fresh thread: torch's CPU ops run several times faster there than in pytest's
    main thread on small CI machines (OpenMP pool contention), and the engine's own worker is a thread."""
    out: list = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join(120)
    return out[0]


@pytest.fixture(scope="module")
def cfg():
    return load_config("tiny")


@pytest.fixture(scope="module")
def weights(cfg):
    return synthetic_weights(cfg, 7)


@pytest.fixture(scope="module")
def solo(cfg, weights):
    """What generate() gives each prompt alone, greedy and DFlash."""
    be = ReferenceBackend(cfg, weights, max_seq=128)
    return in_thread(
        lambda: {
            (i, spec): generate(be, p, 9, speculative=spec).tokens
            for i, p in enumerate(PROMPTS)
            for spec in (None, "dflash")
        }
    )


def test_import_is_cheap():
    code = "import sys, tilert; assert 'torch' not in sys.modules; print(tilert.__version__)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60).returncode == 0
    assert tilert.Engine is Engine


def test_generate_and_stream_match_generate(weights, solo):
    with Engine("tiny", weights, max_seq=128) as eng:
        for (i, spec), want in solo.items():
            r = eng.generate(PROMPTS[i], 9, speculative=spec)
            assert r.tokens == want and r.text is None and r.finish_reason == "length"
            assert r.stats["new_tokens"] == 9 and r.stats["prompt_tokens"] == len(PROMPTS[i])
            assert [t for c in eng.stream(PROMPTS[i], 9, speculative=spec) for t in c.tokens] == want


def test_dflash_stream_yields_blocks(cfg, weights, solo):
    B = cfg.dflash.block_size
    od = OracleDrafter(solo[(0, None)], len(PROMPTS[0]), 0.0, cfg.vocab_size, B)
    with Engine("tiny", weights, max_seq=128) as eng:
        chunks = [c.tokens for c in eng.stream(PROMPTS[0], 9, speculative="dflash", drafter=od)]
    assert [t for c in chunks for t in c] == solo[(0, None)]
    assert [len(c) for c in chunks] == [1, B, B]  # prefill, then whole accepted blocks (9 = 1 + 4 + 4)


@pytest.mark.parametrize("max_active", [1, 2, 8])
def test_interleaved_sequences_are_isolated(weights, solo, max_active):
    eng = Engine("tiny", weights, max_seq=128, background=False, max_active=max_active)
    reqs = {(i, s): eng.submit(p, 9, speculative=s) for i, p in enumerate(PROMPTS) for s in (None, "dflash")}

    def drive() -> int:
        steps = 0
        while not eng.idle():
            steps += eng.step()
        return steps

    steps = in_thread(drive)
    assert {k: r.result().tokens for k, r in reqs.items()} == solo
    assert steps == sum(r.result().stats["steps"] + 1 for r in reqs.values())


def test_threaded_submission(weights, solo):
    results: dict = {}
    with Engine("tiny", weights, max_seq=128, max_active=3) as eng:

        def client(i: int, spec: str | None) -> None:
            results[(i, spec)] = eng.submit(PROMPTS[i], 9, speculative=spec).result(timeout=60).tokens

        threads = [threading.Thread(target=client, args=k) for k in solo]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert results == solo


def test_two_engines_are_independent(cfg, weights, solo):
    other = synthetic_weights(cfg, 8)
    want_other = generate(ReferenceBackend(cfg, other, max_seq=128), PROMPTS[0], 9).tokens
    assert want_other != solo[(0, None)]
    with Engine("tiny", weights, max_seq=128) as a, Engine("tiny", other, max_seq=128) as b:
        ra, rb = a.submit(PROMPTS[0], 9), b.submit(PROMPTS[0], 9)
        assert ra.result(60).tokens == solo[(0, None)] and rb.result(60).tokens == want_other


def test_close_fails_pending_and_leaks_no_thread(weights):
    before = threading.active_count()
    eng = Engine("tiny", weights, max_seq=128, background=False)
    req = eng.submit(PROMPTS[0], 9)
    eng.step()
    eng.close()
    with pytest.raises(EngineClosedError):
        req.result()
    with pytest.raises(EngineClosedError):
        eng.submit(PROMPTS[0], 3)
    with Engine("tiny", weights, max_seq=128) as eng2:
        eng2.generate(PROMPTS[1], 2)
        slow = [eng2.submit(PROMPTS[2], 60) for _ in range(4)]
    for r in slow:
        with pytest.raises(EngineClosedError):
            r.result(10)
    assert threading.active_count() == before
    eng2.close()  # idempotent


def test_cancel_and_stop_tokens(weights, solo):
    eng = Engine("tiny", weights, max_seq=128, background=False)
    req = eng.submit(PROMPTS[0], 9)
    eng.step()
    req.cancel()
    with pytest.raises(RequestCancelled):
        req.result()
    want = solo[(0, "dflash")]
    r = eng.generate(PROMPTS[0], 9, speculative="dflash", stop_token_ids=[want[3]])
    assert r.tokens == want[: want.index(want[3]) + 1] and r.finish_reason == "stop"


def test_bad_requests_raise_at_submit(weights):
    eng = Engine("tiny", weights, max_seq=64, background=False)
    for prompt, n in (([], 3), ([160], 3), ([1], -1), ([1] * 60, 8)):
        with pytest.raises(GenerationError):
            eng.submit(prompt, n)
    with pytest.raises(GenerationError):
        eng.submit([1], 3, speculative="medusa")
    with pytest.raises(EngineError, match="tokenizer"):
        eng.submit("hello", 3)
    assert eng.idle()


def test_bad_engine_arguments(weights):
    with pytest.raises(EngineError, match="unknown backend"):
        Engine("tiny", weights, backend="nope")
    with pytest.raises(EngineError, match="weights must be"):
        Engine("tiny", b"x")
    with pytest.raises(EngineError, match="too large"):
        Engine("mimo-v2.5-pro")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(EngineError, match="no CUDA GPU"):
            Engine("tiny", weights, device="cuda")


def test_registered_backend_without_cache_swap_runs_one_sequence_at_a_time(cfg, weights, solo):
    class Opaque:
        """A backend exposing only the StepBackend protocol (no executor to swap caches into)."""

        def __init__(self, inner: ReferenceBackend) -> None:
            self._inner, self.cfg, self.max_seq = inner, inner.cfg, inner.max_seq
            self.target_step, self.draft_step, self.reset = inner.target_step, inner.draft_step, inner.reset

    @register_backend("test-opaque")
    def _make(cfg, weights, *, max_seq, world, device, plan=None):
        return Opaque(ReferenceBackend(cfg, weights, max_seq=max_seq, world=world, device=device))

    try:
        assert "test-opaque" in backend_names()
        eng = Engine("tiny", weights, backend="test-opaque", max_seq=128, background=False)
        assert eng.max_active == 1
        reqs = {k: eng.submit(PROMPTS[k[0]], 9, speculative=k[1]) for k in solo}
        assert in_thread(lambda: {k: r.result().tokens for k, r in reqs.items()}) == solo
    finally:
        _BACKENDS.pop("test-opaque")
