"""CLI: inspect and generate, and one-line errors with exit code 2."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tilert.cli import main


def test_inspect_json_mimo(capsys):
    assert main(["inspect", "--model", "mimo-v2.5-pro", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["layers"] == 70 and d["sliding_window_layers"] == 60 and d["full_attention_layers"] == 10
    assert d["experts"] == 384 and d["top_k"] == 8
    assert 1.0e12 < d["params_total"] < 1.04e12 and 41e9 < d["params_active"] < 43e9
    assert d["decode_graph_ops"]["attention"] == 70


def test_inspect_text(capsys):
    assert main(["inspect", "--model", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "layer pattern" in out and "parameters:" in out


def test_generate_prints_ids(capsys):
    assert (
        main(["generate", "--model", "tiny", "--device", "cpu", "--prompt-ids", "1,2,3", "--max-new-tokens", "7"]) == 0
    )
    line = capsys.readouterr().out.strip()
    toks = [int(t) for t in line.split(",")]
    assert len(toks) == 7
    assert (
        main(
            ["generate", "--model", "tiny", "--prompt-ids", "1,2,3", "--max-new-tokens", "7", "--speculative", "dflash"]
        )
        == 0
    )
    assert capsys.readouterr().out.strip() == line


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["inspect", "--model", "nope"], "unknown model 'nope'"),
        (["generate", "--model", "tiny", "--prompt-ids", "1,a"], "comma-separated integers"),
        (["generate", "--model", "tiny", "--prompt-ids", "1,100000"], "outside the vocabulary"),
        (["generate", "--model", "tiny", "--prompt-ids", ","], "empty"),
    ],
)
def test_errors_are_one_line_exit_2(argv, msg):
    r = subprocess.run([sys.executable, "-m", "tilert", *argv], capture_output=True, text=True)
    assert r.returncode == 2
    assert msg in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_bad_config_field(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"num_hidden_layers": 2}))
    r = subprocess.run([sys.executable, "-m", "tilert", "inspect", "--config", str(p)], capture_output=True, text=True)
    assert r.returncode == 2 and "config field" in r.stderr and "Traceback" not in r.stderr


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(_has_cuda(), reason="checks the no-GPU error; the GPU backends have gpu-marked tests")
def test_generate_gpu_backends_need_a_gpu(capsys):
    for backend in ("eager", "persistent"):
        assert main(["generate", "--model", "tiny", "--prompt-ids", "1,2", "--backend", backend]) == 2
        assert "needs --device cuda" in capsys.readouterr().err
    assert main(["generate", "--model", "tiny", "--prompt-ids", "1,2", "--device", "cuda", "--backend",
                 "reference"]) == 2  # fmt: skip
    assert "runs on the CPU" in capsys.readouterr().err
