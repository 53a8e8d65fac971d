"""Kernels of the ``dkv-ans`` codec (SPEC.md 6.5): rotary positions undone, one uniform step, rANS.

A track segment's coded rows are split into rANS streams of ``stream_rows`` rows each (independent:
decoded in parallel here and one GPU thread each there). Per value the decoder reads one symbol of
its column's class table (12-bit probabilities), an escape's two bytes where the symbol says so,
and the class's ``shift`` low bits as uniform symbols; the integer ``q`` times the step plus the
column mean is the value before rotary embedding; each head's pairs are then rotated by the cell's
position with the angles of :func:`rope_cos_sin`, computed in f64 by the operations SPEC.md 6.5
lists (no libm: every platform gets the same bits), and the row is emitted in the cache's type.

The encoders here are not normative (any encoder whose output decodes as SPEC.md says is valid);
the decoder and :func:`rope_cos_sin` are. Numba's cache keys each kernel on this file only.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .simd import emit_row, load_row

_JIT = dict(cache=True, error_model="numpy")

PROB_BITS = 12
PROB_SCALE = 1 << PROB_BITS  # every class table's frequencies add up to this
RANS_LOW = 1 << 16  # the state lives in [RANS_LOW, 2^32); 16-bit words are read and written
N_SYMBOLS = 32  # symbols 0..30 stand for q' = s - 15; 31 is the escape
ESCAPE = 31
DIRECT_MAX = 15
MAX_SHIFT = 12
MAX_CLASSES = 64
ROPE_NONE, ROPE_NORM, ROPE_NEOX = 0, 1, 2

# The f64 constants of SPEC.md 6.5 (trigonometry without libm), as exact hex literals.
TWO_OVER_PI = float.fromhex("0x1.45f306dc9c883p-1")
PIO2_HI = float.fromhex("0x1.921fb00000000p+0")  # pi/2 with 22 significant bits: k * PIO2_HI is exact
PIO2_LO = float.fromhex("0x1.5110b4611a626p-22")  # pi/2 - PIO2_HI
SIN_COEFFS = tuple(float.fromhex(h) for h in (
    "-0x1.5555555555555p-3", "0x1.1111111111111p-7", "-0x1.a01a01a01a01ap-13", "0x1.71de3a556c734p-19",
    "-0x1.ae64567f544e4p-26", "0x1.6124613a86d09p-33", "-0x1.ae7f3e733b81fp-41", "0x1.952c77030ad4ap-49"))
COS_COEFFS = tuple(float.fromhex(h) for h in (
    "-0x1.0000000000000p-1", "0x1.5555555555555p-5", "-0x1.6c16c16c16c17p-10", "0x1.a01a01a01a01ap-16",
    "-0x1.27e4fb7789f5cp-22", "0x1.1eed8eff8d898p-29", "-0x1.93974a8c07c9dp-37", "0x1.ae7f3e733b81fp-45",
    "-0x1.6827863b97d97p-53"))
S1, S3, S5, S7, S9, S11, S13, S15 = SIN_COEFFS
C1, C2, C3, C4, C5, C6, C7, C8, C9 = COS_COEFFS


# ---- rotary angles (normative) -----------------------------------------------------------------


@njit(inline="always", cache=True)
def rope_cos_sin(position, theta):
    """cos and sin (as f32) of ``position * theta`` by SPEC.md 6.5: f64, every operation rounded, no FMA."""
    a = np.float64(position) * np.float64(theta)
    k = np.rint(a * TWO_OVER_PI)
    r = (a - k * PIO2_HI) - k * PIO2_LO
    z = r * r
    s = S15
    s = S13 + z * s
    s = S11 + z * s
    s = S9 + z * s
    s = S7 + z * s
    s = S5 + z * s
    s = S3 + z * s
    s = S1 + z * s
    sin_r = r + (r * z) * s
    c = C9
    c = C8 + z * c
    c = C7 + z * c
    c = C6 + z * c
    c = C5 + z * c
    c = C4 + z * c
    c = C3 + z * c
    c = C2 + z * c
    c = C1 + z * c
    cos_r = 1.0 + z * c
    quadrant = np.int64(k) & 3
    if quadrant == 0:
        cs, sn = cos_r, sin_r
    elif quadrant == 1:
        cs, sn = -sin_r, cos_r
    elif quadrant == 2:
        cs, sn = -cos_r, -sin_r
    else:
        cs, sn = sin_r, -cos_r
    return np.float32(cs), np.float32(sn)


@njit(cache=True)
def rope_thetas(n_rot, theta_scale, freq_scale):
    """theta_i (f32) of pair i: ``t_0 = 1; theta_i = freq_scale * t_i; t_{i+1} = t_i * theta_scale``."""
    out = np.empty(n_rot // 2, np.float32)
    t = np.float32(1.0)
    for i in range(n_rot // 2):
        out[i] = np.float32(freq_scale) * t
        t = t * np.float32(theta_scale)
    return out


@njit(cache=True)
def rope_table(positions, thetas):
    """(rows, pairs, 2) f32 cos/sin of every row's position and pair."""
    n = positions.shape[0]
    m = thetas.shape[0]
    out = np.empty((n, m, 2), np.float32)
    for r in range(n):
        for i in range(m):
            c, s = rope_cos_sin(positions[r], thetas[i])
            out[r, i, 0] = c
            out[r, i, 1] = s
    return out


