"""A llama.cpp state stored in a .dkv container: the mapping of SPEC.md, "Session layout".

``write_session`` stores a parsed :class:`LlamaState` with a codec;
``DkvSession`` opens a .dkv, decodes any track or token range, and rebuilds the
state; ``append_session`` extends a stored session with the rows of a newer
state of the same context, writing only the new rows (plus the re-encoded last
partial keyframe chunk).
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .codecs import Codec, codec_for_track, get_codec
from .constants import FLOAT_TYPES, GGML_BLOCK_SIZES, GGMLType, GGUFValueType
from .container import DkvFile, TensorData, append_container, base_kvs, element_view_dtype, write_container
from .container import write_container_to
from .errors import CorruptError, DeltaKVError, SessionMismatchError
from .gguf_io import KeyValue
from .state_model import (
    BodyLayout,
    Framing,
    KVCacheSection,
    KVStream,
    KVTensor,
    LlamaState,
    OpaqueSection,
)

U8, U32, I32, U64, STR, ARR = (
    GGUFValueType.UINT8, GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64,
    GGUFValueType.STRING, GGUFValueType.ARRAY,
)


@dataclass
class Track:
    """One layer's K or V of one stream: a token-major matrix coded by one codec."""

    index: int
    name: str  # "s{stream}.l{layer}.{k|v}"
    stream: int
    ggml_type: int
    n_values: int  # values per row (float types) or bytes per row (raw quantized types)
    transposed: bool
    codec: Codec

    def part_name(self, segment: int, role: str) -> str:
        return f"{self.name}.{segment}.{role}"


def _arr(key, values, element_type):
    if element_type == STR:
        return KeyValue(key, ARR, list(values), STR)
    return KeyValue(key, ARR, np.asarray(values), element_type)


def cell_record_ends(cells, count: int, ext_bytes: int) -> np.ndarray:
    """Byte offset of the end of each cell record: i32 pos, u32 n_seq_id, [ext], i32 seq_id[n]."""
    buf = memoryview(cells)
    if count * 8 > len(buf):  # each record has at least 8 bytes: check before allocating per count
        raise CorruptError(f"{count} cell records need at least {count * 8} bytes, found {len(buf)}", offset=0)
    one_id = 12 + ext_bytes  # the usual record: one sequence id (every cell of a sequence state)
    if len(buf) == count * one_id and count:
        n_seq = np.frombuffer(buf, np.uint8).reshape(count, one_id)[:, 4:8].copy().view("<u4").reshape(-1)
        if np.all(n_seq == 1):
            return np.arange(1, count + 1, dtype=np.int64) * one_id
    ends = np.empty(count, np.int64)
    pos = 0
    for i in range(count):
        if pos + 8 + ext_bytes > len(buf):
            raise CorruptError(f"cell {i} record ends past the {len(buf)} bytes of cell records", offset=pos)
        n_seq = int.from_bytes(buf[pos + 4:pos + 8], "little")
        pos += 8 + ext_bytes + 4 * n_seq
        if pos > len(buf):
            raise CorruptError(f"cell {i} claims {n_seq} sequence ids, past the end of the cell records", offset=pos)
        ends[i] = pos
    return ends


def owned_spans(seg_first_row, seg_rows, stream: int) -> list[tuple[int, int, int]]:
    """(segment, first row, end row) of the rows of ``stream`` each segment still owns, in row order.

    A segment owns every row from its first on (SPEC.md 3.2): earlier ones keep what is before."""
    spans = []
    for s in range(len(seg_rows)):
        rows = int(seg_rows[s][stream])
        if not rows:
            continue
        first = int(seg_first_row[s][stream])
        spans = [(seg, lo, min(hi, first)) for seg, lo, hi in spans]
        spans.append((s, first, first + rows))
    return [sp for sp in spans if sp[2] > sp[1]]


def assemble_cells(spans, records_of_segment, ext_bytes: int, stream: int) -> bytes:
    """The cell records of a stream from its owned ``spans``; ``records_of_segment(s)`` gives the
    record bytes segment ``s`` stores and how many records they are."""
    out = []
    for s, first, end in spans:
        raw, rows = records_of_segment(s)
        ends = cell_record_ends(raw, rows, ext_bytes)
        if len(ends) and ends[-1] != len(raw):
            raise CorruptError(f"cell records of stream {stream} segment {s} have {len(raw) - ends[-1]} extra bytes")
        out.append(bytes(raw[:ends[end - first - 1]]) if end > first else b"")
    return b"".join(out)


def _streams(state: LlamaState) -> list[tuple[int, KVStream]]:
    return [(i, st) for i, sec in enumerate(state.sections) if isinstance(sec, KVCacheSection) for st in sec.streams]


def _stream_tracks(stream: KVStream) -> list[tuple[str, KVTensor]]:
    return [(f"l{i}.k", t) for i, t in enumerate(stream.k)] + [(f"l{i}.v", t) for i, t in enumerate(stream.v)]


def _track_rows(t: KVTensor) -> np.ndarray:
    if t.transposed and not t.is_float:
        raise DeltaKVError(f"a transposed V of quantized type {GGMLType(t.ggml_type).name} (llama.cpp never writes one)")
    return t.rows()


