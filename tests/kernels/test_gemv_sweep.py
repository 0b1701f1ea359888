"""benchmarks/gemv_sweep.py end to end on the CPU: stand-in kernels (the float64 reference written
through the same arguments and pointer table the real ones get), a fixed timer, tiny shapes. The
sweep's bookkeeping, checks, JSON and table are exercised before the one GPU run that uses them."""

import ctypes
import json

import torch

from benchmarks import common
from benchmarks import gemv_sweep as S
from tilert.kernels import fp8_gemm, gemv, mxfp4_gemm
from tilert.kernels.views import TORCH_DTYPES


def _product(fmt, x, w, s):
    return gemv.reference(fmt, x, w, s)


def _fake_gemv(cfg):
    def kern(x, w, s, y, *ws):
        out = _product(cfg.fmt, x, w, s)
        y.copy_(out if cfg.depth != 2 else torch.full_like(out, float("nan")))  # depth 2: a "wrong" variant

    return kern


def _view(addr, shape, dtype):
    t = getattr(torch, TORCH_DTYPES[dtype])
    n = 1
    for d in shape:
        n *= d
    nbytes = n * torch.empty((), dtype=t).element_size()
    raw = torch.frombuffer((ctypes.c_uint8 * nbytes).from_address(addr), dtype=torch.uint8)
    return raw.view(t).view(shape)


def _fake_stream(cfg, copies, sms, prefetch=False):
    specs = gemv.views(cfg)

    def kern(ptrs):
        assert tuple(ptrs.shape) == (copies, len(specs))
        for row in ptrs.tolist():
            v = {name: _view(a, shape, dt) for a, (name, shape, dt) in zip(row, specs)}
            v["y"].copy_(_product(cfg.fmt, v["x"], v["w"], v["s"]))

    return kern


def _fake_old(fmt):
    return lambda cfg: lambda x, w, s, y: y.copy_(_product(fmt, x, w, s))


def test_sweep_runs_checks_and_writes_its_table(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(S, "SHAPES", {("fp8", 256, 512): "tiny_fp8", ("mxfp4", 136, 32 * 37): "tiny_mx"})
    monkeypatch.setattr(S, "L2_TARGET", 1 << 20)
    monkeypatch.setattr(S, "_time", lambda calls, reps: [c() for c in calls] and 2e-6)
    monkeypatch.setattr(common, "copy_bandwidths", lambda: {"memcpy": 3.0e12, "kernel": 2.9e12})
    monkeypatch.setattr(gemv, "compiled", _fake_gemv)
    monkeypatch.setattr(gemv, "compiled_stream", _fake_stream)
    monkeypatch.setattr(mxfp4_gemm, "compiled", _fake_old("mxfp4"))
    monkeypatch.setattr(fp8_gemm, "compiled", _fake_old("fp8"))
    other = {"date": "then", "commit": "abc", "copy_bw_tbps": 3.1, "results": [{"kernel": "fused_moe"}]}
    (tmp_path / "kernels-cpu.json").write_text(json.dumps(other))  # benchmarks/kernels.py's run: kept
    path = S.run([], (1, 3), 132, 2, 600.0, tmp_path, device="cpu")
    doc = json.loads(path.read_text())
    assert doc["results"] == other["results"] and doc["results_run"]["commit"] == "abc"
    assert path.name == "kernels-cpu.json" and doc["copy_bw_tbps"] == 3.0
    recs = {(r["shape"], r["m"]): r for r in doc["gemv"]}
    assert set(recs) == {(s, m) for s in ("tiny_fp8", "tiny_mx") for m in (1, 3)}
    for r in recs.values():
        assert r["old_err"] < S.TOL and r["torch_bf16_us"] == 2.0
        assert r["best_standalone"]["err"] < S.TOL and r["best_stream"]["launcher"].startswith("stream")
        assert {v["launcher"] for v in r["variants"]} == {"standalone", "stream", "stream+prefetch"}
        for v in r["variants"]:
            bad = v["launcher"] == "standalone" and v["tiling"][3] == 2  # the NaN stand-in
            assert ("t_us" in v) != bad and v.get("wrong", False) == bad, v  # caught, not timed
    out = capsys.readouterr().out
    assert "gemv.TUNED entries" in out and "('fp8', 256, 512, 1): (" in out
