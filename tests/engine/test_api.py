"""tilert.Engine: same tokens as generate(), per-sequence KV isolation, threads, shutdown."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest
import torch

import tilert
from tilert.engine import OracleDrafter, ReferenceBackend, generate
from tilert.engine.api import (
    _BACKENDS,
    Engine,
    EngineClosedError,
    EngineError,
    GenerationError,
    KVMemoryError,
    RequestCancelled,
    StepError,
    backend_names,
    register_backend,
)
from tilert.engine.text import TextStream, find_eos_token_ids
from tilert.models.config import load_config
from tilert.models.weights import synthetic_weights

PROMPTS = [[5, 17, 3], [99, 42], [1, 2, 3, 4, 5, 6], [150]]


def in_thread(fn):
    """Run fn in a fresh thread: torch's CPU ops run several times faster there than in pytest's
    main thread on small CI machines (OpenMP pool contention), and the engine's own worker is a thread."""
    out: list = []

    def run() -> None:
        try:
            out.append((fn(), None))
        except BaseException as e:  # re-raised in the caller
            out.append((None, e))

    t = threading.Thread(target=run)
    t.start()
    t.join(120)
    assert out, "timed out"
    if out[0][1] is not None:
        raise out[0][1]
    return out[0][0]


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
    queued = eng.submit(PROMPTS[1], 9)
    queued.cancel()  # before it was admitted: it never gets a cache
    eng.step()
    with pytest.raises(RequestCancelled):
        queued.result()
    assert eng.kv_caches_live == 0 and eng.counters["cancelled"] == 2 and eng.counters["steps"] == 1
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


# ---- robustness: callbacks, close, non-finite logits, KV memory -------------------------------


def test_on_chunk_that_raises_fails_only_its_request(weights, solo):
    def boom(chunk):
        if chunk is not None:
            raise KeyError("boom")

    with Engine("tiny", weights, max_seq=128) as eng:
        bad = eng.submit(PROMPTS[0], 9, on_chunk=boom)
        with pytest.raises(KeyError, match="boom"):
            bad.result(timeout=30)
        later = [eng.submit(PROMPTS[i], 9) for i in (1, 2)]
        assert [r.result(timeout=30).tokens for r in later] == [solo[(1, None)], solo[(2, None)]]
        assert eng.kv_caches_live == 0 and eng.counters["failed"] == 1


def test_waiting_from_on_chunk_raises_instead_of_deadlocking(weights, solo):
    with Engine("tiny", weights, max_seq=128) as eng:
        req = eng.submit(PROMPTS[0], 9, on_chunk=lambda c: eng.generate(PROMPTS[1], 2) if c is not None else None)
        with pytest.raises(EngineError, match="inside the engine's step"):
            req.result(timeout=30)
        assert eng.submit(PROMPTS[1], 9).result(timeout=30).tokens == solo[(1, None)]


@pytest.mark.parametrize("background", [True, False])
def test_close_from_on_chunk_fails_requests_and_never_hangs(weights, background):
    eng = Engine("tiny", weights, max_seq=128, background=background)
    other = eng.submit(PROMPTS[1], 40)
    req = eng.submit(PROMPTS[0], 40, on_chunk=lambda c: eng.close() if c is not None else None)
    for r in (req, other):
        with pytest.raises(EngineClosedError):
            r.result(timeout=30)
    eng.close()
    assert eng.kv_caches_live == 0


def test_waiting_on_a_request_of_a_dead_worker_raises(weights):
    eng = Engine("tiny", weights, max_seq=128)
    eng._run = lambda: None  # a worker that is gone without finishing anything
    req = eng.submit(PROMPTS[0], 40)
    with pytest.raises(EngineClosedError, match="worker is not running"):
        req.result(timeout=10)
    with pytest.raises(EngineClosedError, match="worker is not running"):
        next(iter(req.chunks(timeout=10)))
    eng.close()
    with pytest.raises(EngineClosedError):
        req.result(timeout=10)


def test_non_finite_logits_fail_the_request(weights, solo):
    with Engine("tiny", weights, max_seq=128, batching=False) as eng:  # one sequence per step: target_step
        real = eng.backend.target_step

        def poisoned(tokens, positions, mode="decode"):
            out = real(tokens, positions, mode)
            if int(positions[-1]) >= 7:
                out = dict(out, logits=torch.full_like(out["logits"], float("nan")))
            return out

        eng.backend.target_step = poisoned
        for spec in (None, "dflash"):
            with pytest.raises(StepError, match="non-finite logits"):
                eng.submit(PROMPTS[0], 9, spec).result(timeout=30)
        assert eng.submit(PROMPTS[0], 3).result(timeout=30).tokens == solo[(0, None)][:3]


