"""FP8 e4m3 with block / row-group scales, checked against numpy + ml_dtypes and torch's own cast.

The oracle follows the rule (scale = amax / 448 in float32, divide, clamp to +-448) with numpy and
lets ml_dtypes.float8_e4m3fn do the rounding; the comparison is on the raw fp8 bytes. ml_dtypes'
cast does not saturate (465 -> NaN), so the oracle clamps first, like the rule says.
Random inputs use a fresh seed per run, reported in failure messages.
"""

from __future__ import annotations

import math
import secrets

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tilert.numerics import fp8

E4M3 = ml_dtypes.float8_e4m3fn
TINY = np.float32(np.finfo(np.float32).tiny)


# ----------------------------------------------------------------------------- oracle


def oracle_blocks(w: np.ndarray, bn: int, bk: int) -> tuple[np.ndarray, np.ndarray]:
    """float32 [..., N, K] -> (fp8 bytes uint8 [..., N, K], scales float32 [..., nb, kb])."""
    assert w.dtype == np.float32
    n, k = w.shape[-2:]
    nb, kb = math.ceil(n / bn), math.ceil(k / bk)
    lead = w.shape[:-2]
    wp = np.zeros((*lead, nb * bn, kb * bk), np.float32)
    wp[..., :n, :k] = w
    tiles = wp.reshape(*lead, nb, bn, kb, bk)
    amax = np.max(np.abs(tiles), axis=(-3, -1))
    finite = np.isfinite(amax)
    scale = np.maximum(amax / np.float32(448.0), TINY).astype(np.float32)
    scale = np.where(amax == 0, np.float32(1.0), scale)
    scale = np.where(finite, scale, np.float32(np.nan)).astype(np.float32)
    with np.errstate(invalid="ignore"):
        y = np.clip(tiles / scale[..., :, None, :, None], -448.0, 448.0).astype(np.float32)
    y = np.where(finite[..., :, None, :, None], y, np.float32(0.0))
    qb = y.astype(E4M3).view(np.uint8).reshape(*lead, nb * bn, kb * bk)[..., :n, :k]
    return qb, scale


def fp8_bytes(q: torch.Tensor) -> np.ndarray:
    assert q.dtype == torch.float8_e4m3fn
    return q.view(torch.uint8).numpy()


def expand(s: np.ndarray, bn: int, bk: int, n: int, k: int) -> np.ndarray:
    return np.repeat(np.repeat(s, bn, axis=-2), bk, axis=-1)[..., :n, :k]


