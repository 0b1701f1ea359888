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
