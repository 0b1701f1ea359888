"""The serving load test of benchmarks/batching.py, small: concurrent requests are served by
continuous batching faster than one at a time, each response equal to the same request alone."""

from __future__ import annotations

import threading

from benchmarks.batching import load_test, make_requests, split_rows


def test_concurrent_requests_are_faster_and_equal_alone() -> None:
    out: list = []
    t = threading.Thread(target=lambda: out.append(load_test(requests=24, concurrency=8, max_tokens=12)))
    t.start()
    t.join(600)
    assert out, "load test did not finish"
    res = out[0]
    assert res["all_equal_alone"], f"responses differ from the requests alone: {res['unequal']}"
    assert res["speedup"] > 1.0, res


def test_requests_and_verify_step_split() -> None:
    a, b = make_requests(10, 160, 8, seed=1, dflash_every=3), make_requests(10, 160, 8, seed=1, dflash_every=3)
    assert a == b and all(4 <= len(r["prompt"]) <= 16 for r in a)
    assert [r.get("speculative") for r in a[:4]] == ["dflash", None, None, "dflash"]
    assert split_rows(8, 8, 16) == [2, 2, 2, 2] and split_rows(3, 4, 16) == [3] and split_rows(1, 8, 16) == [1]
