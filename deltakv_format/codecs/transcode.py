"""Transcoding a quantized cache track (SPEC.md 6.6): ggml blocks -> f16 values -> a float codec, and back.

llama.cpp run with ``-ctk q8_0 -ctv q8_0`` (or q4_0) stores K/V as ggml blocks. No float codec takes
such rows, so without transcoding they are stored ``raw`` (lossless, about 1.0x). A transcoded track
decodes the blocks to values, rounds them to f16 and codes them with a float codec (the track's
``deltakv.track.codec``: dkv-ans for K, the default V codec for V); on restore the codec's f16 values
are quantized again, with ggml's reference quantizer, to the cache's own type, so the rebuilt state has
the original's types and row sizes (llama.cpp loads it) and differs from it only in values.

:class:`TranscodedCodec` wraps the float codec and is not a registered codec of its own: the track
keeps the float codec's id, and the parameter ``transcode`` (the cache's ggml type) in
``deltakv.track.params`` says the track is transcoded. A reader that does not know ``transcode``
refuses the track (SPEC.md 3: a parameter the codec does not take is corrupt), so it never decodes
such a file as something else.
"""

from __future__ import annotations

import numpy as np

from ..constants import GGML_BLOCK_SIZES, GGMLType
from ..errors import CodecError, CorruptError
from ..numerics import F16_TO_F32
from . import Codec, Q4_0Codec, Q8_0Codec, bounds, kernels
from .bounds import ErrorBound

TRANSCODE_PARAM = "transcode"
"""The key of ``deltakv.track.params`` that marks a transcoded track; its value is the cache's ggml type."""

# The cache types that can be transcoded, with the codec that re-quantizes exactly as ggml's
# quantize_row_*_ref does (codecs/kernels.py). Q4_1, Q5_0, Q5_1 have no reference quantizer here
# yet: such caches stay raw.
REQUANTIZERS: dict[int, type[Codec]] = {GGMLType.Q8_0: Q8_0Codec, GGMLType.Q4_0: Q4_0Codec}

# The values the float codec codes: f16, the type of the caches those codecs were tuned on. A Q8_0
# value (f16 scale x 8-bit code) needs up to 18 significant bits, so f16 rounds it (by at most 1/16
# of a Q8_0 step); f32 would keep it exactly but doubles the keyframes of the delta codecs.
FLOAT_TYPE = GGMLType.F16


def transcode_type_name(ggml_type: int) -> str:
    return GGMLType(ggml_type).name if ggml_type in set(GGMLType) else f"ggml type {ggml_type}"


def check_transcode_type(cache_type: int, where: str) -> None:
    """A transcode parameter must name a type with a requantizer (CorruptError: what a reader raises)."""
    if cache_type not in REQUANTIZERS:
        known = ", ".join(f"{GGMLType(t).name} ({int(t)})" for t in REQUANTIZERS)
        raise CorruptError(f"{where}: deltakv.track.params {TRANSCODE_PARAM} names {transcode_type_name(cache_type)}; "
                           f"expected one of {known}")


