"""Shared test setup: hypothesis profiles sized for CI's 2 cores, and the `gpu` marker gate."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

from tilert.kernels.common import hopper_reason

try:  # the models under test are tiny: one intra-op thread avoids OpenMP spin contention on 2 cores
    import torch

    torch.set_num_threads(1)
except ImportError:
    pass

settings.register_profile(
    "ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=False
)
settings.register_profile("dev", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = None
    for item in items:
        if "gpu" in item.keywords:
            reason = reason or hopper_reason() or ""
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))
