"""Writing a llama.cpp state as a new .dkv session (SPEC.md sections 3 and 4).

:func:`write_session` plans one track per layer K/V of every stream, codes every track's rows, and
writes the key-values of :data:`~deltakv_format.session_schema.SESSION_KEYS` with the tensors in one
atomic write; to a file, the tensors go to disk track by track as they are coded (a TensorSpool).
It returns a :class:`WrittenSession`: what was written, without reading the file back.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .codecs import Codec, TrackContext, codec_for_role, codec_for_track, get_codec
from .codecs.transcode import TranscodedCodec, transcoded
from .constants import DEFAULT_CODEC, DEFAULT_V_CODEC, HEADER_RESERVE_APPENDS, GGMLType
from .container import TensorData, base_kvs, write_container_to
from .container_spool import TensorSpool
from .errors import CodecError, CorruptError
from .gguf_io import KeyValue
from .session_reader import DkvSession
from .session_schema import (
    ROLES,
    TOKEN_BLOB,
    SessionMetadata,
    cells_tensor,
    encode_metadata,
    section_tensor,
    tokens_tensor,
)
from .session_cells import cell_positions
from .session_sizes import session_stats
from .session_tracks import Track, live_streams, live_tracks, stored_row_size, track_rows, tracks_by_stream
from .state_model import KVCacheSection, LlamaState, OpaqueSection


def track_params_json(codec: Codec) -> str:
    """``deltakv.track.params`` of a track: its codec's parameters beyond the two columns, as canonical JSON."""
    return json.dumps(codec.extra_parameters(), sort_keys=True, separators=(",", ":"))


def token_format_of(state: LlamaState) -> str:
    """``deltakv.source.token_format`` of a state: ``none`` (no token field), ``plain`` or ``packed``."""
    return "none" if state.token_words is None else ("plain" if state.tokens() is not None else "packed")


class SessionTensors:
    """The tensors of one write or append, in the order they go into the file."""

    def __init__(self):
        self.tensors: list[TensorData] = []

    def add(self, name, ggml_type, array, n_inner=None):
        array = np.ascontiguousarray(array)
        if array.size == 0:
            return  # SPEC.md 3.1: a tensor that would have zero elements is omitted
        if array.ndim == 1:
            shape = (array.shape[0] if n_inner is None else n_inner,)
        else:
            inner = array.shape[1] if n_inner is None else n_inner
            shape = (inner, array.shape[0])
        self.tensors.append(TensorData(name, ggml_type, shape, array))

    def add_track_segment(self, track: Track, segment: int, rows: np.ndarray, where: str,
                          context: TrackContext | None = None):
        """Code ``rows`` of ``track`` as segment ``segment``; ``context``: the rows' cell positions and
        the segment's first row (for codecs that take them)."""
        parts = track.codec.encode(rows, track.ggml_type, where, context=context) if rows.shape[0] else {}
        for part in track.codec.parts(track.ggml_type, track.n_values):
            if part.role in parts:
                self.add(track.part_name(segment, part.role), part.ggml_type, parts[part.role], part.n_values or None)


def stream_context(stream, stream_tracks: list[Track], first_row: int, end_row: int) -> TrackContext | None:
    """The positions of a live stream's rows [first_row, end_row), for codecs that take them (else None:
    parsing cell records costs O(cells))."""
    if not any(t.codec.takes_context for t in stream_tracks):
        return None
    positions = cell_positions(stream.cells, stream.cell_count, stream.cell_ext_bytes)
    return TrackContext(positions=positions[first_row:end_row], first_row=first_row)


def state_cache_layers(state: LlamaState) -> list[int]:
    """Per KV section of ``state``, the layers its fullest stream holds (0: no layers)."""
    return [max((len(st.k) for st in sec.streams), default=0) for sec in state.kv_sections]


def rope_for_state(model, state: LlamaState):
    """The rotary parameters (``write_session``'s ``rope``) of ``model`` (a ModelInfo, or None) for
    the KV caches ``state`` holds: the split of the model's layers into caches whose layer counts
    are the state's (a sequence state saved partial-only holds the SWA cache alone); None when
    no split fits or the model is unknown (keys are then coded as they are)."""
    if model is None:
        return None
    return model.rope_params_for(state_cache_layers(state))


