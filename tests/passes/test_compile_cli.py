"""`python -m tilert compile`: plans for tiny and the full-size MiMo models, errors as exit code 2."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tilert.abi import TASK_FIELDS
from tilert.cli import main
from tilert.plan import load_plan


def _compile(tmp_path, capsys, *args: str) -> tuple[int, dict | None, str]:  # noqa: ANN001
    rc = main(["compile", "--out", str(tmp_path / "plan"), "--json", *args])
    cap = capsys.readouterr()
    return rc, (json.loads(cap.out) if rc == 0 else None), cap.err


def test_tiny_plan_roundtrips(tmp_path, capsys) -> None:  # noqa: ANN001
    rc, s, err = _compile(tmp_path, capsys, "--model", "tiny", "--gpus", "2", "--max-seq", "128",
                          "--dump-ir", str(tmp_path / "ir"))  # fmt: skip
    assert rc == 0 and "schedule" in err
    assert s["ranks"] == 2 and s["unfused_dequant_ops"] == 0 and "fused_moe_mxfp4" in s["fused_kernels"]
    for key in ("tasks_per_rank", "predicted_step_ms", "floor_step_ms"):
        assert set(s[key]) >= {"1", "4"}
    plan = load_plan(tmp_path / "plan")
    t = plan.tasks(tmp_path / "plan", "verify.B4", 1)
    assert t.dtype == np.int32 and t.shape[2] == len(TASK_FIELDS) and t.shape[0] == 132
    assert plan.graph(tmp_path / "plan", "decode.B1", 1).meta["rank"] == 1
    assert (tmp_path / "plan" / "report.md").read_text().count("accept_len / (verify step + drafter step)") == 1
    assert (tmp_path / "ir" / "decode.B1" / "08-fuse_residual.r0.txt").exists()


def test_pro_on_eight_gpus(tmp_path, capsys) -> None:  # noqa: ANN001
    rc, s, _ = _compile(tmp_path, capsys, "--model", "mimo-v2.5-pro", "--gpus", "8")
    assert rc == 0 and s["unfused_dequant_ops"] == 0
    assert 60e9 < s["bytes_per_rank"] < 139 * 2**30
    assert s["floor_step_ms"]["1"] < s["predicted_step_ms"]["1"] < 10
    assert s["projected_tokens_per_s"] > 100


@pytest.mark.parametrize("gpus", [2, 4, 8])
def test_flash_compiles(tmp_path, capsys, gpus: int) -> None:  # noqa: ANN001
    rc, s, _ = _compile(tmp_path, capsys, "--model", "mimo-v2-flash", "--gpus", str(gpus), "--max-seq", "8192")
    assert rc == 0 and s["ranks"] == gpus


@pytest.mark.parametrize(
    "args, msg",
    [
        (["--model", "mimo-v2.5-pro", "--gpus", "1"], "does not fit|needs .* GiB per GPU"),
        (["--model", "nope"], "unknown model"),
        (["--model", "tiny", "--gpus", "3"], "num_attention_heads"),
        (["--model", "tiny", "--gpu", "a100"], "unknown GPU"),
        (["--model", "tiny", "--accept-len", "9"], "--accept-len"),
    ],
)
def test_errors_are_one_line_exit_2(tmp_path, capsys, args: list[str], msg: str) -> None:  # noqa: ANN001
    import re

    rc, _, err = _compile(tmp_path, capsys, *args)
    last = err.strip().splitlines()[-1]
    assert rc == 2 and last.startswith("error: ") and re.search(msg, last), err
    assert "Traceback" not in err


def test_batch_compiles_the_mixed_step_shapes(tmp_path, capsys) -> None:  # noqa: ANN001
    """--batch N: the mixed steps of continuous batching (a pool of N + 1 cache slots) at the chosen
    row counts; an Engine on that plan pads to those shapes."""
    rc, s, _ = _compile(tmp_path, capsys, "--model", "tiny", "--gpus", "2", "--max-seq", "64", "--batch", "3",
                        "--batch-rows", "4,1,2")  # fmt: skip
    assert rc == 0 and s["batch"]["slots"] == 3 and s["batch"]["rows"] == [1, 2, 4]
    plan = load_plan(tmp_path / "plan")
    assert {"mixed.B1", "mixed.B2", "mixed.B4"} <= set(plan.steps)
    g = plan.graph(tmp_path / "plan", "mixed.B4")
    assert g.meta["slots"] == 4 and g.values["slots"].shape == (4,)
    assert any(n.op == "attention_block" and n.a.slotted for n in g.nodes)
    from tilert.engine.api import Engine, EngineError

    with Engine("tiny", 0, plan=str(tmp_path / "plan"), max_seq=64, max_active=3) as eng:
        assert eng.batching and eng.backend.batch_rows == (1, 2, 4)
        assert eng.generate([1, 2, 3], 4).tokens == eng.generate([1, 2, 3], 4).tokens
    with pytest.raises(EngineError, match="exceeds the plan's 3 batched sequences"):
        Engine("tiny", 0, plan=str(tmp_path / "plan"), max_seq=64, max_active=4)
    assert main(["compile", "--out", str(tmp_path / "p2"), "--model", "tiny", "--batch", "2",
                 "--batch-rows", "0,3"]) == 2  # fmt: skip
