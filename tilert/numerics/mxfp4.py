"""MXFP4 (OCP Microscaling FP4): E2M1 elements with one E8M0 scale per 32 elements.

This is the CPU/torch reference for the weight format that tilert's decode kernels read
(gpt-oss / triton_kernels layout). Everything is vectorised torch so that reference checks of a
few million elements stay cheap; it runs on whatever device the input lives on.

Layout (along the last, reduction, dimension K):

* ``blocks``: uint8 ``[..., K // 2]``; element ``2i`` in the low nibble, ``2i + 1`` in the high one
  (the published, "file" order). In memory tilert may keep each 32-bit word's bits permuted
  (``TILERT_MXFP4_ORDER``, see "Word order" below): :func:`pack_codes` / :func:`unpack_codes` and
  everything built on them use the order in force; checkpoint files keep the published order.
* ``scales``: uint8 ``[..., K // 32]``; E8M0, value ``2 ** (byte - 127)``; ``0xFF`` is NaN.
* A 4-bit E2M1 code: bit 3 is the sign, codes 0-7 are ``+{0, 0.5, 1, 1.5, 2, 3, 4, 6}``.

Quantising rule (OCP MX spec / torchao default), per block of 32:

* ``e = floor(log2(amax)) - 2`` (2 is the largest E2M1 exponent), clamped to ``[-127, 127]``.
* ``amax == 0``: the clamp gives ``e = -127`` (scale byte 0, i.e. ``2 ** -127``); every code is a
  (signed) zero.
* non-finite ``amax`` (a NaN or +-Inf anywhere in the block): scale byte ``0xFF`` (NaN) and all codes
  0. :func:`dequantize` refuses such blocks.
* ``x * 2 ** -e`` rounds to nearest, ties to even, onto the E2M1 grid, saturating at +-6. The sign
  bit is kept for negative inputs that round to zero (and for ``-0.0``), as ml_dtypes'
  ``float4_e2m1fn`` cast does.

Word order (``TILERT_MXFP4_ORDER``, read on each call): "published" keeps the file's nibbles;
"decode" permutes the 32 bits of every little-endian 4-byte word (8 elements, K // 8 words a row)
so that the kernels' E2M1 -> bf16x2 decode (kernels/common.py ``tilert_e2m1x2_ord``) of byte ``b``
is one funnel shift or multiply and one mask: register ``b`` (the published byte ``b``: element
``2b`` in its low bf16, ``2b + 1`` in its high one) is ``y_b & 0x81C081C0`` with ``y_0 = w``,
``y_1 = rotl(w, 10)``, ``y_2 = rotl(w, 13)``, ``y_3 = (w & 0x001B001B) * 0x1084`` (three
non-overlapping shifted copies, 2, 7 and 12: a carry-free multiply). The mask keeps a code's sign at
bit 15 and its exponent and mantissa at bits 8..6 of each half, so the bf16 reads as the value times
2^-126 (one bf16x2 multiply restores it with the block scale). Published, the same takes 19
instructions a word (a nibble split, a byte permute and a shift-multiply per pair); decode order, 12.
"""

from __future__ import annotations

import functools
import math
import os

import torch

__all__ = [
    "BLOCK_SIZE",
    "E2M1_VALUES",
    "SCALE_NAN",
    "SCALE_BIAS",
    "quantize",
    "dequantize",
    "pack_codes",
    "unpack_codes",
    "scale_values",
    "ORDER_ENV",
    "ORDERS",
    "order_choice",
    "to_order",
    "from_order",
    "reorder_",
]

#: Elements sharing one E8M0 scale.
BLOCK_SIZE = 32
#: E8M0 exponent bias: a scale byte ``b`` means ``2 ** (b - SCALE_BIAS)``.
SCALE_BIAS = 127
#: The E8M0 NaN encoding.
SCALE_NAN = 0xFF

#: Value of each 4-bit E2M1 code (index = code). Code 8 is -0.0.
E2M1_VALUES = torch.tensor(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    dtype=torch.float32,
)

# Midpoints between neighbouring E2M1 magnitudes. A tie rounds to the even code, so for the
# midpoints whose upper neighbour has the even code (0.75 -> 1.0, 1.75 -> 2.0, 3.5 -> 4.0) the
# comparison must be ">=" rather than ">". torch.bucketize(right=False) counts boundaries strictly
# below the value, so those three boundaries are moved one ulp down (computed per dtype).
_MIDPOINTS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
_TIE_UP = (False, True, False, True, False, True, False)

