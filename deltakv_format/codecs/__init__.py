"""The Delta-KV codecs: each turns a track (rows of one layer's K or V) into named parts and back.

A codec is one class, and the class says everything about the codec (SPEC.md section 6 defines
each normatively):

- its id (``name``) and its parameters with their defaults (``parameters``); ``get_config`` /
  ``from_config`` round-trip through JSON as in numcodecs, and ``get_codec(id, **params)`` finds
  the class in the registry (``CODEC_CLASSES``, filled by ``@register_codec``);
- which tracks it can take (``accepts``) and what it falls back to otherwise (``for_track``);
- its parts, their tensor types (``parts``) and how many rows each holds (``expected_part_rows``);
- ``encode`` / ``decode``, bit for bit as SPEC.md says;
- the error bound it can prove from what it stored (``error_bound``, SPEC.md 6.4).

=============  ==========================================================
codec          parts (GGUF tensor type, shape rows x values)
=============  ==========================================================
raw            data (I8, rows x row_bytes): the cache bytes as they are
f16            data (F16, rows x n)
q8_0           data (Q8_0, rows x n), ggml-exact blocks
q4_0           data (Q4_0, rows x n), ggml-exact blocks
delta-q4_0     key (source type, keyframes x n), q4 (Q4_0, deltas x n)
dkv-q4         key, q4, mode (I8, deltas x ceil(n / 256)): per-block intra/inter bits
dkv-ans        sink (source type, sink rows x n), head and data (I8 bytes): rANS-coded
               integers of one step, keys with rotary embedding undone (codecs/dkv_ans.py)
=============  ==========================================================

Rows and values are element bit patterns (uint16 for f16/bf16, uint32 for f32),
see ``kernels``.

Accelerators (the runtime's GPU kernels) register kernels per codec class in a
:class:`KernelRegistry` and are switched on with :func:`use_accelerator`; a codec
class without kernels there runs on the CPU.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, ClassVar, Protocol

import numpy as np

from ..constants import (
    CODEC_DELTA_Q4_0,
    CODEC_DKV_ANS,
    CODEC_DKV_Q4,
    CODEC_F16,
    CODEC_Q4_0,
    CODEC_Q8_0,
    CODEC_RAW,
    DEFAULT_KEYFRAME_INTERVAL,
    FLOAT_TYPES,
    GGML_BLOCK_SIZES,
    ROTATION_SIZES,
    GGMLType,
    ggml_row_bytes,
)
from ..errors import CodecError
from ..numerics import F16_TO_F32
from . import bounds, kernels
from .bounds import ErrorBound

KIND_OF_TYPE = {GGMLType.F16: kernels.KIND_F16, GGMLType.BF16: kernels.KIND_BF16, GGMLType.F32: kernels.KIND_F32}
BITS_DTYPE = {GGMLType.F16: np.uint16, GGMLType.BF16: np.uint16, GGMLType.F32: np.uint32}

# Values per Q4_0 / Q8_0 block: the unit every quantizing codec works in.
BLOCK_VALUES = GGML_BLOCK_SIZES[GGMLType.Q4_0][0]


@dataclass(frozen=True)
class Part:
    """One stored tensor of a codec: its role name, GGUF type and row length in values (0: a tensor
    of one dimension, any length: bytes whose layout the codec's section of SPEC.md gives)."""

    role: str
    ggml_type: int
    n_values: int


def check_finite(rows: np.ndarray, ggml_type: int, where: str) -> None:
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


# ---- accelerators ---------------------------------------------------------------------------


class CodecKernels(Protocol):
    """An accelerator's kernels for one codec class: the codec methods' results, bit for bit."""

    def encode(self, codec: "Codec", rows: np.ndarray, ggml_type: int, where: str) -> dict[str, np.ndarray]: ...

    def decode(self, codec: "Codec", parts: dict[str, np.ndarray], ggml_type: int, n_values: int,
               row_lo: int, row_hi: int) -> np.ndarray: ...

    # Optional: True when ``decode`` also takes ``out=`` (the C-contiguous destination, or None) and
    # writes the rows there itself (a GPU copies them back straight into it: no host copy between).
    decodes_into: bool


class Accelerator(Protocol):
    """What :func:`use_accelerator` takes: the kernels for a codec, or None to run it on the CPU."""

    def kernels_for(self, codec: "Codec") -> CodecKernels | None: ...


@dataclass(frozen=True)
class RegisteredKernels:
    encode: Callable[..., dict[str, np.ndarray]]
    decode: Callable[..., np.ndarray]
    decodes_into: bool = False  # decode takes out= (see CodecKernels)


class KernelRegistry:
    """An accelerator's kernels, registered per codec class.

    Lookup is by the exact class: a subclass is a codec of its own (another id, other parts or
    arithmetic), so it never inherits kernels written for its base class by accident.
    """

    def __init__(self):
        self._by_class: dict[type, RegisteredKernels] = {}

    def register(self, *codec_classes: type, encode, decode, decodes_into: bool = False) -> None:
        for codec_class in codec_classes:
            if not (isinstance(codec_class, type) and issubclass(codec_class, Codec)):
                raise TypeError(f"kernels are registered for Codec classes, found {codec_class!r}")
            self._by_class[codec_class] = RegisteredKernels(encode, decode, decodes_into)

    def kernels_for(self, codec: "Codec") -> RegisteredKernels | None:
        return self._by_class.get(type(codec))

    @property
    def codec_classes(self) -> tuple[type, ...]:
        return tuple(self._by_class)


# Numba's workqueue threading layer (see deltakv_format/__init__.py) aborts on concurrent parallel
# launches, so every kernel call, CPU or accelerator, holds this lock.
_KERNEL_LOCK = threading.RLock()
_ACCELERATOR: Accelerator | None = None


def use_accelerator(accelerator: Accelerator | None) -> Accelerator | None:
    """Route encode/decode of every codec that ``accelerator`` has kernels for to it (None: back to Numba).

    Returns the previous one. The format package never imports an accelerator itself (the
    runtime's GPU kernels: deltakv_runtime.gpu).
    """
    global _ACCELERATOR
    previous, _ACCELERATOR = _ACCELERATOR, accelerator
    return previous


def _accelerated(codec: "Codec") -> CodecKernels | None:
    accelerator = _ACCELERATOR
    return None if accelerator is None else accelerator.kernels_for(codec)


# ---- the registry ---------------------------------------------------------------------------

CODEC_CLASSES: dict[str, type["Codec"]] = {}
"""Every codec class, by its SPEC.md id, in registration order."""

# The per-track columns of SPEC.md section 3 that every track stores, whether or not its codec takes
# them: a codec without a keyframe interval stores 1, one without a rotation 0.
TRACK_COLUMNS = ("keyframe_interval", "rotation")
# Values a reader lets through for a column the codec does not take: the stored 1 / 0 and, as
# version-1 readers always did, 0 or 1 for either (files written before must keep reading).
_NEUTRAL_COLUMN_VALUES = (None, 0, 1)


def register_codec(cls: type["Codec"]) -> type["Codec"]:
    """Class decorator: make ``cls`` known to :func:`get_codec` and ``Codec.from_config`` by its id."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no codec id (class attribute 'name')")
    if cls.name in CODEC_CLASSES:
        raise TypeError(f"codec id {cls.name!r} is taken by {CODEC_CLASSES[cls.name].__name__}; "
                        f"{cls.__name__} needs another")
    bad = [p for p in cls.parameters if not p.replace("_", "").isalnum() or not p.islower()]
    if bad:
        # parameters beyond TRACK_COLUMNS live in deltakv.track.params (SPEC.md 3), keyed by name
        raise TypeError(f"{cls.__name__}: parameter names must be lower-case identifiers, found {bad}")
    CODEC_CLASSES[cls.name] = cls
    return cls


def get_codec(name: str, **params) -> "Codec":
    """A codec by its SPEC.md id, e.g. ``get_codec("delta-q4_0", keyframe_interval=16)``.

    A parameter given as None takes the codec's default."""
    cls = CODEC_CLASSES.get(name)
    if cls is None:
        raise CodecError(f"unknown codec {name!r}; expected one of {', '.join(CODEC_CLASSES)}")
    taken = {}
    extra = {}
    for key, value in params.items():
        if key in cls.parameters:
            if value is not None:
                taken[key] = value
        elif not (key in TRACK_COLUMNS and value in _NEUTRAL_COLUMN_VALUES):
            extra[key] = value
    if extra:
        takes = f"takes only {', '.join(cls.parameters)}" if cls.parameters else "takes no parameters"
        raise CodecError(f"codec {name!r} {takes}, found {extra}")
    return cls(**taken)


def bits_rate(bits: float) -> int:
    """The ``rate`` parameter (hundredths of a bit per value) of ``bits`` bits per value."""
    return int(round(float(bits) * 100))


def codec_for_role(codec: "Codec | str", role: str, *, bits: float | None = None) -> "Codec":
    """The codec of the tracks of ``role`` ("k" or "v"): a codec named by its id gets the class's
    defaults for that role (``Codec.role_defaults``); a Codec object is taken as it is. ``bits``:
    the ``rate`` of a codec that has one, as bits per value (3 -> rate 300); a codec without a
    rate raises CodecError."""
    if isinstance(codec, str):
        cls = CODEC_CLASSES.get(codec)
        if cls is None:
            raise CodecError(f"unknown codec {codec!r}; expected one of {', '.join(CODEC_CLASSES)}")
        codec = get_codec(codec, **cls.role_defaults.get(role, {}))
    elif not isinstance(codec, Codec):
        raise TypeError(f"expected a codec id or a Codec, found {type(codec).__name__}")
    if bits is not None:
        if "rate" not in codec.parameters:
            with_rate = [name for name, cls in CODEC_CLASSES.items() if "rate" in cls.parameters]
            raise CodecError(f"bits per value ({bits:g}) set the rate of the codecs that have one ({', '.join(with_rate)}); "
                             f"codec {codec.name} has none")
        config = codec.get_config()
        config["rate"] = bits_rate(bits)
        codec = Codec.from_config(config)
    return codec


# ---- the codecs -----------------------------------------------------------------------------


class Codec:
    """Base class: a subclass sets ``name`` and ``parameters`` and implements the contract below."""

    name: ClassVar[str] = ""
    parameters: ClassVar[dict[str, int]] = {}
    """The parameters the codec takes, with their defaults (a subset of ``TRACK_COLUMNS``)."""
    role_defaults: ClassVar[dict[str, dict[str, int]]] = {}
    """Per track role ("k", "v"), defaults that replace ``parameters``' when the codec is named for
    that role without them (:func:`codec_for_role`): dkv-ans gives K and V their own rates."""

    keyframe_interval: int = 1
    rotation: int = 0

    def __init__(self, **params):
        unknown = sorted(set(params) - set(self.parameters))
        if unknown:
            takes = f"takes {', '.join(self.parameters)}" if self.parameters else "takes no parameters"
            raise CodecError(f"codec {self.name!r} {takes}, found {', '.join(unknown)}")
        for key, default in self.parameters.items():
            value = params.get(key, default)
            try:
                setattr(self, key, int(value))
            except (TypeError, ValueError) as e:
                raise CodecError(f"codec {self.name!r}: {key} must be an integer, found {value!r}") from e
        self.check_parameters()

    def check_parameters(self) -> None:
        """Raise CodecError for parameter values the codec cannot work with."""

    # -- configuration ------------------------------------------------------------------

    def get_config(self) -> dict:
        """The codec id and its parameters: JSON-serialisable, what a track stores."""
        config = {"codec": self.name, "keyframe_interval": self.keyframe_interval, "rotation": self.rotation}
        config.update(self.extra_parameters())
        return config

    def extra_parameters(self) -> dict[str, int]:
        """The parameters stored in ``deltakv.track.params`` (those that are not track columns)."""
        return {k: getattr(self, k) for k in self.parameters if k not in TRACK_COLUMNS}

    takes_context: ClassVar[bool] = False
    """Whether encode/decode need a :class:`TrackContext` (cell positions, the segment's first row)."""

    @classmethod
    def from_config(cls, config: dict) -> "Codec":
        config = dict(config)
        name = config.pop("codec", None)
        if name is None:
            raise CodecError(f"a codec config needs the key 'codec', found keys {sorted(config)}")
        if cls is not Codec and name != cls.name:
            raise CodecError(f"{cls.__name__}.from_config: expected codec {cls.name!r}, found {name!r}")
        return get_codec(name, **config)

    def __eq__(self, other) -> bool:
        return isinstance(other, Codec) and type(other) is type(self) and other.get_config() == self.get_config()

    def __hash__(self) -> int:
        return hash(tuple(self.get_config().items()))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.get_config()})"

    # -- what tracks it takes -----------------------------------------------------------

    def accepts(self, ggml_type: int, n_values: int) -> bool:
        return ggml_type in FLOAT_TYPES and n_values % BLOCK_VALUES == 0

    def for_track(self, ggml_type: int, n_values: int) -> "Codec | None":
        """This codec, or a variant of it, for a track of these rows; None if neither can take it."""
        return self if self.accepts(ggml_type, n_values) else None

    def for_layer(self, rope, ggml_type: int, n_values: int) -> "Codec":
        """This codec for a K track whose layer llama.cpp rotated with ``rope`` (a
        :class:`~deltakv_format.model_info.RopeParams`, or None when unknown). Codecs that do not
        undo rotary embedding return themselves."""
        return self

    # -- parts --------------------------------------------------------------------------

    def parts(self, ggml_type: int, n_values: int) -> list[Part]:
        raise NotImplementedError

    def expected_part_rows(self, rows: int, first_row: int = 0) -> dict[str, int]:
        """How many rows each part holds for a segment of ``rows`` track rows starting at stream row
        ``first_row`` (SPEC.md 3.2, 6). Parts of one dimension (``Part.n_values == 0``) are not listed."""
        return {"data": rows}

    def rows_of_parts(self, parts: dict[str, np.ndarray]) -> int:
        """Number of track rows the given parts hold."""
        return parts["data"].shape[0]

    # -- coding -------------------------------------------------------------------------

    def encode(self, rows: np.ndarray, ggml_type: int, where: str = "track", context=None) -> dict[str, np.ndarray]:
        """Code a segment's rows. ``context`` (:class:`TrackContext`): the rows' cell positions and the
        segment's first row, for codecs that take them (``takes_context``); others ignore it."""
        self._require(ggml_type, np.shape(rows)[-1])
        extra = (context,) if self.takes_context else ()
        with _KERNEL_LOCK:
            accelerated = _accelerated(self)
            if accelerated is not None:
                return accelerated.encode(self, rows, ggml_type, where, *extra)
            return self._encode(rows, ggml_type, where, *extra)

    def decode(self, parts: dict[str, np.ndarray], ggml_type: int, n_values: int, row_lo: int, row_hi: int,
               out: np.ndarray | None = None, context=None) -> np.ndarray:
        self._require(ggml_type, n_values)
        extra = (context,) if self.takes_context else ()
        with _KERNEL_LOCK:
            accelerated = _accelerated(self)
            if accelerated is None:
                return self._decode(parts, ggml_type, n_values, row_lo, row_hi, out, *extra)
            if getattr(accelerated, "decodes_into", False):
                return accelerated.decode(self, parts, ggml_type, n_values, row_lo, row_hi, *extra, out=out)
            result = accelerated.decode(self, parts, ggml_type, n_values, row_lo, row_hi, *extra)
            if out is None:
                return result
            out[...] = result
            return out

    def _encode(self, rows, ggml_type, where):
        raise NotImplementedError

    def _decode(self, parts, ggml_type, n_values, row_lo, row_hi, out):
        raise NotImplementedError

    def check_parts(self, parts: dict[str, np.ndarray], ggml_type: int, n_values: int, rows: int,
                    first_row: int, where: str) -> None:
        """Raise CorruptError for parts a decoder could not index safely (the reader calls it on
        every segment before decoding). Row counts are checked by the reader itself."""

    def _require(self, ggml_type: int, n_values: int) -> None:
        if not self.accepts(ggml_type, n_values):
            # a kernel given a shape it was not written for would produce garbage, not an error
            type_name = GGMLType(ggml_type).name if ggml_type in set(GGMLType) else str(ggml_type)
            raise CodecError(f"codec {self.name} (rotation {self.rotation}) cannot take rows of {n_values} "
                             f"values of type {type_name}; use codec_for_track() to pick one that can")

    def _out(self, out, n_rows, n_values, ggml_type):
        if out is None:
            return np.empty((n_rows, n_values), BITS_DTYPE[ggml_type])
        if out.shape != (n_rows, n_values) or out.dtype != BITS_DTYPE[ggml_type]:
            raise ValueError(f"out must be {(n_rows, n_values)} {np.dtype(BITS_DTYPE[ggml_type])}, "
                             f"found {out.shape} {out.dtype}")
        return out

    # -- error bound --------------------------------------------------------------------

    def error_bound(self, parts: dict[str, np.ndarray], ggml_type: int, decoded: np.ndarray,
                    first_row: int = 0) -> ErrorBound:
        """What the stored parts prove about ``|decoded - original|`` (SPEC.md 6.4).

        ``decoded``: element bits of the segment's rows ``first_row .. first_row + len(decoded)``, as
        ``decode`` returns them (for the delta codecs ``first_row`` is a keyframe: a multiple of the
        keyframe interval). The bound holds for parts written by the reference encoders; a payload
        that breaks it was damaged, or written by an encoder that does not keep the guarantee.
        """
        raise NotImplementedError


