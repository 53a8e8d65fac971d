"""Appending to a stored session: the rows of a newer state of the same context, as a new segment
(SPEC.md section 8), or the whole session written anew where no segment can express the change.
"""

from __future__ import annotations

import os
import time
from dataclasses import replace

import numpy as np

from .codecs import get_codec
from .codecs.transcode import TranscodedCodec
from .constants import FLOAT_TYPES, GGMLType
from .container import append_container
from .errors import DeltaKVError, SessionMismatchError
from .session_cells import assemble_cells, cell_record_ends, owned_spans
from .session_reader import DkvSession
from .session_schema import ROLES, cells_tensor, section_tensor, tokens_tensor
from .session_tracks import (
    Track,
    chunk_rows,
    live_streams,
    live_tracks,
    source_row_bytes,
    track_rows,
    tracks_by_stream,
)
from .session_writer import SessionTensors, plan_tracks, segment_header_growth, session_kvs, stream_context, token_format_of, write_session
from .state_model import KVCacheSection, LlamaState, OpaqueSection

class WholeStateNeeded(DeltaKVError):
    """An append given the live state's tail only (``row_offsets``) cannot be made from it: the
    change reaches rows before the tail, or the file must be rewritten. Nothing was written; the
    caller retries with the whole live state."""


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


def _check_same_structure(old: DkvSession, state: LlamaState, by_stream: dict[int, list[Track]]) -> None:
    """The live state must be the stored session's context: same sections, streams, layers, types."""
    streams = live_streams(state)
    kinds = ["kv" if isinstance(s, KVCacheSection) else "opaque" for s in state.sections]
    if kinds != old.section_kind:
        raise SessionMismatchError(f"the live state has sections {kinds}, the stored session {old.section_kind}")
    if len(streams) != len(old.stream_cells):
        raise SessionMismatchError(f"the live state has {len(streams)} KV streams, the stored session {len(old.stream_cells)}")
    for g, (_, stream) in enumerate(streams):
        stored, live = by_stream.get(g, []), live_tracks(g, stream)
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


def _rewrite_reason(old: DkvSession, state: LlamaState, by_stream, offsets) -> str | None:
    """Why ``state`` (from row ``offsets[g]`` of each stream on) cannot be stored as an append to
    ``old`` (None when it can)."""
    for i, sec in enumerate(state.sections):
        if not isinstance(sec, OpaqueSection):
            continue
        name = section_tensor(i)
        stored = old.file.tensor(name).tobytes() if old.file.has_tensor(name) else b""
        if bytes(sec.data) != stored:
            return f"section {i} ({sec.role}) changed"
    token_format = token_format_of(state)
    if token_format != old.token_format:
        return f"the token field is {token_format}, the stored one {old.token_format}"
    if token_format == "packed":
        return "a packed (llama-server) token field is stored whole"
    if token_format == "plain":
        tokens, stored = state.tokens(), old.tokens()
        if len(tokens) < len(stored) or not np.array_equal(tokens[:len(stored)], stored):
            return "the stored tokens are not a prefix of the live ones"
    for g, (_, stream) in enumerate(live_streams(state)):
        if old.stream_cells[g] and not offsets[g] + stream.cell_count:
            return f"stream {g} has no cells left"
        if not old.stream_cells[g] and stream.cell_count and not old.stream_n_k[g] + old.stream_n_v[g]:
            return f"stream {g} was empty when stored"
        if old.stream_cells[g] and stream.cell_count and len(by_stream.get(g, [])) != len(live_tracks(g, stream)):
            return f"stream {g} has another number of layers"
    return None


def rewrite_session(path, state: LlamaState, old: DkvSession, rope=None) -> None:
    """Store ``state`` anew at ``path`` with the codecs and application key-values of ``old``
    (crash-safe: a new file renamed over the old one). Every track keeps its stored codec, rotary
    parameters included; where the tracks are not the stored ones (another layer count), each role
    takes the codec of its first float track and ``rope`` (``write_session``'s), when given, the
    rotary parameters of each layer."""
    track_codecs = [t.codec for t in old.tracks] if len(old.tracks) == len(plan_tracks(state, {role: get_codec("raw") for role in ROLES})) else None
    # a transcoded track (SPEC.md 6.6) gives its role the float codec it codes the values with, and
    # makes the rewrite transcode the quantized tracks again
    transcode = any(isinstance(t.codec, TranscodedCodec) for t in old.tracks)
    by_role = {role: next((t.codec.inner if isinstance(t.codec, TranscodedCodec) else t.codec for t in old.tracks
                           if t.id.role == role and (t.ggml_type in FLOAT_TYPES or isinstance(t.codec, TranscodedCodec))),
                          None)
               for role in ROLES}
    extra = [kv for key, kv in old.file.kvs.items() if key.startswith("deltakv.runtime.")]
    write_session(state, path, get_codec(old.codec_name), k_codec=by_role["k"], v_codec=by_role["v"],
                  extra_kvs=extra, track_codecs=track_codecs, rope=rope, transcode=transcode)


