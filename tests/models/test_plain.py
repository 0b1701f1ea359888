"""The plain-PyTorch reference: KV cache, attention conventions, RoPE, routing, DFlash drafter."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tilert.models.config import ModelConfig, load_config
from tilert.models.plain import (
    PlainDFlashDrafter,
    PlainModel,
    attend,
    causal_window_mask,
    plain_dflash_generate,
    plain_greedy_generate,
    rope,
    route,
)
from tilert.models.weights import synthetic_weights

SEQ = [5, 17, 99, 3, 42, 42, 7, 150, 64, 1, 88, 23, 9, 120]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def flash() -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    cfg = load_config("tiny-flash")  # window 3, sinks on every layer, 4 expert groups
    return cfg, synthetic_weights(cfg, seed=11)


@pytest.fixture(scope="module")
def tiny() -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    cfg = load_config("tiny")  # window 4, sinks on sliding layers only
    return cfg, synthetic_weights(cfg, seed=2)


@pytest.mark.parametrize("which", ["flash", "tiny"])
def test_incremental_equals_full(which: str, request: pytest.FixtureRequest) -> None:
    cfg, w = request.getfixturevalue(which)
    m = PlainModel(cfg, w)
    full, hid = m(SEQ, 0, return_hidden=True)
    assert full.shape == (len(SEQ), cfg.vocab_size) and full.dtype == torch.float32
    assert sorted(hid) == list(range(cfg.num_hidden_layers))
    m.reset()
    parts, hparts, pos = [], [], 0
    for n in (5, 1, 3, 1, 4):
        logits, h = m(SEQ[pos : pos + n], pos, return_hidden=True)
        parts.append(logits)
        hparts.append(h[cfg.num_hidden_layers - 1])
        pos += n
    assert m.length == len(SEQ)
    assert _rel(torch.cat(parts), full) < 1e-5
    assert _rel(torch.cat(hparts), hid[cfg.num_hidden_layers - 1]) < 1e-5
    with pytest.raises(ValueError):
        m([1], 3)  # start_pos must equal the cache length


def test_truncate_and_rerun(flash) -> None:
    cfg, w = flash
    m = PlainModel(cfg, w)
    full = m(SEQ, 0)
    m.truncate(6)
    assert _rel(m(SEQ[6:], 6), full[6:]) < 1e-5
    m.truncate(4)
    other = m([1, 2, 3], 4)
    fresh = PlainModel(cfg, w)
    assert _rel(fresh(SEQ[:4] + [1, 2, 3], 0)[4:], other) < 1e-5
    m.truncate(0)
    assert m.length == 0 and _rel(m(SEQ, 0), full) < 1e-5


def test_window_convention_in_attend() -> None:
    """Query at p sees the W keys p-W+1 .. p: key p-W+1 matters, key p-W and key p+1 do not."""
    g = torch.Generator().manual_seed(0)
    S, W, p = 10, 3, 6
    q = torch.randn(S, 4, 8, generator=g)
    k = torch.randn(S, 2, 8, generator=g)
    v = torch.randn(S, 2, 5, generator=g)
    pos = torch.arange(S)
    allowed = causal_window_mask(pos, pos, W)
    assert allowed[p].nonzero().flatten().tolist() == [4, 5, 6]
    base = attend(q, k, v, allowed, 0.3)[p]
    for j, changes in [(p - W + 1, True), (p - W, False), (p + 1, False), (p, True)]:
        v2 = v.clone()
        v2[j] += 1.0
        assert (not torch.allclose(attend(q, k, v2, allowed, 0.3)[p], base)) == changes, j
    full = causal_window_mask(pos, pos, 0)
    assert full[p].nonzero().flatten().tolist() == list(range(p + 1))


def test_sink_formula() -> None:
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(3, 2, 4, generator=g), torch.randn(3, 1, 4, generator=g), torch.randn(3, 1, 2, generator=g)
    sink = torch.tensor([0.5, -2.0])
    allowed = causal_window_mask(torch.arange(3), torch.arange(3), 0)
    out = attend(q, k, v, allowed, 0.5, sink)
    t, h = 2, 1
    s = (k[:, 0] @ q[t, h]) * 0.5
    m = torch.maximum(s.max(), sink[h])
    e = (s - m).exp()
    ref = (e[:, None] * v[:, 0]).sum(0) / (e.sum() + (sink[h] - m).exp())
    assert torch.allclose(out[t, h], ref, atol=1e-6)
    no_sink = attend(q, k, v, allowed, 0.5)
    assert not torch.allclose(out, no_sink)
    assert torch.allclose(attend(q, k, v, allowed, 0.5, torch.full((2,), -1e4)), no_sink, atol=1e-7)


def test_model_window_matters(tiny) -> None:
    """Positions < W see everything either way; later positions must differ if the window is honoured."""
    cfg, w = tiny
    W = cfg.sliding_window_size  # the default (transformers) convention: W keys, the query included
    a = PlainModel(cfg, w)(SEQ, 0)
    b = PlainModel(dataclasses.replace(cfg, sliding_window_size=1000), w)(SEQ, 0)
    assert _rel(a[:W], b[:W]) < 1e-6
    assert all(_rel(a[i], b[i]) > 1e-3 for i in range(W, len(SEQ)))


def test_model_sink_matters(flash) -> None:
    cfg, w = flash
    base = PlainModel(cfg, w)(SEQ[:6], 0)
    muted = dict(w)
    for i in range(cfg.num_hidden_layers):
        muted[f"model.layers.{i}.self_attn.attention_sink_bias"] = torch.full((4,), -1e4)
    off = PlainModel(cfg, muted)(SEQ[:6], 0)
    nosink_cfg = dataclasses.replace(cfg, add_swa_attention_sink_bias=False, add_full_attention_sink_bias=False)
    nosink = PlainModel(nosink_cfg, w)(SEQ[:6], 0)
    assert _rel(off, nosink) < 1e-6
    assert _rel(base, nosink) > 1e-3


def test_rope_properties() -> None:
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 3, 24, generator=g), torch.randn(1, 3, 24, generator=g)
    r, theta = 8, 10000.0

    def score(pq: int, pk: int) -> torch.Tensor:
        return (rope(q, torch.tensor([pq]), r, theta) * rope(k, torch.tensor([pk]), r, theta)).sum(-1)

    assert torch.allclose(score(7, 3), score(107, 103), atol=1e-4)
    assert torch.allclose(score(0, 0), (q * k).sum(-1), atol=1e-5)
    assert not torch.allclose(score(7, 3), score(7, 4), atol=1e-3)
    out = rope(q, torch.tensor([12345]), r, theta)
    assert torch.equal(out[..., r:], q[..., r:])  # pass-through dims
    assert torch.allclose(out[..., :r].norm(dim=-1), q[..., :r].norm(dim=-1), atol=1e-5)
    # NeoX halves: dim i pairs with dim i + r/2, frequency theta^(-2i/r)
    x = torch.zeros(1, 1, r)
    x[0, 0, 1] = 1.0
    got = rope(x, torch.tensor([5]), r, theta)[0, 0]
    ang = 5 * theta ** (-2 / r)
    expect = torch.zeros(r)
    expect[1], expect[1 + r // 2] = torch.cos(torch.tensor(ang)), torch.sin(torch.tensor(ang))
    assert torch.allclose(got, expect, atol=1e-6)


def test_route_bias_selects_scores_weigh() -> None:
    cfg = dataclasses.replace(load_config("tiny"), routed_scaling_factor=2.5)  # 8 experts, top-2, 1 group
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.0, -1.0, -2.0, 0.5, -0.5]])
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.9, 0.0])
    gate = torch.eye(8)
    idx, wts = route(cfg, logits, gate, bias)
    assert idx.tolist() == [[6, 0]]  # 6 wins only through its bias
    s = torch.sigmoid(logits[0, [6, 0]])
    assert torch.allclose(wts[0], s / s.sum() * 2.5)
    idx0, _ = route(cfg, logits, gate, torch.zeros(8))
    assert idx0.tolist() == [[0, 1]]


def test_route_groups() -> None:
    cfg = load_config("tiny-flash")  # 16 experts in 4 groups of 4, keep 2 groups, top-4
    g = torch.Generator().manual_seed(3)
    for _ in range(50):
        x = torch.randn(3, 16, generator=g) * 2
        bias = torch.randn(16, generator=g) * 0.3
        idx, wts = route(cfg, x, torch.eye(16), bias)
        scores = torch.sigmoid(x)
        sel = scores + bias
        for t in range(3):
            gs = sel[t].view(4, 4).topk(2, -1).values.sum(-1)
            groups = set(gs.topk(2).indices.tolist())
            allowed = [e for e in range(16) if e // 4 in groups]
            expect = sorted(allowed, key=lambda e: -sel[t, e].item())[:4]
            assert sorted(idx[t].tolist()) == sorted(expect)
            ch = scores[t, idx[t]]
            assert torch.allclose(wts[t], ch / ch.sum())
    # a lone strong expert in a weak group is excluded by group limiting
    x = torch.full((1, 16), -3.0)
    x[0, 0] = 5.0  # group 0: top-2 sum = s(5) + s(-3)
    x[0, 4:6] = 1.0  # group 1: 2 * s(1)
    x[0, 8:10] = 0.8  # group 2: 2 * s(0.8)
    idx, _ = route(cfg, x, torch.eye(16), torch.zeros(16))
    assert 0 not in idx[0].tolist()


@pytest.fixture(scope="module")
def flash_pair(flash) -> tuple[PlainModel, PlainDFlashDrafter]:
    cfg, w = flash
    m = PlainModel(cfg, w)
    return m, PlainDFlashDrafter(cfg, w, target=m)


def test_drafter_shapes_and_block_attention(flash, flash_pair) -> None:
    cfg, _ = flash
    m, d = flash_pair
    m.reset()
    d.reset()
    _, hid = m(SEQ[:6], 0, return_hidden=True)
    d.append_context(hid, 0)
    B, V = cfg.dflash.block_size, cfg.vocab_size
    logits = d.draft(SEQ[6], 6)
    assert logits.shape == (B, V) and torch.isfinite(logits).all()
    toks = d.draft_tokens(SEQ[6])
    assert len(toks) == B - 1 and all(0 <= t < V for t in toks)
    assert d.context_length == 6
    # bidirectional: row 0 sees the last block row
    block = [SEQ[6]] + [cfg.dflash.mask_token_id] * (B - 1)
    changed = d.forward_block(block[:-1] + [3], 6)
    assert _rel(changed[0], logits[0]) > 1e-4
    # the context matters
    d.reset()
    assert _rel(d.draft(SEQ[6], 6), logits) > 1e-4


def test_drafter_window_and_truncate(flash) -> None:
    cfg, w = flash
    W = cfg.dflash.sliding_window_size
    n = W + 4
    ids = [(7 * i + 3) % cfg.vocab_size for i in range(n)]
    _, hid = PlainModel(cfg, w)(ids, 0, return_hidden=True)
    d = PlainDFlashDrafter(cfg, w)
    d.append_context({k: h[:10] for k, h in hid.items()}, 0)
    d.append_context({k: h[10:] for k, h in hid.items()})
    ref = d.draft(5, n)
    # each row has its own window (|q - k| < W): the block's first row (at n) sees context from
    # n - W + 1 on, later rows less; entries at or before n - W are visible to no row
    for pos, visible in [(n - W, False), (0, False), (n - W + 1, True), (n - 1, True)]:
        h2 = {k: h.clone() for k, h in hid.items()}
        for h in h2.values():
            h[pos] += 1.0
        d2 = PlainDFlashDrafter(cfg, w)
        d2.append_context(h2, 0)
        assert (_rel(d2.draft(5, n), ref) > 1e-5) == visible, pos
    # truncate + re-append reproduces the original exactly
    d.truncate(7)
    assert d.context_length == 7
    d.append_context({k: h[7:] for k, h in hid.items()}, 7)
    assert _rel(d.draft(5, n), ref) < 1e-6
    with pytest.raises(ValueError):
        d.append_context({k: h[:1] for k, h in hid.items()}, 3)


def test_dflash_generate_is_lossless(flash, flash_pair) -> None:
    _, w = flash
    m, d = flash_pair
    prompt = SEQ[:5]
    ref = plain_greedy_generate(m, prompt, 16)
    assert len(ref) == 16
    got, accepts = plain_dflash_generate(m, d, prompt, 16)
    assert got == ref and accepts


class _OracleDrafter(PlainDFlashDrafter):
    """Drafts the true greedy continuation for `good` tokens, then a wrong one, to exercise rollback."""

    def __init__(self, cfg, w, target, truth: list[int]) -> None:
        super().__init__(cfg, w, target)
        self.truth, self.step = truth, 0

    def draft_tokens(self, anchor: int, start_pos: int | None = None) -> list[int]:
        real = super().draft_tokens(anchor, start_pos)
        good = self.step % len(real)
        self.step += 1
        nxt = self.truth[start_pos + 1 : start_pos + len(real) + 1]
        nxt += [0] * (len(real) - len(nxt))
        return nxt[:good] + [(t + 1) % self.cfg.vocab_size for t in nxt[good:]] if good < len(real) else nxt


def test_dflash_accept_and_rollback(flash) -> None:
    cfg, w = flash
    m = PlainModel(cfg, w)
    prompt = SEQ[:4]
    ref = plain_greedy_generate(m, prompt, 20)
    oracle = _OracleDrafter(cfg, w, m, prompt + ref)
    got, accepts = plain_dflash_generate(m, oracle, prompt, 20)
    assert got == ref
    assert set(accepts) >= {0, 1, 2}
    assert oracle.context_length == m.length
