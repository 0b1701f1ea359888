"""Every step graph of a backend reads one device copy of each param: the drafter's graphs share the
target's embedding and LM head, and a later graph must not replace the copy an earlier captured CUDA
graph reads (CPU: meta tensors stand for the device copies)."""

from __future__ import annotations

from tilert.models.builder import build_step_graph
from tilert.models.config import load_config
from tilert.models.drafter import build_drafter_graph
from tilert.models.weights import synthetic_weights


def test_step_graphs_share_one_device_copy_of_each_param() -> None:
    from tilert.engine.eager import EagerBackend

    cfg = load_config("tiny-gpu")
    be = EagerBackend(cfg, synthetic_weights(cfg, 0), max_seq=64, device="meta")
    be._get(("target", 16, "decode"), lambda: build_step_graph(cfg, tokens=16, mode="decode", max_seq=64))
    first = dict(be.runtime.params)
    for c in (5, 1):
        be._get(("drafter", c), lambda c=c: build_drafter_graph(cfg, context=c, max_seq=64))
    be._get(("target", 4, "verify"), lambda: build_step_graph(cfg, tokens=4, mode="verify", max_seq=64))
    shared = [k for k in first if k in be.runtime.params]
    assert any("embed" in k for k in shared) and len(shared) == len(first)
    assert all(be.runtime.params[k] is first[k] for k in shared)
