"""Multi-rank eager runtime: N CPU processes (gloo) against the reference executor's simulated ranks.

Ranks run through `run_local` (spawned processes on 127.0.0.1, bounded timeouts, always reaped)
or through torchrun in a subprocess (the launch entry point). A GPU test runs one NCCL rank.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from tilert.engine import ReferenceBackend, generate
from tilert.models.config import load_config
from tilert.models.weights import synthetic_weights
from tilert.runtime.eager.distributed import MULTICAST_OFF, DistError, free_port, run_local

PROMPT = [1, 2, 3, 4, 5, 6]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _steps(be, cfg) -> list[dict[str, torch.Tensor]]:
    """Prefill, three decode steps on the model's own tokens, one verify step: outputs on the CPU."""
    outs = [be.target_step(torch.tensor(PROMPT, dtype=torch.int32), torch.arange(len(PROMPT), dtype=torch.int32))]
    for i in range(3):
        outs.append(be.target_step(outs[-1]["next_tokens"][-1:].cpu(), torch.tensor([len(PROMPT) + i])))
    B = cfg.dflash.block_size
    block = torch.tensor([int(outs[-1]["next_tokens"][-1])] + [7] * (B - 1), dtype=torch.int32)
    outs.append(be.target_step(block, len(PROMPT) + 3 + torch.arange(B, dtype=torch.int32), "verify"))
    return [{k: v.detach().float().cpu() if v.is_floating_point() else v.cpu() for k, v in o.items()} for o in outs]


# ---- jobs run on every rank (module level: spawned processes import them) ------------------------


def _model_job(ctx, model: str, seed: int) -> dict:
    from tilert.engine.eager import DistEagerBackend

    cfg = load_config(model)
    w = synthetic_weights(cfg, seed)
    exact = DistEagerBackend(cfg, w, ctx, max_seq=64, state_dtype=torch.float32)  # the reference's f32 state
    steps = _steps(exact, cfg)
    be = DistEagerBackend(cfg, w, ctx, max_seq=64)  # bf16 KV caches, as deployed
    greedy = generate(be, PROMPT[:4], 8).tokens
    spec = generate(be, PROMPT[:4], 8, speculative="dflash").tokens
    return {"steps": steps, "greedy": greedy, "dflash": spec, "collectives": ctx.collectives}


def _collectives_job(ctx) -> tuple:
    torch.manual_seed(ctx.rank)
    x = torch.randn(3, 5)
    val = torch.tensor([1.0, 2.0, float(ctx.rank), -float(ctx.rank)])  # ties in columns 0 and 1
    idx = torch.tensor([10 + ctx.rank, 5 - ctx.rank, 7 + ctx.rank, 3 * ctx.rank], dtype=torch.int32)
    return x, val, idx, ctx.all_reduce(x), ctx.all_gather(x.to(torch.bfloat16), 1), ctx.argmax_reduce(val, idx)


def _hang_job(ctx, sleep_s: float):
    if ctx.rank == 1:  # never joins the collective; fails late
        time.sleep(sleep_s)
        raise ValueError("rank 1 gave up")
    return ctx.all_reduce(torch.ones(4))


def _env_job(ctx) -> dict:
    import torch.distributed as dist

    from tilert.engine.eager import DistEagerBackend

    cfg = load_config("tiny")
    tokens = generate(DistEagerBackend(cfg, synthetic_weights(cfg, 3), ctx, max_seq=128), [1, 2, 3, 4], 12).tokens
    return {"backend": dist.get_backend(), "env": {k: os.environ.get(k) for k in MULTICAST_OFF}, "tokens": tokens}


# ---- tests ---------------------------------------------------------------------------------------


def test_collectives_match_reference_semantics():
    from tilert.ir.registry import get_op
    from tilert.runtime.reference.executor import RankContext

    out = run_local(_collectives_job, 3, timeout_s=60, collective_timeout_s=20)
    xs, vals, ids = ([o[i] for o in out] for i in range(3))
    envs = [{"a": a, "b": b} for a, b in zip(vals, ids)]
    ref_sum = get_op("all_reduce").reference(RankContext(0, 3, [{"x": x} for x in xs], ["x"]), xs[0])[0]
    ref_ids = get_op("argmax_reduce").reference(RankContext(0, 3, envs, ["a", "b"]), vals[0], ids[0])[0]
    for o in out:  # every rank holds the same values
        assert torch.allclose(o[3], ref_sum, rtol=1e-6, atol=1e-6) and o[3].dtype == torch.float32
        assert torch.equal(o[4], torch.cat([x.to(torch.bfloat16) for x in xs], 1))
        assert torch.equal(o[5], ref_ids) and o[5].dtype == torch.int32
    assert ref_ids.tolist() == [10, 3, 9, 0]


