"""Numba kernels of the ``dkv-ans`` encoder (not normative: SPEC.md 6.5 says what decodes).

They compute what the numpy arithmetic of ``dkv_ans`` computes, to the bit, so a segment's bytes do
not depend on which of the two ran (``tests/test_dkv_ans_encoder.py`` compares them with the numpy
encoder they replaced):

- integer work (codes, histograms, frequency tables, the rANS words) is exact in any order;
- float sums run in numpy's order for an axis-0 reduction (rows in order, per column); sums of
  squared integer codes are exact anyway (below 2^53 for any segment under 2^23 rows);
- numpy's ``log2`` (its own SIMD loops) and libm's may differ in the last bit. A column's class
  (``rint`` of ``bins * log2(spread)``) is therefore left to numpy (a spread is often sqrt of a
  power of two, whose key lies within a rounding of a half); the entropy estimate's log2 is libm's,
  and where the estimate lies within ``DECISION_MARGIN`` of the step search's budget, the caller
  takes numpy's (``dkv_ans._estimate_bits``): about 1e-13 of error against a margin of 1e-9, so the
  shortcut never decides what numpy would decide otherwise.

Numba's cache keys each kernel on this file only.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .ans import DIRECT_MAX, ESCAPE, MAX_SHIFT, N_SYMBOLS, PROB_BITS, PROB_SCALE, RANS_LOW, ROPE_NONE, _pair_index
from .simd import load_row

_JIT = dict(cache=True, error_model="numpy", nogil=True)

DECISION_MARGIN = 1e-9
"""How close (relative) an estimate of bits may come to the budget before numpy's decides."""

MIN_OCTAVE, MAX_OCTAVE = -5, 14  # dkv_ans._octaves clips a column's key to [-5, 14] octaves