def test_kv_memory_is_checked_at_start(cfg, weights):
    with Engine("tiny", weights, max_seq=128) as eng:
        per_token = 4 * (  # float32 caches of the reference executor: target layers, then drafter layers
            cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.head_dim + cfg.v_head_dim)
            + cfg.dflash.num_hidden_layers * cfg.dflash.num_key_value_heads * 2 * cfg.dflash.head_dim
        )
        assert eng.kv_bytes_per_sequence == 128 * per_token
    with pytest.raises(KVMemoryError, match=r"max_seq=1048576 x max_active=8 needs 14\.00 GiB .*budget 1\.00 GiB"):
        Engine("tiny", weights, max_seq=1 << 20, kv_memory=1 << 30)
    with pytest.raises(KVMemoryError, match="at most 4 concurrent"):
        Engine("tiny", weights, max_seq=1 << 20, max_active=8, kv_memory=8 << 30)
    Engine("tiny", weights, max_seq=1 << 20, max_active=4, kv_memory=8 << 30).close()


# ---- EOS, stop strings ---------------------------------------------------------------------------


class CharTokenizer:
    """Test tokenizer: id t is the letter 'a' + t % 26, except ids >= 150, which are halves of an
    'é' (two in a row decode to it; a lone one to U+FFFD, like byte-fallback tokens)."""

    path = None

    def encode(self, text):
        return [ord(c) - ord("a") for c in text]

    def decode(self, ids):
        out, i = [], 0
        while i < len(ids):
            if ids[i] >= 150:
                pair = i + 1 < len(ids) and ids[i + 1] >= 150
                out.append("é" if pair else "\ufffd")
                i += 2 if pair else 1
            else:
                out.append(chr(ord("a") + ids[i] % 26))
                i += 1
        return "".join(out)


def test_text_stream_deltas_stop_strings_and_partial_characters():
    tok = CharTokenizer()
    ts = TextStream(tok)
    pieces = []
    for t in [0, 1, 150, 151, 2]:
        ts.add(t)
        pieces.append(ts.delta())
    assert pieces == ["a", "b", "", "é", "c"] and ts.text == tok.decode([0, 1, 150, 151, 2])
    ts = TextStream(tok, ["cde", "x"])
    out = []
    for t in [0, 1, 2, 3, 4, 5]:  # a b c d e f
        if ts.add(t):
            break
        out.append(ts.delta())
    assert t == 4 and ts.text == "ab" and out == ["", "", "a", "b"] and ts.delta() == ""
    ts = TextStream(tok, ["zz"])
    for t in [0, 150]:
        ts.add(t)
    ts.finish()
    assert ts.delta(final=True) == "a\ufffd"


def test_stop_strings_and_eos_end_generation(weights, solo):
    want = solo[(0, None)]
    tok = CharTokenizer()
    text = tok.decode(want)

    def run(**kw):
        with Engine("tiny", weights, max_seq=128, tokenizer=tok, **kw.pop("engine", {})) as eng:
            r = eng.generate(PROMPTS[0], 9, **kw)
            chunks = list(eng.stream(PROMPTS[0], 9, **kw))
            spec = eng.generate(PROMPTS[0], 9, "dflash", **kw)
        assert "".join(c.text for c in chunks) == r.text and [t for c in chunks for t in c.tokens] == r.tokens
        assert (spec.tokens, spec.text, spec.finish_reason) == (r.tokens, r.text, r.finish_reason)
        return r

    stop = text[4:6]
    r = run(stop=[stop, "never"])
    cut = text.find(stop)
    n = next(k for k in range(1, 10) if stop in tok.decode(want[:k]))
    assert (r.text, r.tokens, r.finish_reason) == (text[:cut], want[:n], "stop")
    r = run(engine={"eos_token_id": [want[3], 0]} if want[3] != 0 else {"eos_token_id": want[3]})
    assert (r.tokens, r.finish_reason, r.text) == (want[:4], "stop", text[:3])  # the EOS token has no text
    assert run(engine={"eos_token_id": want[3]}, ignore_eos=True).tokens == want


def test_eos_ids_come_from_the_checkpoint_and_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 11}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<end>"}}))

    class Tok(CharTokenizer):
        path = tmp_path / "tokenizer.json"

        def token_id(self, s):
            return {"<end>": 3}.get(s)

    assert find_eos_token_ids([tmp_path], load_config("tiny"), Tok()) == [3, 7, 9, 11]
    with pytest.raises(EngineError, match="eos token id 500"):
        Engine("tiny", 0, eos_token_id=500)
