"""A generation's timing (tilert/engine/timing.py): step times per kind, the decode loop's measured
tokens/s, the projection from the step times, and the share of the loop the host adds."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from tilert.engine import ReferenceBackend, generate
from tilert.engine.timing import StepClock
from tilert.models.config import load_config
from tilert.models.weights import synthetic_weights


def _sleep(s: float):
    def step(*_a, **_k):
        time.sleep(s)
        return {}

    return step


def test_projection_and_host_share_from_known_step_times():
    # 6 DFlash cycles: draft 10 ms + verify 20 ms, then 15 ms of host work; 3 tokens per cycle
    clock = StepClock()
    clock.run("prefill", _sleep(0.005))
    for _ in range(6):
        clock.run("draft", _sleep(0.010))
        clock.run("verify", _sleep(0.020))
        time.sleep(0.015)
    clock.finish()
    t = clock.summary(mean_acceptance_length=3.0, new_tokens=1 + 6 * 3)
    assert t["steps"]["verify"]["n"] == 6 and t["steps"]["draft"]["n"] == 6 and t["steps"]["prefill"]["n"] == 1
    assert t["steps"]["verify"]["mean_ms"] == pytest.approx(20, rel=0.5)
    assert t["projected_tokens_per_s"] == pytest.approx(3 / 0.030, rel=0.25)  # 100/s
    assert t["tokens_per_s"] == pytest.approx(18 / (6 * 0.045), rel=0.25)  # 66.7/s
    assert t["host_share"] == pytest.approx(1 / 3, abs=0.12)
    assert t["measured_over_projected"] == pytest.approx(t["tokens_per_s"] / t["projected_tokens_per_s"], rel=1e-3)


def test_plain_decoding_projects_one_token_per_step():
    clock = StepClock()
    clock.run("prefill", _sleep(0.001))
    for _ in range(5):
        clock.run("decode", _sleep(0.010))
    clock.finish()
    t = clock.summary(mean_acceptance_length=0.0, new_tokens=6)
    assert t["projected_tokens_per_s"] == pytest.approx(100, rel=0.3)
    assert 0 <= t["host_share"] < 0.3 and t["device_timed"] is False


def test_a_prefill_alone_gives_no_rates():
    clock = StepClock()
    clock.run("prefill", _sleep(0.001))
    clock.finish()
    t = clock.summary(mean_acceptance_length=0.0, new_tokens=1)
    assert "tokens_per_s" not in t and t["steps"]["prefill"]["n"] == 1


def test_generate_times_every_step_it_runs():
    cfg = load_config("tiny")
    be = ReferenceBackend(cfg, synthetic_weights(cfg, seed=int(torch.randint(0, 1000, ()))), max_seq=64)
    res = generate(be, [1, 2, 3], 12, speculative="dflash")
    t = res.timing
    assert t is not None and t["steps"]["prefill"]["n"] == 1
    assert t["steps"]["verify"]["n"] == res.steps == t["steps"]["draft"]["n"]
    assert t["tokens_per_s"] > 0 and 0 <= t["host_share"] <= 1
    assert res.stats()["timing"] == t
    plain = generate(be, [1, 2, 3], 5)
    assert plain.timing["steps"]["decode"]["n"] == plain.steps == 4 and "verify" not in plain.timing["steps"]


def test_cli_stats_report_the_loop_rates():
    out = subprocess.run([sys.executable, "-m", "tilert", "generate", "--model", "tiny", "--prompt-ids", "1,2,3",
                          "--max-new-tokens", "8", "--speculative", "dflash", "--stats"],
                         capture_output=True, text=True, timeout=300, check=True)  # fmt: skip
    stats = json.loads(out.stderr.strip().splitlines()[-1])
    t = stats["timing"]
    assert {"tokens_per_s", "projected_tokens_per_s", "measured_over_projected", "host_share"} <= set(t)
    assert t["steps"]["verify"]["n"] == stats["steps"]