@register_codec
class RawCodec(Codec):
    name = CODEC_RAW

    def accepts(self, ggml_type, n_values):
        return True

    def parts(self, ggml_type, n_values):
        """For float types ``n_values`` counts values; for other types it is already row bytes."""
        row_bytes = ggml_row_bytes(ggml_type, n_values) if ggml_type in FLOAT_TYPES else n_values
        return [Part("data", GGMLType.I8, row_bytes)]

    def _encode(self, rows, ggml_type, where):
        return {"data": np.ascontiguousarray(rows).view(np.uint8).reshape(rows.shape[0], -1)}

    def _decode(self, parts, ggml_type, n_values, row_lo, row_hi, out):
        data = parts["data"][row_lo:row_hi]
        if ggml_type in FLOAT_TYPES:
            data = data.view(BITS_DTYPE[ggml_type])
        if out is None:
            return data.copy()
        out[...] = data
        return out

    def error_bound(self, parts, ggml_type, decoded, first_row=0):
        return ErrorBound(1, np.zeros(decoded.shape))  # the bytes themselves


@register_codec
class F16Codec(Codec):
    name = CODEC_F16

    def accepts(self, ggml_type, n_values):
        return ggml_type in FLOAT_TYPES

    def parts(self, ggml_type, n_values):
        return [Part("data", GGMLType.F16, n_values)]

    def _encode(self, rows, ggml_type, where):
        if ggml_type == GGMLType.F16:
            return {"data": np.ascontiguousarray(rows)}
        check_finite(rows, ggml_type, where)
        values = kernels.rows_to_f32(np.ascontiguousarray(rows), KIND_OF_TYPE[ggml_type], F16_TO_F32)
        return {"data": kernels.f16_bits_from_f32(values)}

    def _decode(self, parts, ggml_type, n_values, row_lo, row_hi, out):
        data = parts["data"][row_lo:row_hi]
        out = self._out(out, row_hi - row_lo, n_values, ggml_type)
        if ggml_type == GGMLType.F16:
            out[...] = data
        else:
            values = kernels.rows_to_f32(np.ascontiguousarray(data), kernels.KIND_F16, F16_TO_F32)
            kernels.rows_from_f32(values, KIND_OF_TYPE[ggml_type], out)
        return out

    def error_bound(self, parts, ggml_type, decoded, first_row=0):
        """F16 caches: exact. Others: one f16 rounding when stored, one rounding back when emitted."""
        if ggml_type == GGMLType.F16:
            return ErrorBound(1, np.zeros(decoded.shape))
        stored = bounds.as_float64(parts["data"][first_row:first_row + decoded.shape[0]], GGMLType.F16)
        limit = bounds.half_ulp(stored, GGMLType.F16) + bounds.output_rounding(bounds.as_float64(decoded, ggml_type), ggml_type)
        return ErrorBound(1, _finite_or_zero(limit))


