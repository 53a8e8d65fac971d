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


def decode_parts(codec: str, parts: dict, ggml_type: int, keyframe_interval: int = 1, rotation: int = 0) -> np.ndarray:
    """Decode every row of one segment of a track from its parts."""
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
