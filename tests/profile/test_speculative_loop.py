"""benchmarks/speculative.py's loop part: tokens/s per user measured from the decode loop on one
rank's shard (solo collectives, synthetic weights), and the synthetic weights it generates once
per name for every step shape."""

from __future__ import annotations

import pytest

from tilert.models.builder import build_step_graph
from tilert.models.config import load_config
from tilert.runtime.eager.synthetic import synthetic_params


def test_synthetic_params_skip_what_a_backend_already_holds():
    g = build_step_graph(load_config("tiny"), tokens=1, max_seq=64)
    names = [v.name for v in g.by_role("param")]
    first = synthetic_params(g, device="cpu", skip=names[: len(names) // 2])
    assert set(first) == set(names[len(names) // 2 :])
    assert not synthetic_params(g, device="cpu", skip=names)


@pytest.mark.gpu
def test_loop_on_a_solo_rank_reports_measured_and_projected_rates():
    from benchmarks.speculative import loop_full_scale

    res = loop_full_scale("tiny-gpu", 2, [3.0], new_tokens=24, prompt_len=1, max_seq=256)
    greedy, dflash = res["runs"]
    assert greedy["mode"] == "greedy" and greedy["tokens_per_s"] > 0
    assert dflash["lossless"] and dflash["synthetic"] and dflash["steps"]["verify"]["n"] > 0
    assert dflash["device_timed"] and 0 <= dflash["host_share"] <= 1
    assert dflash["projected_tokens_per_s"] > 0 and dflash["measured_over_projected"] > 0
