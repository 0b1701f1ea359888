"""The streaming GEMV's fused-linear options (tilert/kernels/gemv.py: RMSNorm prologue, residual
epilogue, the x_own prefetch form) and the persistent linears' choice of it
(linear_fused.gemv_config, TILERT_LINEAR_BODY=gemv): configs and views on the CPU, sm_90a compiles
(skipped without nvcc), and against the float64 torch reference on a Hopper GPU."""

from __future__ import annotations

import dataclasses

import pytest

from tilert.kernels import common, gemv
from tilert.kernels import linear_fused as lf
from tilert.kernels import linear_tiling as lt

needs_toolchain = pytest.mark.skipif(not common.has_toolchain(), reason=str(common.toolchain_reason()))

C = gemv.Config
EPS = 1e-6


def _precompile_script():
    """scripts/precompile_gpu.py, which holds the GPU tests' configs (it builds their kernels)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "precompile_gpu.py"
    spec = importlib.util.spec_from_file_location("precompile_gpu", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


OPTIONS, STREAM = _precompile_script().linear_gemv_test_configs()


def spec_of(m: int, n: int, k: int, norm: bool, res: bool, sms: int = 132) -> lf.LinearSpec:
    """The persistent linear's spec at the plan's tiling (as runtime/kinds/linear.py builds it)."""
    bm, bn, bk, split, g = lt.node_shape("linear_fp8", m, n, k, sms)
    return lf.LinearSpec(m, n, k, bm, bn, bk, split, norm_eps=EPS if norm else None,
                         res_dtype="bfloat16" if res else None, gemv=g)  # fmt: skip


def test_body_switch(monkeypatch):
    monkeypatch.delenv(lf.BODY_ENV, raising=False)
    assert lf.body_choice() == "gemv"
    monkeypatch.setenv(lf.BODY_ENV, "fused")
    assert lf.body_choice() == "fused"
    monkeypatch.setenv(lf.BODY_ENV, "fast")
    with pytest.raises(ValueError, match="TILERT_LINEAR_BODY='fast'"):
        lf.body_choice()


def test_option_views_follow_the_plain_ones():
    cfg = C("fp8", 3, 200, 1024, split=2, norm_eps=EPS, res_dtype="float32")
    names = [name for name, _, _ in gemv.views(cfg)]
    assert names == ["x", "w", "s", "y", "ws", "cnt", "gamma", "residual"]
    assert gemv.views(cfg)[0][1] == (4, 1024)  # x: the rows the norm's statistics may read (a power of two)
    plain = C("fp8", 3, 200, 1024, split=2)
    assert gemv.views(plain)[1:] == gemv.views(cfg)[1:6] and gemv.views(plain)[0][1] == (3, 1024)
    with pytest.raises(ValueError, match="res_dtype"):
        C("fp8", 1, 64, 256, res_dtype="int32")
    with pytest.raises(ValueError, match="norm"):
        C("fp8", 1, 64, 96, norm_eps=EPS)
    with pytest.raises(ValueError, match="x_own"):
        gemv.make_body(C("fp8", 1, 64, 256), x_own=True)  # only in the prefetch form
    with pytest.raises(ValueError, match="norm"):
        gemv.make_body(C("fp8", 1, 64, 256, norm_eps=EPS), prefetch=True)  # its x comes with the task before


def test_x_own_keeps_one_x_buffer():
    cfg = STREAM[0]
    xs = cfg.m * cfg.ncs * 64 * 2
    assert gemv.smem_bytes(cfg, prefetch=True) - gemv.smem_bytes(cfg, prefetch=True, x_own=True) == xs


MIMO_LINEARS = [(3072, 6144, True, False), (192, 6144, True, False), (128, 6144, True, False),
                (6144, 2048, False, True), (2048, 6144, True, False), (6144, 2048, False, False)]  # fmt: skip


@pytest.mark.parametrize("m", (1, 3, 8, 16))
@pytest.mark.parametrize("shape", MIMO_LINEARS, ids=lambda s: f"{s[0]}x{s[1]}")
def test_gemv_config_runs_the_plan_tiles(shape, m):
    # same tiles as the task table (the plan VM and the body agree on them), a prefetch form that fits
    n, k, norm, res = shape
    spec = spec_of(m, n, k, norm, res)
    cfg = lf.gemv_config(spec)
    assert cfg is not None, spec
    assert cfg.rows == spec.block_n and cfg.split == spec.split_k and cfg.n_tiles == spec.tiles  # one m tile
    assert cfg.ncs * 64 == k // spec.split_k and cfg.m == m and cfg.evict_first
    assert (cfg.norm_eps is not None) == norm and (cfg.res_dtype is not None) == res
    assert gemv.prefetch_ok(cfg, x_own=True) and gemv.smem_bytes(cfg, prefetch=True, x_own=True) <= lf.STREAM_SMEM
    for d in (d for d in lf.STREAM_DEPTHS if d > cfg.depth):  # the deepest ring that fits
        deeper = dataclasses.replace(cfg, depth=d)
        assert d - 1 > cfg.items or gemv.smem_bytes(deeper, True, True) > lf.STREAM_SMEM, d


def test_gemv_config_leaves_what_it_lacks_to_the_fused_body():
    spec = spec_of(4, 256, 256, True, False)
    assert lf.gemv_config(spec) is not None
    for other in (dict(scale_rows=1), dict(gemv=False, block_k=128), dict(w_dtype="bfloat16", gemv=False)):
        assert lf.gemv_config(dataclasses.replace(spec, **other)) is None, other


# --- sm_90a ------------------------------------------------------------------------------------


@needs_toolchain
@pytest.mark.timeout(900)
def test_options_compile_for_sm90a():
    for cfg in OPTIONS[1:2]:  # norm, residual, split-K, bf16 output, 3 tokens
        src = gemv.compiled(cfg).get_kernel_source()
        assert "tilert_bf16x2_norm" in src and "tilert_cp_async_wait" in src and "mma_sync" in src
        assert "__shared__ __align__(16) float rstd" in src  # the row statistics outside the merged block
    kern = gemv.compiled_stream(STREAM[0], 2, 132, prefetch=True, x_own=True)
    src = kern.get_kernel_source()
    # x_own: the reduction buffer stays in the merged block (no per-class static buffer), the ring and
    # scales held live to the end, where the next task's copies land
    assert "__shared__ __align__(16) float red[" not in src and src.count("tilert_smem_live(") >= 3


@needs_toolchain
@pytest.mark.timeout(900)
def test_norm_statistics_come_from_the_staged_rows_where_they_are_whole():
    # staged and split 1: the sums of squares from shared memory (tilert_sq4), no global row pass;
    # global, or a split-K tile (its staged slice is part of a row): X's rows in global memory
    norm = [c for c in OPTIONS if c.norm_eps is not None]
    staged = [c for c in norm if c.norm_stats == "staged" and c.split == 1]
    glob = [c for c in norm if c.norm_stats == "global" and c.split == 1]
    splitk = [dataclasses.replace(c, norm_stats="staged") for c in norm if c.split > 1]
    assert staged and glob and splitk
    for cfg in staged[:1] + glob[:1] + splitk[:1]:
        src = gemv.compiled(cfg).get_kernel_source()
        body = src[src.index("__global__"):]
        assert ("tilert_sq4(" in body) == (cfg.norm_stats == "staged" and cfg.split == 1), cfg


def test_norm_stats_switch_reaches_the_config_and_refuses_unknown_values(monkeypatch):
    spec = spec_of(4, 256, 256, True, False)
    monkeypatch.setenv(lf.NORM_STATS_ENV, "staged")
    assert lf.gemv_config(spec).norm_stats == "staged"
    monkeypatch.setenv(lf.NORM_STATS_ENV, "global")
    assert lf.gemv_config(spec).norm_stats == "global"
    monkeypatch.delenv(lf.NORM_STATS_ENV)
    assert lf.gemv_config(spec).norm_stats == "staged"
    monkeypatch.setenv(lf.NORM_STATS_ENV, "smem")
    with pytest.raises(ValueError, match="TILERT_NORM_STATS='smem'"):
        lf.gemv_config(spec)
    with pytest.raises(ValueError, match="norm_stats"):
        gemv.Config("fp8", 4, 256, 256, norm_eps=1e-6, norm_stats="smem")


# --- GPU ---------------------------------------------------------------------------------------

TOL = 1e-3
TOL_BF16 = 4e-3  # a bf16 output (or normalised x) adds its own rounding


def tol(cfg: gemv.Config) -> float:
    return TOL_BF16 if cfg.out_dtype == "bfloat16" or cfg.norm_eps is not None else TOL


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", OPTIONS, ids=repr)
def test_options_match_reference(cfg):
    assert gemv.check(cfg) < tol(cfg)


@pytest.mark.gpu
@pytest.mark.parametrize("cfg", STREAM, ids=repr)
def test_x_own_stream_matches_reference(cfg):
    # some CTAs run three tasks back to back: the chained issue, both scale buffers, the ring's slot base
    assert gemv.check_stream(cfg, copies=2 * 132 // cfg.tiles + 2, prefetch=True, x_own=True) < tol(cfg)
