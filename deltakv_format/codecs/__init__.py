"""The Delta-KV codecs: each turns a track (rows of one layer's K or V) into named parts and back.

A codec follows the numcodecs contract: ``encode``, ``decode``, ``get_config`` /
``from_config`` (round-trips through JSON). Parts are the tensors a codec
stores for one segment of a track:

=============  ==========================================================
codec          parts (GGUF tensor type, shape rows x values)
=============  ==========================================================
raw            data (I8, rows x row_bytes): the cache bytes as they are
f16            data (F16, rows x n)
q8_0           data (Q8_0, rows x n), ggml-exact blocks
q4_0           data (Q4_0, rows x n), ggml-exact blocks
delta-q4_0     key (source type, keyframes x n), q4 (Q4_0, deltas x n)
dkv-q4         key, q4, mode (I8, deltas x ceil(n / 256)): per-block intra/inter bits
=============  ==========================================================

Rows and values are element bit patterns (uint16 for f16/bf16, uint32 for f32),
see ``kernels``. SPEC.md defines every codec normatively.
"""

from __future__ import annotations

import functools
import threading
from dataclasses import dataclass

import numpy as np

from ..constants import (
    CODEC_DELTA_Q4_0,
    CODEC_DKV_Q4,
    CODEC_F16,
    CODEC_Q4_0,
    CODEC_Q8_0,
    CODEC_RAW,
    CODECS,
    DEFAULT_KEYFRAME_INTERVAL,
    FLOAT_TYPES,
    ROTATION_SIZES,
    GGMLType,
)
from ..errors import CodecError
from ..numerics import F16_TO_F32
from . import kernels

KIND_OF_TYPE = {GGMLType.F16: kernels.KIND_F16, GGMLType.BF16: kernels.KIND_BF16, GGMLType.F32: kernels.KIND_F32}
BITS_DTYPE = {GGMLType.F16: np.uint16, GGMLType.BF16: np.uint16, GGMLType.F32: np.uint32}


@dataclass(frozen=True)
class Part:
    """One stored tensor of a codec: its role name, GGUF type and row length in values."""

    role: str
    ggml_type: int
    n_values: int


def _check_finite(rows: np.ndarray, ggml_type: int, where: str) -> None:
    """Lossy codecs need finite values within the f16 range (SPEC.md, "Non-finite values")."""
    if ggml_type == GGMLType.F32:
        values = rows.view(np.float32)
        bad = ~(np.abs(values) <= 65504.0)
    else:
        exp_mask = 0x7C00 if ggml_type == GGMLType.F16 else 0x7F80
        bad = (rows & exp_mask) == exp_mask
        if ggml_type == GGMLType.BF16:
            bad |= (rows & 0x7FFF) > 0x477F  # beyond the f16 range
    if bad.any():
        r, c = np.argwhere(bad)[0]
        raise CodecError(
            f"{where}: row {r}, value {c} is {'not finite' if ggml_type != GGMLType.F32 else 'outside the f16 range'}; "
            "lossy codecs need finite values within +-65504 (use --codec raw or f16)"
        )


_KERNEL_LOCK = threading.RLock()
_ACCELERATOR = None


def use_accelerator(accelerator):
    """Route encode/decode of every codec but raw to ``accelerator`` (or back to Numba with None).

    An accelerator has ``encode(codec_name, rows, ggml_type, keyframe_interval, rotation, where=)`` and
    ``decode(codec_name, parts, ggml_type, n_values, row_lo, row_hi, keyframe_interval, rotation)``
    with the codec methods' results bit for bit (the runtime's GPU kernels: deltakv_runtime.gpu).
    Returns the previous one. The format package never imports an accelerator itself.
    """
    global _ACCELERATOR
    previous, _ACCELERATOR = _ACCELERATOR, accelerator
    return previous


