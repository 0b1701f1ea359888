"""The Engine on the eager GPU backend gives the reference backend's tokens (tiny model)."""

from __future__ import annotations

import pytest

import tilert

pytestmark = pytest.mark.gpu


def test_engine_eager_backend_matches_reference():
    with tilert.Engine("tiny", weights=4, max_seq=128) as ref, tilert.Engine(
        "tiny", weights=4, max_seq=128, backend="eager", device="cuda"
    ) as gpu:
        for spec in (None, "dflash"):
            want = ref.generate([5, 17, 3], max_new_tokens=10, speculative=spec).tokens
            assert gpu.generate([5, 17, 3], max_new_tokens=10, speculative=spec).tokens == want


@pytest.mark.parametrize("backend", ["eager", "persistent"])
def test_sampled_generation_on_gpu_backends(backend):
    """Sampling (plain and DFlash with the rejection rule) runs on the GPU backends: valid ids, the
    same tokens for the same seed, the KV budget check passing with the GPU's free memory."""
    with tilert.Engine("tiny-gpu", weights=5, max_seq=128, backend=backend, device="cuda") as eng:
        for spec in (None, "dflash"):
            a = eng.generate([1, 2, 3], 16, spec, temperature=0.8, seed=1).tokens
            b = eng.generate([1, 2, 3], 16, spec, temperature=0.8, seed=1).tokens
            assert a == b and len(a) == 16 and all(0 <= t < eng.cfg.vocab_size for t in a)
