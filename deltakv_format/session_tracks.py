"""Tracks: the K/V matrices of a session, and how a llama.cpp state's streams and layers map to them.

A track is one layer's K or V of one stream (SPEC.md section 3), a token-major matrix coded by one codec.
Streams are numbered globally in body order; each stream's tracks are its K layers, then its V layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .codecs import Codec
from .constants import FLOAT_TYPES, GGML_BLOCK_SIZES, GGMLType, ggml_row_bytes
from .container import element_view_dtype
from .errors import DeltaKVError
from .session_schema import TrackId
from .state_model import KVCacheSection, KVStream, KVTensor, LlamaState


@dataclass
class Track:
    """One track of a stored session: which matrix it is, its cache type and row size, its codec."""

    index: int  # position in deltakv.track.*
    id: TrackId
    ggml_type: int
    n_values: int  # values per row (float types) or bytes per row (raw quantized types)
    transposed: bool
    codec: Codec

    @property
    def name(self) -> str:
        return self.id.name

    @property
    def stream(self) -> int:
        return self.id.stream

    def part_name(self, segment: int, part: str) -> str:
        return self.id.part_tensor(segment, part)


def live_streams(state: LlamaState) -> list[tuple[int, KVStream]]:
    """(section index, stream) of every KV stream of ``state``, in body order (the global stream numbers)."""
    return [(i, st) for i, sec in enumerate(state.sections) if isinstance(sec, KVCacheSection) for st in sec.streams]


def live_tracks(stream_index: int, stream: KVStream) -> list[tuple[TrackId, KVTensor]]:
    """The tracks of a live stream, in file order: its K layers, then its V layers."""
    return ([(TrackId(stream_index, i, "k"), t) for i, t in enumerate(stream.k)]
            + [(TrackId(stream_index, i, "v"), t) for i, t in enumerate(stream.v)])


def track_rows(t: KVTensor) -> np.ndarray:
    """A cache tensor's rows, token-major, as the codecs take them."""
    if t.transposed and not t.is_float:
        raise DeltaKVError(f"a transposed V of quantized type {GGMLType(t.ggml_type).name} (llama.cpp never writes one)")
    return t.rows()


def stored_row_size(t: KVTensor) -> int:
    """What ``deltakv.track.n_values`` records for a cache tensor: values per row, or bytes per row
    for the types stored raw."""
    return t.n_values if t.is_float else t.row_bytes


def source_row_bytes(t: Track) -> int:
    """Bytes of one row of the track in the llama.cpp state."""
    return ggml_row_bytes(t.ggml_type, t.n_values) if t.ggml_type in FLOAT_TYPES else t.n_values


def source_n_values(t: Track) -> int:
    """Values per row of the track in the llama.cpp state (``n_values`` counts bytes for raw types)."""
    if t.ggml_type in FLOAT_TYPES:
        return t.n_values
    block_values, block_bytes = GGML_BLOCK_SIZES[t.ggml_type]
    return t.n_values // block_bytes * block_values


def empty_part(part) -> np.ndarray:
    """A codec part with no rows, of the dtype and row width its decoder expects."""
    dt = element_view_dtype(part.ggml_type)
    if part.n_values == 0:
        return np.empty(0, dt)
    block_values, block_bytes = GGML_BLOCK_SIZES[part.ggml_type]
    return np.empty((0, part.n_values // block_values * block_bytes // dt.itemsize), dt)


def chunk_rows(stream_tracks: list[Track]) -> int:
    """The least common multiple of the keyframe intervals of a stream's tracks: a segment of the
    stream starts on a multiple of it (SPEC.md 3.2)."""
    n = 1
    for t in stream_tracks:
        n = n * t.codec.keyframe_interval // math.gcd(n, t.codec.keyframe_interval)
    return n


def tracks_by_stream(tracks: list[Track]) -> dict[int, list[Track]]:
    by_stream: dict[int, list[Track]] = {}
    for t in tracks:
        by_stream.setdefault(t.stream, []).append(t)
    return by_stream
