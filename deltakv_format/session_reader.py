"""Reading a .dkv session: its metadata checked against the schema, any track or token range decoded,
the llama.cpp state rebuilt (SPEC.md sections 3, 4 and 7).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .codecs import TrackContext, get_codec
from .codecs.transcode import TRANSCODE_PARAM, TranscodedCodec, check_transcode_type, transcode_type_name
from .constants import ALIGNMENT, GGML_BLOCK_SIZES, GGMLType
from .container import DkvFile, element_view_dtype
from .gguf_io import align_up
from .errors import CodecError, CorruptError, DeltaKVError
from .session_cells import assemble_cells, cell_positions, owned_spans
from .session_schema import (
    TOKEN_BLOB,
    cells_tensor,
    decode_metadata,
    is_byte_tensor,
    stream_track_ids,
    tokens_tensor,
)
from .session_sizes import rebuilt_state_bytes, session_stats
from .session_tracks import Track, empty_part
from .state_model import BodyLayout, Framing, KVTensor, LlamaState


def _track_params(text: str, where: str) -> dict:
    """``deltakv.track.params`` of one track: a JSON object of integer parameters."""
    try:
        params = json.loads(text)
    except ValueError as e:
        raise CorruptError(f"deltakv.track.params of {where}: expected a JSON object, found {text[:40]!r} ({e})") from e
    if not isinstance(params, dict) or not all(isinstance(k, str) and type(v) is int for k, v in params.items()):
        raise CorruptError(f"deltakv.track.params of {where}: expected an object of integers, found {text[:60]!r}")
    return params


class DkvSession:
    """An opened .dkv session: metadata, tracks, decoding and rebuilding the llama.cpp state.

    ``DkvSession(path)`` only reads (SPEC.md 8: a committed journal's header is read in place of the
    file's). :meth:`open_for_append` opens it for :func:`~deltakv_format.session_append.append_session`.
    """

    def __init__(self, path, *, verify_checksums: bool = True, _file: DkvFile | None = None):
        """``path``: a .dkv file, or a :class:`DkvFile` already open (which the session then owns)."""
        if isinstance(path, DkvFile):
            _file = path
        self.file = _file if _file is not None else DkvFile(path, verify_checksums=verify_checksums)
        self._positions: dict[tuple[int, int], np.ndarray] = {}
        self._rope_tables: dict[tuple[int, int], dict] = {}  # per (stream, segment): decoders' rotary tables
        where = self.file.name if isinstance(path, DkvFile) else str(path)
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

    @classmethod
    def open_for_append(cls, path, *, verify_checksums: bool = True) -> "DkvSession":
        """Open the session at ``path`` for a writer: the file's exclusive lock is taken (and held
        until :meth:`close`) and an interrupted append's journal recovered before the header is
        read, once (SPEC.md 8, step 1)."""
        return cls(path, _file=DkvFile.open_for_append(path, verify_checksums=verify_checksums))

    @property
    def path(self) -> Path:
        return self.file.path

    def _check_tensor(self, name: str, ggml_type: int, n: int | None = None) -> None:
        """A structural tensor (tokens, cells, sections) has the type and, if given, length it must."""
        info = self.file.tensor_infos.get(name)
        if info is None:
            return
        if info.ggml_type != ggml_type or len(info.shape) != 1 or (n is not None and info.shape[0] != n):
            want = f"{GGMLType(ggml_type).name} [{'n' if n is None else n}]"
            raise CorruptError(f"tensor {name!r}: expected {want}, found {GGMLType(info.ggml_type).name} {list(info.shape)}")

    def _load(self):
        # Every key's presence, type, length and range (SPEC.md 3), from the schema table.
        meta = decode_metadata(self.file.kvs)
        self.framing = Framing(meta.framing)
        self.layout = BodyLayout(meta.layout)
        self.file_version = meta.file_version
        self.seq_prefix_id = meta.seq_prefix_id
        self.arch = meta.arch
        self.token_format = meta.token_format
        self.codec_name = meta.codec_name
        self.section_kind = meta.section_kind
        self.section_role = meta.section_role
        self.section_has_n_stream = meta.section_has_n_stream
        self.stream_section = meta.stream_section
        self.stream_cells = meta.stream_cells
        self.stream_ext = meta.stream_ext
        self.stream_v_trans = meta.stream_v_trans
        self.stream_n_layer = meta.stream_n_layer
        self.stream_rot_k = meta.stream_rot_k
        self.stream_rot_v = meta.stream_rot_v
        self.stream_n_k = meta.stream_n_k
        self.stream_n_v = meta.stream_n_v
        self.n_segments = n_seg = meta.n_segments
        n_st, n_tr = len(meta.stream_section), len(meta.track_name)
        self.seg_first_row = np.array(meta.seg_first_row, np.int64).reshape(n_seg, n_st)
        self.seg_rows = np.array(meta.seg_rows, np.int64).reshape(n_seg, n_st)
        self.seg_first_token = meta.seg_first_token
        self.seg_tokens = meta.seg_tokens

        # What ties the keys together.
        file_framing = self.framing in (Framing.SESSION_FILE, Framing.SEQUENCE_FILE)
        if file_framing != (self.token_format != "none"):
            raise CorruptError(f"deltakv.source.token_format: expected {'plain or packed' if file_framing else 'none'} "
                               f"for framing {self.framing.value!r}, found {self.token_format!r}")
        for g, (rk, rv) in enumerate(zip(self.stream_rot_k, self.stream_rot_v)):
            if (rk < 0) != (rv < 0):
                raise CorruptError(f"stream {g}: expected n_rot_k and n_rot_v both -1 or both >= 0, found {rk} and {rv}")

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
                if not self.file.has_tensor(tokens_tensor(s)):
                    raise CorruptError(f"segment {s} holds {n} tokens, but tensor {tokens_tensor(s)!r} is missing")
                self._check_tensor(tokens_tensor(s), GGMLType.I32, n)
            expect += n
        if self.token_format == "packed":
            if not self.file.has_tensor(TOKEN_BLOB):
                raise CorruptError(f"token_format 'packed' needs the tensor {TOKEN_BLOB!r}, which is missing")
            self._check_tensor(TOKEN_BLOB, GGMLType.I8)
        for name in self.file.tensor_infos:
            if is_byte_tensor(name):
                self._check_tensor(name, GGMLType.I8)

        # Tracks.
        if sum(self.stream_n_k) + sum(self.stream_n_v) != n_tr:
            raise CorruptError(f"deltakv.stream.n_k / n_v: expected them to add up to the {n_tr} tracks, "
                               f"found {sum(self.stream_n_k) + sum(self.stream_n_v)}")
        ids = [track_id for g in range(n_st) for track_id in stream_track_ids(g, self.stream_n_k[g], self.stream_n_v[g])]
        if meta.track_name != [track_id.name for track_id in ids]:
            raise CorruptError("deltakv.track.name does not list s{stream}.l{layer}.k then .v for every stream in order")
        self.tracks = []
        for i, track_id in enumerate(ids):
            ggml_type, n_values = meta.track_ggml_type[i], meta.track_n_values[i]
            if ggml_type not in GGML_BLOCK_SIZES:
                raise CorruptError(f"track {track_id.name} has unknown ggml type {ggml_type}")
            params = _track_params(meta.track_params[i] if meta.track_params is not None else "{}", track_id.name)
            # a transcoded quantized cache (SPEC.md 6.6): the codec codes the blocks' values, and the
            # track's ggml type is the one they are quantized back to
            cache_type = params.pop(TRANSCODE_PARAM, None)
            try:
                codec = get_codec(meta.track_codec[i], keyframe_interval=meta.track_keyframe_interval[i],
                                  rotation=meta.track_rotation[i], **params)
                if cache_type is not None:
                    check_transcode_type(cache_type, f"track {track_id.name}")
                    if cache_type != ggml_type:
                        raise CorruptError(f"track {track_id.name}: deltakv.track.params {TRANSCODE_PARAM} names "
                                           f"{transcode_type_name(cache_type)}, deltakv.track.ggml_type "
                                           f"{transcode_type_name(ggml_type)}; expected the same type")
                    if meta.track_transposed[i]:
                        raise CorruptError(f"track {track_id.name}: a transcoded track stored transposed; expected "
                                           f"row-major blocks (llama.cpp never writes a quantized V transposed)")
                    codec = TranscodedCodec(codec, cache_type)
            except CodecError as e:
                raise CorruptError(f"track {track_id.name}: {e}") from e
            if not codec.accepts(ggml_type, n_values):
                if isinstance(codec, TranscodedCodec):
                    raise CorruptError(f"track {track_id.name}: transcoded codec {codec.name} cannot hold "
                                       f"{GGMLType(ggml_type).name} rows of {n_values} bytes (expected whole "
                                       f"{codec.block_bytes}-byte blocks whose values the codec takes as F16)")
                raise CorruptError(f"track {track_id.name}: codec {codec.name} cannot hold {GGMLType(ggml_type).name} rows "
                                   f"of {n_values} values")
            self.tracks.append(Track(i, track_id, ggml_type, n_values, bool(meta.track_transposed[i]), codec))
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
                    self._check_parts(t, s, rows, int(self.seg_first_row[s, t.stream]), self._parts(t, s, verify=False))
        self._check_no_gaps()

    def _check_no_gaps(self) -> None:
        """Like safetensors, no room for hidden bytes: each tensor starts where the previous one
        ends, rounded up to the alignment (SPEC.md 7). Bytes after the last committed tensor are
        what an append that crashed before its commit leaves (SPEC.md 8); they are never read."""
        end = 0
        for info in self.file.header.tensors:
            expected = align_up(end, ALIGNMENT)
            if info.offset != expected:
                raise CorruptError(f"tensor {info.name!r}: expected it at data offset {expected} (the previous tensor's "
                                   f"end, aligned), found {info.offset}", offset=self.file.data_start + info.offset)
            end = info.offset + info.nbytes

    def _check_parts(self, t: Track, s: int, rows: int, first_row: int, parts: dict) -> None:
        """The part tensors of a track segment hold exactly ``rows`` rows, split as the codec says
        (SPEC.md 3.2; the decoders index them without bounds checks)."""
        for role, n in t.codec.expected_part_rows(rows, first_row).items():
            if parts[role].shape[0] != n:
                raise CorruptError(f"tensor {t.part_name(s, role)!r}: expected {n} rows for {rows} rows with "
                                   f"keyframe interval {t.codec.keyframe_interval}, found {parts[role].shape[0]}")
        t.codec.check_parts(parts, t.ggml_type, t.n_values, rows, first_row, f"{t.name} segment {s}")
        held = t.codec.rows_of_parts(parts)
        if held != rows:
            raise CorruptError(f"tensors of {t.name} segment {s} hold {held} rows, expected {rows}")

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
                tok = self.file.tensor(tokens_tensor(s))
                if tok.shape != (self.seg_tokens[s],):
                    raise CorruptError(f"{tokens_tensor(s)} holds {tok.shape} tokens, expected {self.seg_tokens[s]}")
                out[self.seg_first_token[s]:self.seg_first_token[s] + self.seg_tokens[s]] = tok
        return out

    def _parts(self, track: Track, segment: int, verify: bool | None = None) -> dict[str, np.ndarray]:
        parts = {}
        for part in track.codec.parts(track.ggml_type, track.n_values):
            name = track.part_name(segment, part.role)
            if self.file.has_tensor(name):
                info = self.file.tensor_infos[name]
                if part.n_values == 0:  # bytes of one dimension, laid out as the codec's section says
                    if info.ggml_type != part.ggml_type or len(info.shape) != 1:
                        raise CorruptError(f"tensor {name!r} is {GGMLType(info.ggml_type).name} {info.shape}; "
                                           f"expected {GGMLType(part.ggml_type).name} of one dimension")
                elif info.ggml_type != part.ggml_type or info.shape[0] != part.n_values or len(info.shape) != 2:
                    raise CorruptError(
                        f"tensor {name!r} is {GGMLType(info.ggml_type).name} {info.shape}; "
                        f"expected {GGMLType(part.ggml_type).name} with rows of {part.n_values}"
                    )
                parts[part.role] = self.file.tensor(name, verify=verify)
            else:
                parts[part.role] = empty_part(part)
        return parts

    def _owned(self, stream: int) -> list[tuple[int, int, int]]:
        """(segment, first row, end row) of the rows each segment still owns."""
        return owned_spans(self.seg_first_row, self.seg_rows, stream)

    def rows(self, track: Track | str, row_lo: int = 0, row_hi: int | None = None, out=None) -> np.ndarray:
        """Decode rows [row_lo, row_hi) of a track: token-major element bits (or raw row bytes).

        ``out``: a C-contiguous ``(row_hi - row_lo, n_values)`` array of the rows' dtype that every
        segment decodes straight into (no join); returned."""
        if isinstance(track, str):
            track = self.track_by_name[track]
        n = self.stream_cells[track.stream]
        row_hi = n if row_hi is None else row_hi
        if not 0 <= row_lo <= row_hi <= n:
            raise DeltaKVError(f"rows {row_lo}..{row_hi} out of range 0..{n} for {track.name}")
        if out is not None:
            return self._rows_into(track, row_lo, row_hi, out)
        pieces = [track.codec.decode(parts, track.ggml_type, track.n_values, lo - first, hi - first, context=context)
                  for lo, hi, first, parts, context in self._segment_slices(track, row_lo, row_hi)]
        if not pieces:
            return np.empty((0, track.n_values), element_view_dtype(track.ggml_type))
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def _rows_into(self, track: Track, row_lo: int, row_hi: int, out: np.ndarray) -> np.ndarray:
        dtype = element_view_dtype(track.ggml_type)
        if out.shape != (row_hi - row_lo, track.n_values) or out.dtype != dtype or not out.flags.c_contiguous:
            raise DeltaKVError(f"out for rows {row_lo}..{row_hi} of {track.name}: expected a C-contiguous "
                               f"{(row_hi - row_lo, track.n_values)} {dtype} array, found {out.shape} {out.dtype}")
        for lo, hi, first, parts, context in self._segment_slices(track, row_lo, row_hi):
            track.codec.decode(parts, track.ggml_type, track.n_values, lo - first, hi - first,
                               out=out[lo - row_lo:hi - row_lo], context=context)
        return out

    def _segment_slices(self, track: Track, row_lo: int, row_hi: int):
        """(lo, hi, segment's first row, parts, codec context) of each segment holding rows of row_lo..row_hi."""
        for s, first, end in self._owned(track.stream):
            lo, hi = max(row_lo, first), min(row_hi, end)
            if lo < hi:
                yield lo, hi, first, self._parts(track, s), (self.track_context(track, s) if track.codec.takes_context else None)

    def release_decode_caches(self) -> None:
        """Drop the cell positions and rotary tables kept for decoding (a streamed rebuild calls it
        between streams, so that what it holds does not grow with the number of streams)."""
        self._positions.clear()
        self._rope_tables.clear()

    def track_context(self, track: Track, segment: int) -> TrackContext:
        """What a codec that takes context needs for a segment: the positions of its cells, its first row."""
        key = (track.stream, segment)
        positions = self._positions.get(key)
        if positions is None:
            rows = int(self.seg_rows[segment, track.stream])
            positions = cell_positions(self.segment_cells(track.stream, segment), rows, self.stream_ext[track.stream])
            self._positions[key] = positions
        tables = self._rope_tables.setdefault(key, {})
        return TrackContext(positions=positions, first_row=int(self.seg_first_row[segment, track.stream]),
                            rope_tables=tables)

    def segment_cells(self, stream: int, segment: int) -> np.ndarray:
        """The cell records segment ``segment`` stores for ``stream`` (bytes; empty if none)."""
        name = cells_tensor(stream, segment)
        return self.file.tensor(name).reshape(-1) if self.file.has_tensor(name) else np.empty(0, np.uint8)

    def cells(self, stream: int) -> bytes:
        """The stream's cell records in row order, as the snapshot holds them."""
        return assemble_cells(self._owned(stream), lambda s: (self.segment_cells(stream, s), int(self.seg_rows[s, stream])),
                              self.stream_ext[stream], stream)

    def to_llama_state(self) -> LlamaState:
        """Decode everything and rebuild the llama.cpp state it came from (a typed state holding
        every payload; ``session_rebuild.rebuild_into`` / ``iter_rebuilt_chunks`` give its bytes in
        one buffer, or streamed, without holding them twice)."""
        from .session_rebuild import session_state

        return session_state(self, lambda t, n: KVTensor.payload_from_rows(self.rows(t), t.transposed))

    # -- sizes -----------------------------------------------------------------------

    def source_bytes(self) -> int:
        """Size of the llama.cpp state this session rebuilds (SPEC.md section 4), without decoding."""
        return rebuilt_state_bytes(self)

    def stats(self) -> dict:
        """``kv_source_bytes`` (the K/V payloads in the llama.cpp state), ``kv_stored_bytes`` (their
        coded tensors) and ``file_bytes``."""
        tensor_bytes = {name: info.nbytes for name, info in self.file.tensor_infos.items()}
        return session_stats(self.tracks, self.stream_cells, tensor_bytes, self.file.file_size)

    def close(self):
        self.file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

