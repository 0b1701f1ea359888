"""One loader behind every entry point, with the same checks everywhere (issue 21 item 5).

Each test breaks a checkpoint the way the issue found it broken and expects a one-line error (exit
code 2 on the CLI) naming the problem, before anything runs.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.checkpoint.published import in_thread
from tilert.checkpoint import CheckpointError, open_checkpoint, quantize_checkpoint
from tilert.checkpoint.loader import CheckpointReader, sha256
from tilert.checkpoint.manifest import MANIFEST_NAME, bf16_config
from tilert.cli import main
from tilert.engine.api import Engine
from tilert.models.config import load_config
from tilert.models.weights import save_safetensors, synthetic_weights

PROMPT = "5,17,3,99"
GEN = ["--prompt-ids", PROMPT, "--max-new-tokens", "3"]
V = "model.layers.2.self_attn.v_proj.weight"




@pytest.fixture(scope="module")
def cfg():
    return load_config("tiny")


@pytest.fixture(scope="module")
def bf16_dir(cfg, tmp_path_factory):
    d = tmp_path_factory.mktemp("bf16")
    save_safetensors(synthetic_weights(bf16_config(cfg), 5), d / "model.safetensors")
    (d / "config.json").write_text(json.dumps(cfg.to_dict()))
    return d


@pytest.fixture(scope="module")
def quantized(bf16_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("q")
    quantize_checkpoint(bf16_dir, out, 1)
    return out


@pytest.fixture(scope="module")
def tokens(quantized):
    return in_thread(lambda: Engine(None, quantized, max_seq=64, background=False).generate([5, 17, 3, 99], 3).tokens)


def copy(src, tmp_path, name="c"):
    d = tmp_path / name
    shutil.copytree(src, d)
    return d


def run_cli(argv, capsys):
    rc = main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def one_line_error(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def manifest(d):
    return json.loads((d / MANIFEST_NAME).read_text())


def flip_data_byte(path, name):
    """Flip one byte of a tensor's data in place (the header stays valid)."""
    with open(path, "r+b") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        start = json.loads(f.read(n))[name]["data_offsets"][0]
        f.seek(8 + n + start)
        b = f.read(1)
        f.seek(8 + n + start)
        f.write(bytes([b[0] ^ 0x10]))


def test_generate_checks_checksums_like_serve(quantized, tmp_path, capsys):
    d = copy(quantized, tmp_path)
    flip_data_byte(d / manifest(d)["ranks"][0]["files"][0], V)
    rc, out, err = run_cli(["generate", "--weights", str(d), *GEN], capsys)
    assert rc == 2 and out == ""
    assert f"{V} (rank 0): checksum mismatch" in one_line_error(err)
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        Engine(None, d)


def test_generate_reads_lazily_through_the_loader(bf16_dir, monkeypatch, capsys):
    reads: list[str] = []
    orig = CheckpointReader.read

    def spy(self, name):
        reads.append(name)
        return orig(self, name)

    monkeypatch.setattr(CheckpointReader, "read", spy)
    assert main(["generate", "--weights", str(bf16_dir), *GEN]) == 0
    assert reads and len(reads) == len(set(reads))  # tensor by tensor, each once
    assert not any(r.startswith("dflash.") for r in reads)  # greedy never reads the drafter


@pytest.mark.parametrize("where", ["same", "inside", "around"])
def test_quantize_refuses_overlapping_out_before_touching_anything(bf16_dir, tmp_path, capsys, where):
    src = copy(bf16_dir, tmp_path, "in")
    if where == "around":  # --in lies inside --out
        out, src = tmp_path, src
    else:
        out = src if where == "same" else src / "sub"

    def snapshot():
        return {p.relative_to(tmp_path): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(tmp_path.rglob("*")) if p.is_file()}  # fmt: skip

    before = snapshot()
    rc, _, err = run_cli(["quantize", "--in", str(src), "--out", str(out)], capsys)
    assert rc == 2 and "overlaps --in" in one_line_error(err)
    assert snapshot() == before and not (src / "sub").exists()


