"""The vectorised kernels (codecs/simd.py, numerics' IR builders) against plain scalar definitions, bit for bit.

The scalar encoders below are the reference encoders as first written (one value at a time, the
f16 lookup table, the branchy conversions of numerics.py): the vector kernels must produce the same
bytes on every input, not only on the spec/vectors cases. Nothing here is timed.
"""

import numpy as np
import pytest
from numba import njit

from deltakv_format import reference
from deltakv_format.codecs import codec_for_track, get_codec, kernels
from deltakv_format.codecs.simd import emit_row, load_row, wht_row
from deltakv_format.constants import GGMLType
from deltakv_format.numerics import (
    F16_TO_F32,
    f16_bits_to_f32_fast,
    f32_as_u32,
    f32_bits_to_bf16_bits,
    f32_bits_to_f16_bits,
    f32_to_bf16_bits_fast,
    f32_to_f16_bits_fast,
)

KIND = {GGMLType.F16: 0, GGMLType.BF16: 1, GGMLType.F32: 2}
BITS = {GGMLType.F16: np.uint16, GGMLType.BF16: np.uint16, GGMLType.F32: np.uint32}

# ---- conversions -------------------------------------------------------------------------------


@njit(cache=True)
def _f16_to_f32_all():
    out = np.empty(65536, np.float32)
    for h in range(65536):
        out[h] = f16_bits_to_f32_fast(np.uint16(h))
    return out


def test_f16_to_f32_intrinsic_equals_table_on_all_patterns():
    assert np.array_equal(_f16_to_f32_all().view(np.uint32), F16_TO_F32.view(np.uint32))


def _f32_patterns():
    rng = np.random.default_rng(11)
    hi = np.arange(0, 65536, 251, dtype=np.uint32)  # every 251st exponent/mantissa prefix, all low halves
    grid = ((hi[:, None] << 16) | np.arange(65536, dtype=np.uint32)[None, :]).reshape(-1)
    return np.concatenate([
        grid,
        rng.integers(0, 2**32, 1_000_000, dtype=np.uint64).astype(np.uint32),
        np.arange(0x33000000, 0x33800000, 7, dtype=np.uint32),  # around 2^-25
        np.arange(0x387F0000, 0x38810000, 1, dtype=np.uint32),  # f16 subnormal / normal boundary
        np.arange(0x477F0000, 0x47800100, 1, dtype=np.uint32),  # around 65504 .. 65536
        np.arange(0x7F7F0000, 0x7F800100, 1, dtype=np.uint32),  # bf16 overflow, infinity, NaNs
    ]).astype(np.uint32)


@njit(cache=True)
def _conversions(bits):
    values = bits.view(np.float32)
    n = bits.shape[0]
    fast = np.empty((4, n), np.int64)
    plain = np.empty((2, n), np.int64)
    for i in range(n):
        fast[0, i] = f32_to_f16_bits_fast(values[i])
        fast[1, i] = f32_to_bf16_bits_fast(values[i])
        plain[0, i] = f32_bits_to_f16_bits(np.int64(bits[i]))
        plain[1, i] = f32_bits_to_bf16_bits(np.int64(bits[i]))
    out16 = np.empty(n, np.uint16)
    emit_row(values, 0, out16, 0, n, 0)  # 16-lane path (F16C where available) and scalar tail
    for i in range(n):
        fast[2, i] = out16[i]
    emit_row(values, 0, out16, 0, n, 1)
    for i in range(n):
        fast[3, i] = out16[i]
    return fast, plain


def test_vector_conversions_equal_scalar_definitions():
    bits = _f32_patterns()
    fast, plain = _conversions(bits)
    for row, ref in ((0, 0), (1, 1), (2, 0), (3, 1)):
        bad = np.flatnonzero(fast[row] != plain[ref])
        assert bad.size == 0, f"row {row}: {bad.size} differ, first f32 bits {bits[bad[0]]:#010x}"
    # and the spec's own statement of the rounding (numpy's cast plus saturation / canonical NaN)
    assert np.array_equal(fast[2].astype(np.uint16), reference.to_output_bits(bits.view(np.float32), GGMLType.F16))
    assert np.array_equal(fast[3].astype(np.uint16), reference.to_output_bits(bits.view(np.float32), GGMLType.BF16))


@njit(cache=True)
def _load_rows(src, kind):
    out = np.empty(src.shape[0], np.float32)
    load_row(src, 0, out, 0, src.shape[0], kind)
    return out


