"""MXFP4 quantise/dequantise, checked bit-exactly against an ml_dtypes oracle.

The oracle is written here in numpy: it computes the OCP shared exponent with np.log2 (not frexp),
lets ml_dtypes' float8_e8m0fnu cast produce the scale byte and ml_dtypes' float4_e2m1fn cast do the
element rounding, and reads the 4-bit codes from the float4 bytes. ml_dtypes rounds to nearest even
and saturates at +-6 (checked in test_ml_dtypes_oracle_behaviour), so the oracle does not clamp.
Random inputs use a fresh seed each run; the seed is in every failure message.
"""

from __future__ import annotations

import secrets

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from tilert.numerics import mxfp4

F4 = ml_dtypes.float4_e2m1fn
E8 = ml_dtypes.float8_e8m0fnu
GRID = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
F32_MAX = float(np.finfo(np.float32).max)
F32_TINY_SUB = float(np.finfo(np.float32).smallest_subnormal)


@pytest.fixture(autouse=True)
def _published_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """The oracle packs in the published (file) order; the decode order has tests of its own below."""
    monkeypatch.setenv(mxfp4.ORDER_ENV, "published")


# ----------------------------------------------------------------------------- oracle


def oracle_quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 [..., K] -> (codes uint8 [..., K], scale bytes uint8 [..., K/32]) via ml_dtypes."""
    assert x.dtype == np.float32
    xb = x.reshape(*x.shape[:-1], -1, 32).astype(np.float64)
    amax = np.max(np.abs(xb), axis=-1)  # NaN propagates through np.max
    finite = np.isfinite(amax)
    with np.errstate(divide="ignore", invalid="ignore"):
        e = np.floor(np.log2(amax)) - 2
    e = np.where(finite & (amax > 0), e, -127)
    e = np.clip(e, -127, 127)
    scale = np.exp2(e)
    sbytes = scale.astype(np.float32).astype(E8).view(np.uint8)
    sbytes = np.where(finite, sbytes, 0xFF).astype(np.uint8)
    with np.errstate(invalid="ignore"):
        y = (xb / scale[..., None]).astype(np.float32)  # power-of-two division: exact
    codes = y.astype(F4).view(np.uint8)
    codes = np.where(finite[..., None], codes, 0).astype(np.uint8)
    return codes.reshape(x.shape), sbytes


def oracle_pack(codes: np.ndarray) -> np.ndarray:
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def oracle_dequantize(codes: np.ndarray, sbytes: np.ndarray) -> np.ndarray:
    vals = codes.view(F4).astype(np.float32)
    s = sbytes.view(E8).astype(np.float32)
    out = vals.reshape(*sbytes.shape, 32) * s[..., None]
    return out.reshape(codes.shape).astype(np.float32)


def grid_round(y: np.ndarray) -> np.ndarray:
    """Second, table-free oracle: nearest E2M1 magnitude by distance, ties to the even code (float64)."""
    a = np.abs(y)[..., None]
    d = np.abs(a - GRID)
    best = d.min(axis=-1, keepdims=True)
    cand = d == best
    # Prefer an even code among the nearest (at most two candidates, adjacent codes).
    even = cand & (np.arange(8) % 2 == 0)
    idx = np.where(even.any(-1), even.argmax(-1), cand.argmax(-1))
    idx = np.where(a[..., 0] > 6, 7, idx)
    return (idx | (np.signbit(y) << 3)).astype(np.uint8)


def check_against_oracle(x: torch.Tensor, note: str = "") -> None:
    xf = x.to(torch.float32).numpy()
    codes, sbytes = oracle_quantize(xf)
    blocks, scales = mxfp4.quantize(x)
    assert blocks.dtype == torch.uint8 and scales.dtype == torch.uint8
    assert tuple(blocks.shape) == (*x.shape[:-1], x.shape[-1] // 2)
    assert tuple(scales.shape) == (*x.shape[:-1], x.shape[-1] // 32)
    s_mis = scales.numpy() != sbytes
    assert not s_mis.any(), f"{note} scale mismatch at {np.argwhere(s_mis)[:5]}"
    got = mxfp4.unpack_codes(blocks).numpy()
    c_mis = got != codes
    if c_mis.any():
        i = tuple(np.argwhere(c_mis)[0])
        raise AssertionError(f"{note} code mismatch at {i}: x={xf[i]!r} got {got[i]} oracle {codes[i]}")
    np.testing.assert_array_equal(blocks.numpy(), oracle_pack(codes), err_msg=note)


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


# ----------------------------------------------------------------------------- the oracle itself


def test_ml_dtypes_oracle_behaviour() -> None:
    """The oracle's assumptions: RNE ties, saturation at 6 (no clamp needed), signed zero, E8M0 bytes."""
    ties = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], np.float32)
    assert ties.astype(F4).astype(np.float32).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]
    big = np.array([6.0, 6.5, 7.0, 7.99, 100.0, 1e30, np.inf, -7.0], np.float32)
    assert big.astype(F4).astype(np.float32).tolist() == [6, 6, 6, 6, 6, 6, 6, -6]
    assert np.array([-0.0, -0.1, -0.25], np.float32).astype(F4).view(np.uint8).tolist() == [8, 8, 8]
    pw = np.array([2.0**-127, 1.0, 2.0**127], np.float32)
    assert pw.astype(E8).view(np.uint8).tolist() == [0, 127, 254]


