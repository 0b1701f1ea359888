"""`compile --kernels` builds the plan's TileLang kernels for sm_90a into OUT/kernels (no GPU)."""

from __future__ import annotations

import json

import pytest

from tilert.cli import main
from tilert.kernels.common import toolchain_reason


@pytest.mark.skipif(toolchain_reason() is not None, reason=str(toolchain_reason()))
def test_compile_kernels_into_plan_dir(tmp_path, capsys):
    out = tmp_path / "plan"
    assert main(["compile", "--model", "tiny", "--gpus", "2", "--out", str(out), "--kernels", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["kernels_built"] >= 1 and summary["unfused_dequant_ops"] == 0
    assert any((out / "kernels").rglob("*.so")) or any((out / "kernels").rglob("*.cubin"))
