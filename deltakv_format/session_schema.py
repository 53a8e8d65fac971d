"""The session schema (SPEC.md section 3) as data: every key-value of a .dkv, the tensor names, the track ids.

:data:`SESSION_KEYS` lists every GGUF key of a .dkv in the order a writer puts them: its type, whether it
is required, the length of its array (one entry per section, stream, track, segment or segment x stream),
the range of its values, and the :class:`SessionMetadata` field that holds it. The session writer
(:func:`encode_metadata`) and the reader's checks (:func:`decode_metadata`) are driven by this table, and
``tests/test_spec_agreement.py`` checks that SPEC.md's table says the same. The keys of the container
layer (checksums, architecture, version, header reserve) are in the table too, marked ``container``:
:mod:`deltakv_format.container` writes and checks them.

A track is one layer's K or V of one stream, named by its :class:`TrackId`; every tensor name of a .dkv
comes from one of the templates of :data:`TENSOR_TEMPLATES` (SPEC.md 3.1).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields

import numpy as np

from .constants import GGUFValueType
from .container import KEY_HEADER_CRC, KEY_RESERVE, KEY_TENSOR_CRC, KEY_VERSION
from .errors import CorruptError, DeltaKVError
from .gguf_io import KeyValue
from .state_model import BodyLayout, Framing

U8, U32, I32, U64, STR, ARR = (
    GGUFValueType.UINT8, GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64,
    GGUFValueType.STRING, GGUFValueType.ARRAY,
)
U16_MAX, U32_MAX = 0xFFFF, 0xFFFFFFFF

# ---- tracks ---------------------------------------------------------------------------------------

ROLES = ("k", "v")
"""The two roles of a track: a layer's K cache or its V cache (in this order in every stream)."""


@dataclass(frozen=True, order=True)
class TrackId:
    """Which matrix a track is: ``layer`` of stream ``stream``, its K (``role="k"``) or V (``"v"``)."""

    stream: int
    layer: int
    role: str

    def __post_init__(self):
        if self.role not in ROLES:
            raise ValueError(f"track role: expected one of {ROLES}, found {self.role!r}")

    @property
    def name(self) -> str:
        """``s{stream}.l{layer}.{role}``, as ``deltakv.track.name`` lists it."""
        return f"s{self.stream}.l{self.layer}.{self.role}"

    def part_tensor(self, segment: int, part: str) -> str:
        """The tensor holding codec part ``part`` of this track's rows in ``segment``."""
        return f"{self.name}.{segment}.{part}"


def stream_track_ids(stream: int, n_k: int, n_v: int) -> list[TrackId]:
    """The tracks of a stream in file order: its ``n_k`` K layers, then its ``n_v`` V layers."""
    return [TrackId(stream, layer, "k") for layer in range(n_k)] + [TrackId(stream, layer, "v") for layer in range(n_v)]


# ---- tensor names (SPEC.md 3.1) ----------------------------------------------------------------------

TENSOR_TEMPLATES = {
    "tokens": "tokens.{segment}",
    "token_blob": "token_blob",
    "section": "section.{section}",
    "cells": "s{stream}.cells.{segment}",
    "track_part": "{track}.{segment}.{part}",
}
"""Every tensor name of a session, by kind; ``{track}`` is a :attr:`TrackId.name`."""

TOKEN_BLOB = TENSOR_TEMPLATES["token_blob"]


def tokens_tensor(segment: int) -> str:
    return TENSOR_TEMPLATES["tokens"].format(segment=segment)


def section_tensor(section: int) -> str:
    return TENSOR_TEMPLATES["section"].format(section=section)


def cells_tensor(stream: int, segment: int) -> str:
    return TENSOR_TEMPLATES["cells"].format(stream=stream, segment=segment)


_NUMBER = r"(0|[1-9][0-9]*)"  # as str(int) writes it, so that a name parses back to itself
_TRACK_PART = re.compile(rf"s{_NUMBER}\.l{_NUMBER}\.([kv])\.{_NUMBER}\.([a-z0-9_]+)")
_BYTE_TENSORS = re.compile(rf"section\.{_NUMBER}|s{_NUMBER}\.cells\.{_NUMBER}")


def parse_track_part(name: str) -> tuple[TrackId, int, str] | None:
    """(track, segment, part) of a track part tensor's name; None for any other tensor."""
    m = _TRACK_PART.fullmatch(name)
    if m is None:
        return None
    return TrackId(int(m[1]), int(m[2]), m[3]), int(m[4]), m[5]


