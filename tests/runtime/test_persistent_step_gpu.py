"""The whole step as one persistent launch (runtime/persistent/step.py) on the GPU.

tiny-gpu is the smallest config every persistent body covers (hidden 256, 16 experts, head dim
64). Its outputs are compared with the reference executor (CPU, float32) over a prompt step, a
DFlash verify step and decode steps, with the expert choice pinned as in test_eager_gpu.py; the
verify step's acceptance (computed inside the launch) must equal the reference's; DFlash on the
persistent backend must equal greedy; a table that waits on a counter nothing signals must
raise instead of hanging.
"""

from __future__ import annotations

import pytest
import torch

from tests.runtime.test_eager_gpu import check_accept, check_prompt_verify_decode, check_rows
from tilert.engine import ReferenceBackend, generate
from tilert.models.config import load_config
from tilert.models.weights import margin_safe_weights

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("wait", ["cta", "warp"])
def test_persistent_steps_match_reference(monkeypatch, wait: str) -> None:
    # "cta" (default): every thread of a task polls one counter of its waits; "warp": warp 0 polls
    # them (TILERT_WAIT_THREADS)
    from tilert.engine.persistent import PersistentBackend
    from tilert.kernels import switches

    monkeypatch.setenv(switches.WAIT_ENV, wait)
    cfg = load_config("tiny-gpu")
    w = margin_safe_weights(cfg, int(torch.randint(0, 1000, ())))
    ref, gpu = ReferenceBackend(cfg, w, max_seq=256), PersistentBackend(cfg, w, max_seq=256)
    check_prompt_verify_decode(ref, gpu, cfg)


def test_persistent_dflash_equals_greedy() -> None:
    from tilert.engine.persistent import PersistentBackend

    cfg = load_config("tiny-gpu")
    be = PersistentBackend(cfg, margin_safe_weights(cfg, 5), max_seq=256)
    greedy = generate(be, [1, 2, 3, 4], 20)
    be.reset()
    spec = generate(be, [1, 2, 3, 4], 20, speculative="dflash")
    assert spec.tokens == greedy.tokens


def test_persistent_chained_dflash_cycles_equal_greedy() -> None:
    """DFlash cycles chained on the device (draft_async / verify_async, engine/cycles.py): the
    persistent drafter and verify programs launched back to back, one host synchronisation per
    chain, the tokens of the host-driven loop and of greedy decoding."""
    from tilert.engine.persistent import PersistentBackend

    cfg = load_config("tiny-gpu")
    be = PersistentBackend(cfg, margin_safe_weights(cfg, 6), max_seq=256, drafter_runtime="persistent")
    greedy = generate(be, [1, 2, 3, 4], 30)
    host = generate(be, [1, 2, 3, 4], 30, speculative="dflash")
    chained = generate(be, [1, 2, 3, 4], 30, speculative="dflash", cycles_per_sync=4)
    assert chained.tokens == host.tokens == greedy.tokens
    assert generate(be, [1, 2, 3, 4], 30, cycles_per_sync=5).tokens == greedy.tokens  # chained decode steps
    assert chained.accepted == host.accepted
    assert chained.timing["steps"]["verify"]["n"] == len(chained.accepted)
    assert all(k in ("persistent", "drafter") for k, _ in be._prepared.values()), be._prepared.keys()


@pytest.mark.parametrize("wait", ["warp", "cta"])
def test_persistent_deadlock_is_reported(monkeypatch, wait: str) -> None:
    from tilert.abi import FIELD
    from tilert.engine.persistent import compile_step
    from tilert.kernels import switches

    monkeypatch.setenv(switches.WAIT_ENV, wait)
    from tilert.models.binding import bind_params
    from tilert.models.builder import build_step_graph
    from tilert.runtime.persistent.step import PersistentStep

    cfg = load_config("tiny-gpu")
    rg, sched = compile_step(build_step_graph(cfg, tokens=1, mode="decode", max_seq=256), 256)
    table = sched.table.copy()
    table[0, 0, FIELD["wait0_counter"]] = 0
    table[0, 0, FIELD["wait0_count"]] = 1
    table[0, 0, FIELD["wait0_expected"]] = 10**6
    from tilert.models.weights import synthetic_weights

    params = {k: v.to("cuda") for k, v in bind_params(rg, synthetic_weights(cfg, 0), {}).items()}
    st = PersistentStep(rg, table, sched.counter_expected, params)
    with pytest.raises(RuntimeError, match="timed out") as e:
        st.run({"tokens": torch.ones(1, dtype=torch.int32), "positions": torch.zeros(1, dtype=torch.int32)})
    # the report names the task that timed out first (the blocked one, or one downstream of it), its
    # node and the counter it waited on, as the table has them
    import re

    msg = str(e.value)
    sm, slot, counter = map(int, re.search(r"sm (\d+), task slot (\d+), counter (\d+)", msg).groups())
    row = table[sm, slot]
    assert f"of node {int(row[FIELD['op']])} (" in msg and f"waited for counter {counter} to reach" in msg


def test_engine_on_persistent_backend_keeps_sequences_apart() -> None:
    import tilert

    with tilert.Engine("tiny-gpu", weights=5, max_seq=256, backend="persistent") as eng:
        a = eng.generate([1, 2, 3, 4], max_new_tokens=8).tokens
        b = eng.generate([7, 8, 9, 10, 11, 12], max_new_tokens=8, speculative="dflash").tokens
        fa, fb = eng.submit([1, 2, 3, 4], 8), eng.submit([7, 8, 9, 10, 11, 12], 8, speculative="dflash")
        assert fa.result(timeout=120).tokens == a
        assert fb.result(timeout=120).tokens == b