def codecs_of_roles(codec: Codec | str = DEFAULT_CODEC, k_codec: Codec | str | None = None,
                    v_codec: Codec | str | None = None, bits: float | None = None) -> dict[str, Codec]:
    """The codec of the K and of the V tracks: ``k_codec`` / ``v_codec``, else ``codec``; a codec
    named by its id gets its defaults for the role (dkv-ans: DEFAULT_RATE_K / DEFAULT_RATE_V).
    The default codec named by its id (``"dkv-ans"``) is the default pair: K through dkv-ans at
    DEFAULT_RATE_K, V through DEFAULT_V_CODEC (dkv-q4), unless ``v_codec`` or ``bits`` is given
    (``bits`` asks for one rate for both, so V then takes dkv-ans too).
    ``bits``: the rate of those of the two that have one (dkv-ans), as bits per value; a
    CodecError when neither has."""
    v_default = DEFAULT_V_CODEC if (isinstance(codec, str) and codec == DEFAULT_CODEC and bits is None) else codec
    chosen = {"k": codec_for_role(k_codec if k_codec is not None else codec, "k"),
              "v": codec_for_role(v_codec if v_codec is not None else v_default, "v")}
    if bits is not None:
        rated = [role for role, c in chosen.items() if "rate" in c.parameters]
        if not rated:
            codec_for_role(chosen["k"], "k", bits=bits)  # raises: says which codecs take a rate
            raise CodecError(f"bits per value ({bits}): no codec of K and V takes a rate")
        for role in rated:
            chosen[role] = codec_for_role(chosen[role], role, bits=bits)
    return chosen


def track_codec(codec: Codec, t, transcode: bool = False) -> Codec:
    """The codec of a live cache tensor ``t`` given the codec of its role: the codec (or its variant,
    or a lossless fallback, :func:`codec_for_track`) for float caches; for quantized caches raw, or
    with ``transcode`` the codec over the blocks' values (SPEC.md 6.6) where the type has a
    requantizer and the codec takes the rows (else raw)."""
    if t.is_float:
        return codec_for_track(codec, t.ggml_type, t.n_values)
    if transcode and not t.transposed:
        chosen = transcoded(codec, t.ggml_type, t.row_bytes)
        if chosen is not None:
            return chosen
    return get_codec("raw")


def plan_tracks(state: LlamaState, codec_of_role: dict[str, Codec], track_codecs: list[Codec] | None = None,
                rope=None, transcode: bool = False) -> list[Track]:
    """One track per layer K/V of every stream; ``track_codecs`` (a rewrite of a stored session)
    gives each track the codec it already had. ``rope``: per KV section of the state (in order), the
    :class:`~deltakv_format.model_info.RopeParams` of each layer (``ModelInfo.rope_params()``), for
    codecs that code keys before rotary embedding; None: unknown (they code keys as they are).
    ``transcode``: quantized caches (Q8_0, Q4_0) are coded through their values with the role's
    codec and re-quantized on restore (lossy, SPEC.md 6.6); without it they are stored raw."""
    tracks = []
    kv_sections = [i for i, sec in enumerate(state.sections) if isinstance(sec, KVCacheSection)]
    for stream_index, (section, stream) in enumerate(live_streams(state)):
        cache = kv_sections.index(section)
        layer_rope = rope[cache] if rope is not None and cache < len(rope) else []
        for track_id, t in live_tracks(stream_index, stream):
            codec = codec_of_role[track_id.role]
            chosen = track_codec(codec, t, transcode)
            # llama.cpp (layout v11, n_rot_k > 0) rotates a quantized cache's K by a Hadamard transform
            # after RoPE: undoing RoPE on those values hurts (about 15% more K RMS error on the
            # smollm2_v11_q8_0 fixture), so such K is coded as it is
            hadamard_k = stream.rot is not None and stream.rot[0] > 0
            if track_id.role == "k" and track_id.layer < len(layer_rope) and not hadamard_k:
                chosen = chosen.for_layer(layer_rope[track_id.layer], t.ggml_type, stored_row_size(t))
            if track_codecs is not None:
                chosen = track_codecs[len(tracks)]
            tracks.append(Track(len(tracks), track_id, t.ggml_type, stored_row_size(t), t.transposed, chosen))
    return tracks


