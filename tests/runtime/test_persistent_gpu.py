"""Persistent kernel on the GPU: the chain program vs its reference and its eager twin, repeated
epochs without resetting counters, and a deadlocked table reporting instead of hanging."""

from __future__ import annotations

import pytest
import torch

from tilert.runtime.persistent import chain

pytestmark = pytest.mark.gpu


def _weights(spec: chain.ChainSpec):
    from tilert.numerics import mxfp4

    return mxfp4.quantize(torch.randn(spec.layers, spec.n, spec.n, device="cuda") * spec.n**-0.5)


@pytest.mark.parametrize("layers, m, n", [(2, 1, 1024), (4, 8, 2048), (3, 3, 6144)])
def test_chain_matches_reference_over_epochs(layers, m, n):
    spec = chain.ChainSpec(layers=layers, m=m, n=n)
    W, S = _weights(spec)
    pk = chain.PersistentChain(spec, W, S)
    for _ in range(3):  # fresh inputs each epoch; the output buffer is poisoned first
        x = torch.randn(m, n, device="cuda").to(torch.bfloat16)
        pk.X[spec.layers].fill_(float("nan"))
        y = pk(x).float()
        ref = chain.reference(x, W, S).float()
        assert torch.isfinite(y).all()
        assert float((y - ref).norm() / ref.norm()) < 2e-2
        assert torch.count_nonzero(pk.Y) == 0  # every layer's accumulator returned to zero
    eager = chain.eager_chain(x, W, S, spec).float()
    assert float((eager - ref).norm() / ref.norm()) < 2e-2


def test_deadlock_reports_instead_of_hanging():
    spec = chain.ChainSpec(layers=2, m=1, n=1024)
    W, S = _weights(spec)
    pk = chain.PersistentChain(spec, W, S)
    pk.tasks = chain.deadlock_table(spec).cuda()
    with pytest.raises(RuntimeError, match="wait timed out"):
        pk(torch.randn(1, 1024, device="cuda").to(torch.bfloat16))