@njit(inline="always", cache=True)
def _pair_index(h, i, head_dim, n_rot, mode):
    base = h * head_dim
    if mode == ROPE_NORM:
        return base + 2 * i, base + 2 * i + 1
    return base + i, base + i + n_rot // 2


@njit(inline="always", cache=True)
def _rotate_row(v, table_row, n_heads, head_dim, n_rot, mode):
    """Apply the rotation to f32 row ``v`` in place: a' = a c - b s, b' = a s + b c (f32, in this order)."""
    for h in range(n_heads):
        for i in range(n_rot // 2):
            ia, ib = _pair_index(h, i, head_dim, n_rot, mode)
            c = table_row[i, 0]
            s = table_row[i, 1]
            a = v[ia]
            b = v[ib]
            v[ia] = a * c - b * s
            v[ib] = a * s + b * c


@njit(parallel=True, cache=True)
def unrotate_rows(values, table, head_dim, n_rot, mode):
    """Encoder side: f64 values before rotary embedding, by the decoder's own cos/sin (its inverse)."""
    n, width = values.shape
    out = values.copy()
    n_heads = width // head_dim
    for r in prange(n):
        for h in range(n_heads):
            for i in range(n_rot // 2):
                ia, ib = _pair_index(h, i, head_dim, n_rot, mode)
                c = np.float64(table[r, i, 0])
                s = np.float64(table[r, i, 1])
                a = values[r, ia]
                b = values[r, ib]
                out[r, ia] = a * c + b * s
                out[r, ib] = b * c - a * s
    return out


# ---- rANS decoding (normative) -------------------------------------------------------------------


@njit(cache=True)
def build_decode_table(freqs):
    """Per class and 12-bit slot: symbol | frequency << 5 | (slot - cumulative frequency) << 18."""
    n_classes = freqs.shape[0]
    table = np.empty((n_classes, PROB_SCALE), np.uint32)
    for j in range(n_classes):
        total = 0
        for s in range(N_SYMBOLS):
            f = np.int64(freqs[j, s])
            for slot in range(total, total + f):
                table[j, slot] = np.uint32(s | (f << 5) | ((slot - total) << 18))
            total += f
    return table


@njit(inline="always", cache=True)
def _next_word(x, words, w, last):
    """Renormalise, without a branch: below RANS_LOW the state takes in the next word. Reads past the
    stream's end are clamped to the array and counted, so the end-of-stream check (w == end) catches them."""
    need = np.int64(x < RANS_LOW)
    word = np.int64(words[min(w, last)])
    return (x << (need * 16)) | (word * need), w + need


@njit(inline="always", cache=True)
def _uniform_bits(x, words, w, last, bits):
    """A uniform ``bits``-bit symbol (0..8 bits; frequency 2^(12 - bits) each). Zero bits: the identity."""
    slot = x & (PROB_SCALE - 1)
    v = slot >> (PROB_BITS - bits)
    x = ((x >> PROB_BITS) << (PROB_BITS - bits)) + (slot & ((1 << (PROB_BITS - bits)) - 1))
    x, w = _next_word(x, words, w, last)
    return v, x, w


@njit(inline="always", cache=True)
def _decode_code(x, w, dec, j, k, words, last):
    """One value's integer code q (SPEC.md 6.5): its class symbol, an escape's two bytes, its k low bits."""
    e = np.int64(dec[j, x & (PROB_SCALE - 1)])
    sym = e & 31
    x = ((e >> 5) & 0x1FFF) * (x >> PROB_BITS) + (e >> 18)
    x, w = _next_word(x, words, w, last)
    if sym == ESCAPE:
        lo8, x, w = _uniform_bits(x, words, w, last, 8)
        hi8, x, w = _uniform_bits(x, words, w, last, 8)
        u = lo8 | (hi8 << 8)
        qq = u - 65536 if u >= 32768 else u
    else:
        qq = sym - DIRECT_MAX
    if k == 0:
        return qq, x, w
    low, x, w = _uniform_bits(x, words, w, last, min(k, 8))
    if k > 8:
        high, x, w = _uniform_bits(x, words, w, last, k - 8)
        low = low | (high << 8)
    return qq * (1 << k) + low, x, w


@njit(inline="always", cache=True)
def _stream_bounds(starts, s, n_words):
    w = np.int64(starts[s])
    return w, (np.int64(starts[s + 1]) if s + 1 < starts.shape[0] else np.int64(n_words))


@njit(inline="always", cache=True)
def _initial_state(words, w):
    return np.int64(words[w]) | (np.int64(words[w + 1]) << 16), w + 2


@njit(inline="always", cache=True)
def _finish_row(v, r, row_lo, row_hi, table, n_heads, head_dim, n_rot, mode, kind, out):
    if row_lo <= r < row_hi:
        if mode != ROPE_NONE:
            _rotate_row(v, table[r - row_lo], n_heads, head_dim, n_rot, mode)
        emit_row(v, 0, out[r - row_lo], 0, v.shape[0], kind)


LANES = 4  # streams decoded together by one thread: their state updates are independent (latency hidden)


@njit(parallel=True, **_JIT)
def decode_streams(words, starts, n_words, n_rows, stream_rows, classes, shifts, freqs, step, means,
                   kind, table, head_dim, n_rot, mode, row_lo, row_hi, out):
    """Decode coded rows [row_lo, row_hi) into ``out`` (element bits); returns the first corrupt stream or -1.

    ``table``: (rows, pairs, 2) f32 cos/sin for the rows [row_lo, row_hi) (unused when mode is 0).
    A stream read to its end must end in the encoder's initial state having used exactly its words.
    Whole streams that end by row_hi go LANES at a time (same symbol count each); the rest one by one,
    stopping at row_hi (the end-of-stream check is then skipped, as SPEC.md 6.5 allows)."""
    width = classes.shape[0]
    dec = build_decode_table(freqs)
    column_shift = np.empty(width, np.int64)
    for c in range(width):
        column_shift[c] = shifts[classes[c]]
    first_stream = row_lo // stream_rows
    last_stream = (row_hi + stream_rows - 1) // stream_rows
    # streams that end by row_hi, read to their end (a stream reaching past row_hi stops there, below)
    n_full = max(min(last_stream, min(n_rows, row_hi) // stream_rows) - first_stream, 0)
    n_groups = n_full // LANES
    bad_stream = np.full(max(last_stream - first_stream, 0), -1, np.int64)
    n_heads = width // head_dim if head_dim > 0 else 0
    last = max(np.int64(n_words) - 1, 0)
    for g in prange(n_groups):
        s0 = first_stream + g * LANES
        wa, ea = _stream_bounds(starts, s0, n_words)
        wb, eb = _stream_bounds(starts, s0 + 1, n_words)
        wc, ec = _stream_bounds(starts, s0 + 2, n_words)
        wd, ed = _stream_bounds(starts, s0 + 3, n_words)
        if ea - wa < 2 or eb - wb < 2 or ec - wc < 2 or ed - wd < 2 or ed > n_words:
            for lane in range(LANES):
                bad_stream[g * LANES + lane] = s0 + lane
            continue
        xa, wa = _initial_state(words, wa)
        xb, wb = _initial_state(words, wb)
        xc, wc = _initial_state(words, wc)
        xd, wd = _initial_state(words, wd)
        va = np.empty(width, np.float32)
        vb = np.empty(width, np.float32)
        vc = np.empty(width, np.float32)
        vd = np.empty(width, np.float32)
        for i in range(stream_rows):
            for c in range(width):
                j = classes[c]
                k = column_shift[c]
                m = means[c]
                qa, xa, wa = _decode_code(xa, wa, dec, j, k, words, last)
                qb, xb, wb = _decode_code(xb, wb, dec, j, k, words, last)
                qc, xc, wc = _decode_code(xc, wc, dec, j, k, words, last)
                qd, xd, wd = _decode_code(xd, wd, dec, j, k, words, last)
                va[c] = np.float32(qa) * step + m
                vb[c] = np.float32(qb) * step + m
                vc[c] = np.float32(qc) * step + m
                vd[c] = np.float32(qd) * step + m
            r = s0 * stream_rows + i
            _finish_row(va, r, row_lo, row_hi, table, n_heads, head_dim, n_rot, mode, kind, out)
            _finish_row(vb, r + stream_rows, row_lo, row_hi, table, n_heads, head_dim, n_rot, mode, kind, out)
            _finish_row(vc, r + 2 * stream_rows, row_lo, row_hi, table, n_heads, head_dim, n_rot, mode, kind, out)
            _finish_row(vd, r + 3 * stream_rows, row_lo, row_hi, table, n_heads, head_dim, n_rot, mode, kind, out)
        base = g * LANES
        if xa != RANS_LOW or wa != ea:
            bad_stream[base] = s0
        if xb != RANS_LOW or wb != eb:
            bad_stream[base + 1] = s0 + 1
        if xc != RANS_LOW or wc != ec:
            bad_stream[base + 2] = s0 + 2
        if xd != RANS_LOW or wd != ed:
            bad_stream[base + 3] = s0 + 3
    for si in prange(n_groups * LANES, last_stream - first_stream):
        s = first_stream + si
        w, w_end = _stream_bounds(starts, s, n_words)
        v = np.empty(width, np.float32)
        if w_end - w < 2 or w_end > n_words:
            bad_stream[si] = s
            continue
        x, w = _initial_state(words, w)
        r0 = s * stream_rows
        r1 = min(r0 + stream_rows, n_rows)
        r_stop = min(r1, row_hi)
        for r in range(r0, r_stop):
            for c in range(width):
                qq, x, w = _decode_code(x, w, dec, classes[c], column_shift[c], words, last)
                v[c] = np.float32(qq) * step + means[c]
            if w > w_end:
                break  # ran past its words: corrupt (reported below)
            _finish_row(v, r, row_lo, row_hi, table, n_heads, head_dim, n_rot, mode, kind, out)
        if w > w_end or (r_stop == r1 and (x != RANS_LOW or w != w_end)):
            bad_stream[si] = s
    for si in range(bad_stream.shape[0]):
        if bad_stream[si] >= 0:
            return bad_stream[si]
    return -1


# ---- encoding (not normative) ----------------------------------------------------------------------


@njit(inline="always", cache=True)
def _put(x, f, start, buf, n):
    """Encode one symbol of frequency ``f`` starting at ``start``; words go to buf[n:] (reversed later)."""
    x_max = ((RANS_LOW >> PROB_BITS) << 16) * f
    if x >= x_max:
        buf[n] = np.uint16(x & 0xFFFF)
        n += 1
        x = x >> 16
    x = ((x // f) << PROB_BITS) + (x % f) + start
    return x, n


@njit(parallel=True, **_JIT)
def encode_streams(q, classes, shifts, freqs, cum, stream_rows, s0, s1):
    """rANS-code streams [s0, s1) of integer codes ``q`` (rows, width): (words per stream
    (s1 - s0, capacity), their lengths); each stream's words in decoding order."""
    n_rows, width = q.shape
    max_ops = stream_rows * width * 5 + 2
    lengths = np.zeros(s1 - s0, np.int64)
    out = np.empty((s1 - s0, max_ops), np.uint16)
    for si in prange(s1 - s0):
        s = s0 + si
        r0 = s * stream_rows
        r1 = min(r0 + stream_rows, n_rows)
        op_start = np.empty(max_ops, np.int64)
        op_freq = np.empty(max_ops, np.int64)
        n_ops = 0
        for r in range(r0, r1):
            for c in range(width):
                j = classes[c]
                k = np.int64(shifts[j])
                value = np.int64(q[r, c])
                high = value >> k
                low = value - (high << k)
                if -DIRECT_MAX <= high <= DIRECT_MAX:
                    sym = high + DIRECT_MAX
                    op_start[n_ops] = cum[j, sym]
                    op_freq[n_ops] = freqs[j, sym]
                    n_ops += 1
                else:
                    op_start[n_ops] = cum[j, ESCAPE]
                    op_freq[n_ops] = freqs[j, ESCAPE]
                    u = high & 0xFFFF
                    op_start[n_ops + 1] = (u & 0xFF) << (PROB_BITS - 8)
                    op_freq[n_ops + 1] = 1 << (PROB_BITS - 8)
                    op_start[n_ops + 2] = (u >> 8) << (PROB_BITS - 8)
                    op_freq[n_ops + 2] = 1 << (PROB_BITS - 8)
                    n_ops += 3
                if k > 0:
                    k1 = min(k, 8)
                    op_start[n_ops] = (low & ((1 << k1) - 1)) << (PROB_BITS - k1)
                    op_freq[n_ops] = 1 << (PROB_BITS - k1)
                    n_ops += 1
                    if k > 8:
                        op_start[n_ops] = (low >> 8) << (PROB_BITS - (k - 8))
                        op_freq[n_ops] = 1 << (PROB_BITS - (k - 8))
                        n_ops += 1
        buf = np.empty(n_ops + 2, np.uint16)
        n = 0
        x = np.int64(RANS_LOW)
        for i in range(n_ops - 1, -1, -1):
            x, n = _put(x, op_freq[i], op_start[i], buf, n)
        buf[n] = np.uint16(x >> 16)
        buf[n + 1] = np.uint16(x & 0xFFFF)
        n += 2
        lengths[si] = n
        for i in range(n):
            out[si, i] = buf[n - 1 - i]
    return out, lengths


@njit(parallel=True, cache=True)
def quantize(z, step):
    """q = rint(z / step) as int32 (z f64: values before rotary embedding minus the column mean)."""
    out = np.empty(z.shape, np.int32)
    inv = 1.0 / step
    for r in prange(z.shape[0]):
        for c in range(z.shape[1]):
            out[r, c] = np.int32(np.rint(z[r, c] * inv))
    return out


@njit(parallel=True, cache=True)
def to_f64(src, kind):
    """Source element bits -> f64 values."""
    n, width = src.shape
    out = np.empty((n, width), np.float64)
    for r in prange(n):
        row = np.empty(width, np.float32)
        load_row(src[r], 0, row, 0, width, kind)
        for c in range(width):
            out[r, c] = row[c]
    return out

