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


def test_compare_values_cuts_padding_and_flags_wrong_values() -> None:
    from types import SimpleNamespace

    import torch

    from benchmarks.common import compare_values, off_rows

    g = SimpleNamespace(nodes=[SimpleNamespace(op="linear", outputs=["a"]), SimpleNamespace(op="argmax", outputs=["i"]),
                               SimpleNamespace(op="odd", outputs=["s", "n"])])  # fmt: skip
    want = {"a": torch.randn(3, 8), "i": torch.tensor([1, 2, 3]), "s": torch.randn(4), "n": torch.randn(2)}
    got = {"a": torch.cat([want["a"] * 1.001, torch.zeros(61, 8)]).bfloat16(),  # padded to 64 rows
           "i": torch.tensor([1, 5, 3], dtype=torch.int32), "s": torch.randn(4, 1),
           "n": torch.tensor([1.0, float("nan")])}  # fmt: skip
    rows = compare_values(g, got, want)
    assert [r["value"] for r in rows] == ["a", "i", "n"]  # s: another shape, left out
    assert rows[0]["rel_err"] < 1e-2 and rows[0]["finite"]
    assert rows[1]["equal"] is False
    assert [r["value"] for r in off_rows(rows, 0.05)] == ["i", "n"]