def test_e2m1_table_matches_ml_dtypes() -> None:
    ref = np.arange(16, dtype=np.uint8).view(F4).astype(np.float32)
    assert mxfp4.E2M1_VALUES.dtype == torch.float32
    np.testing.assert_array_equal(bits(mxfp4.E2M1_VALUES.numpy()), bits(ref))


def test_scale_values_matches_ml_dtypes() -> None:
    b = torch.arange(256, dtype=torch.uint8)
    got = mxfp4.scale_values(b).numpy()
    ref = b.numpy().view(E8).astype(np.float32)
    assert np.isnan(got[255]) and np.isnan(ref[255])
    np.testing.assert_array_equal(bits(got[:255]), bits(ref[:255]))
    assert got[0] == 2.0**-127 and got[127] == 1.0 and got[254] == 2.0**127


def test_grid_round_agrees_with_ml_dtypes() -> None:
    seed = secrets.randbits(32)
    rng = np.random.default_rng(seed)
    y = np.concatenate([rng.uniform(-9, 9, 100_000), np.arange(-36, 37) / 4]).astype(np.float32)
    np.testing.assert_array_equal(grid_round(y.astype(np.float64)), y.astype(F4).view(np.uint8), err_msg=f"seed={seed}")


# ----------------------------------------------------------------------------- bit-exact quantise


