"""Progress bars (tqdm, stderr) for quantize, compile and long loads: shown on a terminal only, never
with --quiet / TILERT_QUIET=1, so pipes, tests and CI logs stay clean."""

from __future__ import annotations

import io
import json
import sys

import pytest

from tilert import progress as P
from tilert.checkpoint.manifest import bf16_config
from tilert.cli import main
from tilert.models.config import load_config
from tilert.models.weights import save_safetensors, synthetic_weights


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def bf16_dir(tmp_path):
    cfg = load_config("tiny")
    d = tmp_path / "bf16"
    d.mkdir()
    save_safetensors(synthetic_weights(bf16_config(cfg), 5), d / "model.safetensors")
    (d / "config.json").write_text(json.dumps(cfg.to_dict()))
    return d


@pytest.fixture(autouse=True)
def not_quiet(monkeypatch):
    monkeypatch.delenv("TILERT_QUIET", raising=False)
    P.set_quiet(False)
    yield
    P.set_quiet(False)


def test_bars_only_on_a_terminal_and_not_when_quiet(monkeypatch):
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    with P.progress(total=3, desc="x") as bar:
        bar.update(3)
    assert sys.stderr.getvalue() == ""
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    with P.progress(total=3, desc="work") as bar:
        bar.update(3)
    assert "work:" in term.getvalue() and "/3" in term.getvalue()
    monkeypatch.setenv("TILERT_QUIET", "1")
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    with P.progress(total=3, desc="work") as bar:
        bar.update(3)
    assert term.getvalue() == ""


def test_quantize_bar_on_a_terminal_clean_in_a_pipe(bf16_dir, tmp_path, monkeypatch, capsys):
    assert main(["quantize", "--in", str(bf16_dir), "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and "tensor/s" not in err  # no bar when stderr is not a terminal
    assert main(["quantize", "--in", str(bf16_dir), "--out", str(tmp_path / "b"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    assert main(["quantize", "--in", str(bf16_dir), "--out", str(tmp_path / "c")]) == 0
    assert "quantize" in term.getvalue() and "tensor" in term.getvalue()


def test_compile_bar_per_pass(tmp_path, monkeypatch, capsys):
    argv = ["compile", "--model", "tiny", "--gpus", "1", "--max-seq", "64", "--out", str(tmp_path / "p")]
    assert main([*argv, "--quiet"]) == 0
    assert capsys.readouterr().err == ""
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    assert main(argv) == 0
    assert "compile decode.B1" in term.getvalue() and "pass" in term.getvalue()


def test_long_loads_show_a_bar(bf16_dir, monkeypatch):
    import tilert.models.binding as binding
    from tilert.engine.api import Engine

    monkeypatch.setattr(binding, "LOAD_BAR_BYTES", 0)
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    eng = Engine(None, bf16_dir, max_seq=64, background=False)
    eng.generate([5, 17], 1)
    assert "load weights" in term.getvalue()
