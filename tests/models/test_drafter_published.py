"""Published DFlash drafters: both layouts load, draft as the published forward computes (written
out in drafter_fixtures, not from tilert code), stay lossless, travel through quantize, generate and
serve, and a drafter that does not fit its target fails with one line naming the mismatch.

Bound: relative Frobenius error of the IR reference executor's drafter logits against the float64
published forward <= 1e-4 (both read the same bf16 weights; observed ~1e-7).
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from tests.models.drafter_fixtures import mimo_config, published_forward, reference_config, write_drafter_dir
from tilert.checkpoint.drafter import DrafterError, attach_drafter, open_drafter
from tilert.engine import ReferenceBackend, generate
from tilert.models.binding import bind_params
from tilert.models.config import load_config
from tilert.models.drafter import build_drafter_graph
from tilert.models.plain import PlainModel
from tilert.models.weights import synthetic_weights
from tilert.runtime.reference import ReferenceExecutor

REL = 1e-4
PROMPT = [5, 17, 99, 3, 42, 42, 7, 150, 64, 1, 88, 23, 9]


@pytest.fixture(scope="module")
def target():
    cfg = load_config("tiny")
    w = synthetic_weights(cfg, 3)
    return cfg, w, PlainModel(cfg, w)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def features(target, ids: tuple[int, ...], n: int) -> torch.Tensor:
    """Target hidden states after the drafter's target layers for the first n prompt tokens, bf16."""
    cfg, _, pm = target
    pm.reset()
    _, hid = pm(PROMPT[:n], 0, return_hidden=True)
    return torch.cat([hid[i] for i in ids], -1).to(torch.bfloat16)


def executor_logits(cfg, weights, feats: torch.Tensor, block: list[int]) -> torch.Tensor:
    """One drafter pass on the IR reference executor: context rows 0..C-1, block at C.."""
    C, B = feats.shape[0], len(block)
    g = build_drafter_graph(cfg, context=C, max_seq=64)
    ex = ReferenceExecutor([{}])
    bind_params(g, weights, ex.params[0])
    out = ex.run([g], {
        "block_tokens": torch.tensor(block, dtype=torch.int32),
        "block_positions": torch.arange(C, C + B, dtype=torch.int32),
        "ctx_features": feats,
        "ctx_positions": torch.arange(C, dtype=torch.int32),
    })[0]  # fmt: skip
    return out["logits"]


def compare(target, tmp: Path, raw: dict, layout: str, n: int = 11, **kw) -> tuple[float, torch.Tensor]:
    """(rel err of the executor vs the published forward, executor logits) for a fresh drafter dir."""
    cfg, w, _ = target
    tensors = write_drafter_dir(tmp, cfg, raw, layout, **kw)
    dcfg, dw = attach_drafter(cfg, w, tmp)
    d = dcfg.dflash
    feats = features(target, d.target_layer_ids, n)
    block = [PROMPT[n]] + [d.mask_token_id] * (d.block_size - 1)
    got = executor_logits(dcfg, dw, feats, block)
    head = w["lm_head.weight"]
    ref = published_forward(raw, tensors, w["model.embed_tokens.weight"], head, feats, block, n)
    return rel(got, ref), got


def test_reference_layout_drafts_as_published(target, tmp_path):
    err, _ = compare(target, tmp_path / "d", reference_config(target[0]), "reference")
    assert err < REL, err


@pytest.mark.parametrize("shards", [1, 2])
def test_mimo_layout_drafts_as_published(target, tmp_path, shards):
    err, _ = compare(target, tmp_path / "d", mimo_config(target[0]), "mimo", shards=shards)
    assert err < REL, err


@pytest.mark.parametrize(
    "over",
    [
        {"is_causal": None},  # the reference's rule: sliding layers causal
        {"is_causal": True},
        {"layer_types": ["sliding_attention", "full_attention"], "is_causal": None},  # causal sliding + full
        {"layer_types": ["full_attention", "sliding_attention"]},  # full + bidirectional sliding
        {"sliding_window": 2},  # window below the block size: rows inside the block mask each other
    ],
)
def test_layer_types_and_per_row_window(target, tmp_path, over):
    err, got = compare(target, tmp_path / "d", mimo_config(target[0], **over), "mimo")
    assert err < REL, (over, err)