def check_blocks(w: torch.Tensor, block: tuple[int, int], note: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    q, s = fp8.quantize_blocks(w, block)
    qb, sref = oracle_blocks(w.to(torch.float32).numpy(), *block)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape, note
    assert s.dtype == torch.float32 and tuple(s.shape) == sref.shape, note
    np.testing.assert_array_equal(s.numpy(), sref, err_msg=note)
    got = fp8_bytes(q)
    mis = got != qb
    if mis.any():
        i = tuple(np.argwhere(mis)[0])
        raise AssertionError(f"{note} byte mismatch at {i}: got {got[i]:#x} oracle {qb[i]:#x}")
    return q, s


# ----------------------------------------------------------------------------- the cast itself


def test_torch_cast_is_rne_like_ml_dtypes() -> None:
    """torch's float32 -> e4m3fn cast rounds to nearest even, like ml_dtypes, inside +-448."""
    grid = np.arange(256, dtype=np.uint8).view(E4M3).astype(np.float32)
    grid = np.unique(grid[np.isfinite(grid)])  # sorted, includes -0/0 once
    mids = (grid[:-1].astype(np.float64) + grid[1:]) / 2
    seed = secrets.randbits(32)
    rng = np.random.default_rng(seed)
    vals = np.concatenate(
        [
            grid,
            mids,
            np.nextafter(mids.astype(np.float32), np.float32(0)),
            np.nextafter(mids.astype(np.float32), np.float32(1e9)),
            rng.uniform(-448, 448, 200_000),
            rng.uniform(-0.02, 0.02, 50_000),
            [-0.0],
        ]
    ).astype(np.float32)
    ref = vals.astype(E4M3).view(np.uint8)
    got = fp8_bytes(torch.from_numpy(vals).to(torch.float8_e4m3fn))
    np.testing.assert_array_equal(got, ref, err_msg=f"seed={seed}")
    # ml_dtypes does not saturate; that is why the rule clamps before casting.
    assert np.isnan(np.array([465.0], np.float32).astype(E4M3).astype(np.float32)[0])


# ----------------------------------------------------------------------------- blocks


SHAPES = [(128, 128), (256, 384), (200, 300), (1, 7), (129, 129), (3, 130, 260)]


@pytest.mark.parametrize("shape", SHAPES)
def test_blocks_match_oracle(shape: tuple[int, ...]) -> None:
    seed = secrets.randbits(32)
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape) * np.exp2(rng.integers(-20, 20))
    w[..., 0, 0] *= 50  # one outlier per matrix
    check_blocks(torch.from_numpy(w.astype(np.float32)), (128, 128), f"shape={shape} seed={seed}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_blocks_input_dtypes(dtype: torch.dtype) -> None:
    seed = secrets.randbits(32)
    rng = np.random.default_rng(seed)
    w = torch.from_numpy(rng.standard_normal((2, 256, 192)).astype(np.float32)).to(dtype)
    check_blocks(w, (128, 128), f"dtype={dtype} seed={seed}")


def test_block_scale_is_amax_over_448() -> None:
    seed = secrets.randbits(32)
    rng = np.random.default_rng(seed)
    w = torch.from_numpy((rng.standard_normal((300, 270)) * 3).astype(np.float32))
    q, s = fp8.quantize_blocks(w)
    assert s.shape == (3, 3)
    for i in range(3):
        for j in range(3):
            tile = w[128 * i : 128 * (i + 1), 128 * j : 128 * (j + 1)]  # edge tiles are partial
            assert s[i, j] == tile.abs().max() / 448, f"seed={seed} tile {(i, j)}"
            # The element holding amax maps onto +-448 exactly.
            assert q[128 * i : 128 * (i + 1), 128 * j : 128 * (j + 1)].float().abs().max() == 448.0


def test_partial_block_amax_uses_real_elements_only() -> None:
    w = torch.ones(130, 130)
    w[129, 129] = 896.0  # the only element of the corner tile that is large
    w[128, 0] = -4.0
    q, s = fp8.quantize_blocks(w)
    assert torch.equal(s, torch.tensor([[1.0, 1.0], [4.0, 896.0]]) / 448)
    assert q[129, 129].float() == 448.0 and q[128, 0].float() == -448.0


def test_zero_and_tiny_blocks() -> None:
    w = torch.zeros(256, 256)
    w[:128, :128] = -0.0
    w[128:, :128] = 1e-40  # float32 subnormal: amax / 448 would underflow
    w[128:, 128:] = 2e-44
    q, s = fp8.quantize_blocks(w)
    assert s[0].tolist() == [1.0, 1.0]  # amax == 0 -> scale 1
    assert torch.signbit(q[:128, :128].float()).all() and (q[:128, :128].float() == 0).all()
    assert (s[1] == torch.finfo(torch.float32).tiny).all()
    check_blocks(w, (128, 128), "zero/tiny")
    d = fp8.dequantize_blocks(q, s)
    assert torch.isfinite(d).all()


def test_nonfinite_block_gets_nan_scale_and_dequant_raises() -> None:
    for bad in (float("nan"), float("inf"), -float("inf")):
        w = torch.ones(2, 256, 256)
        w[1, 200, 3] = bad
        q, s = fp8.quantize_blocks(w)
        assert torch.isnan(s[1, 1, 0]) and torch.isfinite(s).sum() == 7
        assert (q[1, 128:, :128].float() == 0).all()
        with pytest.raises(ValueError, match=r"NaN/Inf\) at block index \(1, 1, 0\)"):
            fp8.dequantize_blocks(q, s)
    s = torch.ones(2, 2)
    s[0, 1] = float("inf")
    with pytest.raises(ValueError, match=r"scale is inf \(NaN/Inf\) at block index \(0, 1\)"):
        fp8.dequantize_blocks(torch.zeros(256, 256).to(torch.float8_e4m3fn), s)


def _round_trip_check(w: np.ndarray, deq: np.ndarray, s_full: np.ndarray, note: str) -> None:
    """e4m3 has 3 mantissa bits: |err| <= 2**-4 |w| for normal values (|w/s| >= 2**-6), plus a few
    float32 ulps for the division and the product; below that |err| <= 2**-10 s (half the smallest
    subnormal step 2**-9)."""
    w64 = w.astype(np.float64)
    err = np.abs(deq.astype(np.float64) - w64)
    normal = np.abs(w64) / s_full >= 2.0**-6
    bound = np.where(normal, (2.0**-4 + 2.0**-20) * np.abs(w64), 2.0**-10 * s_full * (1 + 2.0**-20))
    assert (err <= bound).all(), f"{note} worst excess {np.max(err - bound)}"


def test_blocks_round_trip_error_bound() -> None:
    seed = secrets.randbits(32)
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((4, 300, 260)) * np.exp2(rng.uniform(-30, 30, (4, 1, 1)))).astype(np.float32)
    w[:, 5, 5] *= 1e4  # forces subnormal codes for the small elements of that tile
    q, s = fp8.quantize_blocks(torch.from_numpy(w))
    deq = fp8.dequantize_blocks(q, s).numpy()
    ref = q.float().numpy() * expand(s.numpy(), 128, 128, 300, 260)
    np.testing.assert_array_equal(deq, ref)  # dequant is exactly q.float() * scale
    _round_trip_check(w, deq, expand(s.numpy(), 128, 128, 300, 260).astype(np.float64), f"seed={seed}")
    for dt in (torch.bfloat16, torch.float64):
        d = fp8.dequantize_blocks(q, s, dtype=dt)
        assert d.dtype == dt
        torch.testing.assert_close(d.float(), torch.from_numpy(ref), rtol=2**-8, atol=0)


