"""Fused MoE: routing + experts vs the tilert.ops reference on a Hopper GPU; validation on CPU."""

import pytest
import torch

from tilert.kernels import moe


def test_bad_inputs():
    x, rw, b, gu, dn = moe.make_inputs(2, 256, 512, 16, 4, device="cpu", seed=0)
    with pytest.raises(ValueError, match="router_w shape"):
        moe.run(x, rw[:, :128], b, gu, dn, top_k=2)
    with pytest.raises(TypeError, match="bf16"):
        moe.run(x.float(), rw, b, gu, dn, top_k=2)
    with pytest.raises(ValueError, match="1..16"):
        moe.run(torch.zeros(17, 256, dtype=torch.bfloat16), rw, b, gu, dn, top_k=2)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 5, 16])
def test_moe_small(t):
    # all experts local and a high top_k so every T exercises several active experts
    err = moe.check(t, 512, 512, 32, 32, 8)
    assert err < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("t, offset", [(8, 16)])
def test_moe_sharded(t, offset):
    err = moe.check(t, 512, 512, 64, 16, 6, expert_offset=offset)
    assert err < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 8])
def test_moe_mimo(t):
    m = moe.MIMO
    err = moe.check(t, m["hidden"], m["inter"], m["n_experts"], m["n_local"], m["top_k"])
    assert err < 1e-2