def test_per_row_window_is_not_the_anchored_window(target, tmp_path):
    """The anchored window (every row's window at the block's first row, tilert's old mask) drafts
    different logits: the per-row window above is not an accident of the context length."""
    cfg, w, _ = target
    raw = mimo_config(cfg, window=3)
    tensors = write_drafter_dir(tmp_path / "d", cfg, raw, "mimo")
    d = attach_drafter(cfg, w, tmp_path / "d")[0].dflash
    feats = features(target, d.target_layer_ids, 11)
    block = [PROMPT[11]] + [d.mask_token_id] * 3
    args = (raw, tensors, w["model.embed_tokens.weight"], w["lm_head.weight"], feats, block, 11)
    assert rel(published_forward(*args, mask_mode="anchored"), published_forward(*args)) > 1e-3


@pytest.mark.parametrize(
    "change",
    ["attention_sink_bias", "attention_value_scale", "partial_rotary_factor", "rms_norm_eps", "mask_embedding"],
)
def test_each_mimo_extra_is_honoured(target, tmp_path, change):
    """Dropping one extra changes the executor's logits, and both versions match the published
    forward: each extra is represented and honoured, none is silently ignored."""
    cfg = target[0]
    base, other = mimo_config(cfg), mimo_config(cfg)
    kw = {}
    if change == "mask_embedding":
        kw = {"mask_embedding": False}
    elif change in ("partial_rotary_factor", "rms_norm_eps"):
        other[change] = {"partial_rotary_factor": 1.0, "rms_norm_eps": 1e-6}[change]
    else:
        other["dflash_config"] = dict(
            other["dflash_config"], **{change: {"attention_sink_bias": False, "attention_value_scale": 1.0}[change]}
        )
        if change == "attention_sink_bias":
            other["add_swa_attention_sink_bias"] = False
    e1, a = compare(target, tmp_path / "a", base, "mimo")
    e2, b = compare(target, tmp_path / "b", other, "mimo", **kw)
    assert e1 < REL and e2 < REL, (e1, e2)
    assert rel(a, b) > 1e-3, f"{change} changes nothing"


@pytest.mark.parametrize("layout", ["reference", "mimo"])
def test_speculative_with_a_published_drafter_is_lossless(target, tmp_path, layout):
    cfg, w, _ = target
    raw = reference_config(cfg) if layout == "reference" else mimo_config(cfg)
    write_drafter_dir(tmp_path / "d", cfg, raw, layout)
    dcfg, dw = attach_drafter(cfg, w, tmp_path / "d")
    greedy = generate(ReferenceBackend(dcfg, dw, max_seq=64), PROMPT, 20)
    spec = generate(ReferenceBackend(dcfg, dw, max_seq=64), PROMPT, 20, speculative="dflash")
    assert spec.tokens == greedy.tokens and spec.speculative == "dflash" and spec.accepted


