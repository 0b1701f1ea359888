"""Published-layout checkpoints on the GPU backends: a bf16 HF checkpoint quantised on load, and
`quantize`'s own output, give the CPU reference's tokens through `generate --weights` on the eager
and persistent backends (tiny-gpu's shapes, so the persistent bodies run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.checkpoint.published import published_config, published_weights, write_published
from tilert.cli import main

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]


def _tiny_gpu_published() -> dict:
    """tiny-gpu's config as a published config.json: no tilert quantization or dflash block,
    routed_scaling_factor null."""
    raw = json.loads((ROOT / "models" / "configs" / "tiny-gpu.json").read_text())
    raw.pop("quantization")
    raw.pop("dflash")
    raw["routed_scaling_factor"] = None
    return raw


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    from tilert.checkpoint.quantize import quantize_checkpoint

    raw = _tiny_gpu_published()
    cfg = published_config(raw)
    w = published_weights(cfg, seed=3)
    for k in w:  # a clear margin between experts, so bf16 and fp32 route alike
        if k.endswith("e_score_correction_bias"):
            w[k] = torch.arange(cfg.n_routed_experts, 0, -1, dtype=torch.float32) * 10.0
    root = tmp_path_factory.mktemp("ckpt")
    hf = write_published(root / "hf", raw, w)
    quantize_checkpoint(hf, root / "q", 1)
    return {"hf": str(hf), "quantized": str(root / "q")}


def _tokens(capsys, argv: list[str]) -> list[int]:
    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err
    return [int(t) for t in capsys.readouterr().out.strip().split(",")]


@pytest.mark.parametrize("which", ["hf", "quantized"])
@pytest.mark.parametrize("backend", ["eager", "persistent"])
def test_published_checkpoint_on_gpu_backend(capsys, checkpoints, which: str, backend: str) -> None:
    common = ["generate", "--weights", checkpoints[which], "--prompt-ids", "5,6,7,8,9", "--quiet"]
    ref = _tokens(capsys, [*common, "--device", "cpu"])
    assert _tokens(capsys, [*common, "--device", "cuda", "--backend", backend]) == ref
