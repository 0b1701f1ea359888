"""Eager GPU runtime vs the reference on the tiny configs; greedy and DFlash agree on the GPU."""

from __future__ import annotations

import pytest
import torch

from tilert.engine import ReferenceBackend, generate
from tilert.models.config import load_config
from tilert.models.weights import synthetic_weights

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("model", ["tiny", "tiny-flash"])
def test_eager_logits_match_reference(model):
    from tilert.runtime.eager import EagerBackend

    cfg = load_config(model)
    w = synthetic_weights(cfg, int(torch.randint(0, 1000, ())))
    ref, gpu = ReferenceBackend(cfg, w, max_seq=128), EagerBackend(cfg, w, max_seq=128)
    prompt = torch.randint(0, cfg.vocab_size, (6,), dtype=torch.int32)
    pos = torch.arange(6, dtype=torch.int32)
    a, b = ref.target_step(prompt, pos), gpu.target_step(prompt, pos)
    assert float((b["logits"].double() - a["logits"].double()).norm() / a["logits"].double().norm()) < 3e-2
    blk = torch.randint(0, cfg.vocab_size, (cfg.dflash.block_size,), dtype=torch.int32)
    p2 = 6 + torch.arange(cfg.dflash.block_size, dtype=torch.int32)
    a, b = ref.target_step(blk, p2, "verify"), gpu.target_step(blk, p2, "verify")
    assert float((b["logits"].double() - a["logits"].double()).norm() / a["logits"].double().norm()) < 3e-2


def test_dflash_on_gpu_equals_greedy_on_gpu():
    from tilert.runtime.eager import EagerBackend

    cfg = load_config("tiny")
    be = EagerBackend(cfg, synthetic_weights(cfg, 3), max_seq=128)
    greedy = generate(be, [1, 2, 3, 4], 24)
    spec = generate(be, [1, 2, 3, 4], 24, speculative="dflash")
    assert spec.tokens == greedy.tokens