@pytest.mark.parametrize(("model", "world"), [("tiny", 2), ("tiny", 4), ("tiny-flash", 2), ("tiny-flash", 4)])
def test_ranks_match_reference_executor(model, world):
    out = run_local(_model_job, world, model, 1, timeout_s=120, collective_timeout_s=60)
    cfg = load_config(model)
    w = synthetic_weights(cfg, 1)
    ref = ReferenceBackend(cfg, w, max_seq=64, world=world)  # the same shards, simulated in lockstep
    expect = _steps(ref, cfg)
    mine = out[0]["steps"]
    for a, b in zip(expect, mine):
        # hidden state (f32) to float tolerance; logits carry the eager LM head's bf16 GEMM
        assert _rel(b["features"], a["features"]) < 1e-4
        assert _rel(b["logits"], a["logits"]) < 1e-2
        assert b["next_tokens"].tolist() == a["next_tokens"].tolist()
    assert mine[-1]["accept"].tolist() == expect[-1]["accept"].tolist()
    for o in out[1:]:  # replicated outputs agree bit for bit on every rank
        assert all(torch.equal(x["logits"], y["logits"]) for x, y in zip(o["steps"], mine))
        assert (o["greedy"], o["dflash"]) == (out[0]["greedy"], out[0]["dflash"])
    greedy = generate(ReferenceBackend(cfg, w, max_seq=64), PROMPT[:4], 8).tokens
    assert out[0]["greedy"] == greedy
    assert out[0]["dflash"] == greedy
    assert out[0]["collectives"] > 0


def test_stalled_rank_times_out_and_failures_name_ranks():
    t0 = time.monotonic()
    with pytest.raises(DistError) as e:
        run_local(_hang_job, 2, 4.0, timeout_s=30, collective_timeout_s=2)
    msg = str(e.value)
    assert "rank 0/2" in msg and "all_reduce" in msg  # the collective timed out on rank 0
    assert "rank 1/2" in msg and "rank 1 gave up" in msg
    assert time.monotonic() - t0 < 25


def _launch(cmd: list[str], timeout: float = 90) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def _torchrun(n: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}", "--master-addr=127.0.0.1",
            f"--master-port={free_port()}", "-m", "tilert", "launch"]  # fmt: skip


def test_torchrun_launch_dflash_equals_greedy():
    cfg = load_config("tiny-flash")
    greedy = generate(ReferenceBackend(cfg, synthetic_weights(cfg, 5), max_seq=64), [3, 1, 4], 8).tokens
    args = ["--model", "tiny-flash", "--device", "cpu", "--seed", "5", "--prompt-ids", "3,1,4", "--max-new-tokens", "8"]
    r = _launch(_torchrun(2) + args + ["--speculative", "dflash", "--timeout", "60"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines() == [",".join(map(str, greedy))]  # rank 0 only


def test_launch_without_torchrun_is_world_one():
    cfg = load_config("tiny")
    greedy = generate(ReferenceBackend(cfg, synthetic_weights(cfg, 0), max_seq=64), [1, 2, 3], 6).tokens
    r = _launch([sys.executable, "-m", "tilert", "launch", "--device", "cpu", "--prompt-ids", "1,2,3",
                 "--max-new-tokens", "6", "--stats"])  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ",".join(map(str, greedy))
    assert '"world": 1' in r.stderr
    bad = _launch([sys.executable, "-m", "tilert", "launch", "--device", "cpu", "--prompt-ids", "1,999"])
    assert bad.returncode == 2 and "rank 0" in bad.stderr and "999" in bad.stderr


@pytest.mark.gpu
def test_nccl_world_one_matches_eager_backend():
    from tilert.engine.eager import EagerBackend

    cfg = load_config("tiny")
    expect = generate(EagerBackend(cfg, synthetic_weights(cfg, 3), max_seq=128), [1, 2, 3, 4], 12).tokens
    (out,) = run_local(_env_job, 1, device="cuda", timeout_s=300, collective_timeout_s=120)
    assert out["backend"] == "nccl"
    assert out["env"] == MULTICAST_OFF
    assert out["tokens"] == expect
    r = _launch(_torchrun(1) + ["--device", "cuda", "--seed", "3", "--prompt-ids", "1,2,3,4", "--max-new-tokens",
                                "12", "--max-seq", "128", "--speculative", "dflash"], timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ",".join(map(str, expect))
