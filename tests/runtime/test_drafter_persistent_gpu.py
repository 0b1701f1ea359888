"""The DFlash drafter step as a persistent program on the GPU (tiny-gpu): its drafts and logits equal
the eager runtime's drafter step over the same context, step after step (the drafter's KV cache
carried over), and speculative decoding on the persistent backend, drafter included, is lossless."""

from __future__ import annotations

import pytest
import torch

from tilert.engine import generate
from tilert.models.config import load_config
from tilert.models.weights import margin_safe_weights

pytestmark = pytest.mark.gpu


def test_persistent_drafter_step_equals_eager() -> None:
    from tilert.engine.eager import EagerBackend
    from tilert.engine.persistent import PersistentBackend

    cfg = load_config("tiny-gpu")
    w = margin_safe_weights(cfg, int(torch.randint(0, 1000, ())))
    per, eag = PersistentBackend(cfg, w, max_seq=256), EagerBackend(cfg, w, max_seq=256)
    d = cfg.dflash
    B, F = d.block_size, len(d.target_layer_ids) * cfg.hidden_size
    gen = torch.Generator().manual_seed(int(torch.randint(0, 1000, ())))
    # a 6-row prompt context (padded to a compiled shape on the persistent side), then verified blocks
    ctx, ctx_pos, pos = 6, torch.arange(6, dtype=torch.int32), 6
    for step in range(4):
        feats = torch.randn(ctx, F, generator=gen).to(torch.bfloat16).cuda()
        anchor = int(torch.randint(0, cfg.vocab_size, (1,), generator=gen))
        block = torch.tensor([anchor] + [d.mask_token_id] * (B - 1), dtype=torch.int32)
        bpos = pos + torch.arange(B, dtype=torch.int32)
        a = eag.draft_step(block, bpos, feats, ctx_pos)
        b = per.draft_step(block, bpos, feats, ctx_pos)
        assert torch.equal(a.cpu(), b.cpu()), f"step {step}: drafts {b.tolist()} != eager {a.tolist()}"
        ctx, ctx_pos, pos = B, bpos, pos + 1 + step % B  # the next block after `step % B` accepted drafts
    assert not per.fallbacks, per.fallbacks


def test_persistent_drafter_dflash_is_lossless() -> None:
    from tilert.engine.persistent import PersistentBackend

    cfg = load_config("tiny-gpu")
    be = PersistentBackend(cfg, margin_safe_weights(cfg, 7), max_seq=256)
    greedy = generate(be, [3, 1, 4, 1, 5, 9, 2, 6], 24)
    be.reset()
    spec = generate(be, [3, 1, 4, 1, 5, 9, 2, 6], 24, speculative="dflash")
    assert spec.tokens == greedy.tokens
    assert not be.fallbacks, be.fallbacks
    assert any(k == "drafter" for k, _ in be._prepared.values())  # the drafter ran as a persistent step


def test_drafter_runtime_switch_runs_the_eager_drafter(monkeypatch: pytest.MonkeyPatch) -> None:
    from tilert.engine.persistent import PersistentBackend

    monkeypatch.setenv("TILERT_DRAFTER_RUNTIME", "eager")
    cfg = load_config("tiny-gpu")
    be = PersistentBackend(cfg, margin_safe_weights(cfg, 7), max_seq=256)
    spec = generate(be, [3, 1, 4, 1, 5, 9, 2, 6], 12, speculative="dflash")
    be.reset()
    assert spec.tokens == generate(be, [3, 1, 4, 1, 5, 9, 2, 6], 12).tokens
    assert {k for k, _ in be._prepared.values()} >= {"eager"} and "drafter" not in {k for k, _ in be._prepared.values()}


def test_rope_kv_append_kernel_matches_reference() -> None:
    from tilert.kernels.kv_append import RopeKvAppendConfig, check

    for cfg in (RopeKvAppendConfig(4, 1, 64, 64, 64, 1e7, None, 1e-6),  # tiny-gpu's drafter
                RopeKvAppendConfig(16, 1, 128, 128, 128, 1e7, None, 1e-6),  # mimo's, rank of 8, a prompt chunk
                RopeKvAppendConfig(3, 8, 128, 128, 64, 1e4, 0.612, None)):  # partial rope, value scale, no norm
        check(cfg)


@pytest.mark.parametrize("window", [0, 6])
def test_non_causal_attention_kernel_matches_reference(window: int) -> None:
    """The standalone kernel with causal=False (a drafter block: every row sees every new key; a
    window as |q - k| < W) against tilert.ops.attention's bidirectional mask."""
    from tilert.kernels.attention import AttnConfig, check

    for n in (8, 200):
        check(AttnConfig(q_heads=16, kv_heads=1, head_dim=128, v_head_dim=128, rope_dim=128, block=8, window=window,
                         causal=False), n)  # fmt: skip
