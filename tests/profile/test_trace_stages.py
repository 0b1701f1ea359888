"""The per-node stage table of benchmarks/trace_stages.py: spans and task times from a measured trace."""

import gzip
import json

from tilert.profile.trace_analysis import format_stage_gaps, format_stages, load, stage_gaps, stages


def ev(node, cat, ts, dur, name="linear_fp8"):
    return {"ph": "X", "pid": 1, "tid": 0, "name": name, "cat": cat, "ts": ts, "dur": dur, "args": {"node": node}}


def test_stages_span_and_task_times(tmp_path):
    events = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "rank 0"}},
        ev(5, "LINEAR_FP8", 100.0, 4.0), ev(5, "LINEAR_FP8", 101.0, 6.0), ev(5, "LINEAR_FP8", 110.0, 2.0),
        {"ph": "X", "pid": 1, "tid": 0, "name": "wait", "cat": "WAIT", "ts": 90.0, "dur": 10.0, "args": {"node": 5}},
        ev(3, "MOE_ROUTER", 10.0, 5.0, "fused_moe"), ev(3, "MOE_TOPK", 16.0, 9.0, "fused_moe"),
        ev(9, "LINEAR_FP8", 500.0, 1.0),
    ]  # fmt: skip
    p = tmp_path / "t.json.gz"
    p.write_bytes(gzip.compress(json.dumps({"traceEvents": events}).encode()))
    rows = stages(load(p), 0, 9)
    assert [r["node"] for r in rows] == [3, 5]  # by first start; node 9 is outside [0, 9)
    moe, lin = rows
    assert moe["span_us"] == 15.0 and moe["opcodes"]["MOE_TOPK"] == {"tasks": 1, "median_us": 9.0, "max_us": 9.0}
    assert lin["span_us"] == 12.0  # 100 .. 112; the wait event is not a task
    assert lin["opcodes"]["LINEAR_FP8"] == {"tasks": 3, "median_us": 4.0, "max_us": 6.0}
    assert "span   12.0" in format_stages(rows)


def test_stage_gaps_rank_the_stages_by_span_and_the_gap_before_them():
    # two layers of router -> top-k -> linear; the top-k starts 2 us after the last router task ends,
    # the linear 1 us after the top-k (node order is the step's order)
    events = []
    for layer, t0 in ((0, 0.0), (1, 100.0)):
        n = 10 * layer
        events += [ev(n, "MOE_ROUTER", t0, 4.0, "fused_moe"), ev(n, "MOE_ROUTER", t0 + 1.0, 5.0, "fused_moe"),
                   ev(n, "MOE_TOPK", t0 + 8.0, 3.0, "fused_moe"), ev(n + 1, "LINEAR_FP8", t0 + 12.0, 6.0)]
    rows = {r["opcode"]: r for r in stage_gaps(events)}
    assert rows["MOE_TOPK"]["gap_us"] == 2.0 and rows["MOE_TOPK"]["span_us"] == 3.0
    assert rows["LINEAR_FP8"]["gap_us"] == 1.0 and rows["LINEAR_FP8"]["stages"] == 2
    assert rows["MOE_ROUTER"]["span_us"] == 6.0 and rows["MOE_ROUTER"]["task_us"] == 4.5
    # the second router starts 82 us after the first layer's linear ended
    assert rows["MOE_ROUTER"]["total_ms"] == (6.0 + 0.0 + 6.0 + 82.0) / 1e3
    assert [r["opcode"] for r in stage_gaps(events)][0] == "MOE_ROUTER"
    assert "MOE_TOPK" in format_stage_gaps(stage_gaps(events))