def test_quantize_and_engine_refuse_wrong_dtypes(cfg, tmp_path, capsys):
    w = synthetic_weights(bf16_config(cfg), 5)
    q = "model.layers.0.self_attn.q_proj.weight"
    n = "model.layers.1.input_layernorm.weight"
    w[q] = torch.zeros(w[q].shape, dtype=torch.int32)
    w[n] = torch.ones(w[n].shape, dtype=torch.int32)
    d = tmp_path / "bad"
    d.mkdir()
    save_safetensors(w, d / "model.safetensors")
    (d / "config.json").write_text(json.dumps(cfg.to_dict()))
    rc, _, err = run_cli(["quantize", "--in", str(d), "--out", str(tmp_path / "o")], capsys)
    line = one_line_error(err)
    assert rc == 2 and f"tensor {q}: expected bfloat16" in line and "got int32" in line
    assert f"tensor {n}: expected bfloat16, got int32" in line
    assert not (tmp_path / "o" / MANIFEST_NAME).exists()
    with pytest.raises(CheckpointError, match=f"{q}: expected bfloat16"):
        Engine(None, d)


def test_manifest_dtypes_are_checked_against_the_config(quantized, tmp_path, capsys):
    """File and manifest agree (checksum too), but the config says bf16: refused at load, not per request."""
    d = copy(quantized, tmp_path)
    m = manifest(d)
    f = d / m["ranks"][0]["files"][0]
    t = load_file(str(f))
    n = "model.norm.weight"
    t[n] = t[n].float()
    save_file(t, str(f), metadata={"format": "pt"})
    m["ranks"][0]["tensors"][n].update(dtype="float32", sha256=sha256(t[n]))
    (d / MANIFEST_NAME).write_text(json.dumps(m))
    with pytest.raises(CheckpointError, match=f"tensor {n}: expected bfloat16, got float32"):
        Engine(None, d)
    rc, _, err = run_cli(["generate", "--weights", str(d), *GEN], capsys)
    assert rc == 2 and "expected bfloat16, got float32" in one_line_error(err)


def _set(path, value):
    def edit(m):
        *keys, last = path
        for k in keys:
            m = m[k]
        if value is KeyError:
            del m[last]
        else:
            m[last] = value

    return edit


T0 = ("ranks", 0, "tensors", V)


@pytest.mark.parametrize(
    "edit, needle",
    [
        ("{not json", "cannot read manifest"),
        (_set(("ranks",), KeyError), "field 'ranks' is missing"),
        (_set(("world",), "1"), "field 'world' must be an integer"),
        (_set(("version",), 2), "version 2 is not supported"),
        (_set(("format",), "other"), "field 'format'"),
        (_set(("ranks", 0, "tensors"), []), "ranks[0].tensors' must be an object"),
        (_set((*T0, "sha256"), KeyError), "sha256' is missing"),
        (_set((*T0, "shape"), ["a", 2]), "shape' must be a list of sizes"),
        (_set((*T0, "file"), "../elsewhere.safetensors"), "file' must be one of the rank's files"),
        (_set(("ranks", 0, "files"), ["../x.safetensors"]), "files' must be a list of file names"),
        (_set(("world",), 2), "must list world=2 ranks"),
        (_set(("config",), []), "field 'config' must be an object"),
        (_set(("config", "hidden_size"), "big"), "hidden_size"),
        (lambda m: m.clear(), "field 'format'"),
        ("[]", "must be a JSON object"),
    ],
)
def test_malformed_manifest_is_one_line_exit_2(quantized, tmp_path, capsys, edit, needle):
    d = copy(quantized, tmp_path)
    if isinstance(edit, str):
        (d / MANIFEST_NAME).write_text(edit)
    else:
        m = manifest(d)
        edit(m)
        (d / MANIFEST_NAME).write_text(json.dumps(m))
    rc, _, err = run_cli(["generate", "--weights", str(d), *GEN], capsys)
    assert rc == 2 and needle in one_line_error(err)