def _dispatched(method):
    """Serialise kernel calls (numba's workqueue threading layer, see deltakv_format/__init__.py,
    aborts on concurrent parallel launches) and send them to the accelerator if one is in use."""
    name = method.__name__

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if name == "encode":
            ggml_type, n_values = args[1], np.shape(args[0])[-1]
        else:
            ggml_type, n_values = args[1], args[2]
        if not self.accepts(ggml_type, n_values):
            # a kernel given a shape it was not written for would produce garbage, not an error
            type_name = GGMLType(ggml_type).name if ggml_type in set(GGMLType) else str(ggml_type)
            raise CodecError(f"codec {self.name} (rotation {self.rotation}) cannot take rows of {n_values} "
                             f"values of type {type_name}; use codec_for_track() to pick one that can")
        accelerator = _ACCELERATOR
        with _KERNEL_LOCK:
            if accelerator is None or self.name == CODEC_RAW:
                return method(self, *args, **kwargs)
            if name == "encode":
                rows, ggml_type = args[0], args[1]
                where = kwargs.get("where", args[2] if len(args) > 2 else "track")
                return accelerator.encode(self.name, rows, ggml_type, self.keyframe_interval, self.rotation, where=where)
            parts, ggml_type, n_values, row_lo, row_hi = args[:5]
            out = kwargs.get("out", args[5] if len(args) > 5 else None)
            result = accelerator.decode(self.name, parts, ggml_type, n_values, row_lo, row_hi,
                                        self.keyframe_interval, self.rotation)
            if out is None:
                return result
            out[...] = result
            return out

    return wrapper


class Codec:
    """Base class: subclasses set ``name`` and implement parts / encode / decode."""

    name: str = ""
    lossless_for_f16 = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name in ("encode", "decode"):
            if name in cls.__dict__:
                setattr(cls, name, _dispatched(cls.__dict__[name]))

    def __init__(self, keyframe_interval: int = 1, rotation: int = 0):
        self.keyframe_interval = int(keyframe_interval)
        self.rotation = int(rotation)

    # -- configuration ------------------------------------------------------------------

    def get_config(self) -> dict:
        return {"codec": self.name, "keyframe_interval": self.keyframe_interval, "rotation": self.rotation}

    @staticmethod
    def from_config(config: dict) -> "Codec":
        config = dict(config)
        name = config.pop("codec")
        return get_codec(name, **config)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.get_config()})"

    # -- contract -----------------------------------------------------------------------

    def accepts(self, ggml_type: int, n_values: int) -> bool:
        return ggml_type in FLOAT_TYPES and n_values % kernels.BLOCK_VALUES == 0

    def parts(self, ggml_type: int, n_values: int) -> list[Part]:
        raise NotImplementedError

    def encode(self, rows: np.ndarray, ggml_type: int, where: str = "track") -> dict[str, np.ndarray]:
        raise NotImplementedError

    def decode(self, parts: dict[str, np.ndarray], ggml_type: int, n_values: int, row_lo: int, row_hi: int,
               out: np.ndarray | None = None) -> np.ndarray:
        raise NotImplementedError

    def rows_of_parts(self, parts: dict[str, np.ndarray]) -> int:
        """Number of track rows the given parts hold."""
        raise NotImplementedError

    def _out(self, out, n_rows, n_values, ggml_type):
        if out is None:
            return np.empty((n_rows, n_values), BITS_DTYPE[ggml_type])
        if out.shape != (n_rows, n_values) or out.dtype != BITS_DTYPE[ggml_type]:
            raise ValueError(f"out must be {(n_rows, n_values)} {np.dtype(BITS_DTYPE[ggml_type])}")
        return out


