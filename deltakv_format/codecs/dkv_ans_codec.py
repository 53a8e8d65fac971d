"""The ``dkv-ans`` codec class (SPEC.md 6.5); its arithmetic lives in ``ans`` and ``dkv_ans``."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from ..constants import CODEC_DKV_ANS, DEFAULT_RATE_K, DEFAULT_RATE_V, FLOAT_TYPES, GGMLType
from ..errors import CodecError, CorruptError
from . import ans, bounds
from . import Codec, KIND_OF_TYPE, Part, check_finite, register_codec
from .bounds import ErrorBound
from .dkv_ans import (
    F32_ONE_BITS,
    HEAD_FIXED_BYTES,
    Head,
    ROPE_KINDS,
    TrackContext,
    encode_segment,
    estimated_side_bits,
    f32_bits,
    f32_of_bits,
    parse_head,
)

# Rates are hundredths of a bit per K/V value; see eval/EVAL.md for what each rate measured. The K and
# V defaults live in constants.py (DEFAULT_RATE_K / DEFAULT_RATE_V): a codec named without a rate for a
# role gets that role's (``role_defaults``); one made without a role, DEFAULT_RATE.
DEFAULT_RATE = DEFAULT_RATE_V
SOURCE_BITS = {GGMLType.F16: 16, GGMLType.BF16: 16, GGMLType.F32: 32}
# Side information is budgeted as if spread over at least this many rows, so that a short segment
# (an append of a few tokens) gets the step, hence the quality, of a long one.
SIDE_ROWS_FLOOR = 1024
DECODE_WHERE = "dkv-ans segment"


@dataclass(frozen=True)
class CodedRows:
    """The coded rows [first, end) a decode asks of a segment: its words and parsed head, the cells'
    positions of those rows (None without rotary parameters), and where they go in the output."""

    first: int
    end: int
    words: np.ndarray
    head: Head
    positions: np.ndarray | None
    out: np.ndarray


def corrupt_stream(stream: int) -> CorruptError:
    """The error of a stream that does not decode (SPEC.md 6.5), the same from every decoder."""
    return CorruptError(f"{DECODE_WHERE}: rANS stream {stream} does not decode to its rows (damaged data)")


_ROPE_TABLES: dict = {}
"""The encoder's last rotary table: (id of the cells' positions array, rows, angles) -> table, kept while
that array lives. Every K layer of a stream has the same cells (write_session hands each track of a
stream the same positions) and usually the same angles; the table costs about a fifth of a layer's encode."""


def _encoder_rope_table(codec: "DkvAnsCodec", context, lo: int, hi: int, where: str) -> np.ndarray:
    source = context.positions if context is not None else None
    key = (id(source), lo, hi, codec.thetas.tobytes())
    table = _ROPE_TABLES.get(key)
    if table is None:
        table = ans.rope_table(codec._positions(context, lo, hi, where), codec.thetas)
        try:
            weakref.finalize(source, _ROPE_TABLES.pop, key, None)
        except TypeError:  # positions that cannot be watched (a list): not kept
            return table
        _ROPE_TABLES.clear()
        _ROPE_TABLES[key] = table
    return table


