"""A measured persistent trace -> per-kind run, fixed and hand-over times and stream rates
(tilert.profile.trace_analysis), the cost-model fit (tilert.profile.calibration) and
`benchmarks/trace_stages.py --stats` on a stored trace."""

from __future__ import annotations

import argparse
import gzip
import json

import numpy as np
import pytest

from benchmarks import trace_stages
from tilert.abi import FIELD, OPCODE_NAMES, OPCODES, TASK_FIELDS
from tilert.gpu_specs import H200
from tilert.models.config import load_config
from tilert.profile.calibration import compile_rank, fit_task_costs, task_samples, trace_meta
from tilert.profile.timeline import simulate, trace_json
from tilert.profile.trace_analysis import RunTasks, TaskWork, analyse, run_from_trace, task_work


def _row(opcode: str, op: int, signal: int = -1, wait: int | None = None) -> np.ndarray:
    r = np.zeros(len(TASK_FIELDS), np.int32)
    r[FIELD["opcode"]], r[FIELD["op"]], r[FIELD["signal"]] = OPCODES[opcode], op, signal
    for w in range(3):
        r[FIELD[f"wait{w}_counter"]] = -1
    if wait is not None:
        r[FIELD["wait0_counter"]], r[FIELD["wait0_count"]], r[FIELD["wait0_expected"]] = wait, 1, 1
    return r


def test_hand_over_fixed_cost_and_stream_rate_of_a_known_launch():
    # SM0: a GEMV (signals counter 0); SM1: a gate/up task waiting on it, then a reduce with its inputs there
    table = np.zeros((2, 2, len(TASK_FIELDS)), np.int32)
    table[0, 0] = _row("LINEAR_FP8", 0, signal=0)
    table[1, 0] = _row("MOE_GATE_UP", 1, wait=0)
    table[1, 1] = _row("MOE_REDUCE", 1)
    start = np.array([[0, -1], [0, 2300]])
    ready = np.array([[100, -1], [1300, 2450]])  # gate/up: 200 ns after the GEMV's end; reduce: 150 after pick-up
    end = np.array([[1100, -1], [2300, 2500]])
    run = RunTasks(table, start, ready, end)
    zero = np.zeros((2, 2))
    work = TaskWork(np.array([[12e3, 0], [6e3, 1e3]]), np.array([[10e3, 0], [4e3, 0]]), zero)
    a = analyse(run, work, copy_bandwidth=40e9)  # 20 GB/s per SM
    lin, up, red = (a["kinds"][k] for k in ("LINEAR_FP8", "MOE_GATE_UP", "MOE_REDUCE"))
    assert lin["run_us_median"] == 1.0 and lin["stream_GBps_per_sm"] == 10.0 and lin["copy_share"] == 0.5
    assert lin["bytes_GBps_per_sm"] == 12.0 and lin["fixed_us_median"] == 0.1 and lin["handover_tasks"] == 0
    assert up["handover_us_median"] == 0.2 and up["fixed_tasks"] == 0 and up["stream_GBps_per_sm"] == 4.0
    assert red["fixed_us_median"] == 0.15 and red["stream_GBps_per_sm"] is None
    assert a["handover_pairs"] == [{"producer": "LINEAR_FP8", "consumer": "MOE_GATE_UP", "tasks": 1, "us_median": 0.2}]
    assert a["span_us"] == 2.5 and list(a["kinds"])[:2] == ["LINEAR_FP8", "MOE_GATE_UP"]  # streaming kinds first
    # the reduce follows another kind's task on its SM (cold); nothing follows a task of its own node
    assert red["run_us_cold_median"] == 0.05 and red["cold_tasks"] == 1 and red["warm_tasks"] == 0
    assert lin["cold_tasks"] == 0 and lin["run_us_warm_median"] is None


