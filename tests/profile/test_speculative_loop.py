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
    greedy, greedy8, oracle, fixed1, fixed8, own1, own8 = res["runs"]
    # (token equality of chained and host-driven runs is test_persistent_step_gpu's, on margin-safe
    # weights: these synthetic ones have near-ties that the MoE's float32 atomics may round apart)
    assert greedy8["cycles_per_sync"] == 8 and greedy8["steps"]["decode"]["n"] > 0
    assert greedy["mode"] == "greedy" and greedy["tokens_per_s"] > 0
    assert oracle["lossless"] and oracle["synthetic"] and oracle["steps"]["verify"]["n"] > 0
    for r in (oracle, fixed1, fixed8):
        assert r["device_timed"] and 0 <= r["host_share"] <= 1 and r["measured_over_projected"] > 0
    assert fixed1["mode"] == "dflash, model drafter, set acceptance" and fixed1["steps"]["draft"]["n"] > 0
    assert (fixed1["cycles_per_sync"], fixed8["cycles_per_sync"]) == (1, 8)
    assert fixed1["measured_accept_len"] == fixed8["measured_accept_len"] > 1
    assert (own1["cycles_per_sync"], own8["cycles_per_sync"]) == (1, 8) and own8["steps"]["verify"]["n"] > 0


def test_set_acceptance_keeps_the_drafts_that_equal_the_reference():
    import torch

    from benchmarks.speculative import SetAcceptance
    from tilert.ops.sampling import dflash_accept

    truth = [int(t) for t in torch.randint(0, 1000, (40,))]
    n, start = 3, 10  # the anchor at position 10 is reference token 7; its block's rows follow truth[8:]
    positions = torch.arange(start, start + 8, dtype=torch.int32)
    sa = SetAcceptance(truth, n, 0.0, 2000)
    model = torch.randint(1000, 2000, (8,), dtype=torch.int32)  # what the model's drafter proposed
    block = sa.drafts(model, positions)
    assert block[0] == model[0] and block[1:].tolist() == truth[start - n + 1 : start - n + 8]
    target = torch.randint(1000, 2000, (8,), dtype=torch.int32)  # the target agrees with nothing
    acc = sa.accept(block, positions, target)
    assert acc[0] == 7 and acc[1:8].tolist() == block[1:].tolist() and acc[8] == target[7]
    block[4] = 5000  # a draft off the reference: the three before it kept, then the target's own token
    acc = sa.accept(block, positions, target)
    assert acc[0] == 3 and acc[1:4].tolist() == block[1:4].tolist() and acc[4] == target[3] and (acc[5:] == -1).all()
    agree = torch.cat([block[1:], target[-1:]])  # where the target agrees, dflash_accept's own answer
    assert torch.equal(sa.accept(block, positions, agree), dflash_accept(block, agree))
    # every draft corrupted: nothing kept; rows past the reference are never kept either
    assert SetAcceptance(truth, n, 1.0, 2000).accept(SetAcceptance(truth, n, 1.0, 2000).drafts(model, positions),
                                                     positions, target)[0] == 0  # fmt: skip
    late = torch.arange(60, 68, dtype=torch.int32)
    assert sa.accept(sa.drafts(model, late), late, target)[0] == 0
    # corruption at the rate the oracle asks for: the mean kept length over many blocks tracks it
    from tilert.engine import OracleDrafter

    p = OracleDrafter.corruption_for_acceptance(4.0, 8)
    long = [int(t) for t in torch.randint(0, 1000, (4000,))]
    sa = SetAcceptance(long, 1, p, 2000, seed=3)
    kept = [int(sa.accept(sa.drafts(model, q := torch.arange(s0, s0 + 8, dtype=torch.int32)), q, target)[0]) + 1
            for s0 in range(1, 3900, 8)]  # fmt: skip
    assert abs(sum(kept) / len(kept) - 4.0) < 0.4


def test_set_acceptance_steps_run_the_loop_at_the_oracles_acceptance():
    # the backend mixin on the reference backend (CPU): the model's drafter runs, its drafts are the
    # oracle's, the acceptance is the oracle's, host-driven and chained alike; where the target's
    # argmax is the greedy reference's (exact CPU numerics) the tokens are greedy's too
    from benchmarks.speculative import SetAcceptance, SetAcceptanceSteps
    from tilert.engine import OracleDrafter, ReferenceBackend, generate
    from tilert.models.config import load_config
    from tilert.models.weights import synthetic_weights

    class Backend(SetAcceptanceSteps, ReferenceBackend):
        pass

    cfg = load_config("tiny")
    be = Backend(cfg, synthetic_weights(cfg, 11), max_seq=256)
    prompt = [5, 17, 3]
    greedy = generate(be, prompt, 80)
    own = generate(be, prompt, 80, speculative="dflash")
    B = cfg.dflash.block_size
    p = OracleDrafter.corruption_for_acceptance(3.0, B)
    be.set_acceptance = SetAcceptance(greedy.tokens, len(prompt), p, cfg.vocab_size)
    one = generate(be, prompt, 80, speculative="dflash")
    four = generate(be, prompt, 80, speculative="dflash", cycles_per_sync=4)
    assert one.tokens == four.tokens == greedy.tokens and one.accepted == four.accepted
    assert 2.0 < one.mean_acceptance_length < 4.0 and one.mean_acceptance_length > own.mean_acceptance_length + 0.5