def session_metadata(state: LlamaState, codec_name: str, tracks: list[Track], seg_first_row, seg_rows,
                     seg_first_token, seg_tokens, stream_cells) -> SessionMetadata:
    """The values of the session's keys for ``state`` stored as ``tracks`` with the given segment table
    (flat, row-major [segment][stream]) and cell counts."""
    arch = None
    if state.arch_bytes is not None:
        try:
            arch = state.arch_bytes.decode("utf-8")
        except UnicodeDecodeError as e:
            # deltakv.source.arch is a GGUF string (UTF-8); llama.cpp's arch names are ASCII
            raise CorruptError(f"arch string: expected UTF-8 text (a llama.cpp architecture name), found "
                               f"{bytes(state.arch_bytes)[:32]!r} ({e.reason} at byte {e.start})") from e
    sections = state.sections
    streams = [s for _, s in live_streams(state)]
    return SessionMetadata(
        framing=state.framing.value,
        layout=state.layout.value,
        file_version=state.file_version,
        seq_prefix_id=state.seq_prefix_id,
        arch=arch,
        token_format=token_format_of(state),
        codec_name=codec_name,
        section_kind=["kv" if isinstance(s, KVCacheSection) else "opaque" for s in sections],
        section_role=["attention" if isinstance(s, KVCacheSection) else s.role for s in sections],
        section_has_n_stream=[int(s.has_n_stream) if isinstance(s, KVCacheSection) else 0 for s in sections],
        stream_section=[i for i, _ in live_streams(state)],
        stream_cells=list(stream_cells),
        stream_ext=[s.cell_ext_bytes for s in streams],
        stream_v_trans=[-1 if s.v_trans is None else s.v_trans for s in streams],
        stream_n_layer=[-1 if s.n_layer is None else s.n_layer for s in streams],
        stream_rot_k=[-1 if s.rot is None else s.rot[0] for s in streams],
        stream_rot_v=[-1 if s.rot is None else s.rot[1] for s in streams],
        stream_n_k=[len(s.k) for s in streams],
        stream_n_v=[len(s.v) for s in streams],
        track_name=[t.name for t in tracks],
        track_ggml_type=[t.ggml_type for t in tracks],
        track_n_values=[t.n_values for t in tracks],
        track_transposed=[int(t.transposed) for t in tracks],
        track_codec=[t.codec.name for t in tracks],
        track_keyframe_interval=[t.codec.keyframe_interval for t in tracks],
        track_rotation=[t.codec.rotation for t in tracks],
        track_params=[track_params_json(t.codec) for t in tracks],
        n_segments=len(seg_first_token),
        seg_first_row=list(seg_first_row),
        seg_rows=list(seg_rows),
        seg_first_token=list(seg_first_token),
        seg_tokens=list(seg_tokens),
    )


def session_kvs(state: LlamaState, codec_name: str, tracks: list[Track], seg_first_row, seg_rows,
                seg_first_token, seg_tokens, stream_cells) -> list[KeyValue]:
    """Every key-value of a session but the container's checksums and reserve, in table order."""
    meta = session_metadata(state, codec_name, tracks, seg_first_row, seg_rows, seg_first_token, seg_tokens, stream_cells)
    return base_kvs() + encode_metadata(meta)


def _tensor_info_bytes(name: str, n_dims: int) -> int:
    """Header bytes of one tensor: its info (SPEC.md section 2) and its element of deltakv.tensor_crc32c."""
    return 8 + len(name.encode()) + 4 + 8 * n_dims + 4 + 8 + 4


def segment_header_growth(tracks: list[Track], n_streams: int, token_format: str, n_segments: int) -> int:
    """The most bytes one append can add to the header of a session of ``n_segments`` segments stored as
    ``tracks`` (SPEC.md section 8), which sizes the header reserve (:func:`container.header_reserve`).

    An append adds a segment: the tensors of every codec part of every track, each stream's cells
    and the new tokens, and one element per stream to deltakv.segment.first_row and .rows and one
    to .first_token and .tokens (u64 each); every other key keeps its size. The names are those of
    the last of the next HEADER_RESERVE_APPENDS segments (the longest), part tensors counted 2-D.
    A packed token field makes every change a whole new file (SPEC.md section 8): no append grows
    its header, so such a session is written with the smallest reserve.
    """
    if token_format == "packed":
        return 0
    segment = n_segments + HEADER_RESERVE_APPENDS - 1
    total = 16 * n_streams + 16
    for t in tracks:
        total += sum(_tensor_info_bytes(t.part_name(segment, p.role), 2) for p in t.codec.parts(t.ggml_type, t.n_values))
    total += sum(_tensor_info_bytes(cells_tensor(g, segment), 1) for g in range(n_streams))
    if token_format == "plain":
        total += _tensor_info_bytes(tokens_tensor(segment), 1)
    return total