def _empty_part(part) -> np.ndarray:
    from .constants import GGML_BLOCK_SIZES
    from .container import element_view_dtype

    dt = element_view_dtype(part.ggml_type)
    block_values, block_bytes = GGML_BLOCK_SIZES[part.ggml_type]
    return np.empty((0, part.n_values // block_values * block_bytes // dt.itemsize), dt)


def _chunk_of(stream_tracks: list[Track]) -> int:
    n = 1
    for t in stream_tracks:
        n = n * t.codec.keyframe_interval // math.gcd(n, t.codec.keyframe_interval)
    return n


class _SessionBuilder:
    """Collects the key-values and tensors of one write or append."""

    def __init__(self):
        self.tensors: list[TensorData] = []

    def add(self, name, ggml_type, array, n_inner=None):
        array = np.ascontiguousarray(array)
        if array.size == 0:
            return
        if array.ndim == 1:
            shape = (array.shape[0] if n_inner is None else n_inner,)
        else:
            inner = array.shape[1] if n_inner is None else n_inner
            shape = (inner, array.shape[0])
        self.tensors.append(TensorData(name, ggml_type, shape, array))

    def add_track_segment(self, track: Track, segment: int, rows: np.ndarray, where: str):
        parts = track.codec.encode(rows, track.ggml_type, where) if rows.shape[0] else {}
        for part in track.codec.parts(track.ggml_type, track.n_values):
            if part.role in parts:
                self.add(track.part_name(segment, part.role), part.ggml_type, parts[part.role], part.n_values)


def _plan_tracks(state: LlamaState, codec_of_role: dict[str, Codec], track_codecs: list[Codec] | None = None) -> list[Track]:
    """One track per layer K/V of every stream; ``track_codecs`` (a rewrite of a stored session)
    gives each track the codec it already had."""
    tracks = []
    for g, (_, stream) in enumerate(_streams(state)):
        for suffix, t in _stream_tracks(stream):
            n_values = t.n_values if t.is_float else t.row_bytes
            codec = codec_of_role[suffix[-1]]
            chosen = codec_for_track(codec, t.ggml_type, t.n_values) if t.is_float else get_codec("raw")
            if track_codecs is not None:
                chosen = track_codecs[len(tracks)]
            tracks.append(Track(len(tracks), f"s{g}.{suffix}", g, t.ggml_type, n_values, t.transposed, chosen))
    return tracks


def _session_kvs(state: LlamaState, codec: Codec, tracks: list[Track], seg_first_row, seg_rows,
                 seg_first_token, seg_tokens, stream_cells) -> list[KeyValue]:
    kvs = base_kvs()
    kvs.append(KeyValue("deltakv.source.framing", STR, state.framing.value))
    kvs.append(KeyValue("deltakv.source.layout", STR, state.layout.value))
    if state.file_version is not None:
        kvs.append(KeyValue("deltakv.source.file_version", U32, state.file_version))
    if state.seq_prefix_id is not None:
        kvs.append(KeyValue("deltakv.source.seq_prefix_id", I32, state.seq_prefix_id))
    if state.arch_bytes is not None:
        try:
            arch = state.arch_bytes.decode("utf-8")
        except UnicodeDecodeError as e:
            # deltakv.source.arch is a GGUF string (UTF-8); llama.cpp's arch names are ASCII
            raise CorruptError(f"arch string: expected UTF-8 text (a llama.cpp architecture name), found "
                               f"{bytes(state.arch_bytes)[:32]!r} ({e.reason} at byte {e.start})") from e
        kvs.append(KeyValue("deltakv.source.arch", STR, arch))
    token_format = "none" if state.token_words is None else ("plain" if state.tokens() is not None else "packed")
    kvs.append(KeyValue("deltakv.source.token_format", STR, token_format))
    kvs.append(KeyValue("deltakv.codec", STR, codec.name))
    sections = state.sections
    kvs.append(_arr("deltakv.section.kind", ["kv" if isinstance(s, KVCacheSection) else "opaque" for s in sections], STR))
    kvs.append(_arr("deltakv.section.role", ["attention" if isinstance(s, KVCacheSection) else s.role for s in sections], STR))
    kvs.append(_arr("deltakv.section.has_n_stream",
                    [int(s.has_n_stream) if isinstance(s, KVCacheSection) else 0 for s in sections], U8))
    streams = _streams(state)
    kvs.append(_arr("deltakv.stream.section", [i for i, _ in streams], U32))
    kvs.append(_arr("deltakv.stream.cell_count", stream_cells, U64))
    kvs.append(_arr("deltakv.stream.cell_ext_bytes", [s.cell_ext_bytes for _, s in streams], U32))
    kvs.append(_arr("deltakv.stream.v_trans", [-1 if s.v_trans is None else s.v_trans for _, s in streams], I32))
    kvs.append(_arr("deltakv.stream.n_layer", [-1 if s.n_layer is None else s.n_layer for _, s in streams], I32))
    kvs.append(_arr("deltakv.stream.n_rot_k", [-1 if s.rot is None else s.rot[0] for _, s in streams], I32))
    kvs.append(_arr("deltakv.stream.n_rot_v", [-1 if s.rot is None else s.rot[1] for _, s in streams], I32))
    kvs.append(_arr("deltakv.stream.n_k", [len(s.k) for _, s in streams], U32))
    kvs.append(_arr("deltakv.stream.n_v", [len(s.v) for _, s in streams], U32))
    kvs.append(_arr("deltakv.track.name", [t.name for t in tracks], STR))
    kvs.append(_arr("deltakv.track.ggml_type", [t.ggml_type for t in tracks], U32))
    kvs.append(_arr("deltakv.track.n_values", [t.n_values for t in tracks], U64))
    kvs.append(_arr("deltakv.track.transposed", [int(t.transposed) for t in tracks], U8))
    kvs.append(_arr("deltakv.track.codec", [t.codec.name for t in tracks], STR))
    kvs.append(_arr("deltakv.track.keyframe_interval", [t.codec.keyframe_interval for t in tracks], U32))
    kvs.append(_arr("deltakv.track.rotation", [t.codec.rotation for t in tracks], U32))
    kvs.append(KeyValue("deltakv.segment.count", U32, len(seg_first_token)))
    kvs.append(_arr("deltakv.segment.first_row", seg_first_row, U64))
    kvs.append(_arr("deltakv.segment.rows", seg_rows, U64))
    kvs.append(_arr("deltakv.segment.first_token", seg_first_token, U64))
    kvs.append(_arr("deltakv.segment.tokens", seg_tokens, U64))
    return kvs


def write_session(state: LlamaState, path=None, codec: Codec | str = "dkv-q4", progress=None, *,
                  k_codec: Codec | str | None = None, v_codec: Codec | str | None = None,
                  extra_kvs: list[KeyValue] = (), extra_tensors: list[TensorData] = (),
                  track_codecs: list[Codec] | None = None, to=None) -> "DkvSession | None":
    """Store ``state`` as a new .dkv at ``path`` (atomically) and return it opened.

    With ``to=`` a writable binary stream in place of ``path``, the same bytes go to that stream,
    front to back (:func:`container.write_container_to`), and None is returned: there is no file
    to open. :func:`session_bytes` gives them as bytes.

    ``k_codec`` / ``v_codec`` override ``codec`` for the K or the V tracks (every track records its
    own codec, ``deltakv.track.codec`` in SPEC.md section 3; later appends keep it). K matters more to
    the model than V, so ``k_codec="q8_0"`` with the default for V gets q8_0-level quality at fewer
    bits than q8_0 for both (eval/EVAL.md).
    ``extra_kvs`` / ``extra_tensors`` carry an application's own metadata (keys outside
    ``deltakv.`` + ``general.``, or under ``deltakv.runtime.``); readers ignore what they do not know.
    """
    if (path is None) == (to is None):
        raise TypeError(f"write_session: expected a path or to= a binary stream, found "
                        f"{'both' if to is not None else 'neither'}")
    codec = get_codec(codec) if isinstance(codec, str) else codec
    codec_of_role = {role: get_codec(c) if isinstance(c, str) else (c or codec)
                     for role, c in (("k", k_codec), ("v", v_codec))}
    tracks = _plan_tracks(state, codec_of_role, track_codecs)
    builder = _SessionBuilder()
    tokens = state.tokens()
    if state.token_words is not None and tokens is None:
        builder.add("token_blob", GGMLType.I8, np.frombuffer(state.token_words, np.uint8))
    n_tokens = 0 if tokens is None else len(tokens)
    if tokens is not None:
        builder.add("tokens.0", GGMLType.I32, tokens)
    for i, sec in enumerate(state.sections):
        if isinstance(sec, OpaqueSection):
            builder.add(f"section.{i}", GGMLType.I8, np.frombuffer(sec.data, np.uint8))
    streams = _streams(state)
    for g, (_, stream) in enumerate(streams):
        builder.add(f"s{g}.cells.0", GGMLType.I8, np.frombuffer(stream.cells, np.uint8))
    by_stream = {}
    for track in tracks:
        by_stream.setdefault(track.stream, []).append(track)
    for g, (_, stream) in enumerate(streams):
        for track, (_, kv) in zip(by_stream.get(g, []), _stream_tracks(stream)):
            builder.add_track_segment(track, 0, _track_rows(kv), track.name)
            if progress is not None:
                progress(track.name)
    cells = [s.cell_count for _, s in streams]
    kvs = _session_kvs(state, codec, tracks, [0] * len(streams), cells, [0], [n_tokens], cells) + list(extra_kvs)
    if to is not None:
        write_container_to(to, kvs, builder.tensors + list(extra_tensors))
        return None
    write_container(path, kvs, builder.tensors + list(extra_tensors))
    return DkvSession(path)


def session_bytes(state: LlamaState, codec: Codec | str = "dkv-q4", **options) -> bytes:
    """The .dkv that ``write_session(state, path, codec, **options)`` writes, as bytes (for a
    store, a socket or a cache in memory); ``options`` are write_session's keyword arguments."""
    stream = io.BytesIO()
    write_session(state, codec=codec, to=stream, **options)
    return stream.getvalue()  # no copy: BytesIO hands over its buffer when nothing else holds it


class DkvSession:
    """An opened .dkv session: metadata, tracks, decoding and rebuilding the llama.cpp state."""

    def __init__(self, path, *, verify_checksums: bool = True):
        """``path``: a .dkv file, or a :class:`DkvFile` already open (which the session then owns)."""
        opened = isinstance(path, DkvFile)
        self.file = path if opened else DkvFile(path, verify_checksums=verify_checksums)
        where = path.name if opened else str(path)
        try:
            self._load()
        except DeltaKVError as e:
            self.file.close()
            if e.path is None and where is not None:
                raise type(e)(e.bare_message, offset=e.offset, path=where) from e
            raise
        except (KeyError, ValueError, TypeError, IndexError) as e:
            self.file.close()
            raise CorruptError(f"inconsistent session metadata ({type(e).__name__}: {e})", path=where) from e

    @classmethod
    def from_buffer(cls, buffer, *, verify_checksums: bool = True, name: str | None = None) -> "DkvSession":
        """A session held in memory (bytes, memoryview, mmap): read-only and zero-copy, with the
        checks of a file (:meth:`DkvFile.from_buffer`); ``name`` is for error messages."""
        return cls(DkvFile.from_buffer(buffer, verify_checksums=verify_checksums, name=name))

    @property
    def path(self) -> Path:
        return self.file.path

    def _v(self, key, default=...):
        return self.file.value(key, default)

    def _kv(self, key: str, value_type: GGUFValueType, element_type: GGUFValueType | None = None,
            optional: bool = False) -> KeyValue | None:
        """The key-value ``key``, checked to have the type SPEC.md section 3 gives it."""
        kv = self.file.kvs.get(key)
        if kv is None:
            if optional:
                return None
            raise CorruptError(f"missing key {key!r}")
        if kv.value_type != value_type or (element_type is not None and kv.element_type != element_type):
            want = value_type.name if element_type is None else f"an array of {element_type.name}"
            found = kv.value_type.name if kv.value_type != ARR else f"an array of {GGUFValueType(kv.element_type).name}"
            raise CorruptError(f"{key}: expected {want}, found {found}", offset=kv.value_offset)
        return kv

    def _scalar(self, key: str, value_type: GGUFValueType, optional: bool = False, choices=None):
        kv = self._kv(key, value_type, optional=optional)
        if kv is None:
            return None
        if choices is not None and kv.value not in choices:
            raise CorruptError(f"{key}: expected one of {sorted(choices)}, found {kv.value!r}", offset=kv.value_offset)
        return kv.value

    def _list(self, key: str, element_type: GGUFValueType, n: int | None = None, lo: int | None = None,
              hi: int | None = None, choices=None) -> list:
        """An array key-value as a list, its type, length and value range checked."""
        kv = self._kv(key, ARR, element_type)
        value = kv.value
        if n is not None and len(value) != n:
            raise CorruptError(f"{key}: expected {n} entries, found {len(value)}", offset=kv.value_offset)
        if element_type == STR:
            if choices is not None:
                bad = next((v for v in value if v not in choices), None)
                if bad is not None:
                    raise CorruptError(f"{key}: expected entries in {sorted(choices)}, found {bad!r}", offset=kv.value_offset)
            return list(value)
        out = [int(v) for v in value]
        for i, v in enumerate(out):
            if (lo is not None and v < lo) or (hi is not None and v > hi):
                raise CorruptError(f"{key}[{i}]: expected {lo}..{hi}, found {v}", offset=kv.value_offset + 12)
        return out

    def _check_tensor(self, name: str, ggml_type: int, n: int | None = None) -> None:
        """A structural tensor (tokens, cells, sections) has the type and, if given, length it must."""
        info = self.file.tensor_infos.get(name)
        if info is None:
            return
        if info.ggml_type != ggml_type or len(info.shape) != 1 or (n is not None and info.shape[0] != n):
            want = f"{GGMLType(ggml_type).name} [{'n' if n is None else n}]"
            raise CorruptError(f"tensor {name!r}: expected {want}, found {GGMLType(info.ggml_type).name} {list(info.shape)}")

    def _load(self):
        U16_MAX, U32_MAX = 0xFFFF, 0xFFFFFFFF
        self.framing = Framing(self._scalar("deltakv.source.framing", STR, choices={f.value for f in Framing}))
        self.layout = BodyLayout(self._scalar("deltakv.source.layout", STR, choices={b.value for b in BodyLayout}))
        self.file_version = self._scalar("deltakv.source.file_version", U32, optional=True)
        self.seq_prefix_id = self._scalar("deltakv.source.seq_prefix_id", I32, optional=True)
        self.arch = self._scalar("deltakv.source.arch", STR, optional=True)
        self.token_format = self._scalar("deltakv.source.token_format", STR, choices={"none", "plain", "packed"})
        file_framing = self.framing in (Framing.SESSION_FILE, Framing.SEQUENCE_FILE)
        if file_framing != (self.token_format != "none"):
            raise CorruptError(f"deltakv.source.token_format: expected {'plain or packed' if file_framing else 'none'} "
                               f"for framing {self.framing.value!r}, found {self.token_format!r}")
        self.codec_name = self._scalar("deltakv.codec", STR)
        self.section_kind = self._list("deltakv.section.kind", STR, choices={"kv", "opaque"})
        n_sec = len(self.section_kind)
        self.section_role = self._list("deltakv.section.role", STR, n_sec)
        self.section_has_n_stream = self._list("deltakv.section.has_n_stream", U8, n_sec, 0, 1)
        self.stream_section = self._list("deltakv.stream.section", U32, None, 0, max(n_sec - 1, 0))
        n_st = len(self.stream_section)
        # Row counts are u32 words in the llama.cpp state; bounding them keeps all row arithmetic small.
        self.stream_cells = self._list("deltakv.stream.cell_count", U64, n_st, 0, U32_MAX)
        self.stream_ext = self._list("deltakv.stream.cell_ext_bytes", U32, n_st, 0, U16_MAX)
        self.stream_v_trans = self._list("deltakv.stream.v_trans", I32, n_st, -1, 1)
        self.stream_n_layer = self._list("deltakv.stream.n_layer", I32, n_st, -1)
        self.stream_rot_k = self._list("deltakv.stream.n_rot_k", I32, n_st, -1)
        self.stream_rot_v = self._list("deltakv.stream.n_rot_v", I32, n_st, -1)
        for g, (rk, rv) in enumerate(zip(self.stream_rot_k, self.stream_rot_v)):
            if (rk < 0) != (rv < 0):
                raise CorruptError(f"stream {g}: expected n_rot_k and n_rot_v both -1 or both >= 0, found {rk} and {rv}")
        self.stream_n_k = self._list("deltakv.stream.n_k", U32, n_st)
        self.stream_n_v = self._list("deltakv.stream.n_v", U32, n_st)
        names = self._list("deltakv.track.name", STR)
        n_tr = len(names)
        types = self._list("deltakv.track.ggml_type", U32, n_tr)
        n_values = self._list("deltakv.track.n_values", U64, n_tr, 1, U32_MAX)
        transposed = self._list("deltakv.track.transposed", U8, n_tr, 0, 1)
        codecs = self._list("deltakv.track.codec", STR, n_tr)
        intervals = self._list("deltakv.track.keyframe_interval", U32, n_tr)
        rotations = self._list("deltakv.track.rotation", U32, n_tr)
        self.n_segments = self._scalar("deltakv.segment.count", U32)
        n_seg = self.n_segments
        self.seg_first_row = np.array(self._list("deltakv.segment.first_row", U64, n_seg * n_st, 0, U32_MAX), np.int64).reshape(n_seg, n_st)
        self.seg_rows = np.array(self._list("deltakv.segment.rows", U64, n_seg * n_st, 0, U32_MAX), np.int64).reshape(n_seg, n_st)
        self.seg_first_token = self._list("deltakv.segment.first_token", U64, n_seg)
        self.seg_tokens = self._list("deltakv.segment.tokens", U64, n_seg)

        # Sections and streams: streams in section order, every KV section with its streams.
        if any(self.section_kind[s] != "kv" for s in self.stream_section):
            raise CorruptError("deltakv.stream.section names a section that is not a KV cache")
        if self.stream_section != sorted(self.stream_section):
            raise CorruptError("deltakv.stream.section: expected streams in section order, found them out of order")
        for i, kind in enumerate(self.section_kind):
            n = self.stream_section.count(i)
            if kind == "kv" and (n == 0 or (n != 1 and not self.section_has_n_stream[i])):
                want = "one stream (no n_stream word)" if not self.section_has_n_stream[i] else "at least one stream"
                raise CorruptError(f"KV section {i}: expected {want}, found {n}")

        # Tokens: segments hold consecutive ranges, backed by tensors of exactly that length.
        expect = 0
        for s in range(n_seg):
            if self.seg_first_token[s] != expect:
                raise CorruptError(f"deltakv.segment.first_token[{s}]: expected {expect} (the tokens before it), "
                                   f"found {self.seg_first_token[s]}")
            n = self.seg_tokens[s]
            if n and self.token_format != "plain":
                raise CorruptError(f"deltakv.segment.tokens[{s}]: expected 0 with token_format "
                                   f"{self.token_format!r}, found {n}")
            if n:
                if not self.file.has_tensor(f"tokens.{s}"):
                    raise CorruptError(f"segment {s} holds {n} tokens, but tensor 'tokens.{s}' is missing")
                self._check_tensor(f"tokens.{s}", GGMLType.I32, n)
            expect += n
        if self.token_format == "packed":
            if not self.file.has_tensor("token_blob"):
                raise CorruptError("token_format 'packed' needs the tensor 'token_blob', which is missing")
            self._check_tensor("token_blob", GGMLType.I8)
        for name in self.file.tensor_infos:
            if name.startswith("section.") or ".cells." in name:
                self._check_tensor(name, GGMLType.I8)

        # Tracks.
        if sum(self.stream_n_k) + sum(self.stream_n_v) != n_tr:
            raise CorruptError(f"deltakv.stream.n_k / n_v: expected them to add up to the {n_tr} tracks, "
                               f"found {sum(self.stream_n_k) + sum(self.stream_n_v)}")
        self.tracks = []
        expected_names = [f"s{g}.l{i}.{kv}" for g in range(n_st) for kv, n in (("k", self.stream_n_k[g]), ("v", self.stream_n_v[g])) for i in range(n)]
        if names != expected_names:
            raise CorruptError("deltakv.track.name does not list s{stream}.l{layer}.k then .v for every stream in order")
        for i in range(n_tr):
            if types[i] not in GGML_BLOCK_SIZES:
                raise CorruptError(f"track {names[i]} has unknown ggml type {types[i]}")
            codec = get_codec(codecs[i], keyframe_interval=intervals[i], rotation=rotations[i])
            if not codec.accepts(types[i], n_values[i]):
                raise CorruptError(f"track {names[i]}: codec {codec.name} cannot hold {GGMLType(types[i]).name} rows "
                                   f"of {n_values[i]} values")
            stream = int(names[i][1:names[i].index(".")])
            self.tracks.append(Track(i, names[i], stream, types[i], n_values[i], bool(transposed[i]), codec))
        self.track_by_name = {t.name: t for t in self.tracks}

        # Segments (SPEC.md 3.2).
        for g in range(n_st):
            end = 0
            for s in range(n_seg):
                first, rows = int(self.seg_first_row[s, g]), int(self.seg_rows[s, g])
                if rows and first > end:
                    raise CorruptError(f"segment {s} of stream {g} starts at row {first}, after the previous end {end}")
                if rows:
                    end = first + rows
            if end != self.stream_cells[g]:
                raise CorruptError(f"stream {g}: segments hold {end} rows, deltakv.stream.cell_count says {self.stream_cells[g]}")
        for t in self.tracks:
            chunk = t.codec.keyframe_interval
            for s in range(n_seg):
                rows = int(self.seg_rows[s, t.stream])
                if rows and self.seg_first_row[s, t.stream] % chunk:
                    raise CorruptError(f"segment {s} of {t.name} does not start on a keyframe")
                if rows:
                    self._check_parts(t, s, rows, self._parts(t, s, verify=False))

    def _check_parts(self, t: Track, s: int, rows: int, parts: dict) -> None:
        """The part tensors of a track segment hold exactly ``rows`` rows, split as SPEC.md 3.2 says
        (the decoders index them without bounds checks)."""
        if t.codec.rows_of_parts(parts) != rows:
            raise CorruptError(f"tensors of {t.name} segment {s} hold {t.codec.rows_of_parts(parts)} rows, expected {rows}")
        if "key" in parts:
            n_key = -(-rows // t.codec.keyframe_interval)
            want = {"key": n_key, "q4": rows - n_key}
            if "mode" in parts and rows > n_key:
                want["mode"] = rows - n_key
            for role, n in want.items():
                if parts[role].shape[0] != n:
                    raise CorruptError(f"tensor {t.part_name(s, role)!r}: expected {n} rows for {rows} rows with "
                                       f"keyframe interval {t.codec.keyframe_interval}, found {parts[role].shape[0]}")

    # -- reading ---------------------------------------------------------------------

    @property
    def n_tokens(self) -> int:
        return self.seg_first_token[-1] + self.seg_tokens[-1] if self.n_segments else 0

    def tokens(self) -> np.ndarray | None:
        if self.token_format != "plain":
            return None
        out = np.empty(self.n_tokens, np.int32)
        for s in range(self.n_segments):
            if self.seg_tokens[s]:
                tok = self.file.tensor(f"tokens.{s}")
                if tok.shape != (self.seg_tokens[s],):
                    raise CorruptError(f"tokens.{s} holds {tok.shape} tokens, expected {self.seg_tokens[s]}")
                out[self.seg_first_token[s]:self.seg_first_token[s] + self.seg_tokens[s]] = tok
        return out

    def _parts(self, track: Track, segment: int, verify: bool | None = None) -> dict[str, np.ndarray]:
        parts = {}
        for part in track.codec.parts(track.ggml_type, track.n_values):
            name = track.part_name(segment, part.role)
            if self.file.has_tensor(name):
                info = self.file.tensor_infos[name]
                if info.ggml_type != part.ggml_type or info.shape[0] != part.n_values or len(info.shape) != 2:
                    raise CorruptError(
                        f"tensor {name!r} is {GGMLType(info.ggml_type).name} {info.shape}; "
                        f"expected {GGMLType(part.ggml_type).name} with rows of {part.n_values}"
                    )
                parts[part.role] = self.file.tensor(name, verify=verify)
            else:
                parts[part.role] = _empty_part(part)
        return parts

    def _owned(self, stream: int) -> list[tuple[int, int, int]]:
        """(segment, first row, end row) of the rows each segment still owns."""
        return owned_spans(self.seg_first_row, self.seg_rows, stream)

    def rows(self, track: Track | str, row_lo: int = 0, row_hi: int | None = None, out=None) -> np.ndarray:
        """Decode rows [row_lo, row_hi) of a track: token-major element bits (or raw row bytes)."""
        if isinstance(track, str):
            track = self.track_by_name[track]
        n = self.stream_cells[track.stream]
        row_hi = n if row_hi is None else row_hi
        if not 0 <= row_lo <= row_hi <= n:
            raise DeltaKVError(f"rows {row_lo}..{row_hi} out of range 0..{n} for {track.name}")
        pieces = []
        for s, first, end in self._owned(track.stream):
            lo, hi = max(row_lo, first), min(row_hi, end)
            if lo >= hi:
                continue
            parts = self._parts(track, s)
            pieces.append(track.codec.decode(parts, track.ggml_type, track.n_values, lo - first, hi - first))
        if not pieces:
            return np.empty((0, track.n_values), element_view_dtype(track.ggml_type))
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def segment_cells(self, stream: int, segment: int) -> np.ndarray:
        """The cell records segment ``segment`` stores for ``stream`` (bytes; empty if none)."""
        name = f"s{stream}.cells.{segment}"
        return self.file.tensor(name).reshape(-1) if self.file.has_tensor(name) else np.empty(0, np.uint8)

    def cells(self, stream: int) -> bytes:
        """The stream's cell records in row order, as the snapshot holds them."""
        return assemble_cells(self._owned(stream), lambda s: (self.segment_cells(stream, s), int(self.seg_rows[s, stream])),
                              self.stream_ext[stream], stream)

    def to_llama_state(self) -> LlamaState:
        """Decode everything and rebuild the llama.cpp state it came from."""
        sections = []
        stream_iter = 0
        by_stream: dict[int, list[Track]] = {}
        for t in self.tracks:
            by_stream.setdefault(t.stream, []).append(t)
        for i, kind in enumerate(self.section_kind):
            if kind == "opaque":
                data = self.file.tensor(f"section.{i}").reshape(-1) if self.file.has_tensor(f"section.{i}") else np.empty(0, np.uint8)
                sections.append(OpaqueSection(self.section_role[i], memoryview(data.tobytes())))
                continue
            streams = []
            while stream_iter < len(self.stream_section) and self.stream_section[stream_iter] == i:
                g = stream_iter
                n = self.stream_cells[g]
                ks, vs = [], []
                for t in by_stream.get(g, []):
                    rows = self.rows(t)
                    if t.ggml_type in FLOAT_TYPES:
                        n_values = t.n_values
                    else:
                        from .constants import GGML_BLOCK_SIZES

                        bv, bb = GGML_BLOCK_SIZES[t.ggml_type]
                        n_values = t.n_values // bb * bv
                    kv = KVTensor(t.ggml_type, n, n_values, t.transposed, KVTensor.payload_from_rows(rows, t.transposed))
                    (ks if t.name.endswith(".k") else vs).append(kv)
                rot = None if self.stream_rot_k[g] < 0 else (self.stream_rot_k[g], self.stream_rot_v[g])
                streams.append(KVStream(
                    cell_count=n, cells=memoryview(self.cells(g)), cell_ext_bytes=self.stream_ext[g],
                    v_trans=None if self.stream_v_trans[g] < 0 else self.stream_v_trans[g],
                    n_layer=None if self.stream_n_layer[g] < 0 else self.stream_n_layer[g], rot=rot, k=ks, v=vs,
                ))
                stream_iter += 1
            sections.append(KVCacheSection(bool(self.section_has_n_stream[i]), streams))
        if self.token_format == "plain":
            token_words = memoryview(self.tokens().astype("<i4").tobytes())
        elif self.token_format == "packed":
            token_words = memoryview(self.file.tensor("token_blob").reshape(-1).tobytes())
        else:
            token_words = None
        arch = self.arch
        return LlamaState(
            framing=self.framing, layout=self.layout, file_version=self.file_version, token_words=token_words,
            seq_prefix_id=self.seq_prefix_id, arch=arch, arch_bytes=None if arch is None else arch.encode("utf-8"),
            sections=sections,
        )

    def source_bytes(self) -> int:
        """Size of the llama.cpp state this session rebuilds (SPEC.md section 4), without decoding."""
        from .constants import ggml_row_bytes

        total = 0
        if self.framing in (Framing.SESSION_FILE, Framing.SEQUENCE_FILE):
            words = self.n_tokens if self.token_format == "plain" else self.file.tensor_infos["token_blob"].nbytes // 4
            total += 12 + 4 * words
        if self.seq_prefix_id is not None:
            total += 8
        if self.arch is not None:
            total += 4 + len(self.arch.encode("utf-8"))
        for i, kind in enumerate(self.section_kind):
            if kind == "opaque":
                info = self.file.tensor_infos.get(f"section.{i}")
                total += info.nbytes if info else 0
            elif self.section_has_n_stream[i]:
                total += 4
        for g in range(len(self.stream_section)):
            total += 4
            if not self.stream_cells[g]:
                continue
            total += len(self.cells(g)) + 8 + (8 if self.stream_rot_k[g] >= 0 else 0)
            for t in self.tracks:
                if t.stream == g:
                    row = ggml_row_bytes(t.ggml_type, t.n_values) if t.ggml_type in FLOAT_TYPES else t.n_values
                    total += 12 + row * self.stream_cells[g]
        return total

    def stats(self) -> dict:
        payload = sum(info.nbytes for name, info in self.file.tensor_infos.items() if name.startswith("s") and ".l" in name)
        source = 0
        for t in self.tracks:
            from .constants import ggml_row_bytes

            per_row = ggml_row_bytes(t.ggml_type, t.n_values) if t.ggml_type in FLOAT_TYPES else t.n_values
            source += per_row * self.stream_cells[t.stream]
        return {"kv_source_bytes": source, "kv_stored_bytes": payload, "file_bytes": self.file.file_size}

    def close(self):
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def first_differing_cell(old_cells, old_ends: np.ndarray, live_cells, live_count: int) -> int:
    """How many leading cell records the stored and the live stream have in common.

    Records are compared as bytes (position, sequence ids, ext record), in the cache's order; a
    record wholly before the first differing byte is equal in both, since a record's length follows
    from its own bytes."""
    n = min(len(old_ends), live_count)
    if n == 0:
        return 0
    a, b = np.frombuffer(old_cells, np.uint8), np.frombuffer(live_cells, np.uint8)
    m = min(len(a), len(b))
    diff = np.flatnonzero(a[:m] != b[:m])
    first_byte = int(diff[0]) if diff.size else m
    return min(int(np.searchsorted(old_ends, first_byte, side="right")), n)


def _row_bytes(t: Track) -> int:
    from .constants import ggml_row_bytes

    return ggml_row_bytes(t.ggml_type, t.n_values) if t.ggml_type in FLOAT_TYPES else t.n_values


def _check_same_structure(old: DkvSession, state: LlamaState, by_stream: dict[int, list[Track]]) -> None:
    """The live state must be the stored session's context: same sections, streams, layers, types."""
    streams = _streams(state)
    kinds = ["kv" if isinstance(s, KVCacheSection) else "opaque" for s in state.sections]
    if kinds != old.section_kind:
        raise SessionMismatchError(f"the live state has sections {kinds}, the stored session {old.section_kind}")
    if len(streams) != len(old.stream_cells):
        raise SessionMismatchError(f"the live state has {len(streams)} KV streams, the stored session {len(old.stream_cells)}")
    for g, (_, stream) in enumerate(streams):
        stored, live = by_stream.get(g, []), _stream_tracks(stream)
        if stream.cell_count and old.stream_cells[g] and len(live) != len(stored):
            raise SessionMismatchError(f"stream {g}: the live state has {len(stream.k)} K and {len(stream.v)} V layers, "
                                       f"the stored session {old.stream_n_k[g]} and {old.stream_n_v[g]}")
        for t, (_, kv) in zip(stored, live):
            if (kv.n_values if kv.is_float else kv.row_bytes) != t.n_values:
                raise SessionMismatchError(f"{t.name}: the live cache has rows of {kv.n_values} values, the stored one "
                                           f"{t.n_values}")
            if kv.ggml_type != t.ggml_type or kv.transposed != t.transposed:
                raise SessionMismatchError(
                    f"{t.name}: the live cache is {GGMLType(kv.ggml_type).name}{' transposed' if kv.transposed else ''}, "
                    f"the stored one {GGMLType(t.ggml_type).name}{' transposed' if t.transposed else ''}")
        if stream.cell_count and stream.cell_ext_bytes != old.stream_ext[g]:
            raise SessionMismatchError(f"stream {g}: cell records carry {stream.cell_ext_bytes} ext bytes, "
                                       f"the stored ones {old.stream_ext[g]}")


def _rewrite_reason(old: DkvSession, state: LlamaState, by_stream) -> str | None:
    """Why ``state`` cannot be stored as an append to ``old`` (None when it can)."""
    for i, sec in enumerate(state.sections):
        if not isinstance(sec, OpaqueSection):
            continue
        stored = old.file.tensor(f"section.{i}").tobytes() if old.file.has_tensor(f"section.{i}") else b""
        if bytes(sec.data) != stored:
            return f"section {i} ({sec.role}) changed"
    token_format = "none" if state.token_words is None else ("plain" if state.tokens() is not None else "packed")
    if token_format != old.token_format:
        return f"the token field is {token_format}, the stored one {old.token_format}"
    if token_format == "packed":
        return "a packed (llama-server) token field is stored whole"
    if token_format == "plain":
        tokens, stored = state.tokens(), old.tokens()
        if len(tokens) < len(stored) or not np.array_equal(tokens[:len(stored)], stored):
            return "the stored tokens are not a prefix of the live ones"
    for g, (_, stream) in enumerate(_streams(state)):
        if old.stream_cells[g] and not stream.cell_count:
            return f"stream {g} has no cells left"
        if not old.stream_cells[g] and stream.cell_count and not old.stream_n_k[g] + old.stream_n_v[g]:
            return f"stream {g} was empty when stored"
        if old.stream_cells[g] and stream.cell_count and len(by_stream.get(g, [])) != len(_stream_tracks(stream)):
            return f"stream {g} has another number of layers"
    return None


def rewrite_session(path, state: LlamaState, old: DkvSession) -> None:
    """Store ``state`` anew at ``path`` with the codecs and application key-values of ``old``
    (crash-safe: a new file renamed over the old one)."""
    track_codecs = [t.codec for t in old.tracks] if len(old.tracks) == len(_plan_tracks(state, {"k": get_codec("raw"), "v": get_codec("raw")})) else None
    by_role = {role: next((t.codec for t in old.tracks if t.name.endswith("." + role) and t.ggml_type in FLOAT_TYPES), None)
               for role in ("k", "v")}
    extra = [kv for key, kv in old.file.kvs.items() if key.startswith("deltakv.runtime.")]
    write_session(state, path, get_codec(old.codec_name), k_codec=by_role["k"], v_codec=by_role["v"],
                  extra_kvs=extra, track_codecs=track_codecs).close()


def append_session(path, state: LlamaState, progress=None) -> dict:
    """Bring the session at ``path`` up to ``state``, a newer state of the same context.

    For each stream, the stored cell records are compared with the live ones (SPEC.md section 8):
    rows from the first chunk that differs, or that holds the last stored row, are coded from
    ``state``'s exact values into a new segment; rows before it stay. A stream that only grew costs
    its new rows (plus one re-encoded chunk); a sliding-window stream whose window moved is
    rewritten from the first cell that left it. Where no append can express the change (tokens
    that are no longer a prefix, a stream emptied, changed opaque sections, or a file that
    would hold more superseded rows than live ones) the whole file is rewritten.
    Before the new header is committed, the cells the new snapshot rebuilds are checked against
    ``state``'s; a mismatch raises and leaves the old snapshot.

    Returns ``rows_added`` (rows written), ``tokens_added`` and ``rewritten`` (why, or None).
    """
    rewrite = None
    with DkvSession(path) as old:
        by_stream: dict[int, list[Track]] = {}
        for t in old.tracks:
            by_stream.setdefault(t.stream, []).append(t)
        _check_same_structure(old, state, by_stream)
        rewrite = _rewrite_reason(old, state, by_stream)
        if rewrite is None:
            result = _append_rows(old, state, by_stream, progress)
            if result is None:
                rewrite = "superseded rows would outweigh the live ones"
        if rewrite is not None:
            rewrite_session(path, state, old)  # renames over the file; ``old`` keeps its own mapping
    if rewrite is not None:
        tokens = state.tokens()
        return {"rows_added": sum(st.cell_count for _, st in _streams(state)),
                "tokens_added": 0 if tokens is None else len(tokens), "rewritten": rewrite}
    kvs, tensors, summary = result
    append_container(path, kvs, tensors)
    return summary


def _append_rows(old: DkvSession, state: LlamaState, by_stream, progress):
    """The key-values and tensors of an append of ``state`` to ``old``, and its summary; None when
    the file would then hold more superseded rows than live ones (the caller rewrites it)."""
    streams = _streams(state)
    segment = old.n_segments
    builder = _SessionBuilder()
    first_rows, rows_added, new_cells, new_cell_bytes = [], [], [], {}
    for g, (_, stream) in enumerate(streams):
        tracks = by_stream.get(g, [])
        old_n, n = old.stream_cells[g], stream.cell_count
        old_cells = old.cells(g)
        old_ends = cell_record_ends(old_cells, old_n, old.stream_ext[g])
        same = first_differing_cell(old_cells, old_ends, stream.cells, n)
        new_cells.append(n)
        if same == old_n == n:
            first_rows.append(0)
            rows_added.append(0)
            continue
        # Keep rows only up to the first differing cell, and never the last stored one: llama-cpp-python
        # re-evaluates the last token after a load, so its row may have been recomputed since.
        keep = min(same, old_n - 1) if old_n else 0
        chunk = _chunk_of(tracks)
        first = keep - keep % chunk
        ends = cell_record_ends(stream.cells, n, stream.cell_ext_bytes)
        start_byte = int(ends[first - 1]) if first else 0
        cells = np.frombuffer(stream.cells, np.uint8)[start_byte:]
        new_cell_bytes[g] = cells
        builder.add(f"s{g}.cells.{segment}", GGMLType.I8, cells)
        for t, (_, kv) in zip(tracks, _stream_tracks(stream)):
            builder.add_track_segment(t, segment, _track_rows(kv)[first:], t.name)
            if progress is not None:
                progress(t.name)
        first_rows.append(first)
        rows_added.append(n - first)

    seg_first_row = np.vstack([old.seg_first_row, [first_rows]])
    seg_rows = np.vstack([old.seg_rows, [rows_added]])
    _check_rebuilt_cells(old, streams, seg_first_row, seg_rows, segment, new_cell_bytes)

    row_cost = [sum(_row_bytes(t) for t in by_stream.get(g, [])) for g in range(len(streams))]
    held = sum(int(seg_rows[:, g].sum()) * row_cost[g] for g in range(len(streams)))
    live = sum(new_cells[g] * row_cost[g] for g in range(len(streams)))
    if held - live > live:
        return None

    tokens = state.tokens()
    old_tokens = old.tokens()
    n_new_tokens = 0 if tokens is None else len(tokens) - len(old_tokens)
    if n_new_tokens:
        builder.add(f"tokens.{segment}", GGMLType.I32, tokens[len(old_tokens):])
    if not any(rows_added) and not n_new_tokens:
        return [], [], {"rows_added": 0, "tokens_added": 0, "rewritten": None}
    codec = get_codec(old.codec_name)
    kvs = _session_kvs(state, codec, old.tracks, seg_first_row.reshape(-1).tolist(), seg_rows.reshape(-1).tolist(),
                       old.seg_first_token + [old.n_tokens], old.seg_tokens + [n_new_tokens], new_cells)
    kvs = [kv for kv in kvs if kv.key != "deltakv.codec"] + [KeyValue("deltakv.codec", STR, old.codec_name)]
    ours = {kv.key for kv in kvs}
    kvs += [kv for key, kv in old.file.kvs.items() if key not in ours and key.startswith("deltakv.runtime.")]
    return kvs, builder.tensors, {"rows_added": sum(rows_added), "tokens_added": n_new_tokens, "rewritten": None}


def _check_rebuilt_cells(old: DkvSession, streams, seg_first_row, seg_rows, segment: int, new_cell_bytes) -> None:
    """The cells the new segment table rebuilds, from the stored segments and the new one, must be
    the live state's, record for record (positions, sequence ids, order), before anything is committed."""
    for g, (_, stream) in enumerate(streams):
        def records(s, g=g):
            if s == segment:
                return new_cell_bytes.get(g, np.empty(0, np.uint8)), int(seg_rows[s, g])
            return old.segment_cells(g, s), int(seg_rows[s, g])

        spans = owned_spans(seg_first_row, seg_rows, g)
        end = spans[-1][2] if spans else 0
        rebuilt = assemble_cells(spans, records, old.stream_ext[g], g)
        if end != stream.cell_count or rebuilt != bytes(stream.cells):
            raise DeltaKVError(
                f"stream {g}: the appended snapshot would rebuild {end} cells ({len(rebuilt)} bytes), the live state has "
                f"{stream.cell_count} ({len(stream.cells)} bytes); nothing was written")