def test_warm_and_cold_runs_by_the_task_before_on_the_sm():
    # one SM: split (node 3), split (node 3, warm), linear (node 4, cold), split (node 5: cold, another kind before)
    table = np.zeros((1, 4, len(TASK_FIELDS)), np.int32)
    for k, (code, op) in enumerate([("ATTN_SPLIT", 3), ("ATTN_SPLIT", 3), ("LINEAR_FP8", 4), ("ATTN_SPLIT", 5)]):
        table[0, k] = _row(code, op)
    start = np.array([[0, 10_000, 12_000, 20_000]])
    ready = start + 100
    end = np.array([[9_100, 11_100, 19_100, 29_100]])
    run = RunTasks(table, start, ready, end)
    zero = np.zeros((1, 4))
    a = analyse(run, TaskWork(zero, zero, zero))
    split, lin = a["kinds"]["ATTN_SPLIT"], a["kinds"]["LINEAR_FP8"]
    assert split["warm_tasks"] == 1 and split["run_us_warm_median"] == 1.0
    assert split["cold_tasks"] == 1 and split["run_us_cold_median"] == 9.0
    assert lin["cold_tasks"] == 1 and lin["run_us_cold_median"] == 7.0


@pytest.fixture(scope="module")
def tiny_trace():
    """A tiny verify step's predicted timeline as the kernel would stamp it, as a Chrome trace."""
    rank = compile_rank(load_config("tiny"), 4, 1, H200, 64)
    sched = rank.schedule
    start, ready, end = simulate(sched.table, sched.counter_expected, TASK_FIELDS, spec=H200, stamps=True)
    names = [n.op for n in rank.graph.nodes]
    meta = {"model": "tiny", "world": 1, "tokens": 4, "max_seq": 64, "context": 64, "copy_bandwidth_Bps": 4e12}
    trace = trace_json(sched.table, start, end, TASK_FIELDS, names, OPCODE_NAMES, meta=meta, ready_ns=ready)
    return rank, trace, (start, ready, end)


def test_a_stored_trace_pairs_with_the_table_and_recovers_the_model(tiny_trace):
    rank, trace, (start, ready, end) = tiny_trace
    run = run_from_trace(json.loads(json.dumps(trace)), rank.schedule.table)
    t0 = int(start[start >= 0].min())
    used = run.used
    assert (run.ready[used] == ready[used] - t0).all() and (run.end[used] == end[used] - t0).all()
    assert (run.start[used] == start[used] - t0).all()
    # the simulated run times are the cost model's: the fit reproduces them
    work = task_work(rank.graph, rank.tiles, run.table)
    fits = fit_task_costs(task_samples(run, work), q=0.5, min_samples=1)
    for code, f in fits.items():
        assert f["median_rel_err"] < 0.02, code
        if f["fixed_tasks"]:  # tasks whose inputs were there: ready is the fixed cost after pick-up
            assert f["fixed_s"] == pytest.approx(H200.task_cost(code).fixed_s, abs=2e-9), code


def test_trace_stages_stats_reads_the_step_from_the_trace(tiny_trace, tmp_path):
    _, trace, _ = tiny_trace
    p = tmp_path / "t.json.gz"
    p.write_bytes(gzip.compress(json.dumps(trace).encode()))
    flags = ("model", "tokens", "world", "layers", "max_seq", "context", "routed_experts", "copy_bandwidth")
    out = trace_stages.stats(trace_stages.read_trace(p), argparse.Namespace(**dict.fromkeys(flags)))
    assert out["step"]["model"] == "tiny" and out["step"]["tokens"] == 4 and out["copy_bandwidth_Bps"] == 4e12
    assert out["tasks"] == len(trace_stages.task_events(trace))
    assert out["handover_tasks"] > 0 and all(k["tasks"] > 0 for k in out["kinds"].values())


def test_trace_meta_from_the_graph_name():
    meta = trace_meta({"traceEvents": [], "otherData": {"graph": "mimo-v2.5-pro.verify.B8.r0"}})
    assert (meta["model"], meta["tokens"]) == ("mimo-v2.5-pro", 8)
    meta = trace_meta({"otherData": {"graph": "x.decode.B1.r0", "active_experts": {"5": 2}}})
    assert meta["active_experts"] == {5: 2}


def test_expert_tasks_carry_the_measured_routing():
    rank = compile_rank(load_config("tiny"), 4, 1, H200, 64)
    i = rank.moe_nodes()[0]
    n = rank.graph.nodes[i]
    per_expert = rank.graph.values[n.inputs[3]].nbytes / n.a.n_local
    table = rank.schedule.table
    up = table[:, :, FIELD["opcode"]] == OPCODES["MOE_GATE_UP"]
    mine = up & (table[:, :, FIELD["op"]] == i)
    for active in (1, 3):
        work = task_work(rank.graph, rank.tiles, table, {i: active})
        assert work.stream[mine].sum() == pytest.approx(active * per_expert)
