"""Bit-exact scalar arithmetic shared by every Numba codec kernel.

SPEC.md section "Decode arithmetic" is normative; this module is its Numba
rendering. Numba cannot cast to float16 and numpy's ``astype(np.float16)`` is
slow, so conversions to 16-bit floats are written as integer bit operations
(round to nearest, ties to even; subnormals kept; finite values beyond the
largest finite 16-bit value saturate to it; infinities stay; NaN becomes a
canonical quiet NaN that keeps the sign). Conversions *from* 16-bit floats
are exact and go through a 65536-entry lookup table.

Every function here is ``inline='always'`` so that the loops calling them can
be vectorised by LLVM. ``fastmath`` is never enabled anywhere in deltakv: it
would allow fused multiply-add and flush-to-zero and break bit-exactness.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic


@intrinsic
def f32_as_u32(typingctx, x):
    """Reinterpret a float32's bits as uint32 (an LLVM bitcast: no conversion, no copy)."""
    if not isinstance(x, types.Float) or x.bitwidth != 32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


def _build_f16_to_f32_table() -> np.ndarray:
    bits = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    # numpy's float16 -> float32 widening is exact (every f16 is an f32).
    return bits.view(np.float16).astype(np.float32)


F16_TO_F32 = _build_f16_to_f32_table()
F16_TO_F32.setflags(write=False)


@njit(inline="always", cache=True)
def f32_bits_to_f16_bits(u):
    """f32 bit pattern (uint32 as int64) -> f16 bit pattern, round to nearest even."""
    sign = (u >> 16) & 0x8000
    a = u & 0x7FFFFFFF
    if a >= 0x7F800000:  # inf or NaN
        if a > 0x7F800000:
            return sign | 0x7E00
        return sign | 0x7C00
    if a >= 0x38800000:  # result is a normal f16 or overflows to inf
        mant_odd = (a >> 13) & 1
        # Re-bias the exponent (127 -> 15) and round the 13 dropped bits to even;
        # a carry out of the mantissa correctly bumps the exponent (up to inf).
        r = (a - 0x38000000 + 0x0FFF + mant_odd) >> 13
        if r >= 0x7C00:  # finite values saturate (SPEC.md: no decoder invents infinities)
            r = 0x7BFF
        return sign | r
    # f16 subnormal or zero: value / 2^-24, rounded to nearest even.
    e = a >> 23
    if e < 102:  # below 2^-25: rounds to zero (2^-25 itself is a tie to even zero)
        return sign
    m = (a & 0x7FFFFF) | 0x800000
    s = 126 - e
    q = m >> s
    rem = m & ((1 << s) - 1)
    half = 1 << (s - 1)
    if rem > half or (rem == half and (q & 1) == 1):
        q += 1
    return sign | q


@njit(inline="always", cache=True)
def f32_bits_to_bf16_bits(u):
    """f32 bit pattern -> bf16 bit pattern, round to nearest even, canonical NaN."""
    a = u & 0x7FFFFFFF
    if a > 0x7F800000:
        return ((u >> 16) & 0x8000) | 0x7FC0
    if a == 0x7F800000:
        return (u >> 16) & 0xFFFF
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) & 0xFFFF
    if (r & 0x7FFF) == 0x7F80:  # a finite value rounded up to infinity: saturate
        r -= 1
    return r


@njit(inline="always", cache=True)
def bf16_bits_to_f32_bits(h):
    return h << 16
