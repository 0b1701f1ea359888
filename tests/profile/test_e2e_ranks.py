"""benchmarks/e2e_ranks.py's trace arithmetic (the multi-GPU run itself needs the GPUs)."""

from __future__ import annotations

from benchmarks.e2e_ranks import collective_us_per_layer


def _task(node: int, cat: str, ts: float, dur: float) -> dict:
    return {"ph": "X", "cat": cat, "ts": ts, "dur": dur, "args": {"node": node}}


def test_collective_time_is_the_span_of_each_collective_node_per_layer() -> None:
    trace = {"traceEvents": [
        _task(3, "ALL_REDUCE", 10.0, 2.0), _task(3, "ALL_REDUCE", 11.0, 4.0),  # node 3 spans 10..15
        _task(4, "LINEAR_FP8", 15.0, 30.0),  # not a collective
        _task(7, "MOE_REDUCE", 50.0, 3.0), _task(7, "MOE_REDUCE", 49.0, 1.0),  # spans 49..53
        _task(9, "ALL_REDUCE", 60.0, 1.0),  # spans 60..61
        {"ph": "X", "cat": "WAIT", "ts": 0.0, "dur": 99.0, "args": {"node": 3}},
    ]}  # fmt: skip
    assert collective_us_per_layer(trace, layers=2) == {"ALL_REDUCE": 3.0, "MOE_REDUCE": 2.0}
