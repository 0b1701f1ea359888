"""Steps chained on the device (engine/cycles.py): DFlash cycles and greedy decode steps give the
tokens of host-driven steps and of greedy decoding, stops and length limits inside a chain end
the sequence there, and the host synchronises once per chain."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.strategies import tiny_configs
from tilert.engine import ReferenceBackend, generate
from tilert.engine.cycles import CycleState, next_cycle
from tilert.models.config import load_config
from tilert.models.weights import synthetic_weights


class CallLog:
    """A backend that records which of its steps ran, in order (and whether the host waited)."""

    def __init__(self, backend) -> None:
        self.backend, self.calls = backend, []

    def __getattr__(self, name):
        attr = getattr(self.backend, name)
        if name in ("target_step", "draft_step", "decode_async", "verify_async", "draft_async", "finish_async"):

            def logged(*a, **kw):
                self.calls.append(name)
                return attr(*a, **kw)

            return logged
        return attr


@pytest.mark.parametrize("model", ["tiny", "tiny-flash"])
@pytest.mark.parametrize("chain", [2, 3, 8])
def test_chained_cycles_give_the_host_driven_tokens(model, chain):
    cfg = load_config(model)
    be = ReferenceBackend(cfg, synthetic_weights(cfg, 11), max_seq=128)
    prompt = [5, 17, 3, 99, 42]
    greedy = generate(be, prompt, 30)
    host = generate(be, prompt, 30, speculative="dflash")
    dev = generate(be, prompt, 30, speculative="dflash", cycles_per_sync=chain)
    assert dev.tokens == host.tokens == greedy.tokens
    assert dev.accepted == host.accepted and dev.steps == host.steps


@settings(max_examples=8)
@given(cfg=tiny_configs(), seed=st.integers(0, 100), n=st.integers(1, 6), new=st.integers(1, 14),
       chain=st.integers(2, 5))  # fmt: skip
def test_chained_cycles_are_lossless_on_random_configs(cfg, seed, n, new, chain):
    be = ReferenceBackend(cfg, synthetic_weights(cfg, seed), max_seq=64)
    prompt = [(seed * 3 + i) % cfg.vocab_size for i in range(n)]
    got = generate(be, prompt, new, speculative="dflash", cycles_per_sync=chain)
    assert got.tokens == generate(be, prompt, new).tokens
    assert len(got.tokens) == new


def test_a_stop_inside_a_chain_ends_the_sequence_there():
    cfg = load_config("tiny")
    be = ReferenceBackend(cfg, synthetic_weights(cfg, 11), max_seq=128)
    prompt = [5, 17, 3, 99, 42]
    greedy = generate(be, prompt, 30).tokens
    stop = greedy[9]
    want = greedy[: greedy.index(stop) + 1]
    got = generate(be, prompt, 30, speculative="dflash", cycles_per_sync=8, stop_token_ids=[stop])
    assert got.tokens == want


def test_a_chain_synchronises_once():
    # the prefill, the first (host-driven) draft from the prompt's context, then per step `chain`
    # cycles of draft_async + verify_async and one finish_async: no synchronous step inside
    cfg = load_config("tiny")
    log = CallLog(ReferenceBackend(cfg, synthetic_weights(cfg, 11), max_seq=128))
    generate(log, [5, 17, 3, 99, 42], 40, speculative="dflash", cycles_per_sync=4)
    assert log.calls[0] == "target_step"
    bursts = "".join({"draft_async": "d", "verify_async": "v", "finish_async": "|"}.get(c, "?") for c in log.calls[1:])
    assert "?" not in bursts and bursts.endswith("|")
    chains = bursts[:-1].split("|")
    for burst in chains:
        assert burst and burst == "dv" * (len(burst) // 2) and len(burst) // 2 <= 4, bursts
    assert len(chains[0]) // 2 == 4, bursts  # 4 cycles before the host reads their acceptance rows


def test_next_cycle_moves_the_anchor_past_the_accepted_tokens():
    state = CycleState(torch.tensor([7], dtype=torch.int32), torch.tensor([20], dtype=torch.int32), None,
                       torch.arange(4, dtype=torch.int32))  # fmt: skip
    accept = torch.tensor([2, 11, 12, 13, -1], dtype=torch.int32)  # two drafts kept, then the bonus 13
    feats, positions = torch.randn(4, 3), torch.arange(20, 24, dtype=torch.int32)
    nxt = next_cycle(state, accept, feats, positions)
    assert nxt.anchor.tolist() == [13] and nxt.pos.tolist() == [23]
    assert nxt.ctx is feats and torch.equal(nxt.ctx_pos, positions)


def test_engine_and_cli_chain_cycles_with_the_same_tokens(capsys):
    from tilert.cli import main
    from tilert.engine.api import Engine, EngineError

    prompt = [5, 17, 3, 99, 42]
    with Engine("tiny", 11, background=False) as one, Engine("tiny", 11, background=False, cycles_per_sync=4) as four:
        a = one.generate(prompt, 20, speculative="dflash")
        b = four.generate(prompt, 20, speculative="dflash")
    assert a.tokens == b.tokens and len(b.tokens) == 20
    with pytest.raises(EngineError, match="cycles_per_sync"):
        Engine("tiny", 11, background=False, cycles_per_sync=0)
    args = ["generate", "--model", "tiny", "--prompt-ids", "5,17,3", "--max-new-tokens", "12",
            "--speculative", "dflash"]  # fmt: skip
    assert main(args) == 0
    host = capsys.readouterr().out
    assert main([*args, "--cycles-per-sync", "3"]) == 0
    assert capsys.readouterr().out == host
    assert main([*args, "--cycles-per-sync", "0"]) == 2
    assert "--cycles-per-sync" in capsys.readouterr().err


@pytest.mark.parametrize("chain", [2, 5])
def test_chained_greedy_decode_steps_give_the_same_tokens(chain):
    cfg = load_config("tiny")
    be = ReferenceBackend(cfg, synthetic_weights(cfg, 3), max_seq=128)
    prompt = [5, 17, 3, 99, 42]
    want = generate(be, prompt, 23)
    got = generate(be, prompt, 23, cycles_per_sync=chain)
    assert got.tokens == want.tokens and got.steps == want.steps
    stop = want.tokens[7]
    cut = want.tokens[: want.tokens.index(stop) + 1]
    assert generate(be, prompt, 23, cycles_per_sync=chain, stop_token_ids=[stop]).tokens == cut


def test_a_decode_chain_synchronises_once():
    cfg = load_config("tiny")
    log = CallLog(ReferenceBackend(cfg, synthetic_weights(cfg, 3), max_seq=128))
    generate(log, [5, 17, 3], 10, cycles_per_sync=4)
    # the prefill gives the first token; then chains of 4, 4 and 1 decode steps, one sync each
    assert log.calls == ["target_step", *(["decode_async"] * 4 + ["finish_async"]) * 2, "decode_async",
                         "finish_async"]  # fmt: skip