def _random(kind: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if kind == "normal":
        x = rng.standard_normal(shape)
    elif kind == "uniform":
        x = rng.uniform(-1, 1, shape) * 10.0 ** rng.integers(-6, 7)
    elif kind == "heavy":
        x = rng.standard_t(2, shape)
    elif kind == "wide":  # magnitudes over the whole float32 range, random signs
        x = np.exp2(rng.uniform(-149, 127.9, shape)) * rng.choice([-1.0, 1.0], shape)
    elif kind == "sparse":
        x = rng.standard_normal(shape) * (rng.random(shape) < 0.1)
    elif kind == "outliers":
        x = rng.standard_normal(shape)
        x[rng.random(shape) < 0.01] *= 1000.0
    elif kind == "per_block_scale":
        x = rng.standard_normal(shape) * np.exp2(rng.integers(-130, 120, (*shape[:-1], shape[-1] // 32, 1))).repeat(
            32, -1
        ).reshape(shape)
    else:
        raise AssertionError(kind)
    return x.astype(np.float32)


KINDS = ["normal", "uniform", "heavy", "wide", "sparse", "outliers", "per_block_scale"]


@pytest.mark.parametrize("kind", KINDS)
def test_random_matches_oracle(kind: str) -> None:
    seed = secrets.randbits(32)
    rng = np.random.default_rng(seed)
    x = _random(kind, (4, 16, 512), rng)
    check_against_oracle(torch.from_numpy(x), f"kind={kind} seed={seed}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_match_oracle(dtype: torch.dtype) -> None:
    seed = secrets.randbits(32)
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(_random("normal", (64, 256), rng) * 30).to(dtype)
    check_against_oracle(x, f"dtype={dtype} seed={seed}")


def test_few_million_elements_match_oracle() -> None:
    seed = secrets.randbits(32)
    rng = np.random.default_rng(seed)
    x = _random("per_block_scale", (8, 512, 1024), rng)  # 4M elements, [E, N, K]
    check_against_oracle(torch.from_numpy(x), f"seed={seed}")


def _blk(*vals: float, fill: float = 0.0) -> list[float]:
    v = list(vals)
    assert len(v) <= 32
    return v + [fill] * (32 - len(v))


def edge_blocks() -> np.ndarray:
    rows = [
        _blk(),  # all zero
        _blk(fill=-0.0),  # all negative zero
        _blk(-0.0, 0.0, -0.0, 1.0),  # signed zeros next to a value
        _blk(F32_TINY_SUB, -F32_TINY_SUB, 1e-40, -1e-39, 1.17e-38),  # subnormal amax: e clamps to -127
        _blk(*(2.0**k for k in range(-149, -117))),  # powers of two through the subnormals
        _blk(1.0, 1e-3, -1e-3, 0.12, -0.124, 0.126, -0.13, 2**-9, -(2**-10)),  # flush / not flush to 0
        _blk(1e30, -1e30, 1e29, 3e29),
        _blk(F32_MAX, -F32_MAX, F32_MAX / 2, 1.0),
        _blk(-F32_MAX, 6 * 2.0**124, 5 * 2.0**124, -(2.0**-149)),
        [6.0, -6.0, 7.0, -7.0, 7.99, -7.99, 6.5, 5.5, 5.0, 4.99, 5.01] + [4.0] * 21,
        _blk(*(np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]) * 2.0**-3), 0.75),  # ties at scale 2^-3
        _blk(*(np.array([-0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0])), -6.0),  # negative ties
        _blk(*(np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]) * 2.0**100), 6 * 2.0**100),
        _blk(*(np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0]) * 2.0**-120), 7 * 2.0**-120),
        _blk(*np.nextafter(np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], np.float32), np.float32(0)), 4.0),
        _blk(*np.nextafter(np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], np.float32), np.float32(9)), 4.0),
        _blk(np.float32(4.0), np.nextafter(np.float32(4.0), np.float32(0))),  # amax just below a power of 2
        _blk(np.nextafter(np.float32(8.0), np.float32(0)), 0.3),  # y just below 8 -> saturates to 6
        [(-1.0) ** i * (i + 1) for i in range(32)],  # mixed signs
    ]
    return np.array(rows, dtype=np.float32)


def test_edge_cases_match_oracle() -> None:
    x = edge_blocks()
    check_against_oracle(torch.from_numpy(x), "edge blocks")
    # ...and as one long row, and with leading dims.
    check_against_oracle(torch.from_numpy(x.reshape(1, -1)), "edge blocks, one row")
    check_against_oracle(torch.from_numpy(x.reshape(len(x), 1, 1, 32)), "edge blocks, 4-d")


def test_ties_round_to_even_explicitly() -> None:
    # amax 6 -> e = 0, so y == x.
    x = torch.tensor(_blk(0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -5.0, 6.0))
    blocks, scales = mxfp4.quantize(x)
    assert scales.tolist() == [127]
    assert mxfp4.unpack_codes(blocks)[:10].tolist() == [0, 2, 2, 4, 4, 6, 6, 8, 14, 7]