def test_custom_block_shape() -> None:
    seed = secrets.randbits(32)
    rng = np.random.default_rng(seed)
    w = torch.from_numpy(rng.standard_normal((70, 90)).astype(np.float32))
    q, s = check_blocks(w, (32, 64), f"seed={seed}")
    assert s.shape == (3, 2)
    deq = fp8.dequantize_blocks(q, s, block=(32, 64)).numpy()
    _round_trip_check(w.numpy(), deq, expand(s.numpy(), 32, 64, 70, 90).astype(np.float64), f"seed={seed}")


@settings()
@given(
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    n=st.integers(1, 70),
    k=st.integers(1, 70),
    bn=st.integers(1, 32),
    bk=st.integers(1, 32),
    exp=st.integers(-60, 60),
    data=st.data(),
)
def test_property_blocks_match_oracle(
    lead: list[int], n: int, k: int, bn: int, bk: int, exp: int, data: st.DataObject
) -> None:
    w = data.draw(hnp.arrays(np.float32, (*lead, n, k), elements=st.floats(-1e3, 1e3, width=32)))
    w = (w * np.float32(2.0**exp)).astype(np.float32)
    q, s = check_blocks(torch.from_numpy(w), (bn, bk))
    deq = fp8.dequantize_blocks(q, s, block=(bn, bk)).numpy()
    _round_trip_check(w, deq, expand(s.numpy(), bn, bk, n, k).astype(np.float64), f"block={(bn, bk)}")


# ----------------------------------------------------------------------------- rows


@pytest.mark.parametrize("shape", [(1, 128), (4, 7168), (2, 3, 300), (5,)])
def test_rows_match_oracle(shape: tuple[int, ...]) -> None:
    seed = secrets.randbits(32)
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 10).astype(np.float32)
    q, s = fp8.quantize_rows(torch.from_numpy(x))
    assert q.shape == shape and q.dtype == torch.float8_e4m3fn
    assert s.shape == (*shape[:-1], math.ceil(shape[-1] / 128)) and s.dtype == torch.float32
    qb, sref = oracle_blocks(x.reshape(*shape[:-1], 1, shape[-1]), 1, 128)
    np.testing.assert_array_equal(s.numpy(), sref.squeeze(-2), err_msg=f"seed={seed}")
    np.testing.assert_array_equal(fp8_bytes(q), qb.squeeze(-2), err_msg=f"seed={seed}")
    deq = fp8.dequantize_rows(q, s).numpy()
    _round_trip_check(x, deq, np.repeat(s.numpy(), 128, -1)[..., : shape[-1]].astype(np.float64), f"seed={seed}")