@dataclass(frozen=True)
class WrittenSession:
    """What :func:`write_session` wrote, known without reading the file back."""

    path: Path
    codec_name: str  # deltakv.codec
    tracks: list[Track]
    stream_cells: list[int]
    tensor_bytes: dict[str, int]  # every tensor written: name -> bytes
    file_size: int

    def stats(self) -> dict:
        """As :meth:`DkvSession.stats`: ``kv_source_bytes``, ``kv_stored_bytes``, ``file_bytes``."""
        return session_stats(self.tracks, self.stream_cells, self.tensor_bytes, self.file_size)

    def open(self, *, verify_checksums: bool = True) -> DkvSession:
        """Read the written session back (to decode it)."""
        return DkvSession(self.path, verify_checksums=verify_checksums)

    def close(self) -> None:
        """Nothing to close: the file is written and closed. (Callers written when write_session
        returned the opened session call ``write_session(...).close()``.)"""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_session(state: LlamaState, path=None, codec: Codec | str = DEFAULT_CODEC, progress=None, *,
                  k_codec: Codec | str | None = None, v_codec: Codec | str | None = None,
                  extra_kvs: list[KeyValue] = (), extra_tensors: list[TensorData] = (),
                  track_codecs: list[Codec] | None = None, to=None, rope=None,
                  bits: float | None = None, transcode: bool = False, release=None,
                  spool_seen=None) -> WrittenSession | None:
    """Store ``state`` as a new .dkv at ``path`` (atomically); returns what was written
    (:meth:`WrittenSession.open` reads it back).

    With ``to=`` a writable binary stream in place of ``path``, the same bytes go to that stream,
    front to back (:func:`container.write_container_to`), and None is returned: there is no file
    to open. :func:`session_bytes` gives them as bytes.

    ``k_codec`` / ``v_codec`` override ``codec`` for the K or the V tracks (every track records its
    own codec, ``deltakv.track.codec`` in SPEC.md section 3; later appends keep it). K matters more to
    the model than V, so ``k_codec="q8_0"`` with the default for V gets q8_0-level quality at fewer
    bits than q8_0 for both (eval/EVAL.md).
    A codec named by its id gets its defaults for the role: ``dkv-ans`` (the default) codes K at
    DEFAULT_RATE_K, and V with DEFAULT_V_CODEC (dkv-q4) unless ``v_codec``/``bits`` say otherwise
    (:func:`codecs_of_roles`); a Codec object is used as it is.
    ``bits``: the rate of the K/V codecs that have one (dkv-ans), in bits per value (3 -> rate 300);
    CodecError when neither has a rate.
    ``rope``: the model's rotary parameters per KV section and layer (``ModelInfo.rope_params()``,
    :func:`rope_for_state`); ``dkv-ans`` codes keys before rotary embedding with them (without: as
    they are, at some cost).
    ``transcode``: K/V tracks of a quantized cache (llama.cpp's ``-ctk q8_0 -ctv q8_0``, or q4_0) are
    decoded to values, coded with the codec of their role (``k_codec`` / ``v_codec`` / ``codec`` as
    above) and re-quantized to the cache's own type on restore: smaller, lossy in values only
    (SPEC.md 6.6, eval/transcode/). Without it (the default) they are stored raw, byte-exact.
    ``release(view)``: called with each cache tensor's source bytes once they are coded and written
    (:func:`session_tensor_groups`); convert drops the mapped input's pages with it, so that its
    resident set does not grow with the state. ``spool_seen(spool)``: given the TensorSpool once the
    file is written (tests check what was held at a time).
    A file is written track by track through a :class:`~deltakv_format.container_spool.TensorSpool`:
    the coded data held is at most its fixed memory budget (``MEMORY_BUDGET``) plus one track's;
    ``to=`` takes the whole session in memory.
    ``extra_kvs`` / ``extra_tensors`` carry an application's own metadata (keys outside
    ``deltakv.`` + ``general.``, or under ``deltakv.runtime.``); readers ignore what they do not know.
    """
    if (path is None) == (to is None):
        raise TypeError(f"write_session: expected a path or to= a binary stream, found "
                        f"{'both' if to is not None else 'neither'}")
    codec_of_role = codecs_of_roles(codec, k_codec, v_codec, bits)
    codec = codec_for_role(codec, "v")  # deltakv.codec: the codec asked for
    tracks = plan_tracks(state, codec_of_role, track_codecs, rope, transcode)
    streams = live_streams(state)
    groups = session_tensor_groups(state, tracks, progress, release)

    def header_kvs():
        # after every track is coded: a transcoded track may have fallen back to raw meanwhile
        cells = [s.cell_count for _, s in streams]
        tokens = state.tokens()
        n_tokens = 0 if tokens is None else len(tokens)
        return (session_kvs(state, codec.name, tracks, [0] * len(streams), cells, [0], [n_tokens], cells)
                + list(extra_kvs))

    def growth():
        return segment_header_growth(tracks, len(streams), token_format_of(state), 1)  # also after coding

    if to is not None:
        written = [t for group in groups for t in group] + list(extra_tensors)
        write_container_to(to, header_kvs(), written, growth=growth())
        return None
    # To a file: each group goes to the TensorSpool as soon as it is coded; past the spool's fixed memory
    # budget it goes to disk, so the coded data held is that budget plus one track, whatever the session's size.
    with TensorSpool(path) as spool:
        for group in groups:
            for t in group:
                spool.add(t)
        for t in extra_tensors:
            spool.add(t)
        file_size = spool.write_container(header_kvs(), growth=growth())
        if spool_seen is not None:
            spool_seen(spool)
    cells = [s.cell_count for _, s in streams]
    return WrittenSession(Path(path), codec.name, tracks, cells, spool.tensor_bytes(), file_size)