def test_zero_block_convention() -> None:
    x = torch.tensor([_blk(), _blk(fill=-0.0)])
    blocks, scales = mxfp4.quantize(x)
    assert scales.tolist() == [[0], [0]]  # 2**-127
    codes = mxfp4.unpack_codes(blocks)
    assert (codes[0] == 0).all() and (codes[1] == 8).all()
    deq = mxfp4.dequantize(blocks, scales)
    assert (deq == 0).all() and torch.signbit(deq[1]).all() and not torch.signbit(deq[0]).any()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_block_gets_nan_scale(bad: float) -> None:
    x = torch.ones(2, 3, 64)
    x[1, 2, 40] = bad
    blocks, scales = mxfp4.quantize(x)
    assert scales[1, 2, 1] == 0xFF
    assert (mxfp4.unpack_codes(blocks)[1, 2, 32:] == 0).all()
    ok = scales.clone()
    ok[1, 2, 1] = 127
    assert (ok != 0xFF).all()  # only the poisoned block
    check_against_oracle(x, f"non-finite {bad}")
    with pytest.raises(ValueError, match=r"MXFP4 scale 0xFF \(NaN\) at block index \(1, 2, 1\)"):
        mxfp4.dequantize(blocks, scales)


# ----------------------------------------------------------------------------- round trip


@pytest.mark.parametrize("kind", ["normal", "wide", "per_block_scale"])
def test_dequantize_matches_oracle_bitwise(kind: str) -> None:
    seed = secrets.randbits(32)
    rng = np.random.default_rng(seed)
    x = np.concatenate([_random(kind, (8, 256), rng).reshape(-1, 32), edge_blocks()])
    codes, sbytes = oracle_quantize(x)
    ref = oracle_dequantize(codes, sbytes)
    blocks, scales = mxfp4.quantize(torch.from_numpy(x))
    got = mxfp4.dequantize(blocks, scales)
    assert got.dtype == torch.float32 and got.shape == x.shape
    np.testing.assert_array_equal(bits(got.numpy()), bits(ref), err_msg=f"seed={seed}")  # -0.0 included
    for dt in (torch.bfloat16, torch.float16, torch.float64):
        d = mxfp4.dequantize(blocks, scales, dtype=dt)
        assert d.dtype == dt
        torch.testing.assert_close(d, torch.from_numpy(ref).to(dt), rtol=0, atol=0, equal_nan=False)


def test_round_trip_error_bound() -> None:
    """|x - deq| <= max(|x| / 4, scale / 4) per element (scale = 2**e <= amax / 4).

    E2M1 has one mantissa bit, so for |x| >= scale the relative error is at most 1/4 (hit at 1.25,
    2.5, 5 ... times the scale and just below 8 x scale, which saturates to 6); smaller elements have
    an absolute error of at most scale / 4 <= amax / 16. Gaussian data gives ~10% RMS relative error.
    """
    seed = secrets.randbits(32)
    rng = np.random.default_rng(seed)
    x = np.concatenate([_random(k, (16, 1024), rng).reshape(-1, 32) for k in KINDS] + [edge_blocks()])
    blocks, scales = mxfp4.quantize(torch.from_numpy(x))
    deq = mxfp4.dequantize(blocks, scales, dtype=torch.float64).numpy()
    s = np.repeat(mxfp4.scale_values(scales).double().numpy(), 32, axis=-1)
    x64 = x.astype(np.float64)
    err = np.abs(deq - x64)
    bound = np.maximum(np.abs(x64) / 4, s / 4)
    assert (err <= bound).all(), f"seed={seed} worst excess {np.max(err - bound)}"

    g = rng.standard_normal((256, 1024)).astype(np.float32)
    b, sc = mxfp4.quantize(torch.from_numpy(g))
    dg = mxfp4.dequantize(b, sc).numpy()
    rel_rms = np.sqrt(np.mean((dg - g) ** 2) / np.mean(g**2))
    assert rel_rms < 0.15, f"seed={seed} rel rms {rel_rms}"


