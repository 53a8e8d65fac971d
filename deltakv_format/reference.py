"""An independent plain-numpy decoder, written from SPEC.md, used by the tests as a cross-check.

It shares no code with the Numba kernels: conversions to f16 use numpy's own
float16 cast (then SPEC.md's saturation and NaN rules), blocks are parsed with
structured dtypes, and loops run over rows with whole-row numpy operations.
It is slow on purpose-free grounds: clarity first.
"""

from __future__ import annotations

import numpy as np

from .constants import GGMLType

_Q4_0 = np.dtype([("d", "<f2"), ("qs", "u1", 16)])
_Q8_0 = np.dtype([("d", "<f2"), ("qs", "i1", 32)])


def to_output_bits(values: np.ndarray, ggml_type: int) -> np.ndarray:
    """float32 -> output element bits per SPEC.md (RNE, saturation, canonical NaN)."""
    values = np.asarray(values, np.float32)
    if ggml_type == GGMLType.F32:
        return values.view(np.uint32).copy()
    if ggml_type == GGMLType.F16:
        with np.errstate(over="ignore", invalid="ignore"):
            bits = values.astype(np.float16).view(np.uint16).copy()
        sign = (values.view(np.uint32) >> 16).astype(np.uint16) & 0x8000
        overflow = np.isfinite(values) & ((bits & 0x7FFF) == 0x7C00)
        bits[overflow] = sign[overflow] | 0x7BFF
        nan = np.isnan(values)
        bits[nan] = sign[nan] | 0x7E00
        return bits
    if ggml_type == GGMLType.BF16:
        u = values.view(np.uint32).astype(np.uint64)
        rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
        sign = (u >> 16).astype(np.uint16) & 0x8000
        overflow = np.isfinite(values) & ((rounded & 0x7FFF) == 0x7F80)
        rounded[overflow] = sign[overflow] | 0x7F7F
        inf = np.isinf(values)
        rounded[inf] = sign[inf] | 0x7F80
        nan = np.isnan(values)
        rounded[nan] = sign[nan] | 0x7FC0
        return rounded
    raise ValueError(f"no float output for ggml type {ggml_type}")


def from_source_bits(bits: np.ndarray, ggml_type: int) -> np.ndarray:
    if ggml_type == GGMLType.F16:
        return bits.view(np.float16).astype(np.float32)
    if ggml_type == GGMLType.BF16:
        return (bits.astype(np.uint32) << 16).view(np.float32)
    return bits.view(np.float32).copy()