@pytest.mark.parametrize("ggml_type", [GGMLType.F16, GGMLType.BF16, GGMLType.F32])
def test_load_row_is_exact(ggml_type):
    rng = np.random.default_rng(2)
    width = 16 if ggml_type != GGMLType.F32 else 32
    bits = rng.integers(0, 2**width, 100_003, dtype=np.uint64).astype(BITS[ggml_type])
    ours = _load_rows(bits, KIND[ggml_type]).view(np.uint32)
    if ggml_type == GGMLType.F16:
        theirs = F16_TO_F32[bits].view(np.uint32)
    elif ggml_type == GGMLType.BF16:
        theirs = bits.astype(np.uint32) << 16
    else:
        theirs = bits
    assert np.array_equal(ours, theirs)


# ---- Walsh-Hadamard -----------------------------------------------------------------------------


@njit(cache=True)
def _wht(values, size):
    out = values.copy()
    wht_row(out, out, out.shape[0], size)
    return out


@pytest.mark.parametrize("size", [16, 64, 256])
def test_hadamard_equals_sequential_definition(size):
    rng = np.random.default_rng(size)
    x = (rng.standard_normal(size * 40) * np.exp(rng.uniform(-30, 12, size * 40))).astype(np.float32)
    specials = np.array([0.0, -0.0, 1e-45, -1e-45, 6e-8, 65504.0, -65504.0, np.inf, -np.inf], np.float32)
    x[:: 7] = specials[np.arange(x[:: 7].size) % specials.size]
    x[size * 3: size * 4] = np.float32(-0.0)  # a group of negative zeros
    x[size * 5: size * 6] = np.float32(0.0)
    ours = _wht(x, size)
    theirs = reference.hadamard(x, size)
    nan = np.isnan(theirs)
    assert np.array_equal(np.isnan(ours), nan)
    assert np.array_equal(ours.view(np.uint32)[~nan], theirs.view(np.uint32)[~nan])


# ---- the reference encoders, one value at a time ------------------------------------------------


@njit(cache=True)
def _s_f16(x):
    return f32_bits_to_f16_bits(np.int64(f32_as_u32(np.float32(x))))


@njit(cache=True)
def _s_f16_ggml(x):
    u = np.int64(f32_as_u32(np.float32(x)))
    a = u & 0x7FFFFFFF
    if a < 0x7F800000 and a >= 0x477FF000:
        return ((u >> 16) & 0x8000) | 0x7C00
    return f32_bits_to_f16_bits(u)


@njit(cache=True)
def _s_load(src_row, kind, dst):
    for c in range(dst.shape[0]):
        if kind == 0:
            dst[c] = F16_TO_F32[src_row[c]]
        elif kind == 1:
            dst.view(np.uint32)[c] = np.uint32(src_row[c]) << 16
        else:
            dst.view(np.uint32)[c] = src_row[c]


@njit(cache=True)
def _s_hadamard(v, size):
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


@njit(cache=True)
def _s_q4_ggml_block(x, out):
    amax = np.float32(0.0)
    vmax = np.float32(0.0)
    for j in range(32):
        if amax < abs(x[j]):
            amax = abs(x[j])
            vmax = x[j]
    d = vmax / np.float32(-8.0)
    inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
    h = _s_f16_ggml(d)
    out[0] = h & 0xFF
    out[1] = h >> 8
    for j in range(16):
        q0 = min(np.int8(15), np.int8(np.int32(x[j] * inv + np.float32(8.5))))
        q1 = min(np.int8(15), np.int8(np.int32(x[16 + j] * inv + np.float32(8.5))))
        out[2 + j] = np.uint8(q0 & 0xF) | np.uint8((q1 & 0xF) << 4)


@njit(cache=True)
def _s_quantize(x, q8):
    n_rows, n_cols = x.shape
    nb = n_cols // 32
    size = 34 if q8 else 18
    out = np.empty((n_rows, nb * size), np.uint8)
    for r in range(n_rows):
        for b in range(nb):
            blk = x[r, b * 32:(b + 1) * 32]
            o = out[r, b * size:(b + 1) * size]
            if not q8:
                _s_q4_ggml_block(blk, o)
                continue
            amax = np.float32(0.0)
            for j in range(32):
                amax = max(amax, abs(blk[j]))
            d = amax / np.float32(127.0)
            inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
            h = _s_f16_ggml(d)
            o[0] = h & 0xFF
            o[1] = h >> 8
            for j in range(32):
                v = blk[j] * inv
                a = abs(v)
                t = np.floor(a)
                if a - t >= np.float32(0.5):
                    t += np.float32(1.0)
                t = t if v >= 0 else -t
                o[2 + j] = np.uint8(np.int8(np.int32(t)) & 0xFF)
    return out