def test_float64_input_single_rounding() -> None:
    """float64 inputs round once, in float64 (ml_dtypes would round via float32 first)."""
    eps = 2.0**-40
    y = np.array([0.25 + eps, 0.25 - eps, 0.75 - eps, 1.25 + eps, 2.5 + eps, 5.0 + eps, 3.5 - eps, 6.0], np.float64)
    x = np.concatenate([y, np.zeros(24)]) * 2.0**70
    blocks, scales = mxfp4.quantize(torch.from_numpy(x))
    assert scales.tolist() == [127 + 70]
    assert mxfp4.unpack_codes(blocks)[:8].tolist() == [1, 0, 1, 3, 5, 7, 5, 7]
    # Beyond float32's range: e clamps to 127 and values saturate.
    big = torch.full((32,), 1e300, dtype=torch.float64)
    b2, s2 = mxfp4.quantize(big)
    assert s2.tolist() == [254] and (mxfp4.unpack_codes(b2) == 7).all()


@settings()
@given(
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=3),
    nblk=st.integers(1, 4),
    data=st.data(),
)
def test_property_float64_matches_grid_oracle(lead: list[int], nblk: int, data: st.DataObject) -> None:
    shape = (*lead, 32 * nblk)
    x = data.draw(hnp.arrays(np.float64, shape, elements=st.floats(-1e6, 1e6, allow_subnormal=False)))
    exp = data.draw(st.integers(-100, 100))
    x = x * 2.0**exp
    blocks, scales = mxfp4.quantize(torch.from_numpy(x))
    xb = x.reshape(*lead, nblk, 32)
    amax = np.abs(xb).max(-1)
    e = np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1))) - 2, -127).clip(-127, 127)
    np.testing.assert_array_equal(scales.numpy(), (e + 127).astype(np.uint8))
    ref = grid_round(xb / np.exp2(e)[..., None]).reshape(shape)
    np.testing.assert_array_equal(mxfp4.unpack_codes(blocks).numpy(), ref)


# ----------------------------------------------------------------------------- properties


finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@settings()
@given(
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=3),
    nblk=st.integers(1, 8),
    data=st.data(),
)
def test_property_matches_oracle(lead: list[int], nblk: int, data: st.DataObject) -> None:
    x = data.draw(hnp.arrays(np.float32, (*lead, 32 * nblk), elements=finite_f32))
    check_against_oracle(torch.from_numpy(x))


@settings()
@given(
    shape=st.tuples(st.integers(1, 4), st.integers(1, 6)),
    exp=st.integers(-150, 125),
    data=st.data(),
)
def test_property_magnitudes_and_symmetry(shape: tuple[int, int], exp: int, data: st.DataObject) -> None:
    seed = data.draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((shape[0], 32 * shape[1])) * 2.0**exp).astype(np.float32)
    xt = torch.from_numpy(x)
    check_against_oracle(xt, f"exp={exp}")
    b, s = mxfp4.quantize(xt)
    bn, sn = mxfp4.quantize(-xt)
    assert torch.equal(sn, s)
    assert torch.equal(mxfp4.unpack_codes(bn), mxfp4.unpack_codes(b) ^ 8)
    # Quantising the dequantised tensor reproduces the same codes and scales (a fixed point).
    b2, s2 = mxfp4.quantize(mxfp4.dequantize(b, s))
    assert torch.equal(b2, b) and torch.equal(s2, s)


@settings()
@given(x=hnp.arrays(np.float32, st.tuples(st.integers(1, 5), st.just(64)), elements=finite_f32))
def test_property_leading_dims_are_independent(x: np.ndarray) -> None:
    xt = torch.from_numpy(x)
    b, s = mxfp4.quantize(xt.reshape(1, -1, 64))
    for i in range(x.shape[0]):
        bi, si = mxfp4.quantize(xt[i])
        assert torch.equal(b[0, i], bi) and torch.equal(s[0, i], si)


