"""GPU correctness of the decode/verify attention kernel against tilert.ops.attention.

Fresh random bf16 inputs every run (never zeros); the output is poisoned with NaN and checked
fully written; the KV append is checked over the whole cache (see attention.check).
"""

import pytest

from tilert.kernels.attention import AttnConfig

FULL = {"rope_theta": 1e7}
SWA = {"rope_theta": 1e4, "window": 128, "sink": True}

# (config, kv_len) pairs: odd context lengths 1 .. 128K, B = 1, 3, 8, 16, window and sink on/off.
CASES = (
    [(AttnConfig(block=1, **FULL), n) for n in (1, 7, 129, 1000, 8191, 131072)]
    + [(AttnConfig(block=3, **FULL), n) for n in (7, 129, 8191)]
    + [(AttnConfig(block=8, **FULL), n) for n in (8, 129, 1000, 8191, 131072)]
    + [(AttnConfig(block=16, **FULL), n) for n in (16, 1000, 131072)]
    + [(AttnConfig(block=1, **SWA), n) for n in (1, 7, 129, 1000, 131072)]
    + [(AttnConfig(block=3, **SWA), n) for n in (129, 1000)]
    + [(AttnConfig(block=8, **SWA), n) for n in (8, 129, 1000, 8191)]
    + [(AttnConfig(block=16, rope_theta=1e4, window=128), n) for n in (16, 1000)]
    + [(AttnConfig(block=8, sink=True, **FULL), n) for n in (1000,)]
    # one-warpgroup CTAs for B=8/16 (rows_per_cta=64: several row blocks), two-stage ring
    + [(AttnConfig(block=8, num_stages=2, rows_per_cta=64, num_split=128, **FULL), n) for n in (8, 1000, 131072)]
    + [(AttnConfig(block=16, num_stages=2, rows_per_cta=64, num_split=64, **FULL), n) for n in (1000,)]
    + [(AttnConfig(block=1, num_stages=2, num_split=256, **FULL), n) for n in (8191, 131072)]
    # mimo-v2-flash per rank of 8: 8 query heads on 1 kv head
    + [(AttnConfig(q_heads=8, block=8, **FULL), n) for n in (7 + 8, 8191)]
    + [(AttnConfig(q_heads=8, block=1, **SWA), n) for n in (1000,)]
    # the window edge under both conventions: W = 128 keys (transformers) and 129 keys (FlashAttention
    # (128, 0)), contexts where the first row's oldest visible key is key 0, 1 or inside the cache
    + [(AttnConfig(block=1, rope_theta=1e4, window=w, sink=True), n) for w in (128, 129) for n in (128, 129, 130, 300)]
    + [(AttnConfig(block=8, rope_theta=1e4, window=w, sink=True), n) for w in (128, 129) for n in (135, 136, 137)]
)


def _id(case):
    cfg, n = case
    return f"B{cfg.block}-hq{cfg.q_heads}-w{cfg.window}-sink{int(cfg.sink)}-n{n}"


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_attention_matches_reference(case):
    from tilert.kernels.attention import check

    cfg, kv_len = case
    res = check(cfg, kv_len)
    print(f"{_id(case)} rel_err={res['rel_err']:.2e} cache_err={res['cache_err']:.2e}")


@pytest.mark.gpu
def test_attention_repeat_steps_are_consistent():
    """Two successive decode steps through the kernel equal the reference's two steps."""
    import torch

    from tilert.kernels.attention import make_inputs, reference, run

    cfg = AttnConfig(block=8, **SWA)
    x = make_inputs(cfg, 300, capacity=400)
    kc, vc = x["k_cache"].clone(), x["v_cache"].clone()
    for step in range(2):
        pos = x["positions"] + step * cfg.block
        q = torch.randn_like(x["q"])
        k = torch.randn_like(x["k"])
        v = torch.randn_like(x["v"])
        out = run(cfg, q, k, v, x["k_cache"], x["v_cache"], pos, x["sink"])
        ref = reference(cfg, q, k, v, kc, vc, pos, x["sink"])
        err = float((out.float() - ref).norm() / ref.norm())
        assert err < 1e-2, f"step {step}: rel err {err:.3g}"


def written_mask(q_pos, k_pos, W, convention):
    """Causal sliding window from the definitions (tests/ops/test_attention_window.py): W keys
    q-W+1 .. q (transformers) or W+1 keys q-W .. q (FlashAttention (W, 0))."""
    import torch

    reach = W - 1 if convention == "transformers" else W
    return torch.tensor([[k <= q and q - k <= reach for k in k_pos] for q in q_pos], dtype=torch.bool)


@pytest.mark.gpu
@pytest.mark.parametrize("convention", ["transformers", "flash_attention"])
@pytest.mark.parametrize("block", [1, 8])
def test_kernel_window_follows_the_written_mask(convention, block):
    """q = 0 gives equal scores, so each row averages the v rows of its visible keys; v of key j is
    the one-hot e_(j mod 128). With W = 60 a row's visible keys are distinct mod 128, so
    out[row, d] > 0 exactly where key d (mod 128) is visible: the kernel's mask, read back."""
    import torch

    from tilert.kernels.attention import make_inputs, run
    from tilert.models.config import window_keys

    W = 60
    cfg = AttnConfig(block=block, rope_theta=1e4, window=window_keys(W, convention))
    for kv_len in (W - 1 + block, W + block, W + 1 + block, 200):
        x = make_inputs(cfg, kv_len, capacity=256)
        onehot = torch.eye(128, dtype=torch.bfloat16, device="cuda")
        x["v_cache"][0] = onehot[torch.arange(256) % 128]
        start = kv_len - block
        v_new = onehot[torch.arange(start, kv_len) % 128][:, None, :].contiguous()
        out = run(cfg, torch.zeros_like(x["q"]), x["k"], v_new, x["k_cache"], x["v_cache"], x["positions"])
        seen = out[:, 0].float().cpu() > 1e-4  # [B, 128]
        want = written_mask(list(range(start, kv_len)), list(range(kv_len)), W, convention)
        folded = torch.zeros(block, 128, dtype=torch.bool)
        for k in range(kv_len):
            folded[:, k % 128] |= want[:, k]
        assert torch.equal(seen, folded), (convention, block, kv_len)