def is_byte_tensor(name: str) -> bool:
    """Whether ``name`` is an opaque section's or a stream's cell records (I8 tensors of one dimension)."""
    return _BYTE_TENSORS.fullmatch(name) is not None


# ---- key-values (SPEC.md 3) --------------------------------------------------------------------------

# What an array key has one entry of. "segment x stream" is row-major [segment][stream].
PER_SECTION, PER_STREAM, PER_TRACK, PER_SEGMENT = "section", "stream", "track", "segment"
PER_SEGMENT_STREAM = "segment x stream"
PER_TENSOR = "tensor"
ANY_LENGTH = "any"


@dataclass(frozen=True)
class SessionKey:
    """One GGUF key of a .dkv: what SPEC.md section 3 says about it, as data."""

    key: str
    value_type: GGUFValueType  # ARRAY for arrays
    element_type: GGUFValueType | None = None  # arrays only
    required: bool = True
    per: str | None = None  # arrays: what the array has one entry of (PER_*), or ANY_LENGTH
    field: str | None = None  # the SessionMetadata field; None for the container's keys
    defines: str | None = None  # this key's length (or value, for a scalar) is the number of ``defines``
    lo: int | None = None  # smallest allowed value (integer keys)
    hi: int | None = None  # largest allowed value (integer keys)
    index_of: str | None = None  # every value is an index into the ``index_of`` entries
    choices: frozenset[str] | None = None  # allowed values (string keys)
    container: bool = False  # written and checked by the container layer (deltakv_format.container)

    @property
    def is_array(self) -> bool:
        return self.value_type == ARR

    def spec_type(self) -> str:
        """The type as SPEC.md's table writes it: ``u32``, ``string``, ``u64[]``, ..."""
        short = _SPEC_TYPE_NAMES[self.element_type if self.is_array else self.value_type]
        return f"{short}[]" if self.is_array else short

    def type_description(self) -> str:
        return f"an array of {self.element_type.name}" if self.is_array else self.value_type.name


_SPEC_TYPE_NAMES = {U8: "u8", U32: "u32", I32: "i32", U64: "u64", STR: "string"}

FRAMINGS = frozenset(f.value for f in Framing)
LAYOUTS = frozenset(b.value for b in BodyLayout)
TOKEN_FORMATS = frozenset({"none", "plain", "packed"})
SECTION_KINDS = frozenset({"kv", "opaque"})


def _key(key, value_type, **kw) -> SessionKey:
    return SessionKey(key, value_type, **kw)


def _array(key, element_type, per, **kw) -> SessionKey:
    return SessionKey(key, ARR, element_type, per=per, **kw)