class RawCodec(Codec):
    name = CODEC_RAW
    lossless_for_f16 = True

    def accepts(self, ggml_type, n_values):
        return True

    def parts(self, ggml_type, n_values):
        """For float types ``n_values`` counts values; for other types it is already row bytes."""
        from ..constants import ggml_row_bytes

        row_bytes = ggml_row_bytes(ggml_type, n_values) if ggml_type in FLOAT_TYPES else n_values
        return [Part("data", GGMLType.I8, row_bytes)]

    def encode(self, rows, ggml_type, where="track"):
        return {"data": np.ascontiguousarray(rows).view(np.uint8).reshape(rows.shape[0], -1)}

    def decode(self, parts, ggml_type, n_values, row_lo, row_hi, out=None):
        data = parts["data"][row_lo:row_hi]
        if ggml_type in FLOAT_TYPES:
            data = data.view(BITS_DTYPE[ggml_type])
        if out is None:
            return data.copy()
        out[...] = data
        return out

    def rows_of_parts(self, parts):
        return parts["data"].shape[0]


class F16Codec(Codec):
    name = CODEC_F16
    lossless_for_f16 = True

    def accepts(self, ggml_type, n_values):
        return ggml_type in FLOAT_TYPES

    def parts(self, ggml_type, n_values):
        return [Part("data", GGMLType.F16, n_values)]

    def encode(self, rows, ggml_type, where="track"):
        if ggml_type == GGMLType.F16:
            return {"data": np.ascontiguousarray(rows)}
        _check_finite(rows, ggml_type, where)
        values = kernels.rows_to_f32(np.ascontiguousarray(rows), KIND_OF_TYPE[ggml_type], F16_TO_F32)
        return {"data": kernels.f16_bits_from_f32(values)}

    def decode(self, parts, ggml_type, n_values, row_lo, row_hi, out=None):
        data = parts["data"][row_lo:row_hi]
        out = self._out(out, row_hi - row_lo, n_values, ggml_type)
        if ggml_type == GGMLType.F16:
            out[...] = data
        else:
            values = kernels.rows_to_f32(np.ascontiguousarray(data), kernels.KIND_F16, F16_TO_F32)
            kernels.rows_from_f32(values, KIND_OF_TYPE[ggml_type], out)
        return out

    def rows_of_parts(self, parts):
        return parts["data"].shape[0]


class _GGMLBlockCodec(Codec):
    block_type: int = 0

    def parts(self, ggml_type, n_values):
        return [Part("data", self.block_type, n_values)]

    def encode(self, rows, ggml_type, where="track"):
        _check_finite(rows, ggml_type, where)
        values = kernels.rows_to_f32(np.ascontiguousarray(rows), KIND_OF_TYPE[ggml_type], F16_TO_F32)
        return {"data": self._quantize(values)}

    def decode(self, parts, ggml_type, n_values, row_lo, row_hi, out=None):
        out = self._out(out, row_hi - row_lo, n_values, ggml_type)
        self._dequantize(np.ascontiguousarray(parts["data"][row_lo:row_hi]), n_values, KIND_OF_TYPE[ggml_type], F16_TO_F32, out)
        return out

    def rows_of_parts(self, parts):
        return parts["data"].shape[0]


class Q8_0Codec(_GGMLBlockCodec):
    name = CODEC_Q8_0
    block_type = GGMLType.Q8_0
    _quantize = staticmethod(kernels.quantize_q8_0_ggml)
    _dequantize = staticmethod(kernels.dequantize_q8_0)


class Q4_0Codec(_GGMLBlockCodec):
    name = CODEC_Q4_0
    block_type = GGMLType.Q4_0
    _quantize = staticmethod(kernels.quantize_q4_0_ggml)
    _dequantize = staticmethod(kernels.dequantize_q4_0)