@njit(parallel=True, **_JIT)
def values_before_rope(src, kind, table, head_dim, n_rot, mode):
    """Source element bits -> f64 values before rotary embedding: ``ans.unrotate_rows`` of
    ``ans.to_f64`` in one pass (the same operations; ``mode`` ROPE_NONE: the values as they are)."""
    n, width = src.shape
    out = np.empty((n, width), np.float64)
    n_heads = width // head_dim if head_dim > 0 else 0
    for r in prange(n):
        row = np.empty(width, np.float32)
        load_row(src[r], 0, row, 0, width, kind)
        for c in range(width):
            out[r, c] = row[c]
        if mode != ROPE_NONE:
            for h in range(n_heads):
                for i in range(n_rot // 2):
                    ia, ib = _pair_index(h, i, head_dim, n_rot, mode)
                    cs = np.float64(table[r, i, 0])
                    sn = np.float64(table[r, i, 1])
                    a = np.float64(row[ia])
                    b = np.float64(row[ib])
                    out[r, ia] = a * cs + b * sn
                    out[r, ib] = b * cs - a * sn
    return out


@njit(**_JIT)
def column_sums(x):
    """Per column, the sum of ``x`` in row order: numpy's ``x.sum(0)`` (hence ``x.mean(0)`` times n)."""
    n, width = x.shape
    total = np.zeros(width)
    for r in range(n):
        for c in range(width):
            total[c] += x[r, c]
    return total


@njit(parallel=True, **_JIT)
def subtract_means(x, means):
    """``x - means`` in place (f64); returns the largest |x - means|."""
    n, width = x.shape
    peaks = np.zeros(n)
    for r in prange(n):
        peak = 0.0
        for c in range(width):
            v = x[r, c] - means[c]
            x[r, c] = v
            peak = max(peak, abs(v))
        peaks[r] = peak
    return peaks.max() if n else 0.0


@njit(inline="always", cache=True)
def _shift_of_key(key, bins, shift_offset):
    """dkv_ans._shift_of_octave: clip(floor(key / bins) - shift_offset, 0, MAX_SHIFT)."""
    return min(max(key // bins - shift_offset, 0), MAX_SHIFT)


@njit(inline="always", cache=True)
def _symbol(high):
    return high + DIRECT_MAX if -DIRECT_MAX <= high <= DIRECT_MAX else ESCAPE


@njit(**_JIT)
def search_codes(z, step, q):
    """The codes rint(z / step) of the step search into ``q`` (int64, z's shape); returns per column
    the sum of their squares in row order (numpy's sum of ``q ** 2`` over axis 0)."""
    n, width = z.shape
    square = np.zeros(width)
    for r in range(n):
        for c in range(width):
            v = np.rint(z[r, c] / step)
            q[r, c] = np.int64(v)
            square[c] += v * v
    return square


@njit(**_JIT)
def estimate_bits(q, keys, bins, shift_offset, column_counts):
    """dkv_ans._estimate_bits of codes ``q`` whose columns have class keys ``keys`` (numpy's
    ``_octaves``, which the caller computes: its log2 is numpy's): (estimated bits, classes).

    ``column_counts`` (int64, (columns, N_SYMBOLS)) is scratch. The bits are numpy's but for the
    rounding of log2 and of the sum's order (see the module's docstring)."""
    n, width = q.shape
    n_keys = (MAX_OCTAVE - MIN_OCTAVE) * bins + 1
    class_of_key = np.full(n_keys, -1, np.int64)
    shifts = np.empty(width, np.int64)
    raw_bits = 0
    for c in range(width):
        class_of_key[keys[c] - MIN_OCTAVE * bins] = 0
        shifts[c] = _shift_of_key(keys[c], bins, shift_offset)
        raw_bits += shifts[c]
    n_classes = 0
    for k in range(n_keys):  # classes in key order, as numpy's unique gives them
        if class_of_key[k] >= 0:
            class_of_key[k] = n_classes
            n_classes += 1
    column_counts[:, :] = 0
    for r in range(n):
        for c in range(width):
            column_counts[c, _symbol(q[r, c] >> shifts[c])] += 1
    counts = np.zeros((n_classes, N_SYMBOLS), np.int64)
    for c in range(width):
        j = class_of_key[keys[c] - MIN_OCTAVE * bins]
        for s in range(N_SYMBOLS):
            counts[j, s] += column_counts[c, s]
    entropy = 0.0
    escapes = 0
    for j in range(n_classes):
        total = 0
        for s in range(N_SYMBOLS):
            total += counts[j, s]
        escapes += counts[j, ESCAPE]
        for s in range(N_SYMBOLS):
            if counts[j, s] > 0:
                entropy += counts[j, s] * np.log2(counts[j, s] / max(total, 1))
    bits = -entropy + np.float64(raw_bits * n) + np.float64(16 * escapes)
    return bits, n_classes


@njit(**_JIT)
def code_square_sums(q):
    """Per column, the sum of the squared codes in row order (f64, as numpy's mean of ``q ** 2``
    over axis 0 adds them), and the largest |code|."""
    n, width = q.shape
    square = np.zeros(width)
    peak = 0
    for r in range(n):
        for c in range(width):
            v = np.float64(q[r, c])
            square[c] += v * v
            peak = max(peak, abs(np.int64(q[r, c])))
    return square, peak


@njit(parallel=True, **_JIT)
def class_counts(q, column_class, shift, n_classes, n_threads):
    """Per class, how often each symbol occurs in codes ``q`` (int64 (n_classes, N_SYMBOLS)): the
    class of a column is ``column_class``, its symbol that of ``q >> shift`` (escape beyond +-15);
    the rows are counted in ``n_threads`` blocks."""
    n, width = q.shape
    n_blocks = max(1, min(n_threads, n // 64))
    per_block = np.zeros((n_blocks, width, N_SYMBOLS), np.int64)
    for b in prange(n_blocks):
        for r in range(b * n // n_blocks, (b + 1) * n // n_blocks):
            for c in range(width):
                per_block[b, c, _symbol(np.int64(q[r, c]) >> shift[c])] += 1
    counts = np.zeros((n_classes, N_SYMBOLS), np.int64)
    for b in range(n_blocks):
        for c in range(width):
            for s in range(N_SYMBOLS):
                counts[column_class[c], s] += per_block[b, c, s]
    return counts


@njit(**_JIT)
def frequency_tables(counts):
    """dkv_ans.normalize_frequencies of every class's counts: frequencies adding up to PROB_SCALE,
    every used symbol at least 1 (int64 (classes, N_SYMBOLS)). A table whose most frequent symbol
    would fall below 1 (impossible with 32 symbols) is returned as it is; the caller checks."""
    n_classes = counts.shape[0]
    freqs = np.zeros((n_classes, N_SYMBOLS), np.int64)
    for j in range(n_classes):
        total = 0
        top = 0
        for s in range(N_SYMBOLS):
            total += counts[j, s]
            if counts[j, s] > counts[j, top]:
                top = s  # the first of the largest, as numpy's argmax
        if total == 0:
            freqs[j, DIRECT_MAX] = PROB_SCALE
            continue
        used = 0
        for s in range(N_SYMBOLS):
            if counts[j, s] > 0:
                freqs[j, s] = max(1, (counts[j, s] * PROB_SCALE) // total)
                used += freqs[j, s]
        freqs[j, top] += PROB_SCALE - used
    return freqs


# ---- the rANS coder ------------------------------------------------------------------------------


@njit(inline="always", cache=True)
def _put_uniform(x, bits, start, buf, n):
    """Encode a symbol of frequency 2^(PROB_BITS - bits) (a uniform ``bits``-bit value) at ``start``:
    division by a power of two is a shift."""
    lg = PROB_BITS - bits
    if x >= (RANS_LOW >> PROB_BITS) << (16 + lg):
        buf[n] = np.uint16(x & 0xFFFF)
        n += 1
        x = x >> 16
    return ((x >> lg) << PROB_BITS) + (x & ((1 << lg) - 1)) + start, n


@njit(inline="always", cache=True)
def _put(x, f, inv_f, start, buf, n):
    """Encode a symbol of frequency ``f`` (1..PROB_SCALE; ``inv_f`` = 1 / f in f64) at ``start``.

    x // f through the reciprocal: x < 2^32, so x * inv_f is within 2^-20 of x / f, whose fraction is
    a multiple of 1 / f >= 2^-12: the estimate can only fall one short, on an exact quotient."""
    if x >= ((RANS_LOW >> PROB_BITS) << 16) * f:
        buf[n] = np.uint16(x & 0xFFFF)
        n += 1
        x = x >> 16
    quotient = np.int64(x * inv_f)
    rest = x - quotient * f
    if rest >= f:
        quotient += 1
        rest -= f
    return (quotient << PROB_BITS) + rest + start, n


@njit(inline="always", cache=True)
def _put_value(x, n, buf, value, j, k, freqs, inverse, cum):
    """Encode one code ``value`` of class ``j`` with ``k`` low bits: its symbols last to first (the
    decoder reads the class symbol, an escape's two bytes, the low bits)."""
    high = value >> k
    low = value - (high << k)
    if k > 8:
        x, n = _put_uniform(x, k - 8, (low >> 8) << (PROB_BITS - (k - 8)), buf, n)
    if k > 0:
        k1 = min(k, 8)
        x, n = _put_uniform(x, k1, (low & ((1 << k1) - 1)) << (PROB_BITS - k1), buf, n)
    if -DIRECT_MAX <= high <= DIRECT_MAX:
        sym = high + DIRECT_MAX
        x, n = _put(x, freqs[j, sym], inverse[j, sym], cum[j, sym], buf, n)
    else:
        u = high & 0xFFFF
        x, n = _put_uniform(x, 8, (u >> 8) << (PROB_BITS - 8), buf, n)
        x, n = _put_uniform(x, 8, (u & 0xFF) << (PROB_BITS - 8), buf, n)
        x, n = _put(x, freqs[j, ESCAPE], inverse[j, ESCAPE], cum[j, ESCAPE], buf, n)
    return x, n


@njit(inline="always", cache=True)
def _flush(x, n, buf):
    """The final state, as the first two words the decoder reads."""
    buf[n] = np.uint16(x >> 16)
    buf[n + 1] = np.uint16(x & 0xFFFF)
    return n + 2


LANES = 4  # streams coded together by one thread: their state updates are independent (latency hidden)


@njit(parallel=True, **_JIT)
def encode_streams(q, classes, shifts, freqs, cum, stream_rows, s0, s1):
    """rANS-code streams [s0, s1) of integer codes ``q`` (rows, width): (words per stream
    (s1 - s0, capacity), their lengths); stream i's words, in decoding order, are the last
    ``lengths[i]`` of row i.

    The words of ``ans.encode_streams`` (which lists every symbol, then codes the list backwards):
    here the values are visited backwards, each value's symbols last to first, and the words are
    written from the row's end towards its start, so neither a list nor a reversal is needed.
    Whole streams go LANES at a time (one rANS state each, interleaved), the rest one by one."""
    n_rows, width = q.shape
    capacity = stream_rows * width * 5 + 2
    n_classes = freqs.shape[0]
    inverse = np.empty((n_classes, N_SYMBOLS))
    for j in range(n_classes):
        for s in range(N_SYMBOLS):
            inverse[j, s] = 1.0 / max(freqs[j, s], 1)
    column_shift = np.empty(width, np.int64)
    for c in range(width):
        column_shift[c] = shifts[classes[c]]
    lengths = np.zeros(s1 - s0, np.int64)
    out = np.empty((s1 - s0, capacity), np.uint16)
    n_whole = max(min(s1, n_rows // stream_rows) - s0, 0)  # streams of stream_rows rows
    n_groups = n_whole // LANES
    for g in prange(n_groups):
        si = g * LANES
        r0 = (s0 + si) * stream_rows
        ba = out[si, ::-1]  # the words as they are emitted: the last one decoded comes first
        bb = out[si + 1, ::-1]
        bc = out[si + 2, ::-1]
        bd = out[si + 3, ::-1]
        na = nb = nc = nd = 0
        xa = xb = xc = xd = np.int64(RANS_LOW)
        for i in range(stream_rows - 1, -1, -1):
            r = r0 + i
            for c in range(width - 1, -1, -1):
                j = classes[c]
                k = column_shift[c]
                xa, na = _put_value(xa, na, ba, np.int64(q[r, c]), j, k, freqs, inverse, cum)
                xb, nb = _put_value(xb, nb, bb, np.int64(q[r + stream_rows, c]), j, k, freqs, inverse, cum)
                xc, nc = _put_value(xc, nc, bc, np.int64(q[r + 2 * stream_rows, c]), j, k, freqs, inverse, cum)
                xd, nd = _put_value(xd, nd, bd, np.int64(q[r + 3 * stream_rows, c]), j, k, freqs, inverse, cum)
        lengths[si] = _flush(xa, na, ba)
        lengths[si + 1] = _flush(xb, nb, bb)
        lengths[si + 2] = _flush(xc, nc, bc)
        lengths[si + 3] = _flush(xd, nd, bd)
    for si in prange(n_groups * LANES, s1 - s0):
        r0 = (s0 + si) * stream_rows
        r1 = min(r0 + stream_rows, n_rows)
        buf = out[si, ::-1]
        n = 0
        x = np.int64(RANS_LOW)
        for r in range(r1 - 1, r0 - 1, -1):
            for c in range(width - 1, -1, -1):
                x, n = _put_value(x, n, buf, np.int64(q[r, c]), classes[c], column_shift[c], freqs, inverse, cum)
        lengths[si] = _flush(x, n, buf)
    return out, lengths