SESSION_KEYS: tuple[SessionKey, ...] = (
    _key(KEY_HEADER_CRC, U32, container=True),
    _key("general.architecture", STR, container=True),
    _key("general.alignment", U32, container=True),
    _key(KEY_VERSION, U32, container=True),
    _key("deltakv.source.framing", STR, field="framing", choices=FRAMINGS),
    _key("deltakv.source.layout", STR, field="layout", choices=LAYOUTS),
    _key("deltakv.source.file_version", U32, required=False, field="file_version"),
    _key("deltakv.source.seq_prefix_id", I32, required=False, field="seq_prefix_id"),
    _key("deltakv.source.arch", STR, required=False, field="arch"),
    _key("deltakv.source.token_format", STR, field="token_format", choices=TOKEN_FORMATS),
    _key("deltakv.codec", STR, field="codec_name"),
    _array("deltakv.section.kind", STR, PER_SECTION, field="section_kind", defines=PER_SECTION, choices=SECTION_KINDS),
    _array("deltakv.section.role", STR, PER_SECTION, field="section_role"),
    _array("deltakv.section.has_n_stream", U8, PER_SECTION, field="section_has_n_stream", lo=0, hi=1),
    _array("deltakv.stream.section", U32, PER_STREAM, field="stream_section", defines=PER_STREAM, lo=0,
           index_of=PER_SECTION),
    # Row counts are u32 words in the llama.cpp state; bounding them keeps all row arithmetic small.
    _array("deltakv.stream.cell_count", U64, PER_STREAM, field="stream_cells", lo=0, hi=U32_MAX),
    _array("deltakv.stream.cell_ext_bytes", U32, PER_STREAM, field="stream_ext", lo=0, hi=U16_MAX),
    _array("deltakv.stream.v_trans", I32, PER_STREAM, field="stream_v_trans", lo=-1, hi=1),
    _array("deltakv.stream.n_layer", I32, PER_STREAM, field="stream_n_layer", lo=-1),
    _array("deltakv.stream.n_rot_k", I32, PER_STREAM, field="stream_rot_k", lo=-1),
    _array("deltakv.stream.n_rot_v", I32, PER_STREAM, field="stream_rot_v", lo=-1),
    _array("deltakv.stream.n_k", U32, PER_STREAM, field="stream_n_k"),
    _array("deltakv.stream.n_v", U32, PER_STREAM, field="stream_n_v"),
    _array("deltakv.track.name", STR, PER_TRACK, field="track_name", defines=PER_TRACK),
    _array("deltakv.track.ggml_type", U32, PER_TRACK, field="track_ggml_type"),
    _array("deltakv.track.n_values", U64, PER_TRACK, field="track_n_values", lo=1, hi=U32_MAX),
    _array("deltakv.track.transposed", U8, PER_TRACK, field="track_transposed", lo=0, hi=1),
    _array("deltakv.track.codec", STR, PER_TRACK, field="track_codec"),
    _array("deltakv.track.keyframe_interval", U32, PER_TRACK, field="track_keyframe_interval"),
    _array("deltakv.track.rotation", U32, PER_TRACK, field="track_rotation"),
    # version 2: the parameters of codecs that take more than the two columns above (JSON objects)
    _array("deltakv.track.params", STR, PER_TRACK, required=False, field="track_params"),
    _key("deltakv.segment.count", U32, field="n_segments", defines=PER_SEGMENT),
    _array("deltakv.segment.first_row", U64, PER_SEGMENT_STREAM, field="seg_first_row", lo=0, hi=U32_MAX),
    _array("deltakv.segment.rows", U64, PER_SEGMENT_STREAM, field="seg_rows", lo=0, hi=U32_MAX),
    _array("deltakv.segment.first_token", U64, PER_SEGMENT, field="seg_first_token"),
    _array("deltakv.segment.tokens", U64, PER_SEGMENT, field="seg_tokens"),
    _array(KEY_TENSOR_CRC, U32, PER_TENSOR, container=True),
    _array(KEY_RESERVE, U8, ANY_LENGTH, container=True),
)

SESSION_KEY_BY_NAME = {k.key: k for k in SESSION_KEYS}
_METADATA_KEYS = tuple(k for k in SESSION_KEYS if not k.container)


@dataclass
class SessionMetadata:
    """The values of the session's own keys (every :data:`SESSION_KEYS` row that is not the container's),
    as Python values: ``str``/``int`` scalars (None for an absent optional key), lists for arrays (flat,
    row-major for the segment x stream ones)."""

    framing: str
    layout: str
    file_version: int | None
    seq_prefix_id: int | None
    arch: str | None
    token_format: str
    codec_name: str
    section_kind: list[str]
    section_role: list[str]
    section_has_n_stream: list[int]
    stream_section: list[int]
    stream_cells: list[int]
    stream_ext: list[int]
    stream_v_trans: list[int]
    stream_n_layer: list[int]
    stream_rot_k: list[int]
    stream_rot_v: list[int]
    stream_n_k: list[int]
    stream_n_v: list[int]
    track_name: list[str]
    track_ggml_type: list[int]
    track_n_values: list[int]
    track_transposed: list[int]
    track_codec: list[str]
    track_keyframe_interval: list[int]
    track_rotation: list[int]
    track_params: list[str] | None
    n_segments: int
    seg_first_row: list[int]
    seg_rows: list[int]
    seg_first_token: list[int]
    seg_tokens: list[int]


def _counts_so_far(counts: dict[str, int], row: SessionKey, n: int) -> None:
    counts[row.defines] = n
    if row.defines in (PER_SEGMENT, PER_STREAM) and PER_SEGMENT in counts and PER_STREAM in counts:
        counts[PER_SEGMENT_STREAM] = counts[PER_SEGMENT] * counts[PER_STREAM]


def _bounds(row: SessionKey, counts: dict[str, int]) -> tuple[int | None, int | None]:
    hi = row.hi
    if row.index_of is not None:
        hi = max(counts[row.index_of] - 1, 0)
    return row.lo, hi


def _expected_range(lo, hi) -> str:
    return f"at least {lo}" if hi is None else f"{lo}..{hi}"


