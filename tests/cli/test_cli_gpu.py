"""The GPU commands README gives, through the CLI entry point, for prompt lengths and KV capacities a
user picks: every GPU backend prints the tokens the CPU reference prints."""

from __future__ import annotations

import random

import pytest
import torch

from tilert.cli import main

pytestmark = pytest.mark.gpu

# (backend flags, speculative): the GPU ways README shows to run `generate`
VARIANTS = [
    ("--backend persistent", False),
    ("--backend persistent", True),
    ("--backend eager", False),
    ("--backend eager --cuda-graph", False),
    ("--backend eager --cuda-graph", True),
    ("--backend eager", True),
]
MAX_SEQ = (64, 128, 256)  # the precompiled capacities (scripts/precompile_gpu.py --cli)
NEW = 16  # generate's default --max-new-tokens
BLOCK = 4  # tiny-gpu's DFlash block


def _cases(n: int, seed: int = 2026) -> list[tuple[int, int, str, bool]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        max_seq = rng.choice(MAX_SEQ)
        length = rng.randint(1, min(40, max_seq - NEW - BLOCK))
        flags, spec = VARIANTS[i % len(VARIANTS)]
        out.append((length, max_seq, flags, spec))
    return out


def assert_same_or_near_tie(weights: dict, prompt: list[int], got: list[int], ref: list[int]) -> None:
    """GPU tokens equal the CPU reference's, or first differ where the reference itself is at a near
    tie (bf16 vs float32 rounding may pick either of two logits within 1% of the row's scale): there
    the GPU must have taken the reference's second choice."""
    if got == ref:
        return
    k = next(i for i, (a, b) in enumerate(zip(got, ref)) if a != b)
    from tilert.engine import ReferenceBackend
    from tilert.models.config import load_config

    ids = prompt + ref[:k]
    be = ReferenceBackend(load_config("tiny-gpu"), weights, max_seq=len(ids) + 1)
    row = be.target_step(torch.tensor(ids, dtype=torch.int32), torch.arange(len(ids), dtype=torch.int32))["logits"][-1]
    top = row.float().topk(2)
    gap = float(top.values[0] - top.values[1])
    assert gap < 1e-2 * float(row.abs().max()) and got[k] == int(top.indices[1]), (
        f"token {k}: GPU {got[k]}, reference {ref[k]} (top-2 gap {gap:.4g}, not a near tie)"
    )


def _run(capsys, argv: list[str]) -> list[int]:
    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err
    return [int(t) for t in capsys.readouterr().out.strip().split(",")]


def _prompt(length: int, seed: int) -> str:
    rng = random.Random(seed)
    return ",".join(str(rng.randrange(1, 1024)) for _ in range(length))


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> str:
    """tiny-gpu weights whose expert selection has a clear margin, so bf16 and fp32 route alike."""
    from tilert.models.weights import save_safetensors

    f = tmp_path_factory.mktemp("w") / "tiny-gpu.safetensors"
    save_safetensors(_margin_weights(), f)
    return str(f)


@pytest.mark.parametrize(("length", "max_seq", "flags", "spec"), _cases(20))
def test_generate_on_gpu_equals_cpu_reference(capsys, weights_file, length, max_seq, flags, spec) -> None:
    prompt = _prompt(length, seed=length * 1000 + max_seq)
    common = ["generate", "--model", "tiny-gpu", "--prompt-ids", prompt, "--max-seq", str(max_seq),
              "--weights", weights_file]  # fmt: skip
    ref = _run(capsys, [*common, "--device", "cpu"])
    extra = ["--speculative", "dflash"] if spec else []
    got = _run(capsys, [*common, "--device", "cuda", *flags.split(), *extra])
    assert_same_or_near_tie(_margin_weights(), [int(t) for t in prompt.split(",")], got, ref)


def _margin_weights() -> dict:
    from tests.runtime.test_eager_gpu import margin_safe_weights
    from tilert.models.config import load_config

    return margin_safe_weights(load_config("tiny-gpu"), 5)


@pytest.mark.parametrize("argv", [
    "generate --model tiny-gpu --device cuda --backend persistent --prompt-ids 1,2,3",
    "generate --model tiny-gpu --device cuda --backend persistent --prompt-ids 1,2,3 --max-seq 256 "
    "--speculative dflash",
    "generate --model tiny-gpu --device cuda --backend eager --cuda-graph --prompt-ids 1,2,3",
])  # fmt: skip
def test_readme_commands(capsys, argv: str) -> None:
    ref = _run(capsys, ["generate", "--model", "tiny-gpu", "--device", "cpu", "--prompt-ids", "1,2,3"])
    from tilert.models.config import load_config
    from tilert.models.weights import synthetic_weights

    got = _run(capsys, argv.split())
    assert_same_or_near_tie(synthetic_weights(load_config("tiny-gpu"), 0), [1, 2, 3], got, ref)