@register_codec
class DkvAnsCodec(Codec):
    """Rotary embedding undone, first rows exact, one step per segment, rANS-coded integers."""

    name = CODEC_DKV_ANS
    parameters = {
        "rate": DEFAULT_RATE, "sink_rows": 4, "stream_rows": 32,
        "rope": 0, "rope_dims": 0, "head_dim": 0, "theta_scale_f32": 0, "freq_scale_f32": F32_ONE_BITS,
    }
    takes_context = True
    role_defaults = {"k": {"rate": DEFAULT_RATE_K}, "v": {"rate": DEFAULT_RATE_V}}

    def check_parameters(self):
        if not 10 <= self.rate <= 1600:
            raise CodecError(f"codec {self.name}: rate must be 10..1600 (hundredths of a bit per value), found {self.rate}")
        if not 0 <= self.sink_rows <= 65536 or not 1 <= self.stream_rows <= 65536:
            raise CodecError(f"codec {self.name}: sink_rows 0..65536 and stream_rows 1..65536, found "
                             f"{self.sink_rows} and {self.stream_rows}")
        if self.rope not in ROPE_KINDS.values():
            raise CodecError(f"codec {self.name}: rope must be 0 (none), 1 (norm) or 2 (neox), found {self.rope}")
        if self.rope:
            theta, scale = f32_of_bits(self.theta_scale_f32 & 0xFFFFFFFF), f32_of_bits(self.freq_scale_f32 & 0xFFFFFFFF)
            if not (self.head_dim >= 2 and 2 <= self.rope_dims <= self.head_dim and self.rope_dims % 2 == 0):
                raise CodecError(f"codec {self.name}: rope needs an even rope_dims within head_dim, found "
                                 f"rope_dims {self.rope_dims}, head_dim {self.head_dim}")
            if not (0 < theta <= 1 and 0 < scale <= 1024 and np.isfinite(theta) and np.isfinite(scale)):
                raise CodecError(f"codec {self.name}: theta_scale {theta!r} must be in (0, 1] and freq_scale "
                                 f"{scale!r} in (0, 1024]")

    @classmethod
    def with_rope(cls, base: "DkvAnsCodec", kind: str, n_rot: int, head_dim: int, theta_scale: float,
                  freq_scale: float = 1.0) -> "DkvAnsCodec":
        """``base`` with the rotary parameters of one layer (kind ``none``, ``norm`` or ``neox``)."""
        config = base.get_config()
        config.update(rope=ROPE_KINDS[kind], rope_dims=n_rot if kind != "none" else 0,
                      head_dim=head_dim if kind != "none" else 0,
                      theta_scale_f32=f32_bits(theta_scale) if kind != "none" else 0,
                      freq_scale_f32=f32_bits(freq_scale) if kind != "none" else F32_ONE_BITS)
        return Codec.from_config(config)

    def for_layer(self, rope, ggml_type, n_values):
        if rope is None or rope.kind == "none" or rope.head_dim <= 0 or n_values % rope.head_dim:
            return self
        return DkvAnsCodec.with_rope(self, rope.kind, rope.n_rot, rope.head_dim, rope.theta_scale, rope.freq_scale)

    @property
    def thetas(self) -> np.ndarray:
        return ans.rope_thetas(self.rope_dims, f32_of_bits(self.theta_scale_f32), f32_of_bits(self.freq_scale_f32))

    # -- tracks and parts ----------------------------------------------------------------

    def accepts(self, ggml_type, n_values):
        if ggml_type not in FLOAT_TYPES or n_values < 1:
            return False
        return not self.rope or n_values % self.head_dim == 0

    def parts(self, ggml_type, n_values):
        return [Part("sink", ggml_type, n_values), Part("head", GGMLType.I8, 0), Part("data", GGMLType.I8, 0)]

    def n_sink(self, rows: int, first_row: int) -> int:
        return min(self.sink_rows, rows) if first_row == 0 else 0

    def expected_part_rows(self, rows, first_row=0):
        return {"sink": self.n_sink(rows, first_row)}

    def rows_of_parts(self, parts):
        head = np.ascontiguousarray(parts.get("head", np.empty(0, np.uint8))).view(np.uint8).reshape(-1)
        coded = int(head[:4].view("<u4")[0]) if head.size >= HEAD_FIXED_BYTES else 0
        return parts["sink"].shape[0] + coded

    def check_parts(self, parts, ggml_type, n_values, rows, first_row, where):
        coded = rows - parts["sink"].shape[0]
        head = parts.get("head")
        data = parts.get("data")
        n_head = 0 if head is None else head.size
        if coded == 0:
            if n_head or (data is not None and data.size):
                raise CorruptError(f"{where}: a head or data part for a segment without coded rows")
            return
        if data is None or data.size % 2:
            raise CorruptError(f"{where}: data part of {0 if data is None else data.size} bytes, expected an even count")
        parse_head(head, n_values, coded, self.stream_rows, data.size // 2, where)

    # -- coding ---------------------------------------------------------------------------

    def _positions(self, context, lo, hi, where):
        positions = None if context is None else context.positions
        if positions is None or len(positions) < hi:
            raise CodecError(f"{where}: codec {self.name} with rotary parameters needs the cells' positions "
                             f"(rows {lo}..{hi}), found {'none' if positions is None else len(positions)}")
        positions = np.asarray(positions[lo:hi], np.int64)
        if positions.size and (positions.min() < 0 or positions.max() >= 1 << 31):
            raise CodecError(f"{where}: cell positions {int(positions.min())}..{int(positions.max())}; "
                             "rotary coding needs positions in 0..2^31-1")
        return positions

    def _encode(self, rows, ggml_type, where, context=None):
        rows = np.ascontiguousarray(rows)
        check_finite(rows, ggml_type, where)
        n, width = rows.shape
        first_row = 0 if context is None else context.first_row
        n_sink = self.n_sink(n, first_row)
        parts = {"sink": rows[:n_sink].copy(), "head": np.empty(0, np.uint8), "data": np.empty(0, np.uint8)}
        coded = n - n_sink
        if coded == 0:
            return parts
        table = None
        if self.rope:
            table = _encoder_rope_table(self, context, n_sink, n, where)
        side = estimated_side_bits(width, coded, self.stream_rows)
        budget = self.rate / 100 - side / (max(coded, SIDE_ROWS_FLOOR) * width)
        budget -= n_sink * SOURCE_BITS[ggml_type] / (max(n, SIDE_ROWS_FLOOR) * 1.0)
        head, words = encode_segment(rows[n_sink:], table if table is not None else np.empty((0, 0, 2), np.float32),
                                     bits_per_value=budget, stream_rows=self.stream_rows,
                                     head_dim=self.head_dim, n_rot=self.rope_dims, mode=self.rope,
                                     kind=KIND_OF_TYPE[ggml_type])
        parts["head"] = np.frombuffer(head.pack(), np.uint8).copy()
        parts["data"] = words.view(np.uint8).copy()
        return parts

    def split_decode(self, parts, n_values, row_lo, row_hi, out, context):
        """Rows [row_lo, row_hi) of a segment: copy the sink rows among them into ``out``; for the coded
        rows left, a :class:`CodedRows` (None when none are left). The CPU and GPU decoders share this;
        they differ only in who decodes the coded rows."""
        sink = parts["sink"]
        n_sink = sink.shape[0]
        if row_lo < n_sink:
            out[:min(row_hi, n_sink) - row_lo] = sink[row_lo:min(row_hi, n_sink)]
        clo, chi = max(row_lo, n_sink) - n_sink, row_hi - n_sink
        if chi <= clo:
            return None
        data = np.ascontiguousarray(parts["data"]).view(np.uint8).reshape(-1)
        if data.size % 2:
            raise CorruptError(f"{DECODE_WHERE}: data part of {data.size} bytes, expected an even count")
        words = data.view("<u2")
        head_raw = np.ascontiguousarray(parts["head"]).view(np.uint8).reshape(-1)
        head = parse_head(head_raw, n_values, None, self.stream_rows, words.size, DECODE_WHERE)
        if chi > head.n_rows:
            raise CorruptError(f"{DECODE_WHERE}: rows up to {chi} asked of {head.n_rows} coded rows")
        positions = self._positions(context, n_sink + clo, n_sink + chi, DECODE_WHERE) if self.rope else None
        return CodedRows(clo, chi, words, head, positions, out[max(row_lo, n_sink) - row_lo:])

    def _decode_rope_table(self, context, coded, n_sink: int) -> np.ndarray:
        """The rotary table of the coded rows' positions; computed once per segment row range and
        frequency set where the context keeps tables (every K layer of a stream asks for the same one)."""
        thetas = self.thetas
        cache = None if context is None else context.rope_tables
        if cache is None:
            return ans.rope_table(coded.positions, thetas)
        key = (n_sink + coded.first, n_sink + coded.end, thetas.tobytes())  # rows of the segment
        table = cache.get(key)
        if table is None:
            table = cache[key] = ans.rope_table(coded.positions, thetas)
        return table

    def _decode(self, parts, ggml_type, n_values, row_lo, row_hi, out, context=None):
        out = self._out(out, row_hi - row_lo, n_values, ggml_type)
        if row_hi <= row_lo:
            return out
        coded = self.split_decode(parts, n_values, row_lo, row_hi, out, context)
        if coded is None:
            return out
        head = coded.head
        table = self._decode_rope_table(context, coded, parts["sink"].shape[0]) if self.rope else np.empty((0, 0, 2), np.float32)
        bad = ans.decode_streams(coded.words, head.starts, coded.words.size, head.n_rows, self.stream_rows,
                                 head.classes, head.shifts, head.freqs, head.step, head.means, KIND_OF_TYPE[ggml_type],
                                 table, self.head_dim, self.rope_dims, self.rope, coded.first, coded.end, coded.out)
        if bad >= 0:
            raise corrupt_stream(bad)
        return out

    # -- error bound ----------------------------------------------------------------------

    def error_bound(self, parts, ggml_type, decoded, first_row=0):
        """Sink rows exact; coded values within half a step of the value before rotation (a rotated
        pair within sqrt(2) of that), plus f32 rounding and the emit step."""
        n = decoded.shape[0]
        limit = np.zeros(decoded.shape)
        n_sink = parts["sink"].shape[0]
        lo = max(first_row, n_sink) - first_row
        if lo >= n:
            return ErrorBound(1, limit)
        head = parse_head(parts["head"], decoded.shape[1], None, self.stream_rows, parts["data"].size // 2, "dkv-ans")
        values = bounds.as_float64(decoded[lo:], ggml_type)
        half = float(head.step) * (np.sqrt(2.0) if self.rope else 1.0) / 2
        eps = 2.0 ** -18 * (np.abs(values).max(axis=1, keepdims=True) + float(np.abs(head.means).max(initial=0))
                            + float(head.step))
        limit[lo:] = half * (1 + 2.0 ** -20) + eps + bounds.output_rounding(values, ggml_type)
        return ErrorBound(1, limit)


__all__ = ["DkvAnsCodec", "TrackContext", "DEFAULT_RATE", "DEFAULT_RATE_K", "DEFAULT_RATE_V"]
