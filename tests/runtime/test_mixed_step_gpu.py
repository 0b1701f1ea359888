"""Mixed-sequence steps on the GPU: the attention kernel's mixed mode (eager and, inside the step,
persistent) against each sequence's own reference, the whole persistent and eager mixed steps of
tiny-gpu against the reference executor's per-sequence steps, and continuous batching in the
Engine on the GPU backends (each sequence's tokens equal its run alone).

Every sequence's cache slot holds NaN from its first position in the step on (and unused slots
are NaN throughout), so a row that reads another sequence's slot, or a slot's stale tail, shows up.
"""

from __future__ import annotations

import pytest
import torch

from tests.runtime.test_eager_gpu import check_rows
from tilert.engine import ReferenceBackend, generate
from tilert.kernels import attention as A
from tilert.models.config import load_config
from tilert.models.weights import margin_safe_weights

pytestmark = pytest.mark.gpu

MAX_SEQ = 256
# (slot, first position, rows) per sequence, in row order: 3 plain decode rows and 2 verify blocks
MIXED = [(2, 100, 1), (0, 5, 1), (4, 1000, 1), (1, 37, 4), (3, 200, 4)]


@pytest.mark.parametrize("window", [0, 128])
@pytest.mark.parametrize(
    "seqs",
    [
        MIXED,
        [(0, 0, 8), (1, 513, 8)],  # two 8-token verify blocks (16 rows), one a prompt's first chunk
        [(3, 4095, 1)],  # one sequence, one row
        [(u, 64 * u + 3, 1) for u in range(8)],  # 8 users decoding
    ],
)
def test_mixed_kernel_matches_each_sequence_alone(window: int, seqs: list) -> None:
    """The eager kernels (TMA ring) of the mimo-v2.5-pro rank shape, 16 query heads on a kv head."""
    B = sum(n for _, _, n in seqs)
    cfg = A.AttnConfig(block=B, window=window, sink=bool(window), rope_theta=1e4 if window else 1e7, mixed=True)
    A.check_mixed(cfg, seqs, n_slots=6 if max(u for u, _, _ in seqs) < 6 else 9, capacity=4200, seed=B + window)


def test_mixed_kernel_persistent_shape() -> None:
    """The persistent step's CTA shape (128 rows, 1-tile splits) in the standalone launcher."""
    cfg = A.AttnConfig(block=11, rows_per_cta=128, min_tiles=A.PERSISTENT_MIN_TILES, mixed=True)
    A.check_mixed(cfg, MIXED, n_slots=5, capacity=1100, seed=1)


def _alone(cfg, w, prompt: list[int], more: list[int]) -> dict:
    """One sequence's own steps on the reference executor: its prompt, then `more` as one step."""
    be = ReferenceBackend(cfg, w, max_seq=MAX_SEQ)
    be.target_step(torch.tensor(prompt, dtype=torch.int32), torch.arange(len(prompt), dtype=torch.int32))
    pos = torch.arange(len(prompt), len(prompt) + len(more), dtype=torch.int32)
    return be.target_step(torch.tensor(more, dtype=torch.int32), pos)


@pytest.mark.parametrize("backend", ["persistent", "eager"])
def test_mixed_steps_match_each_sequence_alone(backend: str) -> None:
    """A prefill round (five prompts, one step) and a continuation round (3 decode rows and two
    4-token blocks, one step) through the GPU backend's mixed steps; each sequence's rows against
    its own reference steps."""
    from tilert.engine.eager import EagerBackend
    from tilert.engine.persistent import PersistentBackend

    cfg = load_config("tiny-gpu")
    w = margin_safe_weights(cfg, int(torch.randint(0, 1000, ())))
    gpu = (PersistentBackend if backend == "persistent" else EagerBackend)(cfg, w, max_seq=MAX_SEQ)
    gpu.batch_rows = (11, 16)  # the two shapes of this test: 14 prompt rows pad to 16, 11 rows run as they are
    gpu.open_pool(5)
    g = torch.Generator().manual_seed(0)
    seqs = [(2, 3, 1), (0, 2, 1), (4, 2, 1), (1, 3, 4), (3, 4, 4)]  # (slot, prompt length, continuation)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for _, n, _ in seqs]
    more = [torch.randint(0, cfg.vocab_size, (m,), generator=g).tolist() for _, _, m in seqs]
    tok = torch.tensor(sum(prompts, []), dtype=torch.int32)
    pos = torch.cat([torch.arange(len(p), dtype=torch.int32) for p in prompts])
    slots = torch.cat([torch.full((len(p),), u, dtype=torch.int32) for (u, _, _), p in zip(seqs, prompts)])
    gpu.mixed_step(tok, pos, slots)
    tok = torch.tensor(sum(more, []), dtype=torch.int32)
    pos = torch.cat([torch.arange(len(p), len(p) + len(m), dtype=torch.int32) for p, m in zip(prompts, more)])
    slots = torch.cat([torch.full((len(m),), u, dtype=torch.int32) for (u, _, _), m in zip(seqs, more)])
    out = gpu.mixed_step(tok, pos, slots)
    if backend == "persistent":
        assert not gpu.fallbacks, gpu.fallbacks
    row = 0
    for p, m in zip(prompts, more):
        ref = _alone(cfg, w, p, m)
        check_rows(out["logits"][row : row + len(m)], ref["logits"])
        row += len(m)


@pytest.mark.parametrize("backend", ["persistent", "eager"])
def test_engine_batches_on_the_gpu_and_stays_lossless(backend: str) -> None:
    """Continuous batching on the GPU backend: greedy and DFlash requests at once give the tokens
    each gives alone on the same backend without batching."""
    import tilert

    jobs = [([1, 2, 3, 4], 10, None), ([7, 8, 9, 10, 11, 12], 10, "dflash"), ([5], 8, None), ([9, 9, 2], 12, "dflash")]
    kw = dict(weights=5, max_seq=MAX_SEQ, backend=backend, device="cuda", max_active=4)
    with tilert.Engine("tiny-gpu", batching=False, **kw) as eng:
        alone = [eng.generate(p, n, s).tokens for p, n, s in jobs]
    with tilert.Engine("tiny-gpu", batching=True, **kw) as eng:
        assert eng.batching
        eng.backend.batch_rows = (4, 8, 16)  # fewer step shapes to compile
        got = [r.result(timeout=600).tokens for r in [eng.submit(p, n, s) for p, n, s in jobs]]
        if backend == "persistent":
            assert not eng.backend.fallbacks, eng.backend.fallbacks
    assert got == alone


def test_single_user_mixed_step_matches_the_plain_step() -> None:
    """One user through the mixed step (B=1, pool of one slot) gives the plain B=1 decode step's
    tokens: batching leaves the single-user path's results alone."""
    from tilert.engine.persistent import PersistentBackend

    cfg = load_config("tiny-gpu")
    w = margin_safe_weights(cfg, 11)
    plain = generate(PersistentBackend(cfg, w, max_seq=MAX_SEQ), [3, 1, 4, 1, 5], 12).tokens
    import tilert

    with tilert.Engine("tiny-gpu", w, max_seq=MAX_SEQ, backend="persistent", device="cuda", max_active=1,
                       batching=True) as eng:  # fmt: skip
        eng.backend.batch_rows = (1, 16)
        assert eng.generate([3, 1, 4, 1, 5], 12).tokens == plain
