"""Numba kernels of the reference codecs.

Values travel as bit patterns: 16-bit floats (f16, bf16) as ``uint16`` arrays,
f32 as ``uint32`` arrays, so that every decoder output can be compared bit for
bit. ``kind`` selects the element type of both the source cache and the
decoder output: 0 = f16, 1 = bf16, 2 = f32 (see ``KIND_OF_TYPE``).

The decode arithmetic follows SPEC.md "Decode arithmetic" exactly. Encoders are
not normative except ``quantize_q4_0_ggml`` / ``quantize_q8_0_ggml``, which
reproduce ggml's ``quantize_row_q4_0_ref`` / ``quantize_row_q8_0_ref``; the
delta encoders' output is nevertheless pinned by spec/vectors/ and must not
change either.

Loops are parallel over independent units (rows for the plain codecs, keyframe
chunks for the delta codecs). The work inside a unit is done by the vector
intrinsics of ``simd.py`` (16 lanes, no fast-math: see there why that keeps
every bit). Scratch arrays are allocated once per parallel unit, never per row.

``lut`` arguments (the f16 -> f32 table) are kept for the callers' sake; the
kernels convert f16 without it (``numerics.ir_f16_to_f32``, or F16C for block
scales; the same values).

tests/test_kernels_speed_equivalence.py holds the scalar one-value-at-a-time
versions of these kernels and checks the vector ones against them. Numba's
cache keys each kernel on this file only: after editing simd.py or
numerics.py, delete codecs/__pycache__/*.nb[ic] (or touch this file).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..constants import GGML_BLOCK_SIZES, GGMLType
from ..numerics import F16_TO_F32, f16_bits_to_f32_fast  # noqa: F401 (F16_TO_F32 re-exported)
from .simd import (
    dkv_search_group,
    emit_row,
    load_row,
    q4_0_ggml_row,
    q4_apply_row,
    q4_emit_row,
    q8_0_ggml_row,
    q8_emit_row,
    wht_row,
    write_q4_codes,
)

KIND_F16 = 0
KIND_BF16 = 1
KIND_F32 = 2

# Block layouts from the one size table (numba freezes these globals into the compiled kernels).
BLOCK_VALUES, Q4_0_BLOCK_BYTES = GGML_BLOCK_SIZES[GGMLType.Q4_0]
Q8_0_BLOCK_BYTES = GGML_BLOCK_SIZES[GGMLType.Q8_0][1]

# error_model="numpy": float division by zero gives inf/nan instead of a Python exception check,
# which would put a branch into every vectorised loop. fastmath stays off (SPEC.md section 5).
_JIT = dict(cache=True, error_model="numpy")


# ---- element conversion ---------------------------------------------------------


@njit(**_JIT)
def f16_bits_from_f32(values):
    """Vectorised f32 -> f16 bits for whole arrays (used by the f16 codec and tests)."""
    flat = np.ascontiguousarray(values).ravel()
    out = np.empty(flat.shape[0], np.uint16)
    emit_row(flat, 0, out, 0, flat.shape[0], KIND_F16)
    return out.reshape(values.shape)


@njit(parallel=True, **_JIT)
def rows_to_f32(src, kind, lut):
    src = np.ascontiguousarray(src)
    n = src.shape[1]
    out = np.empty(src.shape, np.float32)
    for r in prange(src.shape[0]):
        load_row(src[r], 0, out[r], 0, n, kind)
    return out


@njit(parallel=True, **_JIT)
def rows_from_f32(values, kind, out):
    values = np.ascontiguousarray(values)
    dst = np.ascontiguousarray(out)
    n = values.shape[1]
    for r in prange(values.shape[0]):
        emit_row(values[r], 0, dst[r], 0, n, kind)
    if not out.flags.c_contiguous:
        out[:] = dst


# ---- ggml Q4_0 / Q8_0 -----------------------------------------------------------


@njit(parallel=True, **_JIT)
def quantize_q4_0_ggml(x):
    """ggml quantize_row_q4_0_ref, bit for bit (float32 rows of whole blocks)."""
    x = np.ascontiguousarray(x)
    n_rows, n_cols = x.shape
    nb = n_cols // BLOCK_VALUES
    out = np.empty((n_rows, nb * Q4_0_BLOCK_BYTES), np.uint8)
    for r in prange(n_rows):
        q4_0_ggml_row(x[r], 0, nb, out[r], 0)
    return out


@njit(parallel=True, **_JIT)
def quantize_q8_0_ggml(x):
    """ggml quantize_row_q8_0_ref, bit for bit (float32 rows of whole blocks)."""
    x = np.ascontiguousarray(x)
    n_rows, n_cols = x.shape
    nb = n_cols // BLOCK_VALUES
    out = np.empty((n_rows, nb * Q8_0_BLOCK_BYTES), np.uint8)
    for r in prange(n_rows):
        q8_0_ggml_row(x[r], 0, nb, out[r], 0)
    return out


@njit(parallel=True, **_JIT)
def dequantize_q4_0(blocks, n_cols, kind, lut, out):
    """Q4_0 rows -> output bits: v = f32(d) * f32(q - 8), one rounding to the output type."""
    blocks = np.ascontiguousarray(blocks)
    dst = np.ascontiguousarray(out)
    nb = n_cols // BLOCK_VALUES
    for r in prange(blocks.shape[0]):
        q4_emit_row(blocks[r], nb, dst[r], kind)
    if not out.flags.c_contiguous:
        out[:] = dst


@njit(parallel=True, **_JIT)
def dequantize_q8_0(blocks, n_cols, kind, lut, out):
    """Q8_0 rows -> output bits: v = f32(d) * f32(q), one rounding to the output type."""
    blocks = np.ascontiguousarray(blocks)
    dst = np.ascontiguousarray(out)
    nb = n_cols // BLOCK_VALUES
    for r in prange(blocks.shape[0]):
        q8_emit_row(blocks[r], nb, dst[r], kind)
    if not out.flags.c_contiguous:
        out[:] = dst


# ---- delta codecs: decode ---------------------------------------------------------


@njit(parallel=True, **_JIT)
def decode_delta(keys, deltas, modes, has_modes, interval, rotation, kind, lut, row_lo, row_hi, out):
    """Decode local rows [row_lo, row_hi) of one delta-coded segment into ``out``.

    The segment starts on a keyframe. Local row i is a keyframe when i % interval == 0
    (stored in ``keys[i // interval]``), otherwise a delta row stored in
    ``deltas[i - i // interval - 1]``. SPEC.md 6.2: the state S is f32; each delta row
    updates it block by block and is emitted as H_n(S) (or S) in the same pass
    (``simd.q4_apply_row``), S itself unchanged.
    """
    keys = np.ascontiguousarray(keys)
    deltas = np.ascontiguousarray(deltas)
    modes = np.ascontiguousarray(modes)
    dst = np.ascontiguousarray(out)
    n_cols = dst.shape[1]
    nb = n_cols // BLOCK_VALUES
    first_chunk = row_lo // interval
    last_chunk = (row_hi + interval - 1) // interval
    for chunk in prange(first_chunk, last_chunk):
        state = np.empty(n_cols, np.float32)
        start = chunk * interval
        stop = min(start + interval, row_hi)
        key = keys[chunk]
        if start >= row_lo:
            dst[start - row_lo, :] = key
        load_row(key, 0, state, 0, n_cols, kind)
        if rotation:
            wht_row(state, state, n_cols, rotation)
        for i in range(start + 1, stop):
            d_index = i - chunk - 1
            q4_apply_row(deltas[d_index], state, nb, modes[d_index if has_modes else 0], has_modes,
                         dst[max(i - row_lo, 0)], i >= row_lo, rotation, kind)
    if not out.flags.c_contiguous:
        out[:] = dst


# ---- delta codecs: encode ---------------------------------------------------------


@njit(parallel=True, **_JIT)
def encode_delta(src, kind, interval, rotation, adaptive, search, lut):
    """Closed-loop delta encoder: keyframes every ``interval`` rows, Q4_0 residuals between.

    ``adaptive``: choose per block between inter (residual against the previous row's
    reconstruction) and intra (the value itself), by reconstruction error.
    ``search``: choose each block's scale by error search; otherwise ggml's Q4_0 rule.

    The scale search of a block (the reference dkv-q4 encoder, SPEC.md 6.2): candidates
    f16(vmax / level) for each level of ``simd.SEARCH_LEVELS`` (vmax: the block's first value
    of largest magnitude), the first with the least squared error wins; then one
    least-squares refit f16(sum x k / sum k k) over the winner's codes k = q - 8, kept if
    strictly better. Codes are clamp(rint(x / d) + 8, 0, 15). An all-zero block gets scale
    0, codes 8, error 0. Errors use the decoder's arithmetic and are summed in value order.
    Intra wins only when its error is strictly smaller.
    """
    src = np.ascontiguousarray(src)
    n_rows, n_cols = src.shape
    nb = n_cols // BLOCK_VALUES
    n_modes = (nb + 7) // 8
    n_chunks = (n_rows + interval - 1) // interval
    n_delta = n_rows - n_chunks
    keys = np.empty((n_chunks, n_cols), src.dtype)
    deltas = np.empty((n_delta, nb * Q4_0_BLOCK_BYTES), np.uint8)
    modes = np.zeros((n_delta if adaptive else 0, n_modes), np.uint8)
    for chunk in prange(n_chunks):
        state = np.empty(n_cols, np.float32)
        target = np.empty(n_cols, np.float32)
        residual = np.empty(n_cols, np.float32)
        hs = np.empty(16, np.int32)
        inters = np.empty(16, np.int32)
        no_modes = np.zeros(n_modes, np.uint8)
        start = chunk * interval
        stop = min(start + interval, n_rows)
        keys[chunk, :] = src[start]
        load_row(src[start], 0, state, 0, n_cols, kind)
        if rotation:
            wht_row(state, state, n_cols, rotation)
        for i in range(start + 1, stop):
            d_index = i - chunk - 1
            load_row(src[i], 0, target, 0, n_cols, kind)
            if rotation:
                wht_row(target, target, n_cols, rotation)
            for c in range(n_cols):
                residual[c] = target[c] - state[c]
            qrow = deltas[d_index]
            mrow = modes[d_index] if adaptive else no_modes
            if not search:
                # ggml's Q4_0 rule on the residual; with no error computed, intra never wins.
                q4_0_ggml_row(residual, 0, nb, qrow, 0)
                if adaptive:
                    for b in range(nb):
                        mrow[b >> 3] |= np.uint8(1 << (b & 7))
            else:
                for g0 in range(0, nb, 16):
                    dkv_search_group(residual, target, state, g0, nb, adaptive, hs, inters)
                    for lane in range(min(16, nb - g0)):
                        b = g0 + lane
                        h = np.int64(hs[lane])
                        inter = inters[lane] != 0
                        write_q4_codes(residual if inter else target, b * BLOCK_VALUES, f16_bits_to_f32_fast(h),
                                       qrow, b * Q4_0_BLOCK_BYTES)
                        qrow[b * Q4_0_BLOCK_BYTES] = np.uint8(h & 0xFF)
                        qrow[b * Q4_0_BLOCK_BYTES + 1] = np.uint8(h >> 8)
                        if inter and adaptive:
                            mrow[b >> 3] |= np.uint8(1 << (b & 7))
            # Advance the state exactly as the decoder does (closed loop).
            q4_apply_row(qrow, state, nb, mrow, adaptive, keys[chunk], False, 0, kind)
    return keys, deltas, modes