def decode_metadata(kvs: dict[str, KeyValue]) -> SessionMetadata:
    """The session's key-values, each checked against its :data:`SESSION_KEYS` row: present if required,
    of its type, of its length, within its range or choices. Raises CorruptError naming the key, what it
    expected and what it found, at the value's offset. (What ties keys together, such as the tracks
    adding up to the streams' layers, the reader checks on the result.)"""
    values: dict[str, object] = {}
    counts: dict[str, int] = {}
    for row in _METADATA_KEYS:
        kv = kvs.get(row.key)
        if kv is None:
            if row.required:
                raise CorruptError(f"missing key {row.key!r}")
            values[row.field] = None
            continue
        if kv.value_type != row.value_type or (row.is_array and kv.element_type != row.element_type):
            found = kv.value_type.name if kv.value_type != ARR else f"an array of {GGUFValueType(kv.element_type).name}"
            raise CorruptError(f"{row.key}: expected {row.type_description()}, found {found}", offset=kv.value_offset)
        if not row.is_array:
            if row.choices is not None and kv.value not in row.choices:
                raise CorruptError(f"{row.key}: expected one of {sorted(row.choices)}, found {kv.value!r}",
                                   offset=kv.value_offset)
            if row.defines is not None:
                _counts_so_far(counts, row, kv.value)
            values[row.field] = kv.value
            continue
        entries = kv.value
        if row.defines is not None:
            _counts_so_far(counts, row, len(entries))
        elif row.per in counts and len(entries) != counts[row.per]:
            raise CorruptError(f"{row.key}: expected {counts[row.per]} entries, found {len(entries)}", offset=kv.value_offset)
        if row.element_type == STR:
            if row.choices is not None:
                bad = next((v for v in entries if v not in row.choices), None)
                if bad is not None:
                    raise CorruptError(f"{row.key}: expected entries in {sorted(row.choices)}, found {bad!r}",
                                       offset=kv.value_offset)
            values[row.field] = list(entries)
            continue
        ints = [int(v) for v in entries]
        lo, hi = _bounds(row, counts)
        for i, v in enumerate(ints):
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                # the entries start after the u32 element type and the u64 count
                raise CorruptError(f"{row.key}[{i}]: expected {_expected_range(lo, hi)}, found {v}",
                                   offset=kv.value_offset + 12)
        values[row.field] = ints
    return SessionMetadata(**values)


def encode_metadata(meta: SessionMetadata) -> list[KeyValue]:
    """The session's key-values in table order, for a writer. Refuses (DeltaKVError) metadata that
    :func:`decode_metadata` would refuse: a writer never writes a file its reader rejects."""
    out = []
    counts: dict[str, int] = {}
    for row in _METADATA_KEYS:
        value = getattr(meta, row.field)
        if value is None:
            if row.required:
                raise DeltaKVError(f"{row.key}: a required key, but the writer has no value for it")
            continue
        if not row.is_array:
            if row.choices is not None and value not in row.choices:
                raise DeltaKVError(f"{row.key}: expected one of {sorted(row.choices)}, found {value!r}")
            if row.defines is not None:
                _counts_so_far(counts, row, value)
            out.append(KeyValue(row.key, row.value_type, value))
            continue
        entries = list(value)
        if row.defines is not None:
            _counts_so_far(counts, row, len(entries))
        elif row.per in counts and len(entries) != counts[row.per]:
            raise DeltaKVError(f"{row.key}: expected {counts[row.per]} entries (one per {row.per}), found {len(entries)}")
        if row.element_type == STR:
            bad = next((v for v in entries if v not in row.choices), None) if row.choices is not None else None
            if bad is not None:
                raise DeltaKVError(f"{row.key}: expected entries in {sorted(row.choices)}, found {bad!r}")
            out.append(KeyValue(row.key, ARR, entries, STR))
            continue
        lo, hi = _bounds(row, counts)
        bad = next(((i, v) for i, v in enumerate(entries) if (lo is not None and v < lo) or (hi is not None and v > hi)), None)
        if bad is not None:
            raise DeltaKVError(f"{row.key}[{bad[0]}]: expected {_expected_range(lo, hi)}, found {bad[1]}")
        out.append(KeyValue(row.key, ARR, np.asarray(entries), row.element_type))
    return out


def _check_table() -> None:
    """The table and SessionMetadata name the same fields, in the same order (a programming error otherwise)."""
    table = [k.field for k in _METADATA_KEYS]
    record = [f.name for f in fields(SessionMetadata)]
    if table != record:
        raise RuntimeError(f"SESSION_KEYS fields {table} and SessionMetadata fields {record} disagree")


_check_table()