class TranscodedCodec(Codec):
    """A float codec (``inner``) coding the f16 values of a track of ggml blocks of ``cache_type``."""

    def __init__(self, inner: Codec, cache_type: int):
        if cache_type not in REQUANTIZERS:
            raise CodecError(f"transcode takes caches of {', '.join(GGMLType(t).name for t in REQUANTIZERS)}, "
                             f"found {transcode_type_name(cache_type)}")
        if isinstance(inner, TranscodedCodec) or TRANSCODE_PARAM in inner.parameters:
            raise CodecError(f"transcode needs a float codec, found {inner!r}")
        self.inner = inner
        self.cache_type = int(cache_type)
        self.requantizer = REQUANTIZERS[cache_type]()
        self.block_values, self.block_bytes = GGML_BLOCK_SIZES[cache_type]
        # what the writer, the reader and the size accounting ask of a track's codec
        self.name = inner.name
        self.parameters = {**inner.parameters, TRANSCODE_PARAM: self.cache_type}
        self.keyframe_interval = inner.keyframe_interval
        self.rotation = inner.rotation
        self.takes_context = inner.takes_context

    def n_values(self, row_bytes: int) -> int:
        """Values per row of a track whose rows are ``row_bytes`` bytes of blocks."""
        return row_bytes // self.block_bytes * self.block_values

    # -- configuration ------------------------------------------------------------------

    def get_config(self) -> dict:
        return {**self.inner.get_config(), TRANSCODE_PARAM: self.cache_type}

    def extra_parameters(self) -> dict[str, int]:
        return {**self.inner.extra_parameters(), TRANSCODE_PARAM: self.cache_type}

    def __repr__(self) -> str:
        return f"TranscodedCodec({self.inner!r}, {GGMLType(self.cache_type).name})"

    def for_layer(self, rope, ggml_type, n_values):
        return TranscodedCodec(self.inner.for_layer(rope, FLOAT_TYPE, self.n_values(n_values)), self.cache_type)

    # -- tracks and parts: ``n_values`` is bytes per row, as deltakv.track.n_values records it ---

    def accepts(self, ggml_type, n_values):
        return (ggml_type == self.cache_type and n_values > 0 and n_values % self.block_bytes == 0
                and self.inner.accepts(FLOAT_TYPE, self.n_values(n_values)))

    def for_track(self, ggml_type, n_values):
        return self if self.accepts(ggml_type, n_values) else None

    def parts(self, ggml_type, n_values):
        return self.inner.parts(FLOAT_TYPE, self.n_values(n_values))

    def expected_part_rows(self, rows, first_row=0):
        return self.inner.expected_part_rows(rows, first_row)

    def rows_of_parts(self, parts):
        return self.inner.rows_of_parts(parts)

    def check_parts(self, parts, ggml_type, n_values, rows, first_row, where):
        self.inner.check_parts(parts, FLOAT_TYPE, self.n_values(n_values), rows, first_row, where)

    # -- coding ---------------------------------------------------------------------------

    def cache_values(self, blocks: np.ndarray, where: str) -> np.ndarray:
        """Rows of ggml blocks -> their values as f16 bits (the floats the inner codec codes)."""
        blocks = np.ascontiguousarray(blocks, np.uint8)
        n_values = self.n_values(blocks.shape[1])
        exact = np.empty((blocks.shape[0], n_values), np.uint32)
        self.requantizer._dequantize(blocks, n_values, kernels.KIND_F32, F16_TO_F32, exact)
        values = exact.view(np.float32)
        # f16 would saturate larger values silently (SPEC.md 5); the float codecs refuse them (6.3)
        outside = ~(np.abs(values) <= 65504.0)
        if outside.any():
            r, c = np.argwhere(outside)[0]
            raise CodecError(f"{where}: row {r}, value {c} of the {GGMLType(self.cache_type).name} cache is "
                             f"{values[r, c]!r}; transcoding needs values within +-65504 (convert without --transcode)")
        return kernels.f16_bits_from_f32(values)

    def _encode(self, rows, ggml_type, where, context=None):
        return self.inner.encode(self.cache_values(rows, where), FLOAT_TYPE, where, context=context)

    def decode_values(self, parts, n_values, row_lo, row_hi, context=None) -> np.ndarray:
        """The inner codec's f16 values (bits) of rows [row_lo, row_hi), before re-quantization."""
        return self.inner.decode(parts, FLOAT_TYPE, self.n_values(n_values), row_lo, row_hi, context=context)

    def requantize(self, values_f16: np.ndarray) -> np.ndarray:
        """f16 bits -> rows of ggml blocks of the cache's type, by ggml's reference quantizer."""
        floats = kernels.rows_to_f32(np.ascontiguousarray(values_f16), kernels.KIND_F16, F16_TO_F32)
        return self.requantizer._quantize(floats)

    def _decode(self, parts, ggml_type, n_values, row_lo, row_hi, out, context=None):
        if row_hi <= row_lo:
            blocks = np.empty((0, n_values), np.uint8)
        else:
            blocks = self.requantize(self.decode_values(parts, n_values, row_lo, row_hi, context))
        if out is None:
            return blocks
        out[...] = blocks
        return out

    # -- error bound ----------------------------------------------------------------------

    def error_bound(self, parts, ggml_type, decoded, first_row=0, *, values=None):
        """What the parts prove about the re-quantized values (``decoded``: rows of blocks) against
        the cache's values; ``values``: the inner codec's f16 output of the same rows
        (:meth:`decode_values`), which the bound is built on. Three errors add up: the source's
        rounding to f16, the inner codec's (its own bound), and the re-quantization's (ggml's rule,
        bounded from the stored scales and codes as for the q8_0 / q4_0 codecs)."""
        if values is None:
            raise TypeError("TranscodedCodec.error_bound needs values= (decode_values of the same rows)")
        inner = self.inner.error_bound(parts, FLOAT_TYPE, values, first_row=first_row)
        requant = bounds.per_value(self.requantizer._block_bound(np.ascontiguousarray(decoded, np.uint8)))
        magnitude = np.abs(bounds.as_float64(values, FLOAT_TYPE))
        if inner.group == 1:
            source = bounds.half_ulp(magnitude + inner.limit, FLOAT_TYPE)
            return ErrorBound(1, inner.limit + requant + source)
        # an L2 bound per group: add the L2 norm of the per-value terms (triangle inequality)
        group_limit = np.repeat(inner.limit, inner.group, axis=1)
        source = bounds.half_ulp(magnitude + group_limit, FLOAT_TYPE)
        extra = requant + source
        extra_norm = np.sqrt((extra.reshape(extra.shape[0], -1, inner.group) ** 2).sum(axis=2))
        return ErrorBound(inner.group, inner.limit + extra_norm)

    def value_rows(self, blocks: np.ndarray) -> np.ndarray:
        """Rows of ggml blocks of the cache's type -> float64 values (exact)."""
        blocks = np.ascontiguousarray(blocks, np.uint8)
        exact = np.empty((blocks.shape[0], self.n_values(blocks.shape[1])), np.uint32)
        self.requantizer._dequantize(blocks, exact.shape[1], kernels.KIND_F32, F16_TO_F32, exact)
        return exact.view(np.float32).astype(np.float64)


def transcoded(codec: Codec, ggml_type: int, row_bytes: int) -> Codec | None:
    """``codec`` (a float codec) transcoding a track of ``ggml_type`` blocks of ``row_bytes`` bytes per
    row, or None when that type has no requantizer or the codec cannot take the rows (a requested
    codec's own variant, ``Codec.for_track``, counts; the f16 fallback would be larger than the cache)."""
    if ggml_type not in REQUANTIZERS:
        return None
    block_values, block_bytes = GGML_BLOCK_SIZES[ggml_type]
    if row_bytes <= 0 or row_bytes % block_bytes:
        return None
    chosen = codec.for_track(FLOAT_TYPE, row_bytes // block_bytes * block_values)
    if chosen is None or chosen.name in ("raw", "f16"):
        return None
    return TranscodedCodec(chosen, ggml_type)


__all__ = ["TranscodedCodec", "TRANSCODE_PARAM", "REQUANTIZERS", "FLOAT_TYPE", "transcoded", "check_transcode_type"]