class _GGMLBlockCodec(Codec):
    """One ggml block type per row, quantized with ggml's reference rule."""

    block_type: ClassVar[int] = 0

    def parts(self, ggml_type, n_values):
        return [Part("data", self.block_type, n_values)]

    def _encode(self, rows, ggml_type, where):
        check_finite(rows, ggml_type, where)
        values = kernels.rows_to_f32(np.ascontiguousarray(rows), KIND_OF_TYPE[ggml_type], F16_TO_F32)
        return {"data": self._quantize(values)}

    def _decode(self, parts, ggml_type, n_values, row_lo, row_hi, out):
        out = self._out(out, row_hi - row_lo, n_values, ggml_type)
        self._dequantize(np.ascontiguousarray(parts["data"][row_lo:row_hi]), n_values, KIND_OF_TYPE[ggml_type], F16_TO_F32, out)
        return out

    def error_bound(self, parts, ggml_type, decoded, first_row=0):
        block_bound = self._block_bound(parts["data"][first_row:first_row + decoded.shape[0]])
        limit = bounds.per_value(block_bound) + bounds.output_rounding(bounds.as_float64(decoded, ggml_type), ggml_type)
        return ErrorBound(1, _finite_or_zero(limit))

    def _block_bound(self, data: np.ndarray) -> np.ndarray:
        """Per value bound of one row of blocks (rows x blocks x values per block), before emitting."""
        raise NotImplementedError


