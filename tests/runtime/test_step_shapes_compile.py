"""Every step shape a request can produce compiles for sm_90a (no GPU): prefill chunks, decode,
verify blocks 1..16, KV capacities 64..131072, for tiny-gpu and rank 0 of the 8-rank mimo-v2.5-pro
plan. The whole sweep is hours of nvcc; CI compiles a fixed sample of it (TILERT_SWEEP_SEED picks
another), and TILERT_SWEEP=thorough compiles all of it."""

from __future__ import annotations

import os
import random

import pytest

from tilert.engine.backend import PREFILL_CHUNK, request_shapes
from tilert.kernels.common import toolchain_reason
from tilert.models.config import load_config

PROMPTS = [*range(1, 18), 100, 1000, 4000]
VERIFY = range(1, 17)
MAX_SEQ = [1 << k for k in range(6, 18)]  # 64 .. 131072
MODELS = {"tiny-gpu": 1, "mimo-v2.5-pro": 8}  # model -> world (rank 0 compiled, solo collectives)
SAMPLE = {"tiny-gpu": 2, "mimo-v2.5-pro": 1}  # shapes CI compiles per model (about a minute each)


def sweep(model: str) -> list[tuple[int, str, int]]:
    """(tokens, mode, max_seq) of every request in the sweep: prompts of PROMPTS lengths and every
    verify block size, at every capacity that holds the prompt."""
    shapes = set()
    for max_seq in MAX_SEQ:
        for n in PROMPTS:
            if n + max(VERIFY) < max_seq:
                shapes |= {(t, m, max_seq) for t, m in request_shapes(n, max_seq, None)}
        shapes |= {(b, "verify", max_seq) for b in VERIFY}
    return sorted(shapes)


def test_the_sweep_holds_the_shapes_requests_make() -> None:
    s = sweep("tiny-gpu")
    assert {t for t, m, _ in s if m == "decode"} == {1, PREFILL_CHUNK}  # prompt lengths map onto two shapes
    assert {t for t, m, _ in s if m == "verify"} == set(VERIFY)
    assert {q for *_, q in s} == set(MAX_SEQ)


def _chosen() -> list[tuple[str, int, str, int]]:
    if os.environ.get("TILERT_SWEEP") == "thorough":
        return [(m, *shape) for m in MODELS for shape in sweep(m)]
    rng = random.Random(int(os.environ.get("TILERT_SWEEP_SEED", "20")))
    out = []
    for m, k in SAMPLE.items():
        shapes = sweep(m)
        # the prefill chunk at a small capacity, then odd verify blocks at any capacity
        out.append((m, PREFILL_CHUNK, "decode", min(q for t, md, q in shapes if t == PREFILL_CHUNK)))
        odd = [s for s in shapes if s[1] == "verify" and s[0] % 2 and s[0] > 1]
        out += [(m, *s) for s in rng.sample(odd, k - 1)]
    return out


@pytest.mark.skipif(toolchain_reason() is not None, reason=str(toolchain_reason()))
@pytest.mark.parametrize(("model", "tokens", "mode", "max_seq"), _chosen())
def test_request_step_shape_compiles(model: str, tokens: int, mode: str, max_seq: int) -> None:
    from tilert.runtime.persistent.backend import precompile

    st = precompile(load_config(model), tokens, mode, max_seq, MODELS[model])
    src = st.kernel.get_kernel_source()
    assert "this_grid().sync()" in src  # a cooperative launch: every CTA resident, or a refusal
