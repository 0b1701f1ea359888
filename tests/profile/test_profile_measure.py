"""`profile --measure`: each kernel's time on the eager runtime next to its floor and prediction."""

from __future__ import annotations

import pytest

from tilert.models.config import load_config
from tilert.profile.report import profile_model


def test_measure_fills_every_kernel_row(tmp_path):
    rep = profile_model(load_config("tiny"), 2, steps=["decode"], max_seq=64, measure=True, device="cpu",
                        out=tmp_path, top=5)  # fmt: skip
    step = rep["steps"]["decode.B1"]
    assert step["measured"].startswith("measured on cpu")
    assert all(k["measured_us"] is not None and k["measured_us"] > 0 for k in step["kernels"])
    assert step["measured_ms"] > 0 and "meas. us" in rep["text"]
    assert (tmp_path / "roofline_decode.B1.png").exists() or "matplotlib" in rep["text"]


@pytest.mark.gpu
def test_measure_on_gpu_times_kernels_and_the_persistent_step(tmp_path):
    import json

    rep = profile_model(load_config("tiny-gpu"), 1, steps=["decode"], max_seq=256, measure=True, device="cuda",
                        out=tmp_path, top=5)  # fmt: skip
    step = rep["steps"]["decode.B1"]
    assert "CUDA graph replay" in step["measured"], step["measured"]
    assert all(k["measured_us"] is not None and k["measured_us"] > 0 for k in step["kernels"])
    assert step["persistent_measured_ms"] and step["persistent_measured_ms"] > 0
    tr = json.loads((tmp_path / "trace_decode.B1.rank0.measured.json").read_text())
    ev = [e for e in tr["traceEvents"] if e.get("ph") == "X"]
    tasks = [e for e in ev if e["cat"] != "WAIT"]  # each task, after its 'wait' event (if it waited)
    assert len(tasks) == step["tasks"] and all(e["dur"] >= 0 for e in ev)
    assert len({e["tid"] for e in ev}) > 100  # one track per SM that ran tasks