def append_session(session: DkvSession | str | os.PathLike, state: LlamaState, progress=None, *, rope=None,
                   row_offsets: list[int] | None = None, seconds: dict | None = None) -> dict:
    """Bring the stored session up to ``state``, a newer state of the same context.

    ``session``: the session as :meth:`DkvSession.open_for_append` opened it (locked, its journal
    recovered, its header read once: what the caller checked is what is appended to), or a path,
    which is opened so. An opened session still describes the snapshot it was opened on: close it.

    For each stream, the stored cell records are compared with the live ones (SPEC.md section 8):
    rows from the first chunk that differs, or that holds the last stored row, are coded from
    ``state``'s exact values into a new segment; rows before it stay. A stream that only grew costs
    its new rows (plus one re-encoded chunk); a sliding-window stream whose window moved is
    rewritten from the first cell that left it. Where no append can express the change (tokens
    that are no longer a prefix, a stream emptied, changed opaque sections, or a file that
    would hold more superseded rows than live ones) the whole file is rewritten.
    Before the new header is committed, the cells the new snapshot rebuilds are checked against
    ``state``'s; a mismatch raises and leaves the old snapshot.

    Appended segments keep each track's stored codec (its rotary parameters included); ``rope``
    (``write_session``'s) matters only to a rewrite whose tracks are not the stored ones.

    ``row_offsets``: ``state`` holds only a tail of the live state: stream ``g``'s cells (records
    and rows) are the live ones from row ``row_offsets[g]`` on, and the live rows before it are
    taken to be the stored ones (the caller's promise: the runtime's spare-sequence copy, which
    checks it as far as llama.cpp lets it). The append written is then the one the whole state
    would give; where it would need a row before a tail, or a rewrite, :class:`WholeStateNeeded`
    is raised and nothing is written. ``seconds``: filled with the time spent coding the rows
    (``encode``: the new segment, or the rewrite) and committing them (``write``).

    Returns ``rows_added`` (rows written), ``tokens_added`` and ``rewritten`` (why, or None).
    """
    if not isinstance(session, DkvSession):
        with DkvSession.open_for_append(session) as opened:
            return append_session(opened, state, progress, rope=rope)
    old = session
    if not old.file.locked:
        raise DeltaKVError(f"append_session({old.path}): expected a session opened with DkvSession.open_for_append "
                           f"(it holds the file's lock), found one opened read-only")
    path = old.path
    by_stream = tracks_by_stream(old.tracks)
    _check_same_structure(old, state, by_stream)
    n_streams = len(old.stream_cells)
    offsets = [0] * n_streams if row_offsets is None else [int(o) for o in row_offsets]
    if len(offsets) != n_streams or any(not 0 <= o <= old.stream_cells[g] for g, o in enumerate(offsets)):
        raise DeltaKVError(f"row_offsets {row_offsets}: expected one per stream, each within the stored cells "
                           f"{old.stream_cells}")
    rewrite = _rewrite_reason(old, state, by_stream, offsets)
    t = time.perf_counter()
    if rewrite is None:
        result = _append_rows(old, state, by_stream, progress, offsets)
        if result is None:
            rewrite = "superseded rows would outweigh the live ones"
    if rewrite is not None and row_offsets is not None:
        raise WholeStateNeeded(f"the append is a rewrite ({rewrite}): it needs the whole live state")
    if rewrite is not None:
        rewrite_session(path, state, old, rope)  # renames over the file; ``old`` keeps its own mapping
        if seconds is not None:
            seconds["encode"], seconds["write"] = time.perf_counter() - t, 0.0  # a rewrite does both at once
        tokens = state.tokens()
        return {"rows_added": sum(st.cell_count for _, st in live_streams(state)),
                "tokens_added": 0 if tokens is None else len(tokens), "rewritten": rewrite}
    kvs, tensors, summary = result
    if seconds is not None:
        seconds["encode"] = time.perf_counter() - t
    t = time.perf_counter()
    if kvs:  # nothing new (no rows, no tokens) is nothing to write
        # Sizes the reserve of the new file written when this header no longer fits the old one's.
        growth = segment_header_growth(old.tracks, len(old.stream_cells), old.token_format, old.n_segments + 1)
        append_container(old.file, kvs, tensors, growth=growth)
    if seconds is not None:
        seconds["write"] = time.perf_counter() - t
    return summary


