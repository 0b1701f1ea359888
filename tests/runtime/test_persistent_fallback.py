"""A step shape the persistent bodies do not take runs on the eager runtime, with the same KV caches,
instead of failing the request (CPU: meta tensors, no GPU, no kernel compile)."""

from __future__ import annotations

from tilert.models.builder import build_step_graph
from tilert.models.config import load_config
from tilert.models.weights import synthetic_weights


def test_off_contract_shape_is_routed_to_the_eager_runtime() -> None:
    from tilert.runtime.persistent.backend import PersistentBackend

    cfg = load_config("tiny")  # head dim 24, hidden 64: off the attention and MoE bodies' contracts
    be = PersistentBackend(cfg, synthetic_weights(cfg, 0), max_seq=64, device="meta", sms=132)
    kind, _ = be._prepare(build_step_graph(cfg, tokens=1, mode="decode", max_seq=64))
    assert kind == "eager-target"
    assert len(be.fallbacks) == 1 and be.fallbacks[0].startswith("tiny.decode.B1: ")
