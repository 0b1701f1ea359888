"""`profile --measure`: each kernel's time on the eager runtime next to its floor and prediction."""

from __future__ import annotations

from tilert.models.config import load_config
from tilert.profile.cli import profile_model


def test_measure_fills_every_kernel_row(tmp_path):
    rep = profile_model(load_config("tiny"), 2, steps=["decode"], max_seq=64, measure=True, device="cpu",
                        out=tmp_path, top=5)  # fmt: skip
    step = rep["steps"]["decode.B1"]
    assert step["measured"].startswith("measured on cpu")
    assert all(k["measured_us"] is not None and k["measured_us"] > 0 for k in step["kernels"])
    assert step["measured_ms"] > 0 and "meas. us" in rep["text"]
    assert (tmp_path / "roofline_decode.B1.png").exists() or "matplotlib" in rep["text"]