# float32 value of every E8M0 byte; 2**-127 is a float32 subnormal and is exact. 0xFF -> NaN.
_SCALE_LUT = torch.tensor([math.ldexp(1.0, b - SCALE_BIAS) for b in range(255)] + [math.nan], dtype=torch.float32)


# 2**-e for e = -127 .. 127 (index e + 127); every entry is exact in float32 (2**-127 is subnormal).
_INV_SCALE_LUT = torch.tensor([math.ldexp(1.0, -(b - SCALE_BIAS)) for b in range(255)], dtype=torch.float64)


def _boundaries(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Rounding boundaries for ``torch.bucketize`` that reproduce round-half-to-even."""
    mid = torch.tensor(_MIDPOINTS, dtype=dtype, device=device)
    down = torch.nextafter(mid, torch.full_like(mid, -math.inf))
    return torch.where(torch.tensor(_TIE_UP, device=device), down, mid)


def _check_uint8(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"MXFP4 {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.uint8:
        raise TypeError(f"MXFP4 {name} must have dtype torch.uint8, got {t.dtype}")
    if t.dim() == 0:
        raise ValueError(f"MXFP4 {name} must have at least one dimension, got a 0-d tensor")


ORDER_ENV = "TILERT_MXFP4_ORDER"  # the word order of MXFP4 blocks in memory (see the module docstring)
ORDERS = ("decode", "published")

# The decode's per-byte transforms: (rotate left, carry-free multiplier) of the word, then the mask.
_Y = ((0, 1), (10, 1), (13, 1), (0, (1 << 2) | (1 << 7) | (1 << 12)))  # byte 3 first masks with 0x001B001B
_Y3_KEEP = 0x001B001B


def _decode_bits() -> list[int]:
    """published bit -> decode-order bit, for the 32 bits of a word (from the decode's transforms)."""
    roles = {0: 6, 1: 7, 2: 8, 3: 15}  # code bit (m, e0, e1, s) -> bit of its bf16 half
    perm = [-1] * 32
    for b, (rot, mul) in enumerate(_Y):
        shifts = [i for i in range(32) if mul >> i & 1]
        for h in range(2):
            for cb, db in roles.items():
                d = 16 * h + db
                if mul == 1:
                    src = (d - rot) % 32
                else:  # the one copy (shift a) whose source bit the 0x001B001B mask keeps
                    (src,) = [d - a for a in shifts if 0 <= d - a < 32 and _Y3_KEEP >> (d - a) & 1]
                perm[8 * b + 4 * h + cb] = src
    assert sorted(perm) == list(range(32)), perm
    return perm


_TO_DECODE = _decode_bits()


_WORDS_PER_PASS = 1 << 22  # bounds the index tensors of one pass (4 x 8 bytes a word)


@functools.cache
def _byte_tables(perm: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """int32 [4, 256]: table[j][v] = the permuted bits of byte j of a word holding the value v."""
    t = [[0] * 256 for _ in range(4)]
    for j in range(4):
        for v in range(256):
            bits = sum(1 << perm[8 * j + i] for i in range(8) if v >> i & 1)
            t[j][v] = bits - (1 << 32) if bits >> 31 else bits
    return torch.tensor(t, dtype=torch.int32, device=device)


def _permute_words(blocks: torch.Tensor, perm: list[int], out: torch.Tensor | None = None) -> torch.Tensor:
    """Apply a bit permutation to every little-endian 32-bit word of ``blocks``' last dimension, into
    ``out`` (a new tensor, or ``blocks`` itself: each pass reads its words before it writes them).
    One table lookup a byte, in passes of bounded memory (a layer's stacked experts convert with a
    few hundred MB beside them)."""
    if blocks.shape[-1] % 4:
        raise ValueError(
            f"MXFP4 blocks in {ORDER_ENV}=decode order are whole 32-bit words: the last dimension "
            f"({blocks.shape[-1]} bytes, K = {2 * blocks.shape[-1]}) must be a multiple of 4 bytes (K of 8)"
        )
    if out is None:
        out = torch.empty_like(blocks, memory_format=torch.contiguous_format)
    elif not (out.is_contiguous() and blocks.is_contiguous()):
        raise ValueError("MXFP4 blocks reordered in place must be contiguous")
    tables = _byte_tables(tuple(perm), blocks.device)
    words = blocks.contiguous().view(-1, 4)
    dst = out.view(-1, 4).view(torch.int32).view(-1)
    for s in range(0, words.shape[0], _WORDS_PER_PASS):
        idx = words[s : s + _WORDS_PER_PASS].long()
        part = tables[0][idx[:, 0]]
        for j in range(1, 4):
            part |= tables[j][idx[:, j]]
        dst[s : s + _WORDS_PER_PASS] = part
    return out


def _inverse(perm: list[int]) -> list[int]:
    inv = [0] * len(perm)
    for src, dst in enumerate(perm):
        inv[dst] = src
    return inv


_FROM_DECODE = _inverse(_TO_DECODE)


def order_choice() -> str:
    """TILERT_MXFP4_ORDER: "decode" or "published" (default): the word order of MXFP4 blocks in
    memory, which pack_codes / unpack_codes (and so quantize / dequantize) and the decode kernels
    follow; a build switch (kernels/switches.py)."""
    v = os.environ.get(ORDER_ENV, "published") or "published"
    if v not in ORDERS:
        raise ValueError(f"{ORDER_ENV}={v!r}: expected one of {', '.join(ORDERS)}")
    return v


def _order(order: str | None) -> str:
    """An order argument (None: the one in force), checked."""
    if order is None:
        return order_choice()
    if order not in ORDERS:
        raise ValueError(f"unknown MXFP4 word order {order!r}: expected one of {', '.join(ORDERS)}")
    return order


def to_order(blocks: torch.Tensor, order: str | None = None) -> torch.Tensor:
    """Published-order blocks (a checkpoint file's) -> ``order`` (default: the one in force)."""
    _check_uint8("blocks", blocks)
    return _permute_words(blocks, _TO_DECODE) if _order(order) == "decode" else blocks


def from_order(blocks: torch.Tensor, order: str | None = None) -> torch.Tensor:
    """Blocks in ``order`` (default: the one in force) -> published order (for a checkpoint file)."""
    _check_uint8("blocks", blocks)
    return _permute_words(blocks, _FROM_DECODE) if _order(order) == "decode" else blocks


def reorder_(blocks: torch.Tensor, have: str, want: str) -> torch.Tensor:
    """Convert contiguous blocks from order ``have`` to ``want`` in place (no second copy: weights
    bound to a step keep their addresses; benchmarks/step_variants.py times both orders on one set)."""
    _check_uint8("blocks", blocks)
    if _order(have) != _order(want):
        _permute_words(blocks, _TO_DECODE if want == "decode" else _FROM_DECODE, out=blocks)
    return blocks


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes ``[..., K]`` (K even) into bytes ``[..., K // 2]`` in the word order in force
    (published: element 2i in the low nibble).

    Separate from :func:`quantize` so that tests and kernels can build packed weights from codes.
    """
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise TypeError(f"codes must have an integer dtype, got {codes.dtype}")
    if codes.dim() == 0 or codes.shape[-1] % 2:
        raise ValueError(f"codes last dimension must be even to pack two per byte, got shape {tuple(codes.shape)}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 15):
        raise ValueError(f"codes must lie in [0, 15], got range [{int(codes.min())}, {int(codes.max())}]")
    c = codes.to(torch.uint8)
    return to_order(c[..., 0::2] | (c[..., 1::2] << 4))


def unpack_codes(blocks: torch.Tensor) -> torch.Tensor:
    """Unpack bytes ``[..., K // 2]`` (the word order in force) into 4-bit codes uint8 ``[..., K]``
    (inverse of :func:`pack_codes`)."""
    blocks = from_order(blocks)
    low = blocks & 0x0F
    high = blocks >> 4
    return torch.stack((low, high), dim=-1).reshape(*blocks.shape[:-1], blocks.shape[-1] * 2)


def scale_values(scales: torch.Tensor) -> torch.Tensor:
    """E8M0 bytes -> float32 ``2 ** (byte - 127)`` (``0xFF`` -> NaN); exact, via a lookup table."""
    _check_uint8("scales", scales)
    return _SCALE_LUT.to(scales.device)[scales.long()]


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``x`` to MXFP4 along its last dimension (blocks of 32).

    Returns ``(blocks, scales)``: uint8 ``[..., K // 2]`` packed E2M1 codes and uint8
    ``[..., K // 32]`` E8M0 scales. See the module docstring for the exact rule. Rounding happens in
    float64 for float64 inputs (so it is a single rounding) and in float32 otherwise (exact for
    bf16/fp16/fp8 inputs).
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"MXFP4 quantize expects a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"MXFP4 quantize expects a floating-point tensor, got dtype {x.dtype}")
    if x.dim() == 0:
        raise ValueError("MXFP4 quantize expects at least one dimension (K), got a 0-d tensor")
    k = x.shape[-1]
    if k % BLOCK_SIZE:
        raise ValueError(f"MXFP4 quantize needs the last dimension K to be a multiple of {BLOCK_SIZE}, got K={k}")

    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    lead = x.shape[:-1]
    xb = x.to(work).reshape(*lead, k // BLOCK_SIZE, BLOCK_SIZE)

    amax = xb.abs().amax(dim=-1)  # NaN propagates
    finite = torch.isfinite(amax)
    # floor(log2(amax)) exactly, subnormals included: frexp gives amax = m * 2**p with m in [0.5, 1).
    _, p = torch.frexp(torch.where(finite, amax, torch.zeros_like(amax)))
    e = torch.where(amax > 0, p.to(torch.int32) - 1 - 2, torch.full_like(p, -SCALE_BIAS, dtype=torch.int32))
    e = e.clamp(-SCALE_BIAS, SCALE_BIAS)

    # x * 2**-e is exact (power-of-two scaling; anything that underflows is far below 0.25). The
    # factor comes from a table rather than pow() so exactness does not depend on libm.
    factor = _INV_SCALE_LUT.to(device=x.device, dtype=work)[(e + SCALE_BIAS).long()]
    y = xb * factor.unsqueeze(-1)
    mag = torch.bucketize(y.abs(), _boundaries(work, x.device), right=False).to(torch.uint8)
    codes = mag | (torch.signbit(y).to(torch.uint8) << 3)
    codes = torch.where(finite.unsqueeze(-1), codes, torch.zeros_like(codes))

    scales = torch.where(finite, (e + SCALE_BIAS).to(torch.uint8), torch.full_like(e, SCALE_NAN, dtype=torch.uint8))
    blocks = pack_codes(codes.reshape(*lead, k))
    return blocks, scales


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """MXFP4 ``(blocks, scales)`` -> ``[..., K]`` tensor of ``dtype``.

    The product code value x scale is formed exactly (float64 for a float64 result, else float32)
    and rounded once to ``dtype``. A NaN scale (0xFF) raises: it marks a block that held NaN/Inf,
    and silently turning that into numbers would hide the fault.
    """
    _check_uint8("blocks", blocks)
    _check_uint8("scales", scales)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"MXFP4 dequantize dtype must be a floating-point torch.dtype, got {dtype}")
    if blocks.shape[:-1] != scales.shape[:-1]:
        raise ValueError(
            f"MXFP4 blocks and scales must share leading dims: blocks {tuple(blocks.shape)}, "
            f"scales {tuple(scales.shape)}"
        )
    if blocks.shape[-1] != (BLOCK_SIZE // 2) * scales.shape[-1]:
        raise ValueError(
            f"MXFP4 blocks last dim must be {BLOCK_SIZE // 2} x scales last dim: blocks {tuple(blocks.shape)}, "
            f"scales {tuple(scales.shape)} (expected blocks last dim {(BLOCK_SIZE // 2) * scales.shape[-1]})"
        )
    bad = scales == SCALE_NAN
    if bool(bad.any()):
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"MXFP4 scale 0xFF (NaN) at block index {idx} ({int(bad.sum())} NaN scale(s) in total); "
            "the quantised block held NaN/Inf"
        )

    work = torch.float64 if dtype == torch.float64 else torch.float32
    k = blocks.shape[-1] * 2
    vals = E2M1_VALUES.to(device=blocks.device, dtype=work)[unpack_codes(blocks).long()]
    s = scale_values(scales).to(work)
    out = vals.reshape(*scales.shape, BLOCK_SIZE) * s.unsqueeze(-1)
    return out.reshape(*blocks.shape[:-1], k).to(dtype)
