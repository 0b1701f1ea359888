"""benchmarks/e2e.py's per-step reports on the CPU: the stream-rate / hand-over report of a step's
trace buffer and the cost-model check (the GPU run itself needs the GPU)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from benchmarks.e2e import cost_model_check, format_check, parse_args, stream_report
from tilert.abi import TASK_FIELDS
from tilert.gpu_specs import H200
from tilert.models.config import load_config
from tilert.profile.calibration import compile_rank, predicted_step_ms
from tilert.profile.timeline import simulate


def test_stream_report_reads_the_step_trace_buffer():
    """A step whose trace buffer [sms, tasks, (start, end, ready)] holds the model's own timeline:
    the report's hand-overs and rates are the model's."""
    rank = compile_rank(load_config("tiny"), 4, 1, H200, 64)
    sched = rank.schedule
    start, ready, end = simulate(sched.table, sched.counter_expected, TASK_FIELDS, spec=H200, stamps=True)
    step = SimpleNamespace(table=sched.table, trace=torch.from_numpy(np.stack([start, end, ready], -1)), device="cpu")
    rep = stream_report(step, rank, 4e12, None)
    assert rep["tasks"] == sched.tasks and rep["copy_share_per_sm_GBps"] == pytest.approx(4e12 / 132 / 1e9, abs=0.01)
    lin = rep["kinds"]["LINEAR_FP8"]
    assert lin["stream_GBps_per_sm"] > 0 and lin["copy_share"] == pytest.approx(
        lin["stream_GBps_per_sm"] / rep["copy_share_per_sm_GBps"], rel=0.01
    )
    # a consumer whose last producer ended while it waited is ready one hand-over later; one whose
    # inputs were there, its fixed cost after its SM picked it up
    for name, k in rep["kinds"].items():
        cost = H200.task_cost(name)
        if k["handover_tasks"]:
            assert k["handover_us_median"] == pytest.approx(cost.handover_s * 1e6, abs=1e-3), name
        if k["fixed_tasks"]:
            assert k["fixed_us_median"] == pytest.approx(cost.fixed_s * 1e6, abs=1e-3), name


def test_cost_model_check_compares_measured_with_predicted():
    cfg = load_config("tiny")
    want = predicted_step_ms(cfg, 4, 1, H200.solo(), 64, 32)
    c = cost_model_check(cfg, 4, 1, H200.solo(), 64, 32, measured_ms=2 * want, routed=1.0)
    assert c["gpu"] == "h200" and c["collectives"] == "solo"
    assert c["predicted_ms"] == pytest.approx(want, abs=1e-3) and c["measured_over_predicted"] == pytest.approx(2.0)
    assert c["predicted_at_measured_routing_ms"] <= c["predicted_ms"]  # one expert is less work than uniform's
    line = format_check("4", c)
    assert "measured / predicted 2.000" in line and "at the measured routing (1.0 local experts" in line


def test_routing_is_by_token_with_pinned_rows_as_the_extra():
    a = parse_args([])
    assert a.routing == "token" and a.pinned_blocks == [8]
    assert parse_args(["--routing", "random"]).routing == "token"  # the earlier name of the same routing
    assert parse_args(["--routing", "pinned", "--pinned-blocks"]).pinned_blocks == []


def test_measured_steps_read_both_routings_of_an_e2e_file(tmp_path):
    from tilert.profile.calibration import measured_steps

    row = {"persistent_ms": 16.0, "active_experts": {"mean": 6.5, "min": 1, "max": 14}}
    d = {"device": "NVIDIA H100 80GB HBM3", "commit": "abcdef0123", "model": "m", "world_size": 8, "rank": 0,
         "context": 4096, "routing": "token",
         "steps": {"1": dict(row, persistent_ms=6.0), "8": row, "8.pinned": dict(row, persistent_ms=9.0),
                   "drafter": {"eager_graph_ms": 3.0}}}  # fmt: skip
    p = tmp_path / "e2e.json"
    p.write_text(json.dumps(d))
    got = {(m.tokens, m.routing): (m.persistent_ms, m.routed, m.solo, m.commit) for m in measured_steps(p)}
    assert got == {(1, "token"): (6.0, 6.5, True, "abcdef0"), (8, "token"): (16.0, 6.5, True, "abcdef0"),
                   (8, "pinned"): (9.0, 6.5, True, "abcdef0")}  # fmt: skip


def test_measured_steps_read_the_first_variant_of_a_step_variants_file(tmp_path):
    from tilert.kernels import switches
    from tilert.profile.calibration import measured_steps

    def row(variant, tokens, ms, **kw):
        return {"variant": variant, "env": {}, "tokens": tokens, "ms": ms, "active_experts": {"mean": 0.9}, **kw}

    d = {"device": "NVIDIA H100 80GB HBM3", "commit": "abcdef0123", "model": "m", "world_size": 8, "context": 4096,
         "routing": "random", "rows": [row("base", 1, 4.9), row("cta", 1, 4.7), row("base", 8, 11.3)]}  # fmt: skip
    p = tmp_path / "step-variants.json"
    p.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="record no build switches"):
        measured_steps(p)
    sw = {"TILERT_WAIT_THREADS": "warp"}
    got = [(m.tokens, m.routing, m.persistent_ms, m.routed, m.solo, m.commit) for m in measured_steps(p, sw)]
    assert got == [(1, "token", 4.9, 0.9, True, "abcdef0"), (8, "token", 11.3, 0.9, True, "abcdef0")]
    assert measured_steps(p, sw)[0].switches == switches.completed(sw)
    d["rows"] = [row("base", 1, 4.9, switches={"TILERT_MOE_LOADS": "bulk"})]  # recorded: theirs, not the caller's
    p.write_text(json.dumps(d))
    assert measured_steps(p, sw)[0].switches == switches.completed({"TILERT_MOE_LOADS": "bulk"})


def test_step_variants_pack_holds_the_built_kernels_under_kernels(tmp_path):
    """`step_variants.py --precompile --pack` archives the cache entries it built in the layout the
    GPU machine unpacks (kernels/<version>/<platform>/kernels/<hash>/...), without nvcc's cubin copies."""
    import tarfile

    from benchmarks.step_variants import pack_entries

    entries = []
    for h in ("aa", "bb"):
        e = tmp_path / "cache" / "0.1.15" / "linux-x86_64" / "kernels" / h
        e.mkdir(parents=True)
        for f in ("executable.so", "params.json", "tilert-resources.json", "executable.so.cubin"):
            (e / f).write_text(h + f)
        entries.append(e)
    out = pack_entries([*entries, entries[0]], tmp_path / "p.tar.xz")
    with tarfile.open(out) as tf:
        names = sorted(tf.getnames())
        body = tf.extractfile("kernels/0.1.15/linux-x86_64/kernels/bb/params.json").read().decode()
    assert names == [f"kernels/0.1.15/linux-x86_64/kernels/{h}/{f}" for h in ("aa", "bb")
                     for f in ("executable.so", "params.json", "tilert-resources.json")]  # fmt: skip
    assert body == "bbparams.json"


def test_step_variants_put_the_shared_weights_in_each_variants_word_order():
    # a variant built under TILERT_MXFP4_ORDER=decode reads the same logical weights: its MXFP4
    # blocks are converted in place (same storage) before it runs, and back for a published one
    from benchmarks.step_variants import WeightOrder
    from tilert.numerics import mxfp4
    from tilert.ops.qtensor import QTensor

    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    blocks = torch.randint(0, 256, (2, 8, 16), dtype=torch.uint8, generator=g)
    params = {"w": QTensor("mxfp4", blocks.clone(), torch.full((2, 8, 1), 127, dtype=torch.uint8)),
              "x": torch.randn(3)}  # fmt: skip
    ptr = params["w"].data.data_ptr()
    order = WeightOrder(params, "published")
    order.use("decode")
    assert params["w"].data.data_ptr() == ptr and torch.equal(params["w"].data, mxfp4.to_order(blocks, "decode"))
    order.use("decode")
    assert torch.equal(params["w"].data, mxfp4.to_order(blocks, "decode"))
    order.use("published")
    assert torch.equal(params["w"].data, blocks)
