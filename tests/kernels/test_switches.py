"""Build switches (tilert/kernels/switches.py): the values in force, a with-block that sets and
restores them, a value no reader knows refused; measured files without switches read as the
historical bodies."""

from __future__ import annotations

import json
import os

import pytest

from tilert.kernels import attention, common, linear_fused, linear_tiling, moe, switches
from tilert.numerics import mxfp4
from tilert.profile.calibration import historical_switches, measured_steps


def test_current_names_every_switch_and_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in switches.SWITCHES:
        monkeypatch.delenv(k, raising=False)
    assert switches.current() == {linear_fused.BODY_ENV: "gemv", moe.BODY_ENV: "gemv", moe.TOPK_ENV: "task",
                                  switches.PIN_ENV: "none", switches.ROWS_ENV: "shared",
                                  common.PROBES_ENV: "off", linear_tiling.TILES_ENV: "rows",
                                  switches.QUIET_ENV: "experts", linear_fused.NORM_STATS_ENV: "staged",
                                  moe.LOADS_ENV: "thread", switches.WAIT_ENV: "cta", switches.EARLY_ENV: "0",
                                  attention.Q_LOAD_ENV: "async", mxfp4.ORDER_ENV: "published"}  # fmt: skip


def test_applied_sets_and_restores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(moe.BODY_ENV, "gemv")
    monkeypatch.delenv(moe.TOPK_ENV, raising=False)
    with switches.applied({moe.BODY_ENV: "mainloop", moe.TOPK_ENV: "task"}):
        assert switches.current()[moe.BODY_ENV] == "mainloop"
        assert moe.tiling(8, 6144, 2048, 48, 8).stages[1] == "MOE_TOPK"
    assert os.environ[moe.BODY_ENV] == "gemv" and moe.TOPK_ENV not in os.environ


def test_a_value_no_reader_knows_is_refused_and_undone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(moe.TOPK_ENV, raising=False)
    with pytest.raises(ValueError, match="TILERT_MOE_TOPK='gate'"):
        with switches.applied({moe.TOPK_ENV: "gate"}):
            pass
    assert moe.TOPK_ENV not in os.environ


def test_measured_steps_carry_their_switches(tmp_path) -> None:
    row = {"persistent_ms": 6.0, "active_experts": {"mean": 1.0}}
    old = {"model": "mimo-v2.5-pro", "world_size": 8, "rank": 0, "context": 4096, "steps": {"1": row}}
    new = {**old, "switches": {moe.BODY_ENV: "gemv", linear_fused.BODY_ENV: "gemv", moe.TOPK_ENV: "router"}}
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "new.json").write_text(json.dumps(new))
    hist = {linear_fused.BODY_ENV: "fused", moe.BODY_ENV: "mainloop", moe.TOPK_ENV: "task", switches.PIN_ENV: "none",
            switches.ROWS_ENV: "global", common.PROBES_ENV: "off", linear_tiling.TILES_ENV: "split",
            switches.QUIET_ENV: "none", linear_fused.NORM_STATS_ENV: "global", moe.LOADS_ENV: "thread",
            switches.WAIT_ENV: "warp", switches.EARLY_ENV: "0", attention.Q_LOAD_ENV: "copy",
            mxfp4.ORDER_ENV: "published"}  # fmt: skip
    assert measured_steps(tmp_path / "old.json")[0].switches == historical_switches() == hist
    # a record written before a switch existed: that switch at its historical value
    later = {k: v for k, v in hist.items() if k not in new["switches"]}
    assert measured_steps(tmp_path / "new.json")[0].switches == {**new["switches"], **later}
