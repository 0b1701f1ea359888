"""CPU tests of the attention kernel: every plan configuration compiles for sm_90a (no GPU
needed), and `run` rejects mismatched inputs with a message naming the mismatch."""

import pytest
import torch

from tilert.kernels import attention as A
from tilert.kernels.common import toolchain_reason


def test_configs_for_plan_cover_full_swa_and_blocks():
    cfgs = A.configs_for_plan()
    assert {(c.block, c.window) for c in cfgs} == {(1, 0), (8, 0), (1, 128), (8, 128)}
    for c in cfgs:
        assert (c.q_heads, c.kv_heads, c.head_dim, c.v_head_dim, c.rope_dim) == (16, 1, 192, 128, 64)
        assert c.sink == bool(c.window)
        assert c.smem_bytes() <= 227 * 1024


@pytest.mark.skipif(toolchain_reason() is not None, reason=f"cannot build for sm_90a: {toolchain_reason()}")
@pytest.mark.timeout(600)
def test_plan_configs_compile_for_sm90a():
    for cfg in A.configs_for_plan():
        split, combine = A.compiled(cfg)
        src = split.get_kernel_source()
        assert "wgmma" in src, f"{cfg}: QK^T / PV are not on Hopper tensor cores (no wgmma)"
        assert "tma_load" in src, f"{cfg}: key tiles are not loaded by the TMA ring"
        assert "attn_combine" in combine.get_kernel_source()


def _inputs(cfg, **over):
    x = A.make_inputs(cfg, 20, device="cpu", seed=0)
    x.update(over)
    return x


@pytest.mark.parametrize(
    "field,bad,msg",
    [
        ("q", torch.zeros(1, 16, 128, dtype=torch.bfloat16), "q has shape"),
        ("k", torch.zeros(1, 1, 192, dtype=torch.float16), "k has dtype"),
        ("positions", torch.zeros(1, dtype=torch.int64), "positions has dtype"),
        ("v_cache", torch.zeros(1, 23, 64, dtype=torch.bfloat16), "v_cache has shape"),
    ],
)
def test_run_rejects_mismatches(field, bad, msg):
    cfg = A.AttnConfig(block=1)
    x = _inputs(cfg, **{field: bad})
    with pytest.raises(ValueError, match=msg):
        A.run(cfg, x["q"], x["k"], x["v"], x["k_cache"], x["v_cache"], x["positions"], x["sink"])


def test_run_requires_sink_iff_config_has_one():
    cfg = A.AttnConfig(block=1, window=128, sink=True)
    x = _inputs(cfg)
    with pytest.raises(ValueError, match="pass sink"):
        A.run(cfg, x["q"], x["k"], x["v"], x["k_cache"], x["v_cache"], x["positions"], None)


def test_reference_is_the_ops_reference():
    """The kernel's reference composes tilert.ops (rope, kv_append, attention) on CPU."""
    cfg = A.AttnConfig(block=2, q_heads=4, window=8, sink=True, rope_theta=1e4)
    x = A.make_inputs(cfg, 30, device="cpu", seed=1)
    out = A.reference(cfg, x["q"], x["k"], x["v"], x["k_cache"], x["v_cache"], x["positions"], x["sink"])
    assert out.shape == (2, 4, 128) and torch.isfinite(out).all()
    assert x["k_cache"][:, 28:30].float().abs().sum() > 0