def _append_rows(old: DkvSession, state: LlamaState, by_stream, progress, offsets):
    """The key-values and tensors of an append of ``state`` (each stream from row ``offsets[g]`` on)
    to ``old``, and its summary; None when the file would then hold more superseded rows than live
    ones (the caller rewrites it)."""
    streams = live_streams(state)
    segment = old.n_segments
    builder = SessionTensors()
    first_rows, rows_added, new_cells, new_cell_bytes = [], [], [], {}
    for g, (_, stream) in enumerate(streams):
        tracks = by_stream.get(g, [])
        at = offsets[g]  # the live row of the stream's first given cell
        old_n, n = old.stream_cells[g], at + stream.cell_count
        old_cells = old.cells(g)
        old_ends = cell_record_ends(old_cells, old_n, old.stream_ext[g])
        skip = int(old_ends[at - 1]) if at else 0  # stored record bytes of the rows before the tail
        same = at + first_differing_cell(memoryview(old_cells)[skip:], old_ends[at:] - skip, stream.cells,
                                         stream.cell_count)
        new_cells.append(n)
        if same == old_n == n:
            first_rows.append(0)
            rows_added.append(0)
            continue
        # Keep rows only up to the first differing cell, and never the last stored one: llama-cpp-python
        # re-evaluates the last token after a load, so its row may have been recomputed since.
        keep = min(same, old_n - 1) if old_n else 0
        chunk = chunk_rows(tracks)
        first = keep - keep % chunk
        if first < at:
            raise WholeStateNeeded(f"stream {g}: the append starts at row {first}, before the given tail (row {at})")
        ends = cell_record_ends(stream.cells, stream.cell_count, stream.cell_ext_bytes)
        start_byte = int(ends[first - at - 1]) if first > at else 0
        cells = np.frombuffer(stream.cells, np.uint8)[start_byte:]
        new_cell_bytes[g] = cells
        builder.add(cells_tensor(g, segment), GGMLType.I8, cells)
        context = stream_context(stream, tracks, first - at, n - at)
        if context is not None:
            context = replace(context, first_row=first)  # the row within the stream, not within the tail
        for t, (_, kv) in zip(tracks, live_tracks(g, stream)):
            builder.add_track_segment(t, segment, track_rows(kv)[first - at:], t.name, context)
            if progress is not None:
                progress(t.name)
        first_rows.append(first)
        rows_added.append(n - first)

    seg_first_row = np.vstack([old.seg_first_row, [first_rows]])
    seg_rows = np.vstack([old.seg_rows, [rows_added]])
    _check_rebuilt_cells(old, streams, seg_first_row, seg_rows, segment, new_cell_bytes, offsets)

    row_cost = [sum(source_row_bytes(t) for t in by_stream.get(g, [])) for g in range(len(streams))]
    held = sum(int(seg_rows[:, g].sum()) * row_cost[g] for g in range(len(streams)))
    live = sum(new_cells[g] * row_cost[g] for g in range(len(streams)))
    if held - live > live:
        return None

    tokens = state.tokens()
    old_tokens = old.tokens()
    n_new_tokens = 0 if tokens is None else len(tokens) - len(old_tokens)
    if n_new_tokens:
        builder.add(tokens_tensor(segment), GGMLType.I32, tokens[len(old_tokens):])
    if not any(rows_added) and not n_new_tokens:
        return [], [], {"rows_added": 0, "tokens_added": 0, "rewritten": None}
    get_codec(old.codec_name)  # as a rewrite would, refuse a requested codec this library does not know
    kvs = session_kvs(state, old.codec_name, old.tracks, seg_first_row.reshape(-1).tolist(), seg_rows.reshape(-1).tolist(),
                      old.seg_first_token + [old.n_tokens], old.seg_tokens + [n_new_tokens], new_cells)
    ours = {kv.key for kv in kvs}
    kvs += [kv for key, kv in old.file.kvs.items() if key not in ours and key.startswith("deltakv.runtime.")]
    return kvs, builder.tensors, {"rows_added": sum(rows_added), "tokens_added": n_new_tokens, "rewritten": None}


def _check_rebuilt_cells(old: DkvSession, streams, seg_first_row, seg_rows, segment: int, new_cell_bytes,
                         offsets) -> None:
    """The cells the new segment table rebuilds, from the stored segments and the new one, must be
    the live state's, record for record (positions, sequence ids, order), before anything is committed
    (given a tail, the stored records before it, then the tail's)."""
    for g, (_, stream) in enumerate(streams):
        def records(s, g=g):
            if s == segment:
                return new_cell_bytes.get(g, np.empty(0, np.uint8)), int(seg_rows[s, g])
            return old.segment_cells(g, s), int(seg_rows[s, g])

        spans = owned_spans(seg_first_row, seg_rows, g)
        end = spans[-1][2] if spans else 0
        rebuilt = assemble_cells(spans, records, old.stream_ext[g], g)
        live = bytes(stream.cells)
        if offsets[g]:
            stored = old.cells(g)
            live = stored[:int(cell_record_ends(stored, old.stream_cells[g], old.stream_ext[g])[offsets[g] - 1])] + live
        if end != offsets[g] + stream.cell_count or rebuilt != live:
            raise DeltaKVError(
                f"stream {g}: the appended snapshot would rebuild {end} cells ({len(rebuilt)} bytes), the live state has "
                f"{offsets[g] + stream.cell_count} ({len(live)} bytes); nothing was written")