@njit(cache=True)
def _s_codes(residual, d, q):
    inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
    for j in range(32):
        v = np.rint(residual[j] * inv) + np.float32(8.0)
        if v < 0:
            v = np.float32(0.0)
        if v > 15:
            v = np.float32(15.0)
        q[j] = np.int32(v)


@njit(cache=True)
def _s_error(target, base, inter, d, q):
    err = np.float32(0.0)
    for j in range(32):
        r = d * np.float32(q[j] - 8)
        if inter:
            r = base[j] + r
        e = r - target[j]
        err += e * e
    return err


@njit(cache=True)
def _s_search(target, base, inter, residual, q_best, q_try):
    amax = np.float32(0.0)
    vmax = np.float32(0.0)
    for j in range(32):
        if amax < abs(residual[j]):
            amax = abs(residual[j])
            vmax = residual[j]
    if amax == 0:
        q_best[:] = 8
        return _s_error(target, base, inter, np.float32(0.0), q_best), 0
    best_err = np.float32(np.inf)
    best_h = 0
    for level in (np.float32(-8.0), np.float32(-7.5), np.float32(-7.0), np.float32(-6.5),
                  np.float32(7.0), np.float32(6.5), np.float32(6.0)):
        h = _s_f16(vmax / level)
        d = F16_TO_F32[h]
        _s_codes(residual, d, q_try)
        err = _s_error(target, base, inter, d, q_try)
        if err < best_err:
            best_err = err
            best_h = h
            q_best[:] = q_try
    num = np.float32(0.0)
    den = np.float32(0.0)
    for j in range(32):
        k = np.float32(q_best[j] - 8)
        num += residual[j] * k
        den += k * k
    if den > 0:
        h = _s_f16(num / den)
        d = F16_TO_F32[h]
        if d == d and abs(d) < np.float32(65504.0):
            _s_codes(residual, d, q_try)
            err = _s_error(target, base, inter, d, q_try)
            if err < best_err:
                best_err = err
                best_h = h
                q_best[:] = q_try
    return best_err, best_h