@register_codec
class Q8_0Codec(_GGMLBlockCodec):
    name = CODEC_Q8_0
    block_type = GGMLType.Q8_0
    _quantize = staticmethod(kernels.quantize_q8_0_ggml)
    _dequantize = staticmethod(kernels.dequantize_q8_0)

    def _block_bound(self, data):
        scales, codes = bounds.q8_0_blocks(data)
        return bounds.ggml_block_bound(scales, codes, bounds.GGML_Q8_0_STEP)


@register_codec
class Q4_0Codec(_GGMLBlockCodec):
    name = CODEC_Q4_0
    block_type = GGMLType.Q4_0
    _quantize = staticmethod(kernels.quantize_q4_0_ggml)
    _dequantize = staticmethod(kernels.dequantize_q4_0)

    def _block_bound(self, data):
        scales, codes = bounds.q4_0_blocks(data)
        return bounds.ggml_block_bound(scales, codes - 8, bounds.ggml_q4_0_step_error(codes))


@register_codec
class DeltaQ4_0Codec(Codec):
    """Closed-loop token-to-token Q4_0 deltas with keyframes: the method as its authors describe it."""

    name = CODEC_DELTA_Q4_0
    parameters = {"keyframe_interval": DEFAULT_KEYFRAME_INTERVAL, "rotation": 0}
    adaptive: ClassVar[bool] = False
    """Per block choice of intra (the value) or inter (the residual), stored in the ``mode`` part."""
    search: ClassVar[bool] = False
    """Scales chosen by error search (else ggml's Q4_0 rule on the residual)."""

    def check_parameters(self):
        if not 1 <= self.keyframe_interval <= 65536:
            raise CodecError(f"keyframe_interval must be 1..65536, found {self.keyframe_interval}")
        if self.rotation not in ROTATION_SIZES:
            raise CodecError(f"rotation must be one of {ROTATION_SIZES}, found {self.rotation}")

    def accepts(self, ggml_type, n_values):
        return super().accepts(ggml_type, n_values) and (self.rotation == 0 or n_values % self.rotation == 0)

    def parts(self, ggml_type, n_values):
        parts = [Part("key", ggml_type, n_values), Part("q4", GGMLType.Q4_0, n_values)]
        if self.adaptive:
            parts.append(Part("mode", GGMLType.I8, _mode_bytes(n_values)))
        return parts

    def expected_part_rows(self, rows, first_row=0):
        keyframes = -(-rows // self.keyframe_interval)
        expected = {"key": keyframes, "q4": rows - keyframes}
        if self.adaptive:
            expected["mode"] = rows - keyframes
        return expected

    def rows_of_parts(self, parts):
        return parts["key"].shape[0] + parts["q4"].shape[0]

    def _encode(self, rows, ggml_type, where):
        check_finite(rows, ggml_type, where)
        keys, deltas, modes = kernels.encode_delta(
            np.ascontiguousarray(rows), KIND_OF_TYPE[ggml_type], self.keyframe_interval, self.rotation,
            self.adaptive, self.search, F16_TO_F32,
        )
        parts = {"key": keys, "q4": deltas}
        if self.adaptive:
            parts["mode"] = modes
        return parts

    def _decode(self, parts, ggml_type, n_values, row_lo, row_hi, out):
        out = self._out(out, row_hi - row_lo, n_values, ggml_type)
        if row_hi <= row_lo:
            return out
        modes = parts.get("mode")
        if modes is None or modes.shape[0] == 0:
            modes = np.zeros((1, _mode_bytes(n_values)), np.uint8)
        kernels.decode_delta(
            parts["key"], parts["q4"], modes, self.adaptive, self.keyframe_interval, self.rotation,
            KIND_OF_TYPE[ggml_type], F16_TO_F32, row_lo, row_hi, out,
        )
        return out

    def error_bound(self, parts, ggml_type, decoded, first_row=0):
        """Keyframes: exact. Delta rows: closed loop, so the error is that of the row's own
        quantization (the state carries no earlier error), in the rotated domain when rotating."""
        block_bound = bounds.searched_block_bound if self.search else bounds.ggml_residual_block_bound
        return bounds.delta_bound(parts["q4"], decoded, first_row, ggml_type, self.keyframe_interval, self.rotation,
                                  block_bound)


@register_codec
class DkvQ4Codec(DeltaQ4_0Codec):
    """The default: Walsh-Hadamard rotation, per-block intra/inter choice, searched scales."""

    name = CODEC_DKV_Q4
    parameters = {"keyframe_interval": DEFAULT_KEYFRAME_INTERVAL, "rotation": 64}
    adaptive = True
    search = True

    # The rotation used when the requested one does not divide the rows (SmolLM2's 3 x 64 K rows
    # and 256): the smallest, which divides every row of whole blocks.
    FALLBACK_ROTATION: ClassVar[int] = 16

    def for_track(self, ggml_type, n_values):
        if self.accepts(ggml_type, n_values):
            return self
        if self.rotation:
            smaller = DkvQ4Codec(keyframe_interval=self.keyframe_interval, rotation=self.FALLBACK_ROTATION)
            if smaller.accepts(ggml_type, n_values):
                return smaller
        return None


from .dkv_ans import TrackContext  # noqa: E402 (the codec module needs Codec defined above)
from .dkv_ans_codec import DkvAnsCodec  # noqa: E402,F401


def _mode_bytes(n_values: int) -> int:
    """Bytes of one ``mode`` row: one bit per block."""
    return (n_values // BLOCK_VALUES + 7) // 8


def _finite_or_zero(limit: np.ndarray) -> np.ndarray:
    """Stored infinities or NaN (a damaged payload) prove nothing: their bound is 0, so any error shows."""
    return np.where(np.isfinite(limit), limit, 0.0)


def codec_for_track(codec: Codec, ggml_type: int, n_values: int) -> Codec:
    """The codec a track actually uses: the requested one (or its own variant, ``Codec.for_track``),
    else f16 for an F16 cache (lossless) and raw for anything else (quantized caches, rows that
    are not whole Q4_0 blocks, rows not divisible by the rotation)."""
    chosen = codec.for_track(ggml_type, n_values)
    if chosen is not None:
        return chosen
    # raw and f16 take every float track, so only a lossy codec gets here with a float track
    if ggml_type == GGMLType.F16:
        return F16Codec()
    return RawCodec()
