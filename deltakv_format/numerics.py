"""Bit-exact scalar arithmetic shared by every Numba codec kernel.

SPEC.md section "Decode arithmetic" is normative; this module is its Numba
rendering. Numba cannot cast to float16 and numpy's ``astype(np.float16)`` is
slow, so conversions to 16-bit floats are written as integer bit operations
(round to nearest, ties to even; subnormals kept; finite values beyond the
largest finite 16-bit value saturate to it; infinities stay; NaN becomes a
canonical quiet NaN that keeps the sign). Conversions *from* 16-bit floats
are exact: the 65536-entry table ``F16_TO_F32`` (numpy's widening), or the
integer form ``ir_f16_to_f32`` that equals it for every pattern.

Two renderings of each conversion live here: plain ``inline='always'`` Numba
functions (the readable reference, e.g. ``f32_bits_to_f16_bits``) and LLVM IR
builders (``ir_*``) that emit the same function branch-free in 32-bit lanes, for
scalars or vectors; the kernels (codecs/simd.py) use the IR builders, and
``f32_to_f16_bits_fast`` / ``f32_to_bf16_bits_fast`` / ``f16_bits_to_f32_fast``
expose them to Numba code as scalar intrinsics. tests/test_kernels_speed_equivalence.py
checks both renderings against each other.

``fastmath`` is never enabled anywhere in deltakv: it would allow fused
multiply-add and flush-to-zero and break bit-exactness.

Numba's on-disk cache keys a kernel on its own source file only: after editing
this module or codecs/simd.py, delete deltakv_format/codecs/__pycache__/*.nb[ic].
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


# ---- LLVM IR builders: the same conversions, branch-free, on scalars or vectors -------------------
#
# These emit 32-bit integer and f32 IR only (no 64-bit lanes, no branches, no table lookups), so that
# they vectorise 16 lanes wide. They serve the scalar intrinsics below and the vector kernels of
# deltakv_format/codecs/simd.py. Every one equals its plain counterpart above bit for bit (checked on
# all 2^32 f32 patterns while writing them; tests/test_kernels_speed_equivalence.py re-checks all
# 2^16 f16 patterns and millions of f32 ones).

_I32 = ir.IntType(32)
_F32 = ir.FloatType()


def _like(value, element, x):
    """A constant of ``element`` type, or a vector of them shaped like ``value``."""
    if isinstance(value.type, ir.VectorType):
        return ir.Constant(ir.VectorType(element, value.type.count), [x] * value.type.count)
    return ir.Constant(element, x)


def _ty(value, element):
    if isinstance(value.type, ir.VectorType):
        return ir.VectorType(element, value.type.count)
    return element


def ir_f32_to_f16(b, v):
    """f32 (scalar or vector) -> f16 bits as i32: SPEC.md emit (RNE, subnormals, saturation, canonical NaN)."""
    k = lambda x: _like(v, _I32, x)  # noqa: E731
    u = b.bitcast(v, _ty(v, _I32))
    sign = b.and_(b.lshr(u, k(16)), k(0x8000))
    a = b.and_(u, k(0x7FFFFFFF))
    # normal range: re-bias the exponent, round the 13 dropped bits to even (carries bump the exponent)
    odd = b.and_(b.lshr(a, k(13)), k(1))
    normal = b.lshr(b.add(b.add(a, k((0x0FFF - 0x38000000) & 0xFFFFFFFF)), odd), k(13))
    normal = b.select(b.icmp_unsigned("<", normal, k(0x7BFF)), normal, k(0x7BFF))  # saturate finite values
    # subnormal range: |v| + 0.5 lets the f32 adder round to a multiple of 2^-24 (ties to even)
    af = b.bitcast(a, _ty(v, _F32))
    sub = b.sub(b.bitcast(b.fadd(af, _like(v, _F32, 0.5)), _ty(v, _I32)), k(0x3F000000))
    r = b.select(b.icmp_unsigned("<", a, k(0x38800000)), sub, normal)
    special = b.select(b.icmp_unsigned(">", a, k(0x7F800000)), k(0x7E00), k(0x7C00))
    r = b.select(b.icmp_unsigned(">=", a, k(0x7F800000)), special, r)
    return b.or_(r, sign)


def ir_f32_to_f16_ggml(b, v):
    """GGML_FP32_TO_FP16 (IEEE RNE, finite overflow becomes infinity) as i32 bits."""
    k = lambda x: _like(v, _I32, x)  # noqa: E731
    r = ir_f32_to_f16(b, v)
    u = b.bitcast(v, _ty(v, _I32))
    a = b.and_(u, k(0x7FFFFFFF))
    over = b.and_(b.icmp_unsigned("<", a, k(0x7F800000)), b.icmp_unsigned(">=", a, k(0x477FF000)))
    return b.select(over, b.or_(b.and_(b.lshr(u, k(16)), k(0x8000)), k(0x7C00)), r)


def ir_f32_to_bf16(b, v):
    """f32 -> bf16 bits as i32: RNE, saturation of finite values, infinities kept, canonical NaN."""
    k = lambda x: _like(v, _I32, x)  # noqa: E731
    u = b.bitcast(v, _ty(v, _I32))
    a = b.and_(u, k(0x7FFFFFFF))
    hi = b.lshr(u, k(16))
    r = b.lshr(b.add(b.add(u, k(0x7FFF)), b.and_(hi, k(1))), k(16))
    r = b.select(b.icmp_unsigned("==", b.and_(r, k(0x7FFF)), k(0x7F80)), b.sub(r, k(1)), r)
    r = b.select(b.icmp_unsigned("==", a, k(0x7F800000)), hi, r)
    nan = b.or_(b.and_(hi, k(0x8000)), k(0x7FC0))
    return b.select(b.icmp_unsigned(">", a, k(0x7F800000)), nan, r)


def ir_f16_to_f32(b, h):
    """f16 bits (i32, scalar or vector, in the low 16 bits) -> f32, exactly (NaN payloads kept, like numpy)."""
    k = lambda x: _like(h, _I32, x)  # noqa: E731
    o = b.shl(b.and_(h, k(0x7FFF)), k(13))
    e = b.and_(o, k(0x0F800000))
    normal = b.add(o, k(0x38000000))  # exponent 15 -> 127 bias
    special = b.add(o, k(0x70000000))  # infinities and NaNs: exponent all ones
    # subnormal: build 2^-14 * (1 + m / 1024) and subtract 2^-14 (exact)
    sub = b.fsub(b.bitcast(b.add(o, k(0x38800000)), _ty(h, _F32)), _like(h, _F32, 2.0 ** -14))
    r = b.select(b.icmp_unsigned("==", e, k(0x0F800000)), special, normal)
    r = b.select(b.icmp_unsigned("==", e, k(0)), b.bitcast(sub, _ty(h, _I32)), r)
    r = b.or_(r, b.shl(b.and_(h, k(0x8000)), k(16)))
    return b.bitcast(r, _ty(h, _F32))


@intrinsic
def f32_to_f16_bits_fast(typingctx, x):
    """Branch-free ``f32_bits_to_f16_bits`` of a float32 value, as uint16 (vectorises in loops)."""
    if not isinstance(x, types.Float) or x.bitwidth != 32:
        return None

    def codegen(context, builder, signature, args):
        return builder.trunc(ir_f32_to_f16(builder, args[0]), ir.IntType(16))

    return types.uint16(types.float32), codegen


@intrinsic
def f32_to_bf16_bits_fast(typingctx, x):
    """Branch-free ``f32_bits_to_bf16_bits`` of a float32 value, as uint16."""
    if not isinstance(x, types.Float) or x.bitwidth != 32:
        return None

    def codegen(context, builder, signature, args):
        return builder.trunc(ir_f32_to_bf16(builder, args[0]), ir.IntType(16))

    return types.uint16(types.float32), codegen


@intrinsic
def f16_bits_to_f32_fast(typingctx, h):
    """f16 bit pattern (any integer type, low 16 bits) -> float32, exactly; equals ``F16_TO_F32[h]``."""
    if not isinstance(h, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        v = args[0]
        w = v.type.width
        v = builder.trunc(v, _I32) if w > 32 else (builder.zext(v, _I32) if w < 32 else v)
        return ir_f16_to_f32(builder, v)

    return types.float32(h), codegen