@njit(cache=True)
def _s_apply(state, qrow, mrow, has_modes):
    for b in range(state.shape[0] // 32):
        d = F16_TO_F32[np.uint16(qrow[b * 18]) | (np.uint16(qrow[b * 18 + 1]) << 8)]
        inter = (not has_modes) or ((mrow[b >> 3] >> (b & 7)) & 1) == 1
        for j in range(16):
            byte = qrow[b * 18 + 2 + j]
            lo = d * np.float32(np.int32(byte & 0xF) - 8)
            hi = d * np.float32(np.int32(byte >> 4) - 8)
            state[b * 32 + j] = state[b * 32 + j] + lo if inter else lo
            state[b * 32 + 16 + j] = state[b * 32 + 16 + j] + hi if inter else hi


@njit(cache=True)
def _s_encode_delta(src, kind, interval, rotation, adaptive, search):
    n_rows, n_cols = src.shape
    nb = n_cols // 32
    n_chunks = (n_rows + interval - 1) // interval
    n_delta = n_rows - n_chunks
    keys = np.empty((n_chunks, n_cols), src.dtype)
    deltas = np.empty((n_delta, nb * 18), np.uint8)
    modes = np.zeros((n_delta if adaptive else 0, (nb + 7) // 8), np.uint8)
    state = np.empty(n_cols, np.float32)
    target = np.empty(n_cols, np.float32)
    residual = np.empty(32, np.float32)
    zeros = np.zeros(32, np.float32)
    q_inter = np.empty(32, np.int32)
    q_intra = np.empty(32, np.int32)
    q_try = np.empty(32, np.int32)
    ggml_block = np.empty(18, np.uint8)
    no_modes = np.zeros((nb + 7) // 8, np.uint8)
    for chunk in range(n_chunks):
        start = chunk * interval
        stop = min(start + interval, n_rows)
        keys[chunk, :] = src[start]
        _s_load(src[start], kind, state)
        if rotation:
            _s_hadamard(state, rotation)
        for i in range(start + 1, stop):
            d_index = i - chunk - 1
            _s_load(src[i], kind, target)
            if rotation:
                _s_hadamard(target, rotation)
            qrow = deltas[d_index]
            for b in range(nb):
                tgt = target[b * 32:(b + 1) * 32]
                prev = state[b * 32:(b + 1) * 32]
                for j in range(32):
                    residual[j] = tgt[j] - prev[j]
                if search:
                    err_inter, h_inter = _s_search(tgt, prev, True, residual, q_inter, q_try)
                else:
                    _s_q4_ggml_block(residual, ggml_block)
                    h_inter = np.int64(ggml_block[0]) | (np.int64(ggml_block[1]) << 8)
                    for j in range(16):
                        q_inter[j] = ggml_block[2 + j] & 0xF
                        q_inter[16 + j] = ggml_block[2 + j] >> 4
                    err_inter = np.float32(0.0)
                inter = True
                h = h_inter
                if adaptive:
                    err_intra, h_intra = _s_search(tgt, zeros, False, tgt, q_intra, q_try)
                    if err_intra < err_inter:
                        inter = False
                        h = h_intra
                q = q_inter if inter else q_intra
                qrow[b * 18] = h & 0xFF
                qrow[b * 18 + 1] = h >> 8
                for j in range(16):
                    qrow[b * 18 + 2 + j] = np.uint8(q[j]) | np.uint8(q[16 + j] << 4)
                if inter and adaptive:
                    modes[d_index, b >> 3] |= np.uint8(1 << (b & 7))
            _s_apply(state, qrow, modes[d_index] if adaptive else no_modes, adaptive)
    return keys, deltas, modes


# ---- encoders and decoders on awkward inputs --------------------------------------------------


def _values(rng, rows, cols, style):
    if style == "drift":
        x = np.cumsum(rng.standard_normal((rows, cols)) * 0.2, axis=0) + rng.standard_normal(cols) * 3
    elif style == "wide":  # magnitudes from f16 subnormals to near the f16 limit, per block
        x = rng.standard_normal((rows, cols)) * np.exp(rng.uniform(-20, 10, (1, cols)))
        x = np.clip(x, -65504, 65504)
    elif style == "sparse":  # zero blocks, repeated rows, exact ties
        x = np.round(rng.standard_normal((rows, cols)) * 4) / 2
        x[:, : cols // 2] = 0.0
        x[rows // 2:] = x[rows // 2]
        x[::5, -32:] = -0.0
    else:  # tiny: f16 subnormals and f32 values below them
        x = rng.standard_normal((rows, cols)) * 1e-6
    return x.astype(np.float32)


def _bits(x, ggml_type):
    if ggml_type == GGMLType.F16:
        return x.astype(np.float16).view(np.uint16)
    if ggml_type == GGMLType.BF16:
        return (x.view(np.uint32) >> 16).astype(np.uint16)
    return x.view(np.uint32).copy()


CASES = [
    # (rows, cols, interval, rotation, adaptive, search, style, type)
    (70, 1024, 32, 64, True, True, "drift", GGMLType.F16),
    (45, 192, 7, 64, True, True, "wide", GGMLType.F16),
    (33, 544, 5, 16, True, True, "sparse", GGMLType.BF16),
    (40, 512, 64, 256, True, True, "drift", GGMLType.F32),
    (37, 96, 3, 0, True, True, "tiny", GGMLType.F32),
    (50, 32, 9, 16, True, True, "wide", GGMLType.BF16),
    (41, 256, 16, 0, False, False, "drift", GGMLType.F16),
    (29, 160, 4, 16, False, False, "wide", GGMLType.F32),
    (30, 128, 6, 64, False, True, "drift", GGMLType.F16),  # search without the intra choice
    (30, 128, 6, 0, True, False, "sparse", GGMLType.F16),  # intra choice with ggml scales
]


@pytest.mark.parametrize("case", CASES, ids=[f"{c[6]}-{c[1]}-r{c[3]}-a{int(c[4])}s{int(c[5])}" for c in CASES])
def test_delta_encoder_equals_scalar_reference(case):
    rows, cols, interval, rotation, adaptive, search, style, ggml_type = case
    rng = np.random.default_rng(rows * cols + rotation)
    bits = _bits(_values(rng, rows, cols, style), ggml_type)
    ours = kernels.encode_delta(bits, KIND[ggml_type], interval, rotation, adaptive, search, F16_TO_F32)
    theirs = _s_encode_delta(bits, KIND[ggml_type], interval, rotation, adaptive, search)
    for name, a, b in zip(("key", "q4", "mode"), ours, theirs):
        assert a.shape == b.shape and np.array_equal(a, b), name


@pytest.mark.parametrize("style", ["drift", "wide", "sparse", "tiny"])
def test_ggml_quantizers_equal_scalar_reference(style):
    x = _values(np.random.default_rng(5), 64, 320, style)
    x[3, 32:64] = np.array([-8, -7.5, -0.5, 0.5, 1.5, 2.5, 7.5, 8] * 4, np.float32)  # ties
    assert np.array_equal(kernels.quantize_q4_0_ggml(x), _s_quantize(x, False))
    assert np.array_equal(kernels.quantize_q8_0_ggml(x), _s_quantize(x, True))


@pytest.mark.parametrize("codec_name,params", [
    ("q4_0", {}), ("q8_0", {}), ("delta-q4_0", {"keyframe_interval": 5}),
    ("dkv-q4", {"keyframe_interval": 8, "rotation": 256}), ("dkv-q4", {"keyframe_interval": 3, "rotation": 16}),
    ("dkv-q4", {"keyframe_interval": 32, "rotation": 64}),
])
@pytest.mark.parametrize("ggml_type", [GGMLType.F16, GGMLType.BF16, GGMLType.F32])
def test_decoders_equal_reference_on_awkward_layouts(codec_name, params, ggml_type):
    rng = np.random.default_rng(9)
    bits = _bits(_values(rng, 53, 512, "wide"), ggml_type)
    codec = codec_for_track(get_codec(codec_name, **params), ggml_type, 512)
    parts = codec.encode(bits, ggml_type)
    ref = reference.decode_parts(codec.name, parts, ggml_type, codec.keyframe_interval, codec.rotation)
    ro = {k: v.copy() for k, v in parts.items()}
    for v in ro.values():
        v.setflags(write=False)  # as read from a mapped file
    assert np.array_equal(codec.decode(ro, ggml_type, 512, 0, 53), ref)
    # a row range starting inside a chunk, decoded into a non-contiguous output view
    big = np.zeros((40, 1024), BITS[ggml_type])
    view = big[:, ::2]
    codec.decode(parts, ggml_type, 512, 11, 51, out=view)
    assert np.array_equal(view, ref[11:51]) and not big[:, 1::2].any()


@pytest.mark.parametrize("ggml_type", [GGMLType.F16, GGMLType.BF16, GGMLType.F32])
@pytest.mark.parametrize("rotation", [0, 16, 64, 256])
def test_decoders_saturate_and_keep_infinities_like_reference(ggml_type, rotation):
    """Hand-made parts whose decoded values overflow f16 (saturation) or carry a stored infinity:
    the vector kernels' fast f16 path must fall back to the exact conversion."""
    n = 256
    key = np.full((2, n), 65504.0, np.float32)
    key[1, 5] = np.inf
    key[1, 9:40] = -65504.0
    q4 = np.zeros((2, n // 32 * 18), np.uint8)
    blocks = q4.reshape(2, -1, 18)
    blocks[:, :, 0:2] = np.frombuffer(np.float16(65504.0).tobytes(), np.uint8)  # d = 65504
    blocks[:, :, 2:] = 0x88  # codes 8: steps of zero ...
    blocks[:, ::2, 2] = 0x8F  # ... except +7 * d at value 0 of every other block
    modes = np.full((2, (n // 32 + 7) // 8), 0xFF, np.uint8)
    modes[1, 0] = 0b10101010  # some intra blocks
    parts = {"key": _bits(key, ggml_type), "q4": q4, "mode": modes}
    codec = get_codec("dkv-q4", keyframe_interval=2, rotation=rotation)
    ref = reference.decode_parts("dkv-q4", parts, ggml_type, 2, rotation)
    ours = codec.decode(parts, ggml_type, n, 0, 4)
    assert np.array_equal(ours, ref)
    if ggml_type == GGMLType.F16:
        assert ((ours[1::2] & 0x7FFF) == 0x7BFF).any()  # saturation happened


@pytest.mark.parametrize("ggml_type", [GGMLType.F16, GGMLType.BF16, GGMLType.F32])
@pytest.mark.parametrize("codec_name,block_bytes", [("q4_0", 18), ("q8_0", 34)])
def test_block_decoders_on_extreme_scales_like_reference(ggml_type, codec_name, block_bytes):
    """Scales around the bound of the fast f16 path, infinite and NaN scales, subnormal scales."""
    rng = np.random.default_rng(1)
    scales = np.array([1.0, 8188.0, 8192.0, 511.75, 512.0, 65504.0, -65504.0, np.inf, -np.inf, np.nan,
                       6e-8, -6e-8, 0.0, -0.0, 3.0e4, -1.5], np.float16)
    rows = 6
    data = rng.integers(0, 256, (rows, scales.size * block_bytes), dtype=np.uint64).astype(np.uint8)
    blocks = data.reshape(rows, scales.size, block_bytes)
    blocks[:, :, 0:2] = np.stack([np.roll(scales, r) for r in range(rows)]).view(np.uint8).reshape(rows, -1, 2)
    n = scales.size * 32
    ours = get_codec(codec_name).decode({"data": data}, ggml_type, n, 0, rows)
    theirs = reference.decode_parts(codec_name, {"data": data}, ggml_type)
    assert np.array_equal(ours, theirs)