def test_rows_equal_blocks_of_one_row() -> None:
    x = torch.randn(6, 500) * 7
    q, s = fp8.quantize_rows(x, group=64)
    qb, sb = fp8.quantize_blocks(x, (1, 64))
    assert torch.equal(q.view(torch.uint8), qb.view(torch.uint8)) and torch.equal(s, sb)
    assert torch.equal(fp8.dequantize_rows(q, s, group=64), fp8.dequantize_blocks(qb, sb, block=(1, 64)))


def test_rows_nonfinite() -> None:
    x = torch.ones(3, 256)
    x[2, 130] = float("nan")
    q, s = fp8.quantize_rows(x)
    assert torch.isnan(s[2, 1]) and torch.isfinite(s).sum() == 5
    with pytest.raises(ValueError, match=r"row-group scale is nan \(NaN/Inf\) at block index \(2, 1\)"):
        fp8.dequantize_rows(q, s)


# ----------------------------------------------------------------------------- errors


def test_quantize_errors() -> None:
    with pytest.raises(TypeError, match="floating-point"):
        fp8.quantize_blocks(torch.zeros(4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="at least 2 dims"):
        fp8.quantize_blocks(torch.zeros(4))
    with pytest.raises(ValueError, match="positive ints"):
        fp8.quantize_blocks(torch.zeros(4, 4), (0, 128))
    with pytest.raises(TypeError, match="floating-point"):
        fp8.quantize_rows(torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="at least 1 dims"):
        fp8.quantize_rows(torch.tensor(1.0))
    with pytest.raises(ValueError, match="positive ints"):
        fp8.quantize_rows(torch.zeros(4), group=-1)


def test_dequantize_blocks_errors() -> None:
    q = torch.zeros(2, 200, 300).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"scale_inv shape \(2, 2, 2\).*expected \(2, 2, 3\)"):
        fp8.dequantize_blocks(q, torch.ones(2, 2, 2))
    with pytest.raises(ValueError, match=r"expected \(2, 2, 3\)"):
        fp8.dequantize_blocks(q, torch.ones(2, 3))
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        fp8.dequantize_blocks(torch.zeros(2, 200, 300), torch.ones(2, 2, 3))
    with pytest.raises(TypeError, match="floating-point scales"):
        fp8.dequantize_blocks(q, torch.ones(2, 2, 3, dtype=torch.int32))
    with pytest.raises(TypeError, match="floating-point torch.dtype"):
        fp8.dequantize_blocks(q, torch.ones(2, 2, 3), dtype=torch.int8)
    with pytest.raises(ValueError, match="at least 2 dims"):
        fp8.dequantize_blocks(torch.zeros(4).to(torch.float8_e4m3fn), torch.ones(1))


def test_dequantize_rows_errors() -> None:
    q = torch.zeros(3, 300).to(torch.float8_e4m3fn)
    with pytest.raises(ValueError, match=r"scales shape \(3, 2\).*expected \(3, 3\)"):
        fp8.dequantize_rows(q, torch.ones(3, 2))
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        fp8.dequantize_rows(q.to(torch.bfloat16), torch.ones(3, 3))


def test_exact_ties_after_division() -> None:
    """Elements whose w / scale is exactly an e4m3 midpoint must round to even (and the rule is a
    division: multiplying by 1/scale misses some of these ties)."""
    seed = secrets.randbits(32)
    rng = np.random.default_rng(seed)
    grid = np.unique(np.abs(np.arange(256, dtype=np.uint8).view(E4M3).astype(np.float64)))
    grid = grid[np.isfinite(grid)]
    mids = ((grid[:-1] + grid[1:]) / 2).astype(np.float32)  # exact in float32
    amax = (rng.uniform(1, 2, 20_000) * np.exp2(rng.integers(-20, 20, 20_000))).astype(np.float32)
    m = rng.choice(mids, 20_000) * rng.choice(np.float32([-1, 1]), 20_000)
    s = (amax / np.float32(448)).astype(np.float32)
    w = (m * s).astype(np.float32)
    tie = (w / s).astype(np.float32) == m
    x = np.stack([amax, w], -1)[tie]
    assert len(x) > 1000
    q, _ = check_blocks(torch.from_numpy(x), (1, 2), f"seed={seed}")
    # Every tie landed on an even mantissa (last bit 0) or on zero.
    assert ((fp8_bytes(q)[:, 1] & 1) == 0).all()
