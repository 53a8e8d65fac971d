"""Numba kernels of the reference codecs.

Values travel as bit patterns: 16-bit floats (f16, bf16) as ``uint16`` arrays,
f32 as ``uint32`` arrays, so that every decoder output can be compared bit for
bit. ``kind`` selects the element type of both the source cache and the
decoder output: 0 = f16, 1 = bf16, 2 = f32 (see ``KIND_OF_TYPE``).

The decode arithmetic follows SPEC.md "Decode arithmetic" exactly. Encoders are
not normative except ``quantize_q4_0_ggml`` / ``quantize_q8_0_ggml``, which
reproduce ggml's ``quantize_row_q4_0_ref`` / ``quantize_row_q8_0_ref``.

Loops are parallel over independent units (rows for the plain codecs, keyframe
chunks for the delta codecs) and vectorisable over columns inside a unit.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..numerics import F16_TO_F32, f32_as_u32, f32_bits_to_bf16_bits, f32_bits_to_f16_bits

KIND_F16 = 0
KIND_BF16 = 1
KIND_F32 = 2

Q4_0_BLOCK_BYTES = 18
Q8_0_BLOCK_BYTES = 34
BLOCK_VALUES = 32


# ---- element conversion ---------------------------------------------------------


@njit(inline="always", cache=True)
def _load_row(src_row, kind, lut, dst):
    """Source bit patterns -> float32 values (exact)."""
    n = dst.shape[0]
    if kind == KIND_F16:
        for c in range(n):
            dst[c] = lut[src_row[c]]
    elif kind == KIND_BF16:
        bits = dst.view(np.uint32)
        for c in range(n):
            bits[c] = np.uint32(src_row[c]) << 16
    else:
        bits = dst.view(np.uint32)
        for c in range(n):
            bits[c] = src_row[c]


@njit(inline="always", cache=True)
def _store_row(values, kind, dst_row):
    """float32 values -> output bit patterns (SPEC.md: RNE, saturating, canonical NaN)."""
    n = values.shape[0]
    bits = values.view(np.uint32)
    if kind == KIND_F16:
        for c in range(n):
            dst_row[c] = f32_bits_to_f16_bits(np.int64(bits[c]))
    elif kind == KIND_BF16:
        for c in range(n):
            dst_row[c] = f32_bits_to_bf16_bits(np.int64(bits[c]))
    else:
        for c in range(n):
            dst_row[c] = bits[c]


@njit(cache=True)
def f16_bits_from_f32(values):
    """Vectorised f32 -> f16 bits for whole arrays (used by the f16 codec and tests)."""
    flat = values.ravel()
    out = np.empty(flat.shape[0], np.uint16)
    bits = flat.view(np.uint32)
    for i in range(flat.shape[0]):
        out[i] = f32_bits_to_f16_bits(np.int64(bits[i]))
    return out.reshape(values.shape)


@njit(parallel=True, cache=True)
def rows_to_f32(src, kind, lut):
    out = np.empty(src.shape, np.float32)
    for r in prange(src.shape[0]):
        _load_row(src[r], kind, lut, out[r])
    return out


@njit(parallel=True, cache=True)
def rows_from_f32(values, kind, out):
    for r in prange(values.shape[0]):
        _store_row(values[r], kind, out[r])


# ---- ggml Q4_0 / Q8_0 -----------------------------------------------------------


@njit(inline="always", cache=True)
def _f32_bits(x):
    return np.int64(f32_as_u32(np.float32(x)))


@njit(inline="always", cache=True)
def _f16_bits(x):
    """Saturating f32 -> f16 bits (scales chosen by deltakv's own encoders)."""
    return f32_bits_to_f16_bits(_f32_bits(x))


@njit(inline="always", cache=True)
def _f16_bits_ggml(x):
    """GGML_FP32_TO_FP16: IEEE round to nearest even, overflow to infinity."""
    a = _f32_bits(x) & 0x7FFFFFFF
    if a < 0x7F800000 and a >= 0x477FF000:
        return ((_f32_bits(x) >> 16) & 0x8000) | 0x7C00
    return f32_bits_to_f16_bits(_f32_bits(x))


@njit(inline="always", cache=True)
def _quantize_block_q4_0_ggml(x, out):
    """ggml quantize_row_q4_0_ref for one block of 32 values, bit for bit."""
    amax = np.float32(0.0)
    vmax = np.float32(0.0)
    for j in range(BLOCK_VALUES):
        v = x[j]
        if amax < abs(v):
            amax = abs(v)
            vmax = v
    d = vmax / np.float32(-8.0)
    inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
    h = _f16_bits_ggml(d)
    out[0] = h & 0xFF
    out[1] = h >> 8
    for j in range(16):
        x0 = x[j] * inv
        x1 = x[16 + j] * inv
        # (int8_t)(x + 8.5f): C truncates toward zero, then the 8-bit wrap.
        q0 = np.int8(np.int32(x0 + np.float32(8.5)))
        q1 = np.int8(np.int32(x1 + np.float32(8.5)))
        q0 = min(np.int8(15), q0)
        q1 = min(np.int8(15), q1)
        out[2 + j] = np.uint8(q0 & 0xF) | np.uint8((q1 & 0xF) << 4)


@njit(parallel=True, cache=True)
def quantize_q4_0_ggml(x):
    n_rows, n_cols = x.shape
    nb = n_cols // BLOCK_VALUES
    out = np.empty((n_rows, nb * Q4_0_BLOCK_BYTES), np.uint8)
    for r in prange(n_rows):
        for b in range(nb):
            _quantize_block_q4_0_ggml(
                x[r, b * BLOCK_VALUES:(b + 1) * BLOCK_VALUES],
                out[r, b * Q4_0_BLOCK_BYTES:(b + 1) * Q4_0_BLOCK_BYTES],
            )
    return out


@njit(inline="always", cache=True)
def _round_half_away(v):
    """C roundf: nearest integer, halfway cases away from zero (floor(x + 0.5) is not it)."""
    a = abs(v)
    t = np.floor(a)
    if a - t >= np.float32(0.5):
        t += np.float32(1.0)
    return t if v >= 0 else -t


@njit(parallel=True, cache=True)
def quantize_q8_0_ggml(x):
    """ggml quantize_row_q8_0_ref, bit for bit."""
    n_rows, n_cols = x.shape
    nb = n_cols // BLOCK_VALUES
    out = np.empty((n_rows, nb * Q8_0_BLOCK_BYTES), np.uint8)
    for r in prange(n_rows):
        for b in range(nb):
            blk = x[r, b * BLOCK_VALUES:(b + 1) * BLOCK_VALUES]
            o = out[r, b * Q8_0_BLOCK_BYTES:(b + 1) * Q8_0_BLOCK_BYTES]
            amax = np.float32(0.0)
            for j in range(BLOCK_VALUES):
                amax = max(amax, abs(blk[j]))
            d = amax / np.float32(127.0)
            inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
            h = _f16_bits_ggml(d)
            o[0] = h & 0xFF
            o[1] = h >> 8
            for j in range(BLOCK_VALUES):
                o[2 + j] = np.uint8(np.int8(np.int32(_round_half_away(blk[j] * inv))) & 0xFF)
    return out


@njit(parallel=True, cache=True)
def dequantize_q4_0(blocks, n_cols, kind, lut, out):
    """Q4_0 rows -> output bits: v = f32(d) * f32(q - 8), one rounding to the output type."""
    nb = n_cols // BLOCK_VALUES
    for r in prange(blocks.shape[0]):
        tmp = np.empty(n_cols, np.float32)
        row = blocks[r]
        for b in range(nb):
            base = b * Q4_0_BLOCK_BYTES
            d = lut[np.uint16(row[base]) | (np.uint16(row[base + 1]) << 8)]
            for j in range(16):
                byte = row[base + 2 + j]
                tmp[b * 32 + j] = d * np.float32(np.int32(byte & 0xF) - 8)
                tmp[b * 32 + 16 + j] = d * np.float32(np.int32(byte >> 4) - 8)
        _store_row(tmp, kind, out[r])


@njit(parallel=True, cache=True)
def dequantize_q8_0(blocks, n_cols, kind, lut, out):
    """Q8_0 rows -> output bits: v = f32(d) * f32(q), one rounding to the output type."""
    nb = n_cols // BLOCK_VALUES
    for r in prange(blocks.shape[0]):
        tmp = np.empty(n_cols, np.float32)
        row = blocks[r]
        for b in range(nb):
            base = b * Q8_0_BLOCK_BYTES
            d = lut[np.uint16(row[base]) | (np.uint16(row[base + 1]) << 8)]
            for j in range(32):
                tmp[b * 32 + j] = d * np.float32(np.int8(row[base + 2 + j]))
        _store_row(tmp, kind, out[r])


# ---- Walsh-Hadamard rotation ------------------------------------------------------


@njit(inline="always", cache=True)
def _hadamard_inplace(v, size):
    """Normalised Walsh-Hadamard transform of each group of ``size`` values, in place.

    Butterfly order is normative (SPEC.md): stages h = 1, 2, 4, ..., size/2; in each
    stage pairs (j, j + h) for j in groups of 2h, a' = a + b, b' = a - b; then every
    value is multiplied by 1/sqrt(size), an exact power of two for sizes 16, 64, 256.
    The transform is its own inverse.
    """
    n = v.shape[0]
    scale = np.float32(0.25) if size == 16 else (np.float32(0.125) if size == 64 else np.float32(0.0625))
    h = 1
    while h < size:
        for start in range(0, n, 2 * h):
            for j in range(start, start + h):
                a = v[j]
                b = v[j + h]
                v[j] = a + b
                v[j + h] = a - b
        h *= 2
    for c in range(n):
        v[c] = v[c] * scale


# ---- delta codecs: decode ---------------------------------------------------------


@njit(inline="always", cache=True)
def _apply_delta_row(state, qrow, mrow, has_modes, lut):
    """state <- (inter ? state : 0) + f32(d) * f32(q - 8), per Q4_0 block (SPEC.md)."""
    nb = state.shape[0] // BLOCK_VALUES
    for b in range(nb):
        base = b * Q4_0_BLOCK_BYTES
        d = lut[np.uint16(qrow[base]) | (np.uint16(qrow[base + 1]) << 8)]
        inter = True
        if has_modes:
            inter = ((mrow[b >> 3] >> (b & 7)) & 1) == 1
        off = b * BLOCK_VALUES
        if inter:
            for j in range(16):
                byte = qrow[base + 2 + j]
                state[off + j] = state[off + j] + d * np.float32(np.int32(byte & 0xF) - 8)
                state[off + 16 + j] = state[off + 16 + j] + d * np.float32(np.int32(byte >> 4) - 8)
        else:
            for j in range(16):
                byte = qrow[base + 2 + j]
                state[off + j] = d * np.float32(np.int32(byte & 0xF) - 8)
                state[off + 16 + j] = d * np.float32(np.int32(byte >> 4) - 8)


@njit(parallel=True, cache=True)
def decode_delta(keys, deltas, modes, has_modes, interval, rotation, kind, lut, row_lo, row_hi, out):
    """Decode local rows [row_lo, row_hi) of one delta-coded segment into ``out``.

    The segment starts on a keyframe. Local row i is a keyframe when i % interval == 0
    (stored in ``keys[i // interval]``), otherwise a delta row stored in
    ``deltas[i - i // interval - 1]``.
    """
    n_cols = out.shape[1]
    first_chunk = row_lo // interval
    last_chunk = (row_hi + interval - 1) // interval
    for chunk in prange(first_chunk, last_chunk):
        state = np.empty(n_cols, np.float32)
        emit = np.empty(n_cols, np.float32)
        start = chunk * interval
        stop = min(start + interval, row_hi)
        key = keys[chunk]
        if start >= row_lo:
            out[start - row_lo, :] = key
        _load_row(key, kind, lut, state)
        if rotation:
            _hadamard_inplace(state, rotation)
        for i in range(start + 1, stop):
            d_index = i - chunk - 1
            _apply_delta_row(state, deltas[d_index], modes[d_index], has_modes, lut)
            if i >= row_lo:
                if rotation:
                    emit[:] = state
                    _hadamard_inplace(emit, rotation)
                    _store_row(emit, kind, out[i - row_lo])
                else:
                    _store_row(state, kind, out[i - row_lo])


# ---- delta codecs: encode ---------------------------------------------------------


@njit(inline="always", cache=True)
def _rne(v):
    # Round half to even in f32: np.rint does exactly that.
    return np.rint(v)


@njit(inline="always", cache=True)
def _block_error(target, base, inter, d, q):
    err = np.float32(0.0)
    for j in range(BLOCK_VALUES):
        r = d * np.float32(q[j] - 8)
        if inter:
            r = base[j] + r
        e = r - target[j]
        err += e * e
    return err


@njit(inline="always", cache=True)
def _codes_for_scale(residual, d, q):
    inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
    for j in range(BLOCK_VALUES):
        v = _rne(residual[j] * inv) + np.float32(8.0)
        if v < 0:
            v = np.float32(0.0)
        if v > 15:
            v = np.float32(15.0)
        q[j] = np.int32(v)


@njit(inline="always", cache=True)
def _search_block(target, base, inter, residual, lut, q_best, q_try):
    """Pick a Q4_0 scale for one block minimising the reconstruction error (encoder freedom).

    Candidates: the signed max-abs value mapped to each of several code levels, then one
    least-squares refinement. Returns (error, f16 bits of the scale); codes in q_best.
    """
    amax = np.float32(0.0)
    vmax = np.float32(0.0)
    for j in range(BLOCK_VALUES):
        if amax < abs(residual[j]):
            amax = abs(residual[j])
            vmax = residual[j]
    best_err = np.float32(np.inf)
    best_h = 0
    if amax == 0:
        for j in range(BLOCK_VALUES):
            q_best[j] = 8
        return _block_error(target, base, inter, np.float32(0.0), q_best), 0
    for level in (np.float32(-8.0), np.float32(-7.5), np.float32(-7.0), np.float32(-6.5),
                  np.float32(7.0), np.float32(6.5), np.float32(6.0)):
        h = _f16_bits(vmax / level)
        d = lut[h]
        _codes_for_scale(residual, d, q_try)
        err = _block_error(target, base, inter, d, q_try)
        if err < best_err:
            best_err = err
            best_h = h
            q_best[:] = q_try
    # Least-squares scale for the chosen codes, then requantise once.
    num = np.float32(0.0)
    den = np.float32(0.0)
    for j in range(BLOCK_VALUES):
        k = np.float32(q_best[j] - 8)
        num += residual[j] * k
        den += k * k
    if den > 0:
        h = _f16_bits(num / den)
        d = lut[h]
        if d == d and abs(d) < np.float32(65504.0):
            _codes_for_scale(residual, d, q_try)
            err = _block_error(target, base, inter, d, q_try)
            if err < best_err:
                best_err = err
                best_h = h
                q_best[:] = q_try
    return best_err, best_h


@njit(inline="always", cache=True)
def _write_block(qrow, b, h, q):
    base = b * Q4_0_BLOCK_BYTES
    qrow[base] = h & 0xFF
    qrow[base + 1] = h >> 8
    for j in range(16):
        qrow[base + 2 + j] = np.uint8(q[j]) | np.uint8(q[16 + j] << 4)


@njit(parallel=True, cache=True)
def encode_delta(src, kind, interval, rotation, adaptive, search, lut):
    """Closed-loop delta encoder: keyframes every ``interval`` rows, Q4_0 residuals between.

    ``adaptive``: choose per block between inter (residual against the previous row's
    reconstruction) and intra (the value itself), by reconstruction error.
    ``search``: choose each block's scale by error search; otherwise ggml's Q4_0 rule.
    """
    n_rows, n_cols = src.shape
    nb = n_cols // BLOCK_VALUES
    n_chunks = (n_rows + interval - 1) // interval
    n_delta = n_rows - n_chunks
    keys = np.empty((n_chunks, n_cols), src.dtype)
    deltas = np.empty((n_delta, nb * Q4_0_BLOCK_BYTES), np.uint8)
    modes = np.zeros((n_delta if adaptive else 0, (nb + 7) // 8), np.uint8)
    for chunk in prange(n_chunks):
        state = np.empty(n_cols, np.float32)
        target = np.empty(n_cols, np.float32)
        residual = np.empty(BLOCK_VALUES, np.float32)
        zeros = np.zeros(BLOCK_VALUES, np.float32)
        q_inter = np.empty(BLOCK_VALUES, np.int32)
        q_intra = np.empty(BLOCK_VALUES, np.int32)
        q_try = np.empty(BLOCK_VALUES, np.int32)
        ggml_block = np.empty(Q4_0_BLOCK_BYTES, np.uint8)
        start = chunk * interval
        stop = min(start + interval, n_rows)
        keys[chunk, :] = src[start]
        _load_row(src[start], kind, lut, state)
        if rotation:
            _hadamard_inplace(state, rotation)
        for i in range(start + 1, stop):
            d_index = i - chunk - 1
            _load_row(src[i], kind, lut, target)
            if rotation:
                _hadamard_inplace(target, rotation)
            qrow = deltas[d_index]
            for b in range(nb):
                off = b * BLOCK_VALUES
                tgt = target[off:off + BLOCK_VALUES]
                prev = state[off:off + BLOCK_VALUES]
                for j in range(BLOCK_VALUES):
                    residual[j] = tgt[j] - prev[j]
                if search:
                    err_inter, h_inter = _search_block(tgt, prev, True, residual, lut, q_inter, q_try)
                else:
                    _quantize_block_q4_0_ggml(residual, ggml_block)
                    h_inter = np.int64(ggml_block[0]) | (np.int64(ggml_block[1]) << 8)
                    for j in range(16):
                        q_inter[j] = ggml_block[2 + j] & 0xF
                        q_inter[16 + j] = ggml_block[2 + j] >> 4
                    err_inter = np.float32(0.0)
                inter = True
                h = h_inter
                if adaptive:
                    err_intra, h_intra = _search_block(tgt, zeros, False, tgt, lut, q_intra, q_try)
                    if err_intra < err_inter:
                        inter = False
                        h = h_intra
                if inter:
                    _write_block(qrow, b, h, q_inter)
                    if adaptive:
                        modes[d_index, b >> 3] |= np.uint8(1 << (b & 7))
                else:
                    _write_block(qrow, b, h, q_intra)
            # Advance the state exactly as the decoder does (closed loop).
            if adaptive:
                _apply_delta_row(state, qrow, modes[d_index], True, lut)
            else:
                _apply_delta_row(state, qrow, qrow, False, lut)
    return keys, deltas, modes