@pytest.mark.parametrize("over", [{}, {"is_causal": None, "sliding_window": 2}])
def test_plain_drafter_agrees(target, tmp_path, over):
    """models/plain.py's drafter (written separately from the IR) drafts the published forward's
    logits, and its greedy DFlash loop accepts exactly what the engine's loop accepts."""
    from tilert.models.plain import PlainDFlashDrafter, plain_dflash_generate

    cfg, w, pm = target
    raw = mimo_config(cfg, **over)
    tensors = write_drafter_dir(tmp_path / "d", cfg, raw, "mimo")
    dcfg, dw = attach_drafter(cfg, w, tmp_path / "d")
    drafter = PlainDFlashDrafter(dcfg, dw, pm)
    n = 11
    pm.reset()
    _, hid = pm(PROMPT[:n], 0, return_hidden=True)
    drafter.reset()
    drafter.append_context(hid, 0)
    feats = torch.cat([hid[i] for i in dcfg.dflash.target_layer_ids], -1)
    ref = published_forward(raw, tensors, w["model.embed_tokens.weight"], w["lm_head.weight"], feats,
                            [PROMPT[n]] + [dcfg.dflash.mask_token_id] * 3, n)  # fmt: skip
    assert rel(drafter.draft(PROMPT[n], n), ref) < REL
    be = ReferenceBackend(dcfg, dw, max_seq=64)
    out = be.target_step(torch.tensor(PROMPT[:n], dtype=torch.int32), torch.arange(n, dtype=torch.int32))
    block = torch.tensor([PROMPT[n]] + [dcfg.dflash.mask_token_id] * 3, dtype=torch.int32)
    draft = be.draft_step(block, torch.arange(n, n + 4, dtype=torch.int32), out["features"], torch.arange(n))
    assert draft.tolist() == [PROMPT[n]] + drafter.draft_tokens(PROMPT[n], n)
    tokens, accepts = plain_dflash_generate(pm, drafter, PROMPT, 20)
    res = generate(ReferenceBackend(dcfg, dw, max_seq=64), PROMPT, 20, speculative="dflash")
    assert res.tokens == tokens and res.accepted == accepts


def test_engine_loads_a_drafter_directory(target, tmp_path):
    from tilert.engine.api import Engine

    cfg, w, _ = target
    write_drafter_dir(tmp_path / "d", cfg, mimo_config(cfg), "mimo")
    with Engine("tiny", 3, drafter=tmp_path / "d", background=False) as eng:
        assert eng.cfg.dflash.attention_sink and eng.cfg.dflash.mask_embedding
        greedy = eng.generate(PROMPT, 12)
        spec = eng.generate(PROMPT, 12, speculative="dflash")
    assert spec.tokens == greedy.tokens


def test_quantize_carries_the_drafter(target, tmp_path):
    """quantize --drafter writes the drafter next to the shards; Engine(out) finds it and drafts the
    same logits as the drafter loaded from its own directory; a 2-rank output binds it per rank."""
    from tilert.cli import main
    from tilert.engine.api import Engine
    from tilert.models.weights import save_safetensors

    cfg, w, _ = target
    src = tmp_path / "src"
    src.mkdir()
    save_safetensors({k: v for k, v in w.items() if not k.startswith("dflash.")}, src / "model.safetensors")
    raw = dict(load_config("tiny").to_dict(), dflash=None)
    (src / "config.json").write_text(json.dumps(raw))
    write_drafter_dir(tmp_path / "d", cfg, mimo_config(cfg), "mimo")
    out = tmp_path / "out"
    assert main(["quantize", "--in", str(src), "--out", str(out), "--gpus", "2", "--drafter", str(tmp_path / "d")]) == 0
    assert (out / "dflash" / "config.json").is_file() and (out / "dflash" / "mask_embedding.pt").is_file()
    moved = open_drafter(out / "dflash", cfg)
    assert moved.config == open_drafter(tmp_path / "d", cfg).config
    with Engine(None, out, background=False) as eng:
        assert eng.world == 2 and eng.cfg.dflash == moved.config
        spec = eng.generate(PROMPT, 12, speculative="dflash")
        greedy = eng.generate(PROMPT, 12)
    assert spec.tokens == greedy.tokens