class DeltaQ4_0Codec(Codec):
    """Closed-loop token-to-token Q4_0 deltas with keyframes: the method as its authors describe it."""

    name = CODEC_DELTA_Q4_0
    adaptive = False
    search = False

    def __init__(self, keyframe_interval: int = DEFAULT_KEYFRAME_INTERVAL, rotation: int = 0):
        super().__init__(keyframe_interval, rotation)
        if not 1 <= self.keyframe_interval <= 65536:
            raise CodecError(f"keyframe_interval must be 1..65536, found {self.keyframe_interval}")
        if self.rotation not in ROTATION_SIZES:
            raise CodecError(f"rotation must be one of {ROTATION_SIZES}, found {self.rotation}")

    def accepts(self, ggml_type, n_values):
        return super().accepts(ggml_type, n_values) and (self.rotation == 0 or n_values % self.rotation == 0)

    def parts(self, ggml_type, n_values):
        parts = [Part("key", ggml_type, n_values), Part("q4", GGMLType.Q4_0, n_values)]
        if self.adaptive:
            parts.append(Part("mode", GGMLType.I8, (n_values // kernels.BLOCK_VALUES + 7) // 8))
        return parts

    def encode(self, rows, ggml_type, where="track"):
        _check_finite(rows, ggml_type, where)
        keys, deltas, modes = kernels.encode_delta(
            np.ascontiguousarray(rows), KIND_OF_TYPE[ggml_type], self.keyframe_interval, self.rotation,
            self.adaptive, self.search, F16_TO_F32,
        )
        parts = {"key": keys, "q4": deltas}
        if self.adaptive:
            parts["mode"] = modes
        return parts

    def decode(self, parts, ggml_type, n_values, row_lo, row_hi, out=None):
        out = self._out(out, row_hi - row_lo, n_values, ggml_type)
        if row_hi <= row_lo:
            return out
        modes = parts.get("mode")
        if modes is None or modes.shape[0] == 0:
            modes = np.zeros((1, (n_values // kernels.BLOCK_VALUES + 7) // 8), np.uint8)
        kernels.decode_delta(
            parts["key"], parts["q4"], modes, self.adaptive, self.keyframe_interval, self.rotation,
            KIND_OF_TYPE[ggml_type], F16_TO_F32, row_lo, row_hi, out,
        )
        return out

    def rows_of_parts(self, parts):
        return parts["key"].shape[0] + parts["q4"].shape[0]


class DkvQ4Codec(DeltaQ4_0Codec):
    """The default: Walsh-Hadamard rotation, per-block intra/inter choice, searched scales."""

    name = CODEC_DKV_Q4
    adaptive = True
    search = True

    def __init__(self, keyframe_interval: int = DEFAULT_KEYFRAME_INTERVAL, rotation: int = 64):
        super().__init__(keyframe_interval, rotation)


_REGISTRY = {c.name: c for c in (RawCodec, F16Codec, Q8_0Codec, Q4_0Codec, DeltaQ4_0Codec, DkvQ4Codec)}
assert tuple(_REGISTRY) == CODECS


def get_codec(name: str, **params) -> Codec:
    """A codec by its SPEC.md id, e.g. ``get_codec("delta-q4_0", keyframe_interval=16)``."""
    cls = _REGISTRY.get(name)
    if cls is None:
        raise CodecError(f"unknown codec {name!r}; expected one of {', '.join(CODECS)}")
    if cls in (RawCodec, F16Codec, Q8_0Codec, Q4_0Codec):
        extra = {k: v for k, v in params.items() if v not in (None, 0, 1)}
        if extra:
            raise CodecError(f"codec {name!r} takes no parameters, found {extra}")
        return cls()
    params = {k: v for k, v in params.items() if v is not None}
    try:
        return cls(**params)
    except TypeError as e:
        raise CodecError(f"codec {name!r}: {e}") from e


def codec_for_track(codec: Codec, ggml_type: int, n_values: int) -> Codec:
    """The codec a track actually uses: the requested one, or raw when it cannot take the track
    (quantized caches, rows that are not whole Q4_0 blocks, rows not divisible by the rotation)."""
    if codec.accepts(ggml_type, n_values):
        return codec
    if isinstance(codec, DkvQ4Codec) and codec.rotation and DkvQ4Codec(codec.keyframe_interval, 16).accepts(ggml_type, n_values):
        return DkvQ4Codec(codec.keyframe_interval, 16)
    if ggml_type in FLOAT_TYPES and not isinstance(codec, (RawCodec, F16Codec)):
        return F16Codec() if ggml_type == GGMLType.F16 else RawCodec()
    return RawCodec()