def test_deleted_manifest_is_refused_unless_opted_out(quantized, tokens, tmp_path, capsys):
    d = copy(quantized, tmp_path)
    (d / MANIFEST_NAME).unlink()
    rc, _, err = run_cli(["generate", "--weights", str(d), *GEN], capsys)
    line = one_line_error(err)
    assert rc == 2 and f"{d / MANIFEST_NAME} is missing" in line and "--no-verify-checksums" in line
    with pytest.raises(CheckpointError, match="tilert-manifest.json is missing"):
        Engine(None, d)
    rc, out, _ = run_cli(["generate", "--weights", str(d), *GEN, "--no-verify-checksums"], capsys)
    assert rc == 0 and out.strip() == ",".join(map(str, tokens))
    # structure is still checked without the manifest
    f = next(d.glob("rank000-*.safetensors"))
    t = load_file(str(f))
    t.pop("model.norm.weight")
    save_file(t, str(f))
    with pytest.raises(CheckpointError, match="missing tensor model.norm.weight"):
        open_checkpoint(d, verify_checksums=False)


def test_deleted_manifest_of_two_ranks_loads_when_opted_out(bf16_dir, tmp_path):
    if not hasattr(pytest.importorskip("tilert.passes"), "shard_for_ranks"):
        pytest.skip("needs the shard pass")
    quantize_checkpoint(bf16_dir, tmp_path / "q2", 2)
    want = in_thread(lambda: Engine(None, tmp_path / "q2", max_seq=64, background=False).generate([5, 17], 3).tokens)
    (tmp_path / "q2" / MANIFEST_NAME).unlink()
    eng = Engine(None, tmp_path / "q2", max_seq=64, background=False, verify_checksums=False)
    assert eng.world == 2 and in_thread(lambda: eng.generate([5, 17], 3).tokens) == want


def test_tokenizer_larger_than_the_vocabulary_is_refused(cfg, bf16_dir, tmp_path):
    tokenizers = pytest.importorskip("tokenizers", reason="the tokenizers library is not installed")
    from tokenizers.models import WordLevel

    from tilert.tokenizer import TokenizerError

    d = copy(bf16_dir, tmp_path)
    for n, ok in ((cfg.vocab_size + 40, False), (cfg.vocab_size - 10, True)):
        tok = tokenizers.Tokenizer(WordLevel({f"w{i}": i for i in range(n)}, unk_token="w0"))
        tok.save(str(d / "tokenizer.json"))
        if ok:
            assert Engine(None, d, background=False).tokenizer.id_range == n
            continue
        with pytest.raises(TokenizerError, match=f"token ids up to {n - 1}.*vocab_size is {cfg.vocab_size}"):
            Engine(None, d)
        with pytest.raises(TokenizerError, match="vocab_size"):
            quantize_checkpoint(d, tmp_path / "o", 1)
        assert not (tmp_path / "o" / MANIFEST_NAME).exists()


def test_quantize_reads_and_dequantises_each_tensor_once(bf16_dir, tmp_path, monkeypatch):
    if not hasattr(pytest.importorskip("tilert.passes"), "shard_for_ranks"):
        pytest.skip("needs the shard pass")
    import tilert.checkpoint.convert as convert

    reads: list[str] = []
    deq: list[str] = []
    orig_read, orig_deq = CheckpointReader.read, convert.dequantize_weight
    monkeypatch.setattr(CheckpointReader, "read", lambda self, n: reads.append(n) or orig_read(self, n))
    monkeypatch.setattr(convert, "dequantize_weight", lambda w, p: deq.append(p) or orig_deq(w, p))
    m = quantize_checkpoint(bf16_dir, tmp_path / "q2", 2, max_file_bytes=64 << 10)
    assert len(reads) == len(set(reads)) == len(CheckpointReader(bf16_dir).keys())
    assert len(deq) == len(set(deq)) > 0
    assert all(len(r["files"]) > 1 for r in m["ranks"])  # split by --max-file-gb, written by offset
    eng = Engine(None, tmp_path / "q2", max_seq=64, background=False)
    assert eng.world == 2 and len(in_thread(lambda: eng.generate([5, 17], 3).tokens)) == 3


def test_sharded_input_to_quantize_is_refused(quantized, tmp_path, capsys):
    rc, _, err = run_cli(["quantize", "--in", str(quantized), "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "already a tilert sharded checkpoint" in one_line_error(err)
