"""The persistent step relies on every CTA being resident at once (they wait on each other's counters):
it is a cooperative launch, so a grid the GPU cannot hold together is refused with an error naming
the cause, never left to stall until a wait times out."""

from __future__ import annotations

import pytest
import torch

from tilert.models.builder import build_step_graph
from tilert.models.config import load_config
from tilert.runtime.eager.synthetic import synthetic_params
from tilert.runtime.persistent.backend import compile_step
from tilert.runtime.persistent.step import PersistentError, PersistentStep

pytestmark = pytest.mark.gpu

OVERSIZED = 9 * 132  # 9 x 256 threads per SM is more than an SM holds (scripts/precompile_gpu.py --cli)


def test_grid_that_cannot_be_resident_is_refused() -> None:
    cfg = load_config("tiny-gpu")
    rg, sched = compile_step(build_step_graph(cfg, tokens=1, mode="decode", max_seq=256), 256, sms=OVERSIZED)
    st = PersistentStep(rg, sched.table, sched.counter_expected, synthetic_params(rg, 0), "cuda", num_sms=OVERSIZED)
    inputs = {"tokens": torch.ones(1, dtype=torch.int32), "positions": torch.zeros(1, dtype=torch.int32)}
    with pytest.raises(PersistentError, match="resident at once"):
        st.run(inputs)
    torch.cuda.synchronize()  # the refusal left the device usable
    assert torch.ones(4, device="cuda").sum().item() == 4
