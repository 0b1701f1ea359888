"""Profiler: per-pass rows from the real pipeline, roofline rows, and the trace JSON format."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tilert.abi import TASK_FIELDS
from tilert.cli import main
from tilert.models.config import load_config
from tilert.profile.report import ProfileError, profile_model
from tilert.profile.timeline import TimelineError, probe_medians, simulate, trace_json


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("prof")
    return out, profile_model(load_config("tiny"), 2, steps=["decode"], out=out)


def test_pass_rows_cover_the_pipeline(report):
    from tilert.passes.manager import PIPELINE

    _, r = report
    rows = r["steps"]["decode.B1"]["passes"]
    assert [x["name"] for x in rows] == ["input"] + [p.name for p in PIPELINE]
    shard = next(x for x in rows if x["name"] == "shard")
    assert shard["graphs"] == 2 and all(x["ir_bytes"] > 0 and x["seconds"] >= 0 for x in rows)
    assert rows[-1]["nodes"] < shard["nodes"]  # fusion shrinks the graphs


def test_roofline_and_files(report):
    out, r = report
    s = r["steps"]["decode.B1"]
    ks = s["kernels"]
    assert ks and all(k["floor_us"] <= k["eager_us"] for k in ks)
    assert abs(s["simulated_makespan_ms"] - s["makespan_ms"]) <= 0.01 * s["makespan_ms"] + 1e-3
    assert sum(k["tasks"] for k in ks) <= s["tasks"]
    assert json.loads((out / "profile.json").read_text())["world"] == 2
    png = out / "roofline_decode.B1.png"
    try:
        import matplotlib  # noqa: F401

        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    except ImportError:
        assert "matplotlib is not installed" in r["text"]


def test_trace_is_chrome_format(report):
    out, r = report
    tr = json.loads((out / "trace_decode.B1.rank0.json").read_text())
    xs = [e for e in tr["traceEvents"] if e["ph"] == "X"]
    assert len(xs) == r["steps"]["decode.B1"]["tasks"]
    assert {e["tid"] for e in xs} <= set(range(132)) and all(e["dur"] > 0 and e["ts"] >= 0 for e in xs)
    assert all(len(e["args"]["tile"]) == 3 and e["name"] for e in xs)
    names = [e for e in tr["traceEvents"] if e["ph"] == "M" and e["name"] == "thread_name"]
    assert len(names) == 132 and names[0]["args"]["name"] == "SM 000"


def _table(rows_per_sm):
    F = {f: i for i, f in enumerate(TASK_FIELDS)}
    L = max(len(r) for r in rows_per_sm)
    t = np.zeros((len(rows_per_sm), L, len(TASK_FIELDS)), np.int32)
    t[:, :, F["signal"]] = -1
    for s, rows in enumerate(rows_per_sm):
        for k, (op, wait, signal, ns) in enumerate(rows):
            t[s, k, F["opcode"]], t[s, k, F["op"]], t[s, k, F["cost_ns"]], t[s, k, F["signal"]] = 2, op, ns, signal
            for w in range(3):
                t[s, k, F[f"wait{w}_counter"]] = -1
            if wait is not None:
                t[s, k, F["wait0_counter"]], t[s, k, F["wait0_count"]], t[s, k, F["wait0_expected"]] = wait, 1, 1
    return t


def test_simulate_respects_dependencies_and_measured_times_use_the_same_exporter():
    # SM0: A (100 ns) signals c0; SM1: B waits on c0 (50 ns), then C (10 ns)
    t = _table([[(0, None, 0, 100)], [(1, 0, -1, 50), (2, None, -1, 10)]])
    start, end = simulate(t, np.array([1], np.int32), TASK_FIELDS)
    assert start[1, 0] == 100 and end[1, 1] == 160
    measured_start, measured_end = start + 7, end + 9  # e.g. globaltimer stamps from the kernel
    tr = trace_json(t, measured_start, measured_end, TASK_FIELDS, ["a", "b", "c"], {2: "LINEAR_FP8"})
    xs = [e for e in tr["traceEvents"] if e["ph"] == "X"]
    assert [(e["name"], e["tid"]) for e in xs] == [("a", 0), ("b", 1), ("c", 1)]
    # with ready stamps: B waited 30 ns (a 'wait' event), then ran from its ready stamp
    ready = measured_start.copy()
    ready[1, 0] += 30
    tr = trace_json(t, measured_start, measured_end, TASK_FIELDS, ["a", "b", "c"], {}, ready_ns=ready)
    xs = [e for e in tr["traceEvents"] if e["ph"] == "X"]
    assert [e["name"] for e in xs] == ["a", "wait", "b", "c"]
    assert xs[1]["dur"] == 0.03 and xs[2]["args"]["wait_us"] == 0.03 and xs[2]["ts"] == xs[1]["ts"] + 0.03
    with pytest.raises(TimelineError, match="deadlocks"):
        simulate(_table([[(0, 0, 0, 5)]]), np.array([1], np.int32), TASK_FIELDS)
    with pytest.raises(TimelineError, match="do not match"):
        trace_json(t, start[:1], end[:1], TASK_FIELDS, ["a"], {})


def test_probe_stamps_become_phase_medians():
    # a step built with TILERT_PROBES=on: each task's phase stamps (ns, 0 = not reached) after its
    # start of run, and per opcode the median of each phase over the tasks that reached it
    t = _table([[(0, None, 0, 100), (1, None, -1, 10)], [(2, None, -1, 50)]])
    start = np.array([[1000, 2000], [1000, 0]], np.int64)
    ready = start + np.array([[0, 100], [40, 0]])
    end = start + 900
    probes = np.zeros((2, 2, 3), np.int64)
    probes[0, 0] = [1200, 1500, 0]  # phases 0 and 1 of the first task, 200 / 500 ns after its start
    probes[0, 1] = [2300, 2600, 2700]  # 200 / 500 / 600 ns after its ready stamp
    probes[1, 0] = [1440, 0, 0]  # 400 ns
    tr = trace_json(t, start, end, TASK_FIELDS, ["a", "b", "c"], {2: "LINEAR_FP8"}, ready_ns=ready, probes_ns=probes)
    runs = [e for e in tr["traceEvents"] if e["ph"] == "X" and e["cat"] != "WAIT"]
    assert [e["args"]["probes_us"] for e in runs] == [[0.2, 0.5, None], [0.2, 0.5, 0.6], [0.4, None, None]]
    assert probe_medians(tr) == {"LINEAR_FP8": [0.2, 0.5, 0.6]}
    assert probe_medians(tr, by="node") == {"a": [0.2, 0.5, None], "b": [0.2, 0.5, 0.6], "c": [0.4, None, None]}
    assert probe_medians(trace_json(t, start, end, TASK_FIELDS, ["a", "b", "c"], {})) == {}  # no probes
    with pytest.raises(ValueError, match="by 'sm'"):
        probe_medians(tr, by="sm")


def test_profile_cli(tmp_path, capsys):
    assert main(["profile", "--model", "tiny", "--gpus", "1", "--steps", "verify", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert "verify.B4" in out.out and "fuse_moe" in out.out and "simulating" in out.err
    assert main(["profile", "--model", "tiny", "--gpus", "2", "--rank", "5"]) == 2
    with pytest.raises(ProfileError):
        profile_model(load_config("tiny"), 1, steps=["prefill"])