def _q4_0_values(block_bytes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One row of Q4_0 blocks -> (scales f32 per value, codes - 8 as f32), in value order."""
    blocks = np.ascontiguousarray(block_bytes).view(_Q4_0)
    d = blocks["d"].astype(np.float32)
    low = (blocks["qs"] & 0x0F).astype(np.int32) - 8
    high = (blocks["qs"] >> 4).astype(np.int32) - 8
    codes = np.concatenate([low, high], axis=1).astype(np.float32)  # values j and j + 16
    return np.repeat(d, 32), codes.reshape(-1)


def dequantize_q4_0(rows: np.ndarray, ggml_type: int) -> np.ndarray:
    out = []
    for row in rows:
        d, q = _q4_0_values(row)
        out.append(to_output_bits(d * q, ggml_type))
    return np.array(out).reshape(len(rows), -1)


def dequantize_q8_0(rows: np.ndarray, ggml_type: int) -> np.ndarray:
    out = []
    for row in rows:
        blocks = np.ascontiguousarray(row).view(_Q8_0)
        d = np.repeat(blocks["d"].astype(np.float32), 32)
        q = blocks["qs"].astype(np.float32).reshape(-1)
        out.append(to_output_bits(d * q, ggml_type))
    return np.array(out).reshape(len(rows), -1)


def hadamard(values: np.ndarray, size: int) -> np.ndarray:
    """SPEC.md's normalised Walsh-Hadamard transform over groups of ``size`` values."""
    v = values.astype(np.float32).reshape(-1, size).copy()
    h = 1
    while h < size:
        v = v.reshape(v.shape[0], size // (2 * h), 2, h)
        a = v[:, :, 0, :].copy()
        b = v[:, :, 1, :].copy()
        v[:, :, 0, :] = a + b
        v[:, :, 1, :] = a - b
        v = v.reshape(-1, size)
        h *= 2
    scale = np.float32({16: 0.25, 64: 0.125, 256: 0.0625}[size])
    return (v * scale).reshape(-1)


def decode_delta(keys, q4, modes, ggml_type, keyframe_interval: int, rotation: int) -> np.ndarray:
    """All rows of one delta-coded segment (keys, q4, modes as stored)."""
    n_rows = keys.shape[0] + q4.shape[0]
    n_values = keys.shape[1]
    out = np.empty((n_rows, n_values), keys.dtype)
    d_index = 0
    state = None
    for i in range(n_rows):
        if i % keyframe_interval == 0:
            key = keys[i // keyframe_interval]
            out[i] = key
            state = from_source_bits(key, ggml_type)
            if rotation:
                state = hadamard(state, rotation)
            continue
        d, q = _q4_0_values(q4[d_index])
        step = d * q
        if modes is None:
            state = state + step
        else:
            bits = np.unpackbits(modes[d_index], bitorder="little")[: n_values // 32]
            inter = np.repeat(bits.astype(bool), 32)
            state = np.where(inter, state + step, step).astype(np.float32)
        d_index += 1
        emitted = hadamard(state, rotation) if rotation else state
        out[i] = to_output_bits(emitted, ggml_type)
    return out


def quantize_q8_0(values: np.ndarray) -> np.ndarray:
    """Rows of f32 values -> rows of Q8_0 blocks by SPEC.md 6.1's rule (ggml's quantize_row_q8_0_ref)."""
    x = np.asarray(values, np.float32).reshape(len(values), -1, 32)
    d = np.abs(x).max(axis=2) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    scaled = (x * inv[:, :, None]).astype(np.float64)  # the f32 product, exact in f64
    codes = np.sign(scaled) * np.floor(np.abs(scaled) + 0.5)  # roundf: halfway away from zero
    blocks = np.empty(x.shape[:2], _Q8_0)
    with np.errstate(over="ignore"):
        blocks["d"] = d.astype(np.float16)
    blocks["qs"] = codes.astype(np.int8)
    return blocks.view(np.uint8).reshape(len(values), -1)


def quantize_q4_0(values: np.ndarray) -> np.ndarray:
    """Rows of f32 values -> rows of Q4_0 blocks by SPEC.md 6.1's rule (ggml's quantize_row_q4_0_ref)."""
    x = np.asarray(values, np.float32).reshape(len(values), -1, 32)
    first_max = np.abs(x).argmax(axis=2)  # argmax: the first value of largest magnitude
    d = np.take_along_axis(x, first_max[:, :, None], axis=2)[:, :, 0] / np.float32(-8)
    with np.errstate(divide="ignore"):
        inv = np.where(d != 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
    shifted = x * inv[:, :, None] + np.float32(8.5)  # two f32 roundings, as ggml's C
    codes = np.minimum(15, np.trunc(shifted).astype(np.int64)).astype(np.uint8)
    blocks = np.empty(x.shape[:2], _Q4_0)
    with np.errstate(over="ignore"):
        blocks["d"] = d.astype(np.float16)
    blocks["qs"] = codes[:, :, :16] | (codes[:, :, 16:] << 4)
    return blocks.view(np.uint8).reshape(len(values), -1)


QUANTIZE = {GGMLType.Q8_0: quantize_q8_0, GGMLType.Q4_0: quantize_q4_0}


def decode_parts(codec: str, parts: dict, ggml_type: int, keyframe_interval: int = 1, rotation: int = 0,
                 params: dict | None = None, positions=None) -> np.ndarray:
    """Decode every row of one segment of a track from its parts (``params``: the codec's
    ``deltakv.track.params`` and ``n_values``, the values per row; ``positions``: the segment's cell
    positions). A transcoded track (``transcode`` in ``params``, SPEC.md 6.6) decodes as an F16 track
    whose rows are then quantized to the ``transcode`` type: rows of blocks."""
    if params and "transcode" in params:
        inner = {k: v for k, v in params.items() if k != "transcode"}
        values = decode_parts(codec, parts, GGMLType.F16, keyframe_interval, rotation, inner, positions)
        return QUANTIZE[GGMLType(params["transcode"])](np.asarray(values, np.uint16).view(np.float16).astype(np.float32))
    if codec == "dkv-ans":
        return decode_dkv_ans(parts, ggml_type, params or {}, positions)
    if codec == "raw":
        data = parts["data"]
        return data.view({GGMLType.F16: np.uint16, GGMLType.BF16: np.uint16, GGMLType.F32: np.uint32}[ggml_type]) \
            if ggml_type in (GGMLType.F16, GGMLType.BF16, GGMLType.F32) else data
    if codec == "f16":
        data = parts["data"]
        return data.copy() if ggml_type == GGMLType.F16 else to_output_bits(data.view(np.float16).astype(np.float32), ggml_type)
    if codec == "q8_0":
        return dequantize_q8_0(parts["data"], ggml_type)
    if codec == "q4_0":
        return dequantize_q4_0(parts["data"], ggml_type)
    if codec in ("delta-q4_0", "dkv-q4"):
        return decode_delta(parts["key"], parts["q4"], parts.get("mode"), ggml_type, keyframe_interval, rotation)
    raise ValueError(f"unknown codec {codec!r}")


# ---- dkv-ans (SPEC.md 6.5), from the text: plain Python integers and floats, numpy f32 for the f32 steps ----

ANS_CONSTANTS = {name: float.fromhex(h) for name, h in (
    ("TWO_OVER_PI", "0x1.45f306dc9c883p-1"), ("PIO2_HI", "0x1.921fb00000000p+0"),
    ("PIO2_LO", "0x1.5110b4611a626p-22"),
    ("S1", "-0x1.5555555555555p-3"), ("S3", "0x1.1111111111111p-7"), ("S5", "-0x1.a01a01a01a01ap-13"),
    ("S7", "0x1.71de3a556c734p-19"), ("S9", "-0x1.ae64567f544e4p-26"), ("S11", "0x1.6124613a86d09p-33"),
    ("S13", "-0x1.ae7f3e733b81fp-41"), ("S15", "0x1.952c77030ad4ap-49"),
    ("C1", "-0x1.0000000000000p-1"), ("C2", "0x1.5555555555555p-5"), ("C3", "-0x1.6c16c16c16c17p-10"),
    ("C4", "0x1.a01a01a01a01ap-16"), ("C5", "-0x1.27e4fb7789f5cp-22"), ("C6", "0x1.1eed8eff8d898p-29"),
    ("C7", "-0x1.93974a8c07c9dp-37"), ("C8", "0x1.ae7f3e733b81fp-45"), ("C9", "-0x1.6827863b97d97p-53"),
)}


class AnsCorrupt(ValueError):
    """A dkv-ans head or stream that SPEC.md 6.5 says is corrupt."""


def _f32(x) -> np.float32:
    return np.float32(x)


def _f32_of_bits(u: int) -> np.float32:
    return np.array([u & 0xFFFFFFFF], np.uint32).view(np.float32)[0]


def ans_cos_sin(pos: int, theta: np.float32) -> tuple[np.float32, np.float32]:
    """cos32, sin32 of pos * theta by SPEC.md 6.5 (Python floats are IEEE f64, each operation rounded)."""
    k_ = ANS_CONSTANTS
    a = float(pos) * float(theta)
    k = float(round(a * k_["TWO_OVER_PI"]))  # round(): nearest, ties to even
    r = (a - k * k_["PIO2_HI"]) - k * k_["PIO2_LO"]
    z = r * r
    s = k_["S15"]
    for name in ("S13", "S11", "S9", "S7", "S5", "S3", "S1"):
        s = k_[name] + z * s
    sin_r = r + (r * z) * s
    c = k_["C9"]
    for name in ("C8", "C7", "C6", "C5", "C4", "C3", "C2", "C1"):
        c = k_[name] + z * c
    cos_r = 1.0 + z * c
    cs, sn = [(cos_r, sin_r), (-sin_r, cos_r), (-cos_r, -sin_r), (sin_r, -cos_r)][int(k) % 4]
    return _f32(cs), _f32(sn)


def ans_thetas(n_rot: int, theta_scale: np.float32, freq_scale: np.float32) -> list[np.float32]:
    t = _f32(1.0)
    out = []
    for _ in range(n_rot // 2):
        out.append(_f32(freq_scale) * t)
        t = t * _f32(theta_scale)
    return out


def parse_ans_head(head: bytes, n_values: int, stream_rows: int, n_words: int) -> dict:
    """The fields of a ``head`` part (SPEC.md 6.5), every rule checked."""
    import struct

    if len(head) < 12:
        raise AnsCorrupt(f"head of {len(head)} bytes")
    n_rows, step_bits, n_classes, reserved = struct.unpack_from("<IIHH", head, 0)
    step = _f32_of_bits(step_bits)
    n_streams = -(-n_rows // stream_rows)
    if not (np.isfinite(step) and step > 0) or not 1 <= n_classes <= 64 or reserved:
        raise AnsCorrupt("head fields")
    if len(head) != 12 + 3 * n_values + 66 * n_classes + 4 * n_streams:
        raise AnsCorrupt("head length")
    mean = np.frombuffer(head, "<f2", n_values, 12).astype(np.float32)
    cls = list(head[12 + 2 * n_values:12 + 3 * n_values])
    if not np.isfinite(mean).all() or any(j >= n_classes for j in cls):
        raise AnsCorrupt("means or classes")
    shift, freq = [], []
    off = 12 + 3 * n_values
    for _ in range(n_classes):
        k, zero = head[off], head[off + 1]
        f = list(struct.unpack_from("<32H", head, off + 2))
        if k > 12 or zero or sum(f) != 4096:
            raise AnsCorrupt("class table")
        shift.append(k)
        freq.append(f)
        off += 66
    start = list(struct.unpack_from(f"<{n_streams}I", head, off))
    if n_streams and (start[0] != 0 or any(b - a < 2 for a, b in zip(start, start[1:])) or start[-1] + 2 > n_words):
        raise AnsCorrupt("stream starts")
    return dict(n_rows=n_rows, step=step, mean=mean, cls=cls, shift=shift, freq=freq, start=start)


def ans_stream_codes(w: list[int], n_rows: int, cls: list[int], shift: list[int], freq: list[list[int]]) -> list[list[int]]:
    """The integers q of the ``n_rows`` rows of one rANS stream of words ``w`` (SPEC.md 6.5)."""
    cum = []
    for f in freq:
        c = [0]
        for v in f:
            c.append(c[-1] + v)
        cum.append(c)
    if len(w) < 2:
        raise AnsCorrupt("stream of fewer than 2 words")
    x = w[0] + 65536 * w[1]
    p = 2
    if x < 65536:
        raise AnsCorrupt("initial state")

    def renorm():
        nonlocal x, p
        if x < 65536:
            if p == len(w):
                raise AnsCorrupt("stream read past its words")
            x = 65536 * x + w[p]
            p += 1

    def symbol(j):
        nonlocal x
        slot = x % 4096
        y = next(y for y in range(32) if cum[j][y] <= slot < cum[j][y + 1])
        x = freq[j][y] * (x // 4096) + slot - cum[j][y]
        renorm()
        return y

    def uniform(b):
        nonlocal x
        m = 2 ** (12 - b)
        slot = x % 4096
        v = slot // m
        x = m * (x // 4096) + slot % m
        renorm()
        return v

    rows = []
    for _ in range(n_rows):
        row = []
        for j in cls:
            k = shift[j]
            y = symbol(j)
            if y == 31:
                lo = uniform(8)
                hi = uniform(8)
                u = lo + 256 * hi
                qp = u - 65536 if u >= 32768 else u
            else:
                qp = y - 15
            low = 0
            if k > 0:
                low = uniform(min(k, 8))
                if k > 8:
                    low += 256 * uniform(k - 8)
            row.append(qp * 2 ** k + low)
        rows.append(row)
    if x != 65536 or p != len(w):
        raise AnsCorrupt(f"stream ends in state {x} after {p} of {len(w)} words")
    return rows


def decode_dkv_ans(parts: dict, ggml_type: int, params: dict, positions=None) -> np.ndarray:
    """Every row of one dkv-ans segment: the sink rows, then the coded rows (``positions``: the i32
    ``pos`` of each of the segment's cells, needed where ``rope`` != 0)."""
    sink = np.asarray(parts["sink"])
    n_values = params.get("n_values") or (sink.shape[1] if sink.ndim == 2 else None)  # the track's C
    head = bytes(np.ascontiguousarray(parts.get("head", np.empty(0, np.uint8))).view(np.uint8).reshape(-1))
    data = bytes(np.ascontiguousarray(parts.get("data", np.empty(0, np.uint8))).view(np.uint8).reshape(-1))
    dtype = np.uint32 if ggml_type == GGMLType.F32 else np.uint16
    if not head:
        return sink.view(dtype).reshape(sink.shape[0], -1)
    if len(data) % 2:
        raise AnsCorrupt("odd data length")
    words = list(np.frombuffer(data, "<u2").tolist())
    stream_rows = params.get("stream_rows", 32)
    h = parse_ans_head(head, n_values, stream_rows, len(words))
    starts = h["start"] + [len(words)]
    q = []
    for t in range(len(h["start"])):
        rows_t = min(stream_rows, h["n_rows"] - t * stream_rows)
        q += ans_stream_codes(words[starts[t]:starts[t + 1]], rows_t, h["cls"], h["shift"], h["freq"])
    rope = params.get("rope", 0)
    n_sink = sink.shape[0]
    out = np.empty((n_sink + h["n_rows"], n_values), dtype)
    out[:n_sink] = sink.view(dtype).reshape(n_sink, n_values)
    if rope:
        n_rot, head_dim = params["rope_dims"], params["head_dim"]
        thetas = ans_thetas(n_rot, _f32_of_bits(params["theta_scale_f32"]),
                            _f32_of_bits(params.get("freq_scale_f32", 0x3F800000)))
    for i, qrow in enumerate(q):
        v = np.array(qrow, np.int64).astype(np.float32) * h["step"] + h["mean"]  # two f32 roundings
        if rope:
            pos = int(positions[n_sink + i])
            if pos < 0:
                raise AnsCorrupt("negative position")
            for base in range(0, n_values, head_dim):
                for pair, theta in enumerate(thetas):
                    ia, ib = (base + 2 * pair, base + 2 * pair + 1) if rope == 1 else (base + pair, base + pair + n_rot // 2)
                    c, s = ans_cos_sin(pos, theta)
                    a, b = v[ia], v[ib]
                    v[ia] = a * c - b * s
                    v[ib] = a * s + b * c
        out[n_sink + i] = to_output_bits(v, ggml_type)
    return out
