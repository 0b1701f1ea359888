"""Checkpoints: lazy tensor-by-tensor loading, `tilert quantize` shards + manifest, validation."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.checkpoint.published import in_thread, write_shards
from tilert.checkpoint import CheckpointError, CheckpointReader, LazyWeights, open_checkpoint, quantize_checkpoint
from tilert.checkpoint.manifest import MANIFEST_NAME, bf16_config, rank_needs
from tilert.checkpoint.quantize import quantize_need
from tilert.cli import main
from tilert.engine import ReferenceBackend, generate
from tilert.engine.api import Engine
from tilert.models.config import load_config
from tilert.models.weights import dequantize_weight, from_file, save_safetensors, synthetic_weights

PROMPT = [5, 17, 3, 99]
V = "model.layers.2.self_attn.v_proj.weight"




def write_hf(weights: dict, d, shards: int = 2) -> None:
    """An HF-style checkpoint: `shards` files + model.safetensors.index.json (no config.json)."""
    write_shards(d, weights, shards)


@pytest.fixture(scope="module")
def cfg():
    return load_config("tiny")


@pytest.fixture(scope="module")
def bf16_ckpt(cfg, tmp_path_factory):
    """A bf16 HF checkpoint of the tiny model (every linear stored as bf16 `X.weight`)."""
    d = tmp_path_factory.mktemp("bf16")
    write_hf(synthetic_weights(bf16_config(cfg), 5), d)
    (d / "config.json").write_text(json.dumps(cfg.to_dict()))
    return d


@pytest.fixture(scope="module")
def quantized(cfg, bf16_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("q1")
    quantize_checkpoint(bf16_ckpt, out, 1)
    return out


def test_reader_reads_only_requested_tensors(cfg, tmp_path):
    w = synthetic_weights(cfg, 1)
    write_hf(w, tmp_path, shards=3)
    r = CheckpointReader(tmp_path)
    assert sorted(r.keys()) == sorted(w) and r.reads == []
    name = "model.layers.1.mlp.experts.3.down_proj.weight_blocks"
    assert r.info(name) == (tuple(w[name].shape), torch.uint8) and r.reads == []
    assert torch.equal(LazyWeights(r)[name], w[name]) and r.reads == [name]


def test_engine_binds_lazily_from_hf_checkpoint(cfg, tmp_path):
    w = synthetic_weights(cfg, 1)
    write_hf(w, tmp_path)
    want = in_thread(lambda: generate(ReferenceBackend(cfg, w, max_seq=64), PROMPT, 6).tokens)
    with Engine(cfg, tmp_path, max_seq=64) as eng:
        assert eng.generate(PROMPT, 6).tokens == want
    eng = Engine(cfg, tmp_path, max_seq=64, background=False)
    assert eng.weights.reader.reads == []  # opening validates headers only
    in_thread(lambda: eng.generate(PROMPT, 2))
    reads = eng.weights.reader.reads
    assert len(reads) == len(set(reads)) and reads  # each tensor read once
    assert not any(n.startswith("dflash.") for n in reads)  # the drafter is never read for greedy


def test_quantize_world1_round_trip(cfg, bf16_ckpt, quantized):
    m = json.loads((quantized / MANIFEST_NAME).read_text())
    assert m["world"] == 1 and m["model"] == "tiny" and len(m["ranks"][0]["files"]) == 1
    t = m["ranks"][0]["tensors"]
    assert t["model.layers.1.mlp.experts.0.gate_proj.weight_blocks"]["dtype"] == "uint8"
    assert t["model.layers.0.self_attn.q_proj.weight"]["dtype"] == "float8_e4m3fn"
    assert t["lm_head.weight"]["dtype"] == "bfloat16"
    # the quantised values stay close to the bf16 originals
    src = CheckpointReader(bf16_ckpt)
    q = {k: from_file(k, v) for k, v in load_file(str(quantized / m["ranks"][0]["files"][0])).items()}
    for p in ("model.layers.1.mlp.experts.2.up_proj", "model.layers.3.self_attn.o_proj"):
        x, y = src.read(p + ".weight").float(), dequantize_weight(q, p)
        assert (x - y).norm() / x.norm() < 0.15
    # the Engine on the shards == the reference backend on the same quantised dict
    ref = {}
    for need in rank_needs(cfg, 1)[0].values():
        ref.update(quantize_need(LazyWeights(src), need))

    def both():
        want = generate(ReferenceBackend(cfg, ref, max_seq=64), PROMPT, 8, speculative="dflash").tokens
        with Engine(None, quantized, max_seq=64) as eng:
            return want, eng.generate(PROMPT, 8, speculative="dflash").tokens

    want, got = in_thread(both)
    assert got == want


def test_quantize_two_ranks(cfg, bf16_ckpt, quantized, tmp_path):
    if not hasattr(pytest.importorskip("tilert.passes"), "shard_for_ranks"):
        pytest.skip("needs the shard pass (tilert.passes.shard_for_ranks)")
    quantize_checkpoint(bf16_ckpt, tmp_path, 2, cfg)
    m = json.loads((tmp_path / MANIFEST_NAME).read_text())
    E = cfg.n_routed_experts
    r0, r1 = (set(r["tensors"]) for r in m["ranks"])
    assert "model.layers.1.mlp.experts.0.down_proj.weight_blocks" in r0 - r1
    assert f"model.layers.1.mlp.experts.{E - 1}.down_proj.weight_blocks" in r1 - r0
    assert "model.norm.weight" in r0 & r1  # replicated
    lm = [r["tensors"]["lm_head.weight"] for r in m["ranks"]]
    assert lm[0]["slice"][0] == 0 and lm[0]["shape"][0] < cfg.vocab_size  # vocabulary-parallel

    def logits(d):  # one prefill step on the shards (each rank quantised on its own grid)
        eng = Engine(None, d, max_seq=64, background=False)
        ids = torch.tensor(PROMPT, dtype=torch.int32)
        return eng.world, eng.backend.target_step(ids, torch.arange(len(PROMPT), dtype=torch.int32))["logits"]

    (w1, one), (w2, two) = in_thread(lambda: (logits(quantized), logits(tmp_path)))
    assert (w1, w2) == (1, 2) and one.shape == two.shape
    assert (one - two).norm() / one.norm() < 0.05  # same model up to per-slice quantisation noise


def _rewrite(path, fn):
    t = load_file(str(path))
    fn(t)
    save_file(t, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda t: t[V].view(torch.uint8).__setitem__((0, 0), 3), f"{V} \\(rank 0\\): checksum mismatch"),
        (lambda t: t.pop("model.norm.weight"), "missing tensor model.norm.weight"),
        (
            lambda t: t.__setitem__("model.norm.weight", torch.ones(3, dtype=torch.bfloat16)),
            "model.norm.weight: manifest",
        ),
        (lambda t: t["model.norm.weight"].__setitem__(0, float("nan")), "model.norm.weight \\(rank 0\\): contains NaN"),
        (lambda t: t.__setitem__("extra.bias", torch.ones(3)), "unexpected tensor extra.bias"),
    ],
)
def test_corrupted_shard_is_named(quantized, tmp_path, edit, match):
    import shutil

    d = tmp_path / "q"
    shutil.copytree(quantized, d)
    _rewrite(d / json.loads((d / MANIFEST_NAME).read_text())["ranks"][0]["files"][0], edit)
    with pytest.raises(CheckpointError, match=match):
        open_checkpoint(d)


def test_bad_inputs_are_named(cfg, tmp_path):
    w = synthetic_weights(bf16_config(cfg), 5)
    bad = dict(w)
    bad.pop("model.layers.2.mlp.experts.1.up_proj.weight")
    bad["model.layers.0.input_layernorm.weight"] = torch.ones(7, dtype=torch.bfloat16)
    bad["junk"] = torch.ones(2)
    write_hf(bad, tmp_path / "in", shards=1)
    with pytest.raises(CheckpointError) as e:
        quantize_checkpoint(tmp_path / "in", tmp_path / "out", 1, cfg)
    msg = str(e.value)
    assert "missing tensor model.layers.2.mlp.experts.1.up_proj.weight" in msg
    assert "model.layers.0.input_layernorm.weight: expected shape [64], got [7]" in msg
    assert "unexpected tensor junk" in msg
    nan = dict(w)
    nan["model.layers.3.self_attn.q_proj.weight"] = torch.full_like(
        nan["model.layers.3.self_attn.q_proj.weight"], float("inf")
    )
    write_hf(nan, tmp_path / "nan", shards=1)
    with pytest.raises(CheckpointError, match="model.layers.3.self_attn.q_proj.*NaN/Inf"):
        quantize_checkpoint(tmp_path / "nan", tmp_path / "out2", 1, cfg)
    with pytest.raises(CheckpointError, match="missing tensor model.layers.2.mlp.experts.1.up_proj.weight"):
        open_checkpoint(tmp_path / "in", cfg)  # every loader makes the same checks


def test_quantize_cli(cfg, bf16_ckpt, tmp_path, capsys):
    assert main(["quantize", "--in", str(bf16_ckpt), "--out", str(tmp_path / "o"), "--gpus", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "tiny" and out["world"] == 1 and out["tensors_per_rank"][0] > 100
    assert main(["quantize", "--in", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err


def test_tokenizer_text_round_trip(cfg, bf16_ckpt, tmp_path):
    tokenizers = pytest.importorskip("tokenizers", reason="the tokenizers library is not installed")
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    tok = tokenizers.Tokenizer(WordLevel({f"w{i}": i for i in range(cfg.vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.save(str(bf16_ckpt / "tokenizer.json"))
    try:
        quantize_checkpoint(bf16_ckpt, tmp_path, 1)
    finally:
        (bf16_ckpt / "tokenizer.json").unlink()
    assert (tmp_path / "tokenizer.json").is_file()

    def run():
        with Engine(None, tmp_path, max_seq=64) as eng:
            r = eng.generate("w5 w17 w3 w99", 5)
            ids = eng.generate(PROMPT, 5)
            chunks = "".join(c.text for c in eng.stream("w5 w17 w3 w99", 5))
            return r, ids, chunks

    r, ids, chunks = in_thread(run)
    assert r.tokens == ids.tokens and r.text == " ".join(f"w{t}" for t in r.tokens)
    assert chunks.split() == r.text.split()


def test_files_keep_the_published_mxfp4_order(tmp_path, monkeypatch):
    # TILERT_MXFP4_ORDER=decode permutes MXFP4 blocks in memory only: the file written is the one
    # written under the published order, byte for byte, and reading it gives the decode-order blocks
    cfg = load_config("tiny")
    seed = int(torch.randint(0, 2**31, ()))
    monkeypatch.setenv("TILERT_MXFP4_ORDER", "published")
    pub = synthetic_weights(cfg, seed, include_drafter=False)
    save_safetensors(pub, tmp_path / "pub.safetensors")
    monkeypatch.setenv("TILERT_MXFP4_ORDER", "decode")
    dec = synthetic_weights(cfg, seed, include_drafter=False)
    names = [k for k in pub if k.endswith(".weight_blocks")]
    assert names and all(not torch.equal(pub[k], dec[k]) for k in names[:3])
    save_safetensors(dec, tmp_path / "dec.safetensors")
    assert (tmp_path / "pub.safetensors").read_bytes() == (tmp_path / "dec.safetensors").read_bytes()
    read = LazyWeights(CheckpointReader(tmp_path / "pub.safetensors"))
    assert all(torch.equal(read[k], dec[k]) for k in names)