def test_two_ranks_on_one_gpu_match_reference() -> None:
    """World 2 with real collectives: both ranks' persistent programs run at once (66 SMs each) and
    exchange through peer buffers (all-reduces, the MoE reduce, the cross-rank argmax, all-gather)."""
    ranks_match_reference("tiny-gpu", 2, None)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_two_ranks_on_two_gpus_match_reference() -> None:
    """The same with each rank on its own GPU (a whole GPU each): the collectives write the other
    GPU's inboxes and arrival counters through NVLink peer access."""
    ranks_match_reference("tiny-gpu", 2, ["cuda:0", "cuda:1"])


def test_eight_ranks_on_one_gpu_match_unsharded() -> None:
    """tiny-gpu-8 (16 heads, 8 KV heads, 32 experts: it shards 8 ways) as 8 ranks of 16 SMs on one
    GPU: the verify step's logits and acceptance equal the unsharded model's, on the reference
    executor and on the one-rank persistent step."""
    ranks_match_reference("tiny-gpu-8", 8, None, steps=("verify",))


@pytest.mark.parametrize("world", [4, 8])
def test_ranks_on_their_own_gpus_match_unsharded(world: int) -> None:
    """Issue 8's check: every rank on its own GPU, the logits equal the unsharded one-GPU run."""
    if torch.cuda.device_count() < world:
        pytest.skip(f"needs {world} GPUs")
    ranks_match_reference("tiny-gpu-8", world, [f"cuda:{r}" for r in range(world)], steps=("verify",))


def ranks_match_reference(model: str, world: int, devices: list[str] | None,
                          steps: tuple[str, ...] = ("decode", "verify", "decode")) -> None:  # fmt: skip
    """`world` ranks of `model` (MultiRankStep: on one GPU with devices None, else rank r on
    devices[r]) against the unsharded reference executor over `steps`: a 6-token prompt, a DFlash
    verify block (its acceptance too) and a 1-token decode. steps=("verify",): one verify block at
    position 0, also run unsharded by the one-rank persistent step on cuda:0, and the ranks'
    logits, next tokens and acceptance compared with that run as well."""
    from tilert.engine.persistent import PersistentBackend, compile_ranks
    from tilert.models.binding import bind_params
    from tilert.models.builder import build_step_graph
    from tilert.runtime.persistent.step import MultiRankStep

    cfg = load_config(model)
    w = margin_safe_weights(cfg, int(torch.randint(0, 1000, ())))
    ref = ReferenceBackend(cfg, w, max_seq=256)
    one = PersistentBackend(cfg, w, max_seq=256) if steps == ("verify",) else None
    states: list[dict] = [{} for _ in range(world)]
    progs: dict = {}

    def step(tokens: torch.Tensor, pos: torch.Tensor, mode: str) -> list[dict]:
        key = (len(tokens), mode)
        if key not in progs:
            graphs, scheds = compile_ranks(build_step_graph(cfg, tokens=len(tokens), mode=mode, max_seq=256), 256,
                                           world, gpus=1 if devices is None else world)  # fmt: skip
            devs = devices or ["cuda"] * world
            params = [{k: v.to(d) for k, v in bind_params(rg, w, {}).items()} for rg, d in zip(graphs, devs)]
            progs[key] = MultiRankStep(graphs, scheds, params, states=states, devices=devices)
        return progs[key].run({"tokens": tokens, "positions": pos})

    def compare(a: dict, outs: list[dict]) -> None:
        for o in outs:
            got = o["logits"].float().cpu()
            want = a["logits"] if got.shape == a["logits"].shape else None
            if want is None:  # a rank's vocabulary slice
                r = outs.index(o)
                want = a["logits"][:, r * got.shape[1] : (r + 1) * got.shape[1]]
            check_rows(got, want)
        ids = [o["next_tokens"].cpu().long() for o in outs]
        assert all(torch.equal(ids[0], x) for x in ids)  # the cross-rank argmax is the same on every rank
        top2 = a["logits"].float().topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 1e-2 * a["logits"].abs().max()  # rows without a near-tie
        assert torch.equal(ids[0][clear], a["next_tokens"].long()[clear])

    if steps == ("verify",):
        blk = torch.randint(0, cfg.vocab_size, (cfg.dflash.block_size,), dtype=torch.int32)
        p0 = torch.arange(cfg.dflash.block_size, dtype=torch.int32)
        a, outs = ref.target_step(blk, p0, "verify"), step(blk, p0, "verify")
        compare(a, outs)
        b = one.target_step(blk, p0, "verify")
        check_rows(b["logits"].float().cpu(), a["logits"])
        compare({"logits": b["logits"].float().cpu(), "next_tokens": b["next_tokens"].cpu()}, outs)
        for o in outs:
            check_accept(blk, o, a)
            assert torch.equal(o["accept"].cpu().long(), b["accept"].cpu().long())  # both bf16 GPU runs
        return
    prompt = torch.randint(0, cfg.vocab_size, (6,), dtype=torch.int32)
    a = ref.target_step(prompt, torch.arange(6, dtype=torch.int32))
    compare(a, step(prompt, torch.arange(6, dtype=torch.int32), "decode"))
    blk = torch.randint(0, cfg.vocab_size, (cfg.dflash.block_size,), dtype=torch.int32)
    blk[1] = int(a["next_tokens"][-1])
    p2 = 6 + torch.arange(cfg.dflash.block_size, dtype=torch.int32)
    a = ref.target_step(blk, p2, "verify")
    outs = step(blk, p2, "verify")
    compare(a, outs)
    for o in outs:
        check_accept(blk, o, a)
    tok, p3 = torch.randint(0, cfg.vocab_size, (1,), dtype=torch.int32), torch.tensor([10], dtype=torch.int32)
    compare(ref.target_step(tok, p3), step(tok, p3, "decode"))
