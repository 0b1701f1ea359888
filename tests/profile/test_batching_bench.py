"""benchmarks/batching.py's users mode, as a CPU smoke test (tiny model, reference executor): it
runs the same measurement code as the GPU run and writes its JSON."""

from __future__ import annotations

import json
import threading

from benchmarks.batching import main


def test_users_smoke_mode_writes_its_figures(tmp_path) -> None:
    out: list = []
    argv = ["users", "--model", "tiny", "--device", "cpu", "--world-size", "1", "--users", "1", "2", "4",
            "--context", "12", "--iters", "1", "--out", str(tmp_path)]  # fmt: skip
    t = threading.Thread(target=lambda: out.append(main(argv)))
    t.start()
    t.join(600)
    assert out, "smoke run did not finish"
    d = json.loads((tmp_path / "batching-tiny-cpu-smoke.json").read_text())
    assert [r["users"] for r in d["users"]] == [1, 2, 4]
    assert d["accept_len"] == 6.3 and d["block"] == 4 and d["synthetic"]
    for r in d["users"]:
        assert r["plain_tokens_per_s_total"] > 0 and r["dflash_tokens_per_s_total"] > 0
    assert d["users"][2]["dflash_verify_steps"] == [4]  # 4 users x 4-token blocks fit one 16-row step
