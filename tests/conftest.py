"""Shared test setup: hypothesis profiles sized for CI's 2 cores, and the `gpu` marker gate."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=False
)
settings.register_profile("dev", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def _hopper_reason() -> str | None:
    """None when a Hopper (sm_90) GPU is usable, else why not."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "needs an NVIDIA Hopper GPU (sm_90); none is visible"
    major, minor = torch.cuda.get_device_capability()
    if major != 9:
        return f"needs compute capability 9.x (Hopper); this GPU is {major}.{minor}"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = None
    for item in items:
        if "gpu" in item.keywords:
            reason = reason or _hopper_reason() or ""
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))
