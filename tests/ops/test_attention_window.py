"""The sliding-window convention against a written-out mask.

For window W the config's convention says which keys a query at position q sees:
- "transformers" (default; transformers' `kv_idx > q_idx - W`, vLLM): k in q-W+1 .. q (W keys);
- "flash_attention" (FlashAttention's (W, 0) read literally): k in q-W .. q (W+1 keys);
non-causal (DFlash drafter layers): the same bound on both sides, |q - k| < W (or <= W).
`written_mask` spells that out per (q, k) pair from those definitions alone; every implementation
(op reference, plain model, plan VM, whole models on the reference executor) must agree with it,
at the window edge included.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tilert import ops
from tilert.models.config import ConfigError, load_config, parse_config, window_keys
from tilert.models.plain import PlainModel, causal_window_mask, drafter_mask
from tilert.ops.attention import visible

CONVENTIONS = ("transformers", "flash_attention")


def written_mask(q_pos: list[int], k_pos: list[int], W: int, convention: str, causal: bool = True) -> torch.Tensor:
    """[T, S] from the definitions above, one (q, k) pair at a time."""
    extra = {"transformers": 0, "flash_attention": 1}[convention]
    rows = []
    for q in q_pos:
        row = []
        for k in k_pos:
            ok = k <= q if causal else True
            if W > 0:
                ok = ok and q - k <= W - 1 + extra  # W keys: q-W+1 .. q; W+1 keys: q-W .. q
                if not causal:
                    ok = ok and k - q <= W - 1 + extra
            row.append(ok)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.bool)


def attention_pattern(q_pos: torch.Tensor, n_keys: int, window: int, causal: bool) -> torch.Tensor:
    """Which keys the op reference attends to, read from its output: q = 0 (equal scores), v = one-hot
    of the key index, so out[t, j] > 0 exactly where key j is visible to query t."""
    T = q_pos.numel()
    q = torch.zeros(T, 2, 8)
    kc = torch.randn(1, n_keys, 8)
    vc = torch.eye(n_keys)[None]  # [1, S, S]: key j's value is e_j
    out = ops.attention(q, kc, vc, q_pos, n_keys, scale=1.0, window=window, causal=causal)
    return out[:, 0] > 0


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("W", [1, 2, 3, 5])
@pytest.mark.parametrize("causal", [True, False])
def test_op_reference_follows_the_written_mask(convention, W, causal):
    S = 14
    q_pos = [0, 1, W - 1, W, W + 1, 7, 9, 10]  # the window edge: where q - W and q - W + 1 fall
    want = written_mask(q_pos, list(range(S)), W, convention, causal)
    keys = window_keys(W, convention)
    assert torch.equal(visible(torch.tensor(q_pos), torch.arange(S), keys, causal), want)
    assert torch.equal(attention_pattern(torch.tensor(q_pos), S, keys, causal), want)


@pytest.mark.parametrize("convention", CONVENTIONS)
@pytest.mark.parametrize("W", [1, 3, 4])
def test_plain_model_masks_follow_the_written_mask(convention, W):
    pos = list(range(12))
    keys = window_keys(W, convention)
    got = causal_window_mask(torch.tensor(pos), torch.tensor(pos), keys)
    assert torch.equal(got, written_mask(pos, pos, W, convention))
    q = [6, 7, 8, 9]
    for causal in (True, False):
        want = written_mask(q, pos, W, convention, causal)
        assert torch.equal(drafter_mask(torch.tensor(q), torch.tensor(pos), keys, causal), want)


def test_window_edge_by_convention():
    """At W = 4 the query at 10 sees key 7 under both conventions, key 6 only under (W, 0)."""
    for convention, first in (("transformers", 7), ("flash_attention", 6)):
        m = written_mask([10], list(range(12)), 4, convention)[0]
        assert m.nonzero().flatten().tolist() == list(range(first, 11))
        keys = window_keys(4, convention)
        assert visible(torch.tensor([10]), torch.arange(12), keys, True)[0].nonzero().flatten().tolist() == list(
            range(first, 11)
        )


def test_config_property():
    raw = load_config("tiny").to_dict()
    assert raw["sliding_window_convention"] == "transformers"
    W = raw["sliding_window_size"]
    default = parse_config(raw)
    fa = parse_config(dict(raw, sliding_window_convention="flash_attention"))
    layer = next(i for i in range(default.num_hidden_layers) if default.is_sliding(i))
    assert default.attention(layer).window == W and fa.attention(layer).window == W + 1
    assert parse_config(fa.to_dict()).sliding_window_convention == "flash_attention"
    with pytest.raises(ConfigError, match="sliding_window_convention"):
        parse_config(dict(raw, sliding_window_convention="sglang"))
    with pytest.raises(ConfigError, match="dflash.sliding_window_convention"):
        parse_config(dict(raw, dflash=dict(raw["dflash"], sliding_window_convention="(W, 0)")))


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_whole_model_follows_the_convention(convention):
    """Reference executor == plain model under each convention; the two conventions give different
    logits once a query has more than W keys behind it, and equal ones before."""
    from tests.runtime.test_reference_executor import check_against_plain

    cfg = dataclasses.replace(load_config("tiny"), sliding_window_convention=convention)
    check_against_plain(cfg, seed=4, prompt=[3, 1, 4, 1, 5, 9, 2, 6], steps=[1, 4, 1])
    from tilert.models.weights import synthetic_weights

    w = synthetic_weights(cfg, 4)
    other = dataclasses.replace(cfg, sliding_window_convention=[c for c in CONVENTIONS if c != convention][0])
    seq = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]
    a, b = PlainModel(cfg, w)(seq, 0), PlainModel(other, w)(seq, 0)
    W = cfg.sliding_window_size
    assert float((a[:W] - b[:W]).abs().max()) < 1e-6
    assert all(float((a[i] - b[i]).abs().max()) > 1e-4 for i in range(W, len(seq)))


@pytest.mark.parametrize("convention", CONVENTIONS)
def test_plan_vm_follows_the_convention(convention):
    """The compiled task tables on the plan VM (split-KV tiles, old-key range from the window) give
    the reference executor's outputs under each convention, with contexts past the window."""
    from tests.runtime.test_plan_vm import check, compiled_steps, run_vm

    cfg = dataclasses.replace(load_config("tiny"), sliding_window_convention=convention)
    case = compiled_steps(cfg, 1, prompt=9)
    check(case, run_vm(case, "random", seed=1), f"tiny {convention}")


def test_window_keys():
    assert [window_keys(W, c) for W in (0, 1, 128) for c in CONVENTIONS] == [0, 0, 1, 2, 128, 129]
    with pytest.raises(ConfigError):
        window_keys(4, "sglang")