@settings()
@given(
    codes=hnp.arrays(
        np.uint8, st.tuples(st.integers(1, 3), st.integers(1, 40).map(lambda n: 2 * n)), elements=st.integers(0, 15)
    )
)
def test_property_pack_unpack_inverse(codes: np.ndarray) -> None:
    c = torch.from_numpy(codes)
    packed = mxfp4.pack_codes(c)
    np.testing.assert_array_equal(packed.numpy(), oracle_pack(codes))
    assert torch.equal(mxfp4.unpack_codes(packed), c)


def test_pack_layout() -> None:
    assert mxfp4.pack_codes(torch.tensor([1, 2, 15, 0], dtype=torch.uint8)).tolist() == [0x21, 0x0F]


# ----------------------------------------------------------------------------- word order


@settings()
@given(
    codes=hnp.arrays(
        np.uint8, st.tuples(st.integers(1, 3), st.integers(1, 12).map(lambda n: 8 * n)), elements=st.integers(0, 15)
    )
)
def test_property_decode_order_round_trips(codes: np.ndarray) -> None:
    # decode order is a bijection on each word: pack/unpack and to_order/from_order invert each
    # other, and pack_codes under decode order is the published packing moved by to_order
    c = torch.from_numpy(codes)
    pub = mxfp4.pack_codes(c)
    dec = mxfp4.to_order(pub, "decode")
    assert torch.equal(mxfp4.from_order(dec, "decode"), pub)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(mxfp4.ORDER_ENV, "decode")
        assert torch.equal(mxfp4.pack_codes(c), dec)
        assert torch.equal(mxfp4.unpack_codes(dec), c)
    assert torch.equal(mxfp4.to_order(pub), pub)  # published in force: the identity


def test_decode_order_moves_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    # every bit of a word lands on the place the decode's transforms read it from (one-hot words),
    # and quantize / dequantize under decode order give the published values
    one_hot = torch.tensor([1 << i for i in range(31)] + [-(1 << 31)], dtype=torch.int32).view(torch.uint8)
    moved = mxfp4.to_order(one_hot.reshape(32, 4), "decode").view(torch.int32).flatten().tolist()
    assert [(m & 0xFFFFFFFF).bit_length() - 1 for m in moved] == mxfp4._TO_DECODE
    assert mxfp4._TO_DECODE != list(range(32))
    x = torch.randn(5, 96, generator=torch.Generator().manual_seed(secrets.randbits(31)))
    pub_b, pub_s = mxfp4.quantize(x)
    ref = mxfp4.dequantize(pub_b, pub_s)
    monkeypatch.setenv(mxfp4.ORDER_ENV, "decode")
    b, s = mxfp4.quantize(x)
    assert torch.equal(s, pub_s) and not torch.equal(b, pub_b) and torch.equal(mxfp4.from_order(b), pub_b)
    assert torch.equal(mxfp4.dequantize(b, s), ref)


def test_reorder_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    # reorder_ converts in the tensor's own storage, in passes smaller than the tensor
    monkeypatch.setattr(mxfp4, "_WORDS_PER_PASS", 5)
    g = torch.Generator().manual_seed(secrets.randbits(31))
    pub = torch.randint(0, 256, (3, 7, 16), dtype=torch.uint8, generator=g)
    b = pub.clone()
    ptr = b.data_ptr()
    assert mxfp4.reorder_(b, "published", "decode") is b and b.data_ptr() == ptr
    assert torch.equal(b, mxfp4.to_order(pub, "decode")) and not torch.equal(b, pub)
    mxfp4.reorder_(b, "decode", "decode")
    assert torch.equal(b, mxfp4.to_order(pub, "decode"))
    mxfp4.reorder_(b, "decode", "published")
    assert torch.equal(b, pub)
    with pytest.raises(ValueError, match="unknown MXFP4 word order 'nibbles'"):
        mxfp4.reorder_(b, "published", "nibbles")
    with pytest.raises(ValueError, match="unknown MXFP4 word order 'Decode'"):
        mxfp4.to_order(pub, "Decode")


