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
    greedy, greedy8, dflash, fixed, host, chained = res["runs"]
    assert greedy8["cycles_per_sync"] == 8 and greedy8["equals_host_driven"]
    assert greedy["mode"] == "greedy" and greedy["tokens_per_s"] > 0
    assert dflash["lossless"] and dflash["synthetic"] and dflash["steps"]["verify"]["n"] > 0
    assert dflash["device_timed"] and 0 <= dflash["host_share"] <= 1
    assert dflash["projected_tokens_per_s"] > 0 and dflash["measured_over_projected"] > 0
    assert fixed["mode"] == "dflash, set acceptance" and fixed["lossless"] is None and fixed["synthetic"]
    assert fixed["measured_accept_len"] > 1 and fixed["tokens_per_s"] > 0
    assert (host["cycles_per_sync"], chained["cycles_per_sync"]) == (1, 8)
    assert chained["equals_host_driven"] and chained["steps"]["verify"]["n"] == host["steps"]["verify"]["n"]


def test_set_acceptance_keeps_the_drafts_that_equal_the_reference():
    import torch

    from benchmarks.speculative import accept_as_reference
    from tilert.ops.sampling import dflash_accept

    truth = [int(t) for t in torch.randint(0, 1000, (40,))]
    n, start = 3, 10  # the block's anchor at position 10: truth[8] is its token, drafts follow truth[9:]
    block = torch.tensor([truth[start - n]] + truth[start - n + 1 : start - n + 8], dtype=torch.int32)
    target = torch.randint(1000, 2000, (8,), dtype=torch.int32)  # the target agrees with nothing
    acc = accept_as_reference(block, start, target, truth, n)
    assert acc[0] == 7 and acc[1:8].tolist() == block[1:].tolist() and acc[8] == target[7]
    block[4] = 5000  # a corrupted draft: the three before it kept, then the target's own token
    acc = accept_as_reference(block, start, target, truth, n)
    assert acc[0] == 3 and acc[1:4].tolist() == block[1:4].tolist() and acc[4] == target[3]
    assert (acc[5:] == -1).all()
    # where the target agrees with the drafts, the acceptance is dflash_accept's own
    agree = torch.cat([block[1:], target[-1:]])
    assert torch.equal(accept_as_reference(block, start, agree, truth, n), dflash_accept(block, agree))
