"""The DFlash drafter step as a persistent program on the GPU (tiny-gpu): its logits and drafts equal
the eager runtime's drafter step over the same context, step after step (the drafter's KV cache
carried over), and speculative decoding on the persistent backend, drafter included, is lossless.
The drafter's new bodies (context-row append, non-causal attention) against their references."""

from __future__ import annotations

import pytest
import torch

from tilert.engine import generate
from tilert.models.config import load_config
from tilert.models.weights import margin_safe_weights

pytestmark = pytest.mark.gpu


def _draft(be, block, bpos, feats, cpos) -> dict:  # noqa: ANN001
    """One drafter step of backend `be` with all its outputs (draft and logits)."""
    from tilert.models.drafter import build_drafter_graph

    C = int(feats.shape[0])
    prepared = be._get(("drafter", C), lambda: build_drafter_graph(be.cfg, context=C, max_seq=be.max_seq))
    inputs = {"block_tokens": block, "block_positions": bpos, "ctx_features": feats, "ctx_positions": cpos}
    out = be._execute(prepared, inputs)
    return {"draft": out["draft"].cpu(), "logits": next(v for k, v in out.items() if k != "draft").cpu()}


def test_persistent_drafter_step_equals_eager() -> None:
    """Steps of both compiled context shapes (a 16-row prompt chunk, then verified blocks), the
    drafter's caches carried over: logits within bf16 noise of the eager drafter's, drafts equal
    wherever the eager logits have no near tie."""
    from tests.runtime.test_eager_gpu import check_rows
    from tilert.engine.eager import EagerBackend
    from tilert.engine.persistent import PersistentBackend

    cfg = load_config("tiny-gpu")
    w = margin_safe_weights(cfg, int(torch.randint(0, 1000, ())))
    per, eag = PersistentBackend(cfg, w, max_seq=256, drafter_runtime="persistent"), EagerBackend(cfg, w, max_seq=256)
    d = cfg.dflash
    B, F = d.block_size, len(d.target_layer_ids) * cfg.hidden_size
    gen = torch.Generator().manual_seed(int(torch.randint(0, 1000, ())))
    ctx_pos, pos = torch.arange(16, dtype=torch.int32), 16
    for step in range(4):
        feats = torch.randn(len(ctx_pos), F, generator=gen).to(torch.bfloat16).cuda()
        anchor = int(torch.randint(0, cfg.vocab_size, (1,), generator=gen))
        block = torch.tensor([anchor] + [d.mask_token_id] * (B - 1), dtype=torch.int32)
        bpos = pos + torch.arange(B, dtype=torch.int32)
        a, b = _draft(eag, block, bpos, feats, ctx_pos), _draft(per, block, bpos, feats, ctx_pos)
        check_rows(b["logits"], a["logits"])
        lg = a["logits"].float()
        top2 = lg.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 1e-2 * lg.abs().max()
        clear[0] = True  # the anchor
        assert torch.equal(a["draft"][clear], b["draft"][clear]), (step, a["draft"], b["draft"])
        ctx_pos, pos = bpos, pos + 1 + step % B  # the next block after `step % B` accepted drafts
    assert not per.fallbacks, per.fallbacks
    assert all(k == "drafter" for k, _ in per._prepared.values())


def test_persistent_drafter_dflash_is_lossless() -> None:
    from tilert.engine.persistent import PersistentBackend

    cfg = load_config("tiny-gpu")
    be = PersistentBackend(cfg, margin_safe_weights(cfg, 7), max_seq=256, drafter_runtime="persistent")
    greedy = generate(be, [3, 1, 4, 1, 5, 9, 2, 6], 24)
    be.reset()
    spec = generate(be, [3, 1, 4, 1, 5, 9, 2, 6], 24, speculative="dflash")
    assert spec.tokens == greedy.tokens
    assert not be.fallbacks, be.fallbacks
    assert any(k == "drafter" for k, _ in be._prepared.values())  # the drafter ran as a persistent step


def test_drafter_runtime_switch_picks_the_drafter_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    from tilert.engine.persistent import PersistentBackend

    cfg = load_config("tiny-gpu")
    for env in ("eager", "persistent"):
        monkeypatch.setenv("TILERT_DRAFTER_RUNTIME", env)
        be = PersistentBackend(cfg, margin_safe_weights(cfg, 7), max_seq=256)
        spec = generate(be, [3, 1, 4, 1, 5, 9, 2, 6], 12, speculative="dflash")
        be.reset()
        assert spec.tokens == generate(be, [3, 1, 4, 1, 5, 9, 2, 6], 12).tokens
        kinds = {k for k, _ in be._prepared.values()}
        if env == "eager":
            assert "eager" in kinds and "drafter" not in kinds, kinds
        else:
            assert "drafter" in kinds, kinds


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
