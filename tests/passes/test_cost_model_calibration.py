"""The compiler's predicted persistent step against measured ones: rank 0 of mimo-v2.5-pro at 8 ranks,
solo on one GPU as `benchmarks/e2e.py` measures it (collectives as local work), KV context 4096.

H200: the stored results (benchmarks/results/e2e-nvidia-h200.json at e62ce6d, B=1 decode;
e2e-random-routing-B8-81c16da-nvidia-h200.json, B=8 verify with routing by token). The H200 task
costs were fitted to traces (benchmarks/calibrate_costs.py), not to these step times. H100: the stored
results (e2e-nvidia-h100-80gb-hbm3.json at d5516a8 and step-variants-down-early-nvidia-h100-80gb-hbm3.json
at 523c528, B=1 and B=8, routing by token); its table is fitted to the 523c528 run's traces, and the
expert tasks' one scale factor balances the errors on these steps, so that check is partly a
consistency check."""

from __future__ import annotations

from pathlib import Path

import pytest

from tilert.gpu_specs import H100, H200
from tilert.kernels import switches
from tilert.models.config import load_config
from tilert.profile.calibration import MeasuredStep, measured_steps, predicted_step_ms

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
WORLD, CONTEXT, MAX_SEQ = 8, 4096, 4160
TOLERANCE = 0.25


def stored(file: str, tokens: int, routing: str | None = None) -> MeasuredStep:
    """The file's step of `tokens` (with `routing`: "pinned" finds a pinned-routing file's step "8"
    and a by-token file's extra row "8.pinned" alike)."""
    (m,) = [m for m in measured_steps(RESULTS / file) if m.tokens == tokens and routing in (None, m.routing)]
    assert m.solo and m.world == WORLD and m.context == CONTEXT and m.model == "mimo-v2.5-pro"
    return m


def predicted(cfg, m: MeasuredStep, spec, routed=None) -> float:
    """The compiler's step for a stored one, built under the switches the stored one ran under."""
    with switches.applied(m.switches):
        return predicted_step_ms(cfg, m.tokens, WORLD, spec.solo(), MAX_SEQ, CONTEXT, routed=routed)


@pytest.fixture(scope="module")
def cfg():
    return load_config("mimo-v2.5-pro")


@pytest.mark.parametrize("file, tokens, routing", [
    ("e2e-nvidia-h200.json", 1, None),  # B=1: pinned routing is one expert a rank, the expected load, too
    ("e2e-random-routing-B8-81c16da-nvidia-h200.json", 8, "token"),
])  # fmt: skip
def test_h200_prediction_within_25_percent_of_the_stored_step(cfg, file, tokens, routing):
    m = stored(file, tokens, routing)
    got = predicted(cfg, m, H200)
    assert abs(got / m.persistent_ms - 1) <= TOLERANCE, f"predicted {got:.2f} ms, measured {m.persistent_ms:.2f} ms"


def test_h200_prediction_at_the_measured_routing(cfg):
    """Pinned routing at B=8 (one active expert a layer, not the expected seven): the prediction for
    that routing, where the compiler's own (uniform routing) would be twice the step."""
    m = stored("e2e-nvidia-h200.json", 8, "pinned")
    assert m.routed == 1.0
    got = predicted(cfg, m, H200, m.routed)
    assert abs(got / m.persistent_ms - 1) <= TOLERANCE, f"predicted {got:.2f} ms, measured {m.persistent_ms:.2f} ms"


@pytest.mark.parametrize("tokens", [1, 8])
def test_h100_prediction_within_25_percent_of_the_stored_step(cfg, tokens):
    m = stored("e2e-nvidia-h100-80gb-hbm3.json", tokens, "token")
    for routed in (None, m.routed):  # the compiler's own (uniform routing) and at the measured routing
        got = predicted(cfg, m, H100, routed)
        assert abs(got / m.persistent_ms - 1) <= TOLERANCE, (routed, got, m.persistent_ms)


@pytest.mark.parametrize("tokens", [1, 8])
def test_h100_prediction_of_the_kernel_alone(cfg, tokens):
    """The step the H100 table was fitted to (523c528, `benchmarks/step_variants.py`'s base variant:
    the kernel alone, launches back to back), its switches those of the same run's trace."""
    from benchmarks.calibrate_costs import steps_of

    (m,) = [m for m in steps_of(RESULTS, "step-variants-down-early-nvidia-h100-80gb-hbm3.json") if m.tokens == tokens]
    got = predicted(cfg, m, H100, m.routed)
    assert abs(got / m.persistent_ms - 1) <= TOLERANCE, (got, m.persistent_ms)