def test_decode_order_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(mxfp4.ORDER_ENV, "decode")
    with pytest.raises(ValueError, match="whole 32-bit words"):
        mxfp4.pack_codes(torch.tensor([1, 2, 15, 0], dtype=torch.uint8))
    monkeypatch.setenv(mxfp4.ORDER_ENV, "nibbles")
    with pytest.raises(ValueError, match="TILERT_MXFP4_ORDER='nibbles'"):
        mxfp4.order_choice()


def test_empty_k() -> None:
    b, s = mxfp4.quantize(torch.zeros(3, 0))
    assert b.shape == (3, 0) and s.shape == (3, 0)
    assert mxfp4.dequantize(b, s).shape == (3, 0)


# ----------------------------------------------------------------------------- errors


def test_quantize_rejects_k_not_multiple_of_32() -> None:
    with pytest.raises(ValueError, match=r"multiple of 32.*K=48"):
        mxfp4.quantize(torch.zeros(2, 48))


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.bool])
def test_quantize_rejects_non_float(dtype: torch.dtype) -> None:
    with pytest.raises(TypeError, match="floating-point"):
        mxfp4.quantize(torch.zeros(2, 32, dtype=dtype))


def test_quantize_rejects_scalar() -> None:
    with pytest.raises(ValueError, match="0-d"):
        mxfp4.quantize(torch.tensor(1.0))


def test_dequantize_rejects_nan_scale() -> None:
    blocks = torch.zeros(2, 3, 32, dtype=torch.uint8)
    scales = torch.full((2, 3, 2), 127, dtype=torch.uint8)
    scales[1, 0, 1] = 0xFF
    scales[1, 2, 0] = 0xFF
    with pytest.raises(ValueError, match=r"0xFF \(NaN\) at block index \(1, 0, 1\).*2 NaN scale"):
        mxfp4.dequantize(blocks, scales)


@pytest.mark.parametrize("which", ["blocks", "scales"])
def test_dequantize_rejects_wrong_dtype(which: str) -> None:
    blocks = torch.zeros(2, 16, dtype=torch.uint8)
    scales = torch.zeros(2, 1, dtype=torch.uint8)
    if which == "blocks":
        blocks = blocks.to(torch.int8)
    else:
        scales = scales.float()
    with pytest.raises(TypeError, match=rf"{which} must have dtype torch.uint8"):
        mxfp4.dequantize(blocks, scales)


def test_dequantize_rejects_non_float_output_dtype() -> None:
    with pytest.raises(TypeError, match="floating-point"):
        mxfp4.dequantize(torch.zeros(1, 16, dtype=torch.uint8), torch.zeros(1, 1, dtype=torch.uint8), torch.int32)


def test_dequantize_rejects_mismatched_last_dim() -> None:
    with pytest.raises(ValueError, match=r"16 x scales last dim.*expected blocks last dim 32"):
        mxfp4.dequantize(torch.zeros(4, 16, dtype=torch.uint8), torch.zeros(4, 2, dtype=torch.uint8))


def test_dequantize_rejects_mismatched_leading_dims() -> None:
    with pytest.raises(ValueError, match=r"share leading dims.*\(4, 16\).*\(3, 1\)"):
        mxfp4.dequantize(torch.zeros(4, 16, dtype=torch.uint8), torch.zeros(3, 1, dtype=torch.uint8))


def test_pack_codes_errors() -> None:
    with pytest.raises(ValueError, match="even"):
        mxfp4.pack_codes(torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        mxfp4.pack_codes(torch.tensor([0, 16]))
    with pytest.raises(TypeError, match="integer"):
        mxfp4.pack_codes(torch.zeros(2))