def session_tensor_groups(state: LlamaState, tracks: list[Track], progress=None, release=None):
    """The tensors of a new session in file order, in groups (a small tensor, or one track's coded
    parts) that a writer can put on disk before the next is made. ``release(view)`` is called with a
    cache tensor's source bytes once the group coded from them has been taken (the next group is
    asked for): a reader of a mapped state drops those pages (MappedFile.release)."""
    tensors = SessionTensors()

    def taken():
        group = tensors.tensors
        tensors.tensors = []
        return group

    tokens = state.tokens()
    if state.token_words is not None and tokens is None:
        tensors.add(TOKEN_BLOB, GGMLType.I8, np.frombuffer(state.token_words, np.uint8))
    if tokens is not None:
        tensors.add(tokens_tensor(0), GGMLType.I32, tokens)
    for i, sec in enumerate(state.sections):
        if isinstance(sec, OpaqueSection):
            tensors.add(section_tensor(i), GGMLType.I8, np.frombuffer(sec.data, np.uint8))
    streams = live_streams(state)
    for g, (_, stream) in enumerate(streams):
        tensors.add(cells_tensor(g, 0), GGMLType.I8, np.frombuffer(stream.cells, np.uint8))
    yield taken()
    by_stream = tracks_by_stream(tracks)
    for g, (_, stream) in enumerate(streams):
        context = stream_context(stream, by_stream.get(g, []), 0, stream.cell_count)
        for track, (_, kv) in zip(by_stream.get(g, []), live_tracks(g, stream)):
            tensors.add_track_segment(track, 0, track_rows(kv), track.name, context)
            if isinstance(track.codec, TranscodedCodec):
                coded = sum(t.nbytes() for t in tensors.tensors)
                if coded >= kv.row_bytes * kv.cell_count:
                    # a transcoded track no smaller than its blocks (a q4_0 cache at the default rates)
                    # would only lose values: it stays raw, exact (SPEC.md 6.6)
                    tensors.tensors = []
                    track.codec = get_codec("raw")
                    tensors.add_track_segment(track, 0, track_rows(kv), track.name, context)
            if progress is not None:
                progress(track.name)
            yield taken()
            if release is not None:
                release(kv.data)


def session_bytes(state: LlamaState, codec: Codec | str = DEFAULT_CODEC, **options) -> bytes:
    """The .dkv that ``write_session(state, path, codec, **options)`` writes, as bytes (for a
    store, a socket or a cache in memory); ``options`` are write_session's keyword arguments."""
    stream = io.BytesIO()
    write_session(state, codec=codec, to=stream, **options)
    return stream.getvalue()