def test_generate_cli_takes_a_drafter(target, tmp_path, capsys):
    from tilert.cli import main

    cfg, _, _ = target
    write_drafter_dir(tmp_path / "d", cfg, reference_config(cfg), "reference")
    ids = ",".join(map(str, PROMPT))
    base = ["generate", "--model", "tiny", "--seed", "3", "--prompt-ids", ids, "--max-new-tokens", "10"]
    assert main(base) == 0
    greedy = capsys.readouterr().out
    assert main(base + ["--speculative", "dflash", "--drafter", str(tmp_path / "d")]) == 0
    assert capsys.readouterr().out == greedy
    bad = reference_config(cfg, hidden_size=32)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps(bad))
    assert main(base + ["--drafter", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert "hidden_size 32" in err and len(err.splitlines()) == 1


def test_serve_cli_passes_the_drafter(target, tmp_path, monkeypatch):
    import tilert.serve.app as app
    from tilert.cli import main

    cfg, _, _ = target
    write_drafter_dir(tmp_path / "d", cfg, mimo_config(cfg), "mimo")
    seen = {}

    class Stub:
        url = "http://stub"

        def __init__(self, engine, host, port, **kw):
            seen["dflash"] = engine.cfg.dflash

        def start(self):
            return self

        def wait(self):
            return None

        def stop(self):
            return None

    monkeypatch.setattr(app, "Server", Stub)
    assert main(["serve", "--model", "tiny", "--seed", "3", "--drafter", str(tmp_path / "d")]) == 0
    assert seen["dflash"] == open_drafter(tmp_path / "d", cfg).config


# ---- a drafter that does not fit its target --------------------------------------------------------


def _mismatch_cases(cfg):
    r = reference_config
    return [
        (r(cfg, hidden_size=32), "hidden_size 32"),
        (r(cfg, num_target_layers=9), "num_target_layers 9"),
        (r(cfg, vocab_size=999), "vocab_size 999"),
        (dict(r(cfg), dflash_config={"target_layer_ids": [0, 7], "mask_token_id": 3}), "[7] are beyond"),
        (dict(r(cfg), dflash_config={"target_layer_ids": [0], "mask_token_id": cfg.vocab_size}), "mask_token_id"),
        (dict(r(cfg), dflash_config={"mask_token_id": 3}, num_target_layers=None), "target_layer_ids"),
        (r(cfg, hidden_act="gelu"), "hidden_act"),
        (r(cfg, output_multiplier=2.0), "output_multiplier"),
        (r(cfg, layer_types=["sliding_attention", "full_attention"]), "sliding_window"),
    ]


@pytest.mark.parametrize("case", range(9))
def test_a_drafter_that_does_not_fit_fails_with_one_line(target, tmp_path, case):
    cfg, w, _ = target
    raw, needle = _mismatch_cases(cfg)[case]
    d = tmp_path / "d"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(raw))
    with pytest.raises(DrafterError, match=None) as e:
        attach_drafter(cfg, w, d)
    msg = str(e.value)
    assert needle in msg and "\n" not in msg, msg


def test_tensor_problems_name_the_tensor(target, tmp_path):
    from safetensors.torch import load_file, save_file

    cfg, w, _ = target
    write_drafter_dir(tmp_path / "d", cfg, reference_config(cfg), "reference")
    f = tmp_path / "d" / "model.safetensors"
    t = load_file(str(f))
    t2 = {k: v for k, v in t.items() if k != "layers.1.mlp.up_proj.weight"}
    save_file(t2 | {"layers.1.extra.weight": t["fc.weight"].clone()}, str(f))
    with pytest.raises(DrafterError, match="missing tensor layers.1.mlp.up_proj.weight.*unexpected tensor layers.1.ex"):
        open_drafter(tmp_path / "d", cfg)
    t3 = dict(t, **{"fc.weight": t["fc.weight"][:, :10].contiguous()})
    save_file(t3, str(f))
    with pytest.raises(DrafterError, match="tensor fc.weight: expected"):
        open_drafter(tmp_path / "d", cfg)


def test_mask_embedding_file_forms(target, tmp_path):
    cfg, w, _ = target
    H = cfg.hidden_size
    raw = mimo_config(cfg)
    mask_id = raw["dflash_config"]["mask_token_id"]
    vec = torch.randn(H).to(torch.bfloat16)
    for i, obj in enumerate([vec, vec[None], {"mask_token_id": mask_id, "embedding": vec}]):
        write_drafter_dir(tmp_path / f"ok{i}", cfg, raw, "mimo", mask_embedding=obj)
        got = open_drafter(tmp_path / f"ok{i}", cfg).weights["dflash.mask_embedding"]
        assert torch.equal(got, vec)
    for i, (obj, needle) in enumerate([({"mask_token_id": mask_id + 1, "embedding": vec}, "mask token"),
                                       (torch.zeros(H + 1), f"{H} values")]):  # fmt: skip
        write_drafter_dir(tmp_path / f"bad{i}", cfg, raw, "mimo", mask_embedding=obj)
        with pytest.raises(DrafterError, match=needle):
            open_drafter(tmp_path / f"bad{i}", cfg)


def test_published_config_round_trips(target, tmp_path):
    from tilert.checkpoint.drafter import drafter_config, published_config

    cfg = target[0]
    for raw in (reference_config(cfg), mimo_config(cfg), mimo_config(cfg, is_causal=None)):
        d = drafter_config(copy.deepcopy(raw), cfg)
        assert drafter_config(published_config(d, cfg), cfg) == d
    d = drafter_config(mimo_config(cfg), cfg)
    assert d.layer_window(0) == 3 and not d.layer_causal(0) and d.rope_dim == 8 and d.rms_norm_eps == 1e-2
    assert replace(d, is_causal=None).layer_causal(0)


# ---- GPU runtimes (the lead's GPU machine) ---------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["eager", "persistent"])
@pytest.mark.parametrize("layout", ["reference", "mimo"])
def test_gpu_backends_draft_with_published_drafters(tmp_path, backend, layout):
    """The eager runtime (and the persistent backend, whose drafter path is the eager runtime) drafts
    the reference executor's tokens with each published drafter, and stays lossless."""
    from tilert.engine.api import Engine

    cfg = load_config("tiny-gpu")
    raw = reference_config(cfg) if layout == "reference" else mimo_config(cfg, window=5)
    raw.update(num_attention_heads=4, num_key_value_heads=1, head_dim=64, v_head_dim=64, intermediate_size=128)
    write_drafter_dir(tmp_path / "d", cfg, raw, layout)
    prompt = [5, 17, 3, 99, 42, 7, 150, 64, 1, 88, 23]
    with (
        Engine("tiny-gpu", 4, max_seq=128, drafter=tmp_path / "d") as ref,
        Engine("tiny-gpu", 4, max_seq=128, backend=backend, device="cuda", drafter=tmp_path / "d") as gpu,
    ):
        want = ref.generate(prompt, 16, speculative="dflash")
        got = gpu.generate(prompt, 16, speculative="dflash")
        assert got.tokens == want.tokens == ref.generate(prompt, 16).tokens


@pytest.mark.gpu
def test_eager_drafter_logits_match_the_executor(tmp_path):
    """The eager runtime's drafter pass (bf16 KV cache, sinks, value scale, partial RoPE, mask
    embedding, per-row window) against the reference executor: relative error <= 2e-2."""
    from tilert.runtime.eager.backend import EagerBackend

    cfg = load_config("tiny-gpu")
    raw = mimo_config(cfg, window=5)
    raw.update(num_attention_heads=4, num_key_value_heads=1, head_dim=64, v_head_dim=64, intermediate_size=128)
    write_drafter_dir(tmp_path / "d", cfg, raw, "mimo")
    w = synthetic_weights(cfg, 4)
    dcfg, dw = attach_drafter(cfg, w, tmp_path / "d")
    d = dcfg.dflash
    C = 11
    feats = (torch.randn(C, len(d.target_layer_ids) * cfg.hidden_size) * 0.5).to(torch.bfloat16)
    block = [7] + [d.mask_token_id] * (d.block_size - 1)
    want = executor_logits(dcfg, dw, feats, block)
    be = EagerBackend(dcfg, dw, max_seq=64)
    g = be._prepare(build_drafter_graph(dcfg, context=C, max_seq=64))
    got = be._execute(g, {
        "block_tokens": torch.tensor(block, dtype=torch.int32).cuda(),
        "block_positions": torch.arange(C, C + len(block), dtype=torch.int32).cuda(),
        "ctx_features": feats.cuda(),
        "ctx_positions": torch.arange(C, dtype=torch.int32).cuda(),
    })["logits"]  # fmt: skip
    assert rel(got.float().cpu(), want) < 2e-2
