"""Published-style MiMo-V2 checkpoints load as they are (issue 21 items 1-3).

Hub config.json (routed_scaling_factor: null, fields tilert does not use, no tilert quantization
block), bf16 HF safetensors with a bf16 router weight and sink bias, MTP tensors beside them:
through Engine(None, dir), `generate --weights` and `serve --weights`, quantised on load or in bf16.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.checkpoint.published import (
    FLASH,
    PRO,
    in_thread,
    published_config,
    published_weights,
    upcast,
    write_published,
)
from tilert.checkpoint import CheckpointError, open_checkpoint, quantize_checkpoint
from tilert.checkpoint.manifest import bf16_config, rank_needs
from tilert.checkpoint.quantize import quantize_need
from tilert.cli import main
from tilert.engine import ReferenceBackend, generate
from tilert.engine.api import Engine
from tilert.models.config import QuantConfig, load_config

PROMPT = [5, 17, 3, 99]




@pytest.fixture(scope="module", params=["flash", "pro"])
def published(request, tmp_path_factory):
    """(raw config, bf16 weights as stored, checkpoint dir) in the published layout."""
    raw = {"flash": FLASH, "pro": PRO}[request.param]
    w = published_weights(published_config(raw))
    return raw, w, write_published(tmp_path_factory.mktemp(request.param), raw, w)


def test_published_config_loads(tmp_path):
    for raw in (FLASH, PRO):
        p = tmp_path / "config.json"
        p.write_text(json.dumps(raw))
        c = load_config(p)
        assert c.routed_scaling_factor == 1.0 and c.attention_value_scale == 0.707
        assert c.layernorm_epsilon == 1e-5 and c.sliding_window_size == raw["sliding_window_size"]
        assert c.quantization == QuantConfig()  # no tilert block: tilert's default run formats
        assert c.dflash is None and c.attention(1).rope_dim == 8  # 0.334 * 24, even


def test_engine_runs_published_bf16_checkpoint_as_stored(published):
    """quantize="none": bf16 stays bf16; tokens equal the reference on the upcast tensors."""
    raw, w, d = published
    cfg = bf16_config(published_config(raw))
    want = in_thread(lambda: generate(ReferenceBackend(cfg, upcast(w), max_seq=64), PROMPT, 6).tokens)

    def run():
        with Engine(None, d, max_seq=64, quantize="none") as eng:
            return eng.cfg, eng.generate(PROMPT, 6).tokens

    got_cfg, got = in_thread(run)
    assert got_cfg.quantization == QuantConfig("bf16", "bf16", "bf16", "bf16")
    assert got_cfg.routed_scaling_factor == 1.0 and got == want


def test_engine_quantises_published_bf16_checkpoint_on_load(published, tmp_path):
    """The default (auto) quantises a bf16 checkpoint as it binds: the same model as `quantize` + load."""
    raw, w, d = published
    cfg = published_config(raw, name=d.name)
    ck = open_checkpoint(d)
    assert ck.config.quantization == QuantConfig() and ck.config.name == d.name
    assert ck.converted["model.layers.1.mlp.experts.0.up_proj"] == ("bf16", "mxfp4")
    assert ck.converted["model.layers.0.self_attn.q_proj"] == ("bf16", "fp8")
    assert ck.weights.reader.reads == []  # opening reads headers only
    quantize_checkpoint(d, tmp_path / "q", 1)

    def run():
        eng = Engine(None, d, max_seq=64, background=False)
        got = eng.generate(PROMPT, 6).tokens
        reads = eng.weights.reader.reads
        with Engine(None, tmp_path / "q", max_seq=64) as q:
            return got, reads, q.generate(PROMPT, 6).tokens

    got, reads, want = in_thread(run)
    assert got == want
    assert len(reads) == len(set(reads)) and not any(r.startswith("model.mtp.") for r in reads)
    # quantised per the config's formats, from the upcast source
    ref = {}
    for need in rank_needs(cfg, 1)[0].values():
        ref.update(quantize_need(upcast(w), need))
    assert in_thread(lambda: generate(ReferenceBackend(cfg, ref, max_seq=64), PROMPT, 6).tokens) == got


def test_bf16_router_and_sink_are_cast_everywhere(published, tmp_path, capsys):
    raw, w, d = published
    gate, sink = "model.layers.1.mlp.gate.weight", "model.layers.1.self_attn.attention_sink_bias"
    assert w[gate].dtype == w[sink].dtype == torch.bfloat16
    ck = open_checkpoint(d, quantize="none")
    for k in (gate, sink):
        assert ck.weights[k].dtype == torch.float32 and torch.equal(ck.weights[k], w[k].float())
    # quantize writes them as float32, so generate accepts quantize's own output
    m = quantize_checkpoint(d, tmp_path / "q", 1)
    t = m["ranks"][0]["tensors"]
    assert t[gate]["dtype"] == t[sink]["dtype"] == "float32"
    assert main(["generate", "--weights", str(tmp_path / "q"), "--prompt-ids", "5,17,3", "--max-new-tokens", "3"]) == 0
    assert len(capsys.readouterr().out.strip().split(",")) == 3
    # a dict of storage-form tensors with a bf16 router binds as float32 too (the binder casts)
    cfg = bf16_config(published_config(raw))
    stored = {k: v for k, v in w.items() if not k.startswith("model.mtp.")}

    def logits(weights):
        be = ReferenceBackend(cfg, weights, max_seq=64)
        return be.target_step(torch.tensor(PROMPT), torch.arange(len(PROMPT)))["logits"]

    a, b = in_thread(lambda: (logits(stored), logits(upcast(w))))
    assert torch.equal(a, b)


def test_generate_cli_takes_the_checkpoints_config(published, capsys):
    raw, w, d = published
    want = in_thread(lambda: Engine(None, d, max_seq=64, quantize="none", background=False).generate(PROMPT, 5))
    argv = ["generate", "--weights", str(d), "--prompt-ids", "5,17,3,99", "--max-new-tokens", "5", "--quantize", "none"]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == ",".join(map(str, want.tokens))
    assert main(argv[:-2]) == 0  # auto: quantised on load
    assert len(capsys.readouterr().out.strip().split(",")) == 5


def test_serve_passes_loading_options(published, monkeypatch, capsys):
    pytest.importorskip("aiohttp", reason="serving needs aiohttp")
    import tilert.serve.app as app

    raw, w, d = published
    seen = {}

    class FakeServer:  # records the engine serve built, serves nothing
        def __init__(self, engine, host, port, **kw):
            seen["cfg"], seen["tokens"] = engine.cfg, engine.generate(PROMPT, 2).tokens
            self.url = f"http://{host}:{port}"

        def start(self):
            return self

        def wait(self):
            pass

        def stop(self):
            pass

    monkeypatch.setattr(app, "Server", FakeServer)
    assert main(["serve", "--weights", str(d), "--quantize", "none", "--port", "0"]) == 0
    assert seen["cfg"].quantization.experts == "bf16" and len(seen["tokens"]) == 2
    assert main(["serve", "--weights", str(d), "--port", "0"]) == 0
    assert seen["cfg"].quantization.experts == "mxfp4"


def test_quantised_published_checkpoint_runs_as_stored(tmp_path):
    """A quantised checkpoint (quantization_config fp8, 128x128 blocks; MXFP4 experts; here an FP8
    lm_head too) runs as stored under auto: nothing is re-quantised; on-load converts to the config's
    formats (bf16 lm_head)."""
    cfg = published_config(FLASH)
    w = upcast(published_weights(cfg))
    stored = {}
    for need in rank_needs(cfg, 1)[0].values():
        fmt = "fp8" if need.name == "lm_head" else need.fmt
        stored.update(quantize_need(w, type(need)(need.name, fmt, need.slice)))
    raw = {**FLASH, "quantization_config": {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                            "weight_block_size": [128, 128]}}  # fmt: skip
    d = write_published(tmp_path / "fp8", raw, stored)
    ck = open_checkpoint(d)
    assert ck.config.quantization == QuantConfig("mxfp4", "fp8", "fp8", "fp8") and ck.converted == {}
    assert open_checkpoint(d, quantize="on-load").converted == {"lm_head": ("fp8", "bf16")}
    got = in_thread(lambda: Engine(None, d, max_seq=64, background=False).generate(PROMPT, 4).tokens)
    want = in_thread(lambda: generate(ReferenceBackend(ck.config, stored, max_seq=64), PROMPT, 4).tokens)
    assert got == want
    # FP8 experts that cannot run at these sizes are refused at load, not at the first request
    fp8_experts = {**stored}
    for need in rank_needs(cfg, 1)[0].values():
        if ".experts." in need.name:
            for k in (need.name + ".weight_blocks", need.name + ".weight_scales"):
                del fp8_experts[k]
            fp8_experts.update(quantize_need(w, type(need)(need.name, "fp8", None)))
    d2 = write_published(tmp_path / "fp8e", raw, fp8_experts)
    with pytest.raises(CheckpointError, match="FP8 experts need moe_intermediate_size"):
        open_checkpoint(d2)
    assert open_checkpoint(d2, quantize="on-load").config.quantization.experts == "mxfp4"


def test_published_fields_that_would_change_the_model_are_refused(tmp_path):
    cfg = published_config(FLASH)
    d = write_published(tmp_path / "ok", FLASH, published_weights(cfg))
    for over, field in [
        ({"n_shared_experts": 1}, "n_shared_experts"),
        ({"attention_bias": True}, "attention_bias"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
        ({"quantization_config": {"quant_method": "awq"}}, "quant_method"),
        ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 64]}}, "weight_block_size"),
        ({"sliding_window": 8}, "sliding_window"),
    ]:
        (d / "config.json").write_text(json.dumps({**FLASH, **over}))
        with pytest.raises(ValueError, match=field):
            open_checkpoint(d)


def test_mixed_formats_cannot_run_as_stored(tmp_path):
    cfg = published_config(FLASH)
    w = upcast(published_weights(cfg))
    p = "model.layers.2.self_attn.o_proj"
    w.update(quantize_need(w, rank_needs(cfg, 1)[0][p]))  # one attention linear in FP8, the rest bf16
    d = write_published(tmp_path / "mixed", FLASH, w)
    with pytest.raises(CheckpointError, match="attention linears in several formats"):
        open_checkpoint(d, quantize="none")
    ck = open_checkpoint(d)  # auto converts the mixed group to the config's format
    assert ck.config.quantization.attention == "fp8" and p not in ck.converted
    assert ck.converted["model.layers.2.self_attn.q_proj"] == ("bf16", "fp8")


def test_unknown_quantize_mode_is_refused(published):
    _, _, d = published
    with pytest.raises(CheckpointError, match="quantize must be one of auto, on-load, none, got 'fp4'"):
        Engine(None, d, quantize="fp4")


def test_quantise_on_load_per_rank(published):
    """Two simulated ranks each convert what their params need and keep their slices: same tokens."""
    if not hasattr(pytest.importorskip("tilert.passes"), "shard_for_ranks"):
        pytest.skip("needs the shard pass")
    _, _, d = published

    def run(world):
        eng = Engine(None, d, world=world, max_seq=64, background=False)
        return eng.world, eng.generate(PROMPT, 5).tokens

    (w1, one), (w2, two) = in_thread(lambda: (run(1), run(2)))
    assert (w1, w2) == (1, 2) and one == two
