"""File-level operations behind the ``deltakv`` command: convert, restore, inspect, validate.

The command line only parses arguments and prints; everything it can do is here,
callable from Python. Wherever a .dkv is read or written, a store URL may stand for its path
(``redis://host:6379/0/name.dkv``, ``s3://bucket/prefix/name.dkv``: ``stores.open_entry``);
the entry's bytes are then read into memory (``DkvSession.from_buffer``) or written whole.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .codecs import CODEC_CLASSES, get_codec
from .codecs.bounds import as_float64
from .codecs.transcode import TranscodedCodec
from .constants import DEFAULT_CODEC, FLOAT_TYPES, GGUF_MAGIC, GGMLType
from .container import DkvFile, replacing_file
from .errors import ChecksumError, CodecError, CorruptError, DeltaKVError
from .llama_state import parse_state
from .model_info import ModelInfo
from .reference import from_source_bits
from .session_cells import cell_record_ends, owned_spans
from .session_reader import DkvSession
from .session_rebuild import iter_rebuilt_chunks
from .session_sizes import stored_bytes_by_track
from .session_tracks import source_n_values
from .session_writer import codecs_of_roles, rope_for_state, session_bytes, write_session
from .state_model import APPENDIX_ROLE, Framing, LlamaState, OpaqueSection


def check_output_path(path) -> None:
    """Refuse, before any work is done, an output path whose folder is missing or is not a folder.

    Writes go through a temporary file next to ``path``; without this check the error names that
    temporary file (``.out.dkv.x1y2z3.tmp``) instead of the path the caller gave."""
    path = Path(path)
    folder = path.parent
    if not folder.exists():
        raise DeltaKVError(f"cannot write {path}: the folder {folder} does not exist")
    if not folder.is_dir():
        raise DeltaKVError(f"cannot write {path}: {folder} is not a folder")
    if path.is_dir():
        raise DeltaKVError(f"cannot write {path}: it is a folder")


@contextlib.contextmanager
def writing(path):
    """Turn an OSError of writing ``path`` (through its temporary file) into an error naming ``path``."""
    try:
        yield
    except OSError as e:
        raise DeltaKVError(f"cannot write {path}: {e.strerror or e}") from e


def is_entry_url(location) -> bool:
    """True when ``location`` names a store entry by URL rather than a file by path."""
    from .stores import is_store_url

    return is_store_url(location)


def entry_exists(url: str) -> bool:
    """Whether the store entry ``url`` names exists (a listing: no entry is read)."""
    from .stores import open_entry

    store, name = open_entry(url)
    return any(info.name == name for info in store.list())


@contextlib.contextmanager
def stored_entry(url: str):
    """``with stored_entry(url) as (data, where):`` the entry's bytes and where they are, for messages."""
    from .stores import open_entry

    store, name = open_entry(url)
    with store.get(name) as data:
        if bytes(data[:4]) != GGUF_MAGIC:
            raise DeltaKVError(f"expected a .dkv entry (GGUF magic {GGUF_MAGIC!r}), found {bytes(data[:4])!r} "
                               f"({len(data)} bytes)", path=store.locate(name))
        yield data, store.locate(name)


@contextlib.contextmanager
def opened_session(location):
    """A .dkv by path or by store URL, as a DkvSession."""
    if is_entry_url(location):
        with stored_entry(location) as (data, where), DkvSession.from_buffer(data, name=where) as session:
            yield session
    else:
        with DkvSession(location) as session:
            yield session


def put_dkv(location, data) -> str:
    """Write the .dkv bytes ``data`` at ``location`` (a path: crash-safe; a store URL: one put);
    returns where they went, for messages."""
    if is_entry_url(location):
        from .stores import open_entry

        store, name = open_entry(location)
        store.put(name, data)
        return store.locate(name)
    atomic_write(location, [data])
    return str(location)


@contextlib.contextmanager
def dkv_bytes(location):
    """``with dkv_bytes(location) as (data, where):`` a .dkv's bytes by path (mapped) or store URL."""
    if is_entry_url(location):
        with stored_entry(location) as found:
            yield found
    else:
        with MappedFile(location) as mapped:
            yield mapped.buf, str(location)


def atomic_write(path, chunks) -> int:
    """Write ``chunks`` (bytes-like) to ``path`` through a temporary file, fsync and rename."""
    check_output_path(path)
    written = 0
    with writing(path), replacing_file(path) as f:
        for chunk in chunks:
            f.write(chunk)
            written += len(chunk)
    return written


class MappedFile:
    """A read-only memory map of a whole file (empty files map to b"")."""

    def __init__(self, path):
        self.path = Path(path)
        try:
            self._f = open(self.path, "rb")
        except FileNotFoundError as e:
            raise DeltaKVError(f"no such file: {self.path}") from e
        except IsADirectoryError as e:
            raise DeltaKVError(f"{self.path} is a folder, expected a file") from e
        size = os.fstat(self._f.fileno()).st_size
        self._map = mmap.mmap(self._f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        self.buf = memoryview(self._map) if self._map is not None else memoryview(b"")
        # the map's address, to find a view's offset in it (release); the array goes at once, so that
        # it holds no export that would keep close() from closing the map
        self._base = np.frombuffer(self._map, np.uint8).ctypes.data if self._map is not None else 0

    def release(self, view) -> None:
        """Take the pages under ``view`` (a part of ``buf``, e.g. a parsed cache tensor's bytes) out
        of this process's resident set (madvise DONTNEED; the page cache keeps them and a later read
        maps them again): convert calls it on what it has coded, so that its resident set does not
        grow with the input. A no-op for a view outside the map or where there is no madvise."""
        advise = getattr(mmap, "MADV_DONTNEED", None)
        if self._map is None or advise is None:
            return
        view = memoryview(view)
        if not view.nbytes or not view.c_contiguous:
            return
        start = np.frombuffer(view.cast("B"), np.uint8).ctypes.data - self._base
        if start < 0 or start + view.nbytes > len(self._map):
            return  # not a part of this map (a copy)
        first = start - start % mmap.PAGESIZE
        try:
            self._map.madvise(advise, first, start + view.nbytes - first)
        except (OSError, ValueError):
            pass  # advice only

    def close(self):
        try:
            self.buf.release()
        except Exception:
            pass
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass  # views into the map still alive; it closes when they go
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def is_dkv(path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def load_model_info(model_path):
    if model_path is None:
        return None
    return ModelInfo.from_gguf(model_path)


def parse_state_file(mapped: MappedFile, model=None) -> LlamaState:
    """Parse a llama.cpp state file; errors name the file."""
    try:
        return parse_state(mapped.buf, model=model)
    except DeltaKVError as e:
        if e.path is None:
            raise type(e)(e.bare_message, offset=e.offset, path=str(mapped.path)) from e
        raise


# ---- convert ----------------------------------------------------------------------------


@dataclass
class ConvertReport:
    source_bytes: int
    dkv_bytes: int
    kv_source_bytes: int
    kv_stored_bytes: int
    codec: str
    tracks_by_codec: dict = field(default_factory=dict)
    rope_tracks: int = 0  # K tracks coded with rotary embedding undone
    rope_capable_tracks: int = 0  # K tracks whose codec can undo it (dkv-ans), given the model

    @property
    def ratio(self) -> float:
        return self.dkv_bytes / self.source_bytes if self.source_bytes else float("nan")


def convert(in_path, out_path, *, codec=DEFAULT_CODEC, keyframe_interval=None, model_path=None, progress=None,
            k_codec=None, v_codec=None, bits=None, transcode=False) -> ConvertReport:
    """llama.cpp state file (any supported framing and layout) -> .dkv.

    ``k_codec`` / ``v_codec``: another codec for the K or the V tracks (``keyframe_interval`` applies
    to every delta codec). ``model_path``: the model's GGUF; besides fixing the layout, it gives
    the rotary parameters with which dkv-ans codes K before rotary embedding (without it, K is
    coded as it is: larger or worse). ``bits``: the rate of the codecs that have one (dkv-ans), in
    bits per value. ``transcode``: code the K/V of a quantized cache (q8_0, q4_0) through their values
    and re-quantize them on restore (lossy, SPEC.md 6.6); without it they are kept raw."""
    # the codecs that take a keyframe interval: the delta codecs
    delta_codecs = tuple(name for name, cls in CODEC_CLASSES.items() if "keyframe_interval" in cls.parameters)
    if keyframe_interval and not {codec, k_codec, v_codec} & set(delta_codecs):
        raise CodecError(f"--keyframe-interval applies to the delta codecs ({', '.join(delta_codecs)}); "
                         f"found codec {codec}" + (f", K {k_codec}" if k_codec else "") + (f", V {v_codec}" if v_codec else ""))

    def make(name):
        if name is None or name not in delta_codecs or not keyframe_interval:
            return name  # by id: write_session gives it its defaults for the role
        return get_codec(name, keyframe_interval=keyframe_interval)

    codec_obj = make(codec)
    codecs_of_roles(codec_obj, make(k_codec), make(v_codec), bits)  # a bad codec or bits: before any work
    if is_entry_url(out_path):
        from .stores import open_entry

        store, entry_name = open_entry(out_path)  # a bad URL: before any work
    else:
        store = None
        check_output_path(out_path)
    model = load_model_info(model_path)
    with MappedFile(in_path) as mapped:
        if bytes(mapped.buf[:4]) == GGUF_MAGIC:
            raise DeltaKVError(f"{in_path} is already a GGUF/.dkv file; convert takes a llama.cpp state file")
        state = parse_state_file(mapped, model)
        rope = rope_for_state(model, state)
        options = dict(progress=progress, k_codec=make(k_codec), v_codec=make(v_codec), rope=rope, bits=bits,
                       transcode=transcode)
        if store is not None:
            data = session_bytes(state, codec_obj, **options)
            store.put(entry_name, data)
            # The report is read back from the bytes written: what a reader of the entry will see.
            written = DkvSession.from_buffer(data, name=store.locate(entry_name), verify_checksums=False)
        else:
            with writing(out_path):
                written = write_session(state, out_path, codec_obj, release=mapped.release, **options)
        source_bytes = len(mapped.buf)
        del state
    stats = written.stats()
    by_codec: dict[str, int] = {}
    for t in written.tracks:
        label = t.codec.name
        if isinstance(t.codec, TranscodedCodec):
            label += f" (transcoded {GGMLType(t.ggml_type).name})"
        by_codec[label] = by_codec.get(label, 0) + 1
    k_tracks = [t for t in written.tracks if t.id.role == "k"]
    return ConvertReport(source_bytes, stats["file_bytes"], stats["kv_source_bytes"], stats["kv_stored_bytes"],
                         written.codec_name, by_codec,
                         rope_tracks=sum(1 for t in k_tracks if t.codec.get_config().get("rope")),
                         rope_capable_tracks=sum(1 for t in k_tracks if "rope" in t.codec.parameters))


# ---- restore ----------------------------------------------------------------------------


def restore(dkv_path, out_path, *, framing: str | None = None) -> int:
    """.dkv (a path or a store URL) -> llama.cpp state bytes (the original framing unless
    ``framing`` says otherwise)."""
    check_output_path(out_path)
    with opened_session(dkv_path) as session:
        target = Framing(framing) if framing else None
        # streamed: a few layers decoded at a time, written as they come (memory independent of the
        # session's size); the file appears only once complete (atomic_write)
        return atomic_write(out_path, iter_rebuilt_chunks(session, framing=target, tokens=session.tokens()))


# ---- inspect ----------------------------------------------------------------------------


def _token_text(model_path, tokens) -> list[str] | None:
    if model_path is None or tokens is None:
        return None
    from gguf import GGUFReader

    reader = GGUFReader(model_path)
    field_ = reader.fields.get("tokenizer.ggml.tokens")
    if field_ is None:
        return None
    vocab = field_.contents()
    return [vocab[t] if 0 <= t < len(vocab) else f"<{t}>" for t in tokens]


def _escape(s: str) -> str:
    return s.encode("unicode_escape").decode("ascii")


def inspect_state(state: LlamaState) -> dict:
    sections = []
    for sec in state.sections:
        if isinstance(sec, OpaqueSection):
            sections.append({"kind": "opaque", "role": sec.role, "bytes": len(sec.data)})
            continue
        streams = []
        for st in sec.streams:
            types = sorted({GGMLType(t.ggml_type).name for t in st.k + st.v})
            streams.append({
                "cells": st.cell_count, "v_trans": st.v_trans, "n_layer": st.n_layer, "k_layers": len(st.k),
                "v_layers": len(st.v), "types": types, "cell_ext_bytes": st.cell_ext_bytes,
                "kv_bytes": sum(len(t.data) for t in st.k + st.v),
                "values_per_row": sorted({t.n_values for t in st.k + st.v}),
            })
        sections.append({"kind": "kv", "has_n_stream": sec.has_n_stream, "streams": streams})
    return {"framing": state.framing.value, "layout": state.layout.value, "file_version": state.file_version,
            "arch": _escape(state.arch) if state.arch is not None else None,
            "layers": model_layers([[len(st.k) for st in sec.streams] for sec in state.kv_sections]),
            "sections": sections}


def model_layers(k_layers_by_cache: list[list[int]]) -> int:
    """The model layers a state holds: each KV cache (iSWA: two) holds its own layers, and every
    stream of a cache (n_stream > 1) holds the same ones again, so streams are not added up.
    ``k_layers_by_cache``: per KV cache, the K tensors of each stream (0 for an empty stream)."""
    return sum(max(streams, default=0) for streams in k_layers_by_cache)


def rope_of_codec(codec) -> str | None:
    """How a track's codec treats rotary embedding, from its config: None for a codec without rotary
    parameters; "not undone" (K coded as it is); else e.g. "neox, 64 of 64 dims, base 100000"."""
    config = codec.get_config()
    if "rope" not in config:
        return None
    if not config["rope"]:
        return "not undone"
    from .codecs.dkv_ans import ROPE_KINDS, f32_of_bits

    kind = {v: k for k, v in ROPE_KINDS.items()}.get(config["rope"], str(config["rope"]))
    n_rot = config["rope_dims"]
    theta = float(f32_of_bits(config["theta_scale_f32"] & 0xFFFFFFFF))
    text = f"{kind}, {n_rot} of {config['head_dim']} dims, base {theta ** (-n_rot / 2):.6g}"
    freq = float(f32_of_bits(config.get("freq_scale_f32", 0x3F800000) & 0xFFFFFFFF))
    return text + (f", freq scale {freq:.6g}" if freq != 1.0 else "")


def k_rope_summary(tracks) -> str | None:
    """One line on whether the K tracks were coded with rotary embedding undone (None: no K track's
    codec has rotary parameters)."""
    k = [t for t in tracks if t.id.role == "k" and "rope" in t.codec.parameters]
    if not k:
        return None
    undone = {}
    for t in k:
        if t.codec.get_config()["rope"]:
            text = rope_of_codec(t.codec)
            undone[text] = undone.get(text, 0) + 1
    if not undone:
        return f"not undone in {len(k)} K tracks (written without the model's rotary parameters)"
    shown = "; ".join(f"{n} x {text}" for text, n in undone.items())
    return f"undone in {sum(undone.values())} of {len(k)} K tracks: {shown}"


def inspect(path, *, model_path=None, n_tokens_shown=8) -> dict:
    """A description of a .dkv or a llama.cpp state file (what ``deltakv inspect --json`` prints);
    a store URL names a .dkv entry."""
    url = is_entry_url(path)
    if not url:
        path = Path(path)
    if url or is_dkv(path):
        with opened_session(path) as s:
            state_info = {"framing": s.framing.value, "layout": s.layout.value, "file_version": s.file_version,
                          "arch": _escape(s.arch) if s.arch else None}
            tokens = s.tokens()
            stats = s.stats()
            source = s.source_bytes()
            tracks = {}
            for t in s.tracks:
                rope = rope_of_codec(t.codec) if t.id.role == "k" else None
                transcoded = isinstance(t.codec, TranscodedCodec)
                key = (t.codec.name, t.codec.keyframe_interval, t.codec.rotation, GGMLType(t.ggml_type).name, rope,
                       transcoded)
                tracks[key] = tracks.get(key, 0) + 1
            info = {
                "file": str(path), "kind": "dkv", "format_version": int(s.file.value("deltakv.version")),
                **state_info,
                "codec": s.codec_name,
                "tracks": [{"codec": c, "keyframe_interval": n, "rotation": r, "type": ty, "count": k,
                            **({} if rope is None else {"rope": rope}),
                            **({"transcoded": "values coded, re-quantized to the type on restore (lossy)"}
                               if transcoded else {})}
                           for (c, n, r, ty, rope, transcoded), k in tracks.items()],
                "segments": s.n_segments,
                "streams": [{"cells": c} for c in s.stream_cells],
                "layers": model_layers([[n for n, sec in zip(s.stream_n_k, s.stream_section) if sec == i]
                                        for i, kind in enumerate(s.section_kind) if kind == "kv"]),
                "n_tokens": None if tokens is None else len(tokens),
                "bytes": {"file": stats["file_bytes"], "source": source, "kv_source": stats["kv_source_bytes"],
                          "kv_stored": stats["kv_stored_bytes"]},
                "compression_ratio": stats["file_bytes"] / source if source else None,
                "kv_bits_per_value": _bits_per_value(s),
            }
            k_rope = k_rope_summary(s.tracks)
            if k_rope is not None:
                info["k_rope"] = k_rope
            appendix = appendix_bytes(s)
            if appendix:
                info["appendix_bytes"] = appendix
    else:
        with MappedFile(path) as mapped:
            state = parse_state_file(mapped, load_model_info(model_path))
            tokens = state.tokens()
            tokens = None if tokens is None else np.array(tokens)
            info = {"file": str(path), "kind": "llama.cpp state", **inspect_state(state), "bytes": {"file": len(mapped.buf)}}
            info["n_tokens"] = None if tokens is None else len(tokens)
            del state
    if tokens is not None:
        first = [int(t) for t in tokens[:n_tokens_shown]]
        info["first_tokens"] = first
        text = _token_text(model_path, first)
        if text is not None:
            info["first_tokens_text"] = [_escape(t) for t in text]
    return info


def appendix_bytes(session: DkvSession) -> int:
    """Bytes kept after the sequence payload of the source file (its ``appendix`` sections)."""
    return sum(len(session.file.tensor(f"section.{i}")) for i, (kind, role)
               in enumerate(zip(session.section_kind, session.section_role)) if kind == "opaque" and role == APPENDIX_ROLE)


def _bits_per_value(session: DkvSession) -> float | None:
    """Stored bits per K/V value of the tracks coded through values (float caches, transcoded ones)."""
    values = 0
    coded = [t for t in session.tracks if t.ggml_type in FLOAT_TYPES or isinstance(t.codec, TranscodedCodec)]
    for t in coded:
        values += source_n_values(t) * session.stream_cells[t.stream]
    if not values:
        return None
    by_track = stored_bytes_by_track({name: info.nbytes for name, info in session.file.tensor_infos.items()})
    stored = sum(by_track.get(t.id, 0) for t in coded)
    return 8 * stored / values


# ---- validate -------------------------------------------------------------------------


@dataclass
class ValidationReport:
    ok: bool
    problems: list[str]
    layers: list[dict] = field(default_factory=list)


def _as_f32(bits: np.ndarray, ggml_type: int) -> np.ndarray:
    return from_source_bits(np.ascontiguousarray(bits), ggml_type)


def validate(path, *, against=None, model_path=None) -> ValidationReport:
    """Structure and checksums of a .dkv (or parseability of a llama.cpp file); with ``against``,
    per-layer error figures of the decoded K/V against the original state, each checked against the
    bound its codec proves from the stored parts (SPEC.md 6.4): a problem is an error that the stored
    scales cannot explain, never a large error the codec stated.

    A file that cannot be read as a .dkv container (not GGUF, another format version, a header
    that fails its checksum) raises. A container that reads but whose content breaks the format
    (tensor checksums, the segment table, cell records) is reported as problems."""
    if is_entry_url(path):
        with stored_entry(path) as (data, where):
            return _validate_dkv(lambda: DkvFile.from_buffer(data, name=where),
                                 lambda: DkvSession.from_buffer(data, name=where), against, model_path)
    path = Path(path)
    if not is_dkv(path):
        with MappedFile(path) as mapped:
            parse_state_file(mapped, load_model_info(model_path))
        return ValidationReport(True, [])
    return _validate_dkv(lambda: DkvFile(path), lambda: DkvSession(path), against, model_path)


def _validate_dkv(open_container, open_session, against, model_path) -> ValidationReport:
    problems: list[str] = []
    layers: list[dict] = []
    with open_container() as container:  # what fails to open here is unreadable, not a problem to list
        problems += container.verify()
    try:
        session = open_session()
    except CorruptError as e:
        # The reader refuses what breaks the session rules (SPEC.md 3, 3.2, 7): segments that
        # start past the rows held so far or off a keyframe, rows that do not add up to the cell
        # count, mismatched arrays. The container read fine, so this is a corrupt file.
        return ValidationReport(False, problems + [e.bare_message])
    with session as s:
        bad_cells = cell_problems(s)
        if bad_cells:
            return ValidationReport(False, problems + bad_cells)  # rebuilding would trip over the same cells
        try:
            rebuilt = s.to_llama_state()
        except DeltaKVError as e:
            problems.append(str(e))
            return ValidationReport(False, problems)
        if against is not None:
            with MappedFile(against) as mapped:
                original = parse_state_file(mapped, load_model_info(model_path))
                layers, more = compare_states(original, rebuilt, s)
                problems += more
                del original
    return ValidationReport(not problems, problems, layers)


def cell_problems(session: DkvSession) -> list[str]:
    """What is wrong with the cell records of each stream, one line per problem.

    Every segment's ``s{g}.cells.{s}`` tensor must hold exactly the records of its rows (SPEC.md
    3.1), whether or not a later segment overrides them. In the snapshot's cells no (sequence id,
    position) pair may occur twice in one stream: llama.cpp's decode keeps each sequence's positions
    consecutive, so two cells of one sequence at one position are a damaged or mis-assembled cache.
    Streams with ext records are not checked for that: M-RoPE embedding inputs legitimately share a
    position (llama_batch_allocr: "embedding inputs can have overlapping positions")."""
    problems = []
    for g in range(len(session.stream_cells)):
        broken = False
        for s in range(session.n_segments):
            rows = int(session.seg_rows[s, g])
            name = f"s{g}.cells.{s}"
            if not rows:
                continue
            # CRCs are verify()'s to report; here only the structure of the records counts
            raw = session.file.tensor(name, verify=False).reshape(-1) if session.file.has_tensor(name) else np.empty(0, np.uint8)
            try:
                ends = cell_record_ends(raw, rows, session.stream_ext[g])
            except CorruptError as e:
                problems.append(f"stream {g} segment {s}: expected {rows} cell records in tensor {name!r} "
                                f"({len(raw)} bytes), found that {e.bare_message}")
                broken = True
                continue
            if ends[-1] != len(raw):
                problems.append(f"stream {g} segment {s}: expected {rows} cell records filling tensor {name!r} "
                                f"({len(raw)} bytes), found {len(raw) - int(ends[-1])} bytes after them")
                broken = True
        if broken or session.stream_ext[g] or not session.stream_cells[g]:
            continue
        try:
            cells = session.cells(g)
        except ChecksumError:
            continue  # the damaged tensor is in verify()'s list already
        problems += _repeated_cells(session, g, cells)
    return problems


def _repeated_cells(session: DkvSession, stream: int, cells: bytes) -> list[str]:
    """The (sequence id, position) pairs held twice in a stream's cells (records without ext)."""
    n = session.stream_cells[stream]
    ends = cell_record_ends(cells, n, 0)
    words = np.frombuffer(cells, "<i4")  # records of i32 pos, u32 n_seq_id, i32 seq_id[n]: all 4-byte words
    first_word = np.concatenate(([0], ends[:-1])) // 4
    pos = words[first_word].astype(np.int64)
    n_seq = words[first_word + 1].view(np.uint32).astype(np.int64)
    # Cells of the old sequence files (layout v9-outputs) carry no sequence id (n_seq_id = 0):
    # they all belong to the one sequence the file holds; -1 << 40 stands for it (no i32 id).
    own = n_seq == 0
    per_cell = np.where(own, 1, n_seq)
    row = np.repeat(np.arange(n), per_cell)  # one entry per (cell, sequence id)
    index_in_cell = np.arange(len(row)) - np.repeat(np.cumsum(per_cell) - per_cell, per_cell)
    seq_word = np.minimum(first_word[row] + 2 + index_in_cell, len(words) - 1)  # own cells read no word
    seq = np.where(own[row], -1 << 40, words[seq_word].astype(np.int64))
    p = pos[row]
    order = np.lexsort((row, p, seq))
    same = (seq[order][1:] == seq[order][:-1]) & (p[order][1:] == p[order][:-1])
    if not same.any():
        return []
    k = int(np.argmax(same))
    a, b = int(row[order][k]), int(row[order][k + 1])
    who = "the state's sequence" if seq[order][k] == -1 << 40 else f"sequence {int(seq[order][k])}"
    where = (f"twice in the record of row {a}" if a == b else
             f"in row {a} (segment {_segment_of_row(session, stream, a)}) and row {b}")
    more = int(same.sum()) - 1
    return [f"stream {stream} segment {_segment_of_row(session, stream, b)}: expected each (sequence id, "
            f"position) pair once per stream, found {who} at position {int(p[order][k])} {where}"
            + (f", and {more} more repeated pair{'s' if more > 1 else ''}" if more else "")]


def _segment_of_row(session: DkvSession, stream: int, row: int) -> int:
    """The segment that holds ``row`` of ``stream`` in the snapshot (the ownership rule of SPEC.md 3.2)."""
    return next(s for s, first, end in owned_spans(session.seg_first_row, session.seg_rows, stream) if first <= row < end)


def compare_states(original: LlamaState, rebuilt: LlamaState, session: DkvSession) -> tuple[list[dict], list[str]]:
    problems = []
    layers = []
    if original.tokens() is not None and not np.array_equal(original.tokens(), rebuilt.tokens()):
        problems.append("tokens differ from the original")
    o_kv, r_kv = original.kv_sections, rebuilt.kv_sections
    if len(o_kv) != len(r_kv) or len(original.sections) != len(rebuilt.sections):
        return layers, problems + ["the original has another structure (sections)"]
    for a, b in zip(original.sections, rebuilt.sections):
        if isinstance(a, OpaqueSection) and bytes(a.data) != bytes(b.data):
            problems.append(f"opaque section {a.role} differs from the original")
    track_iter = iter(session.tracks)
    for sa, sb in ((x, y) for secA, secB in zip(o_kv, r_kv) for x, y in zip(secA.streams, secB.streams)):
        if bytes(sa.cells) != bytes(sb.cells):
            problems.append("cell records differ from the original")
        for ta, tb in zip(sa.k + sa.v, sb.k + sb.v):
            track = next(track_iter)
            if ta.ggml_type != tb.ggml_type or len(ta.data) != len(tb.data):
                problems.append(f"{track.name}: type or size differs from the original")
                continue
            entry = {"track": track.name, "codec": track.codec.name, "type": GGMLType(ta.ggml_type).name}
            if ta.ggml_type in FLOAT_TYPES and ta.cell_count:
                _compare_float_track(session, track, ta, tb, entry, problems)
            elif isinstance(track.codec, TranscodedCodec) and ta.cell_count:
                _compare_transcoded_track(session, track, ta, tb, entry, problems)
            else:
                entry["identical"] = bytes(ta.data) == bytes(tb.data)
                if not entry["identical"]:
                    problems.append(f"{track.name}: raw payload differs from the original")
            layers.append(entry)
    return layers, problems


def _compare_float_track(session: DkvSession, track, ta, tb, entry: dict, problems: list[str]) -> None:
    """Error figures of one float track, and its check against the codec's bound."""
    # a damaged payload may decode to infinities or NaN: they are reported, not warned about
    with np.errstate(invalid="ignore", over="ignore"):
        original = np.ascontiguousarray(ta.rows())
        decoded = np.ascontiguousarray(tb.rows())
        x = _as_f32(original, ta.ggml_type)
        y = _as_f32(decoded, tb.ggml_type)
        entry["rmse"] = float(np.sqrt(np.mean((y - x) ** 2)))
        entry["max_abs_error"] = float(np.abs(y - x).max())
        entry["rms_value"] = float(np.sqrt(np.mean(x ** 2)))
        entry["max_block_relative_error"] = 0.0
        if x.shape[1] % 32 == 0:  # informative: what the error is next to each block's largest value
            amax = np.abs(x).reshape(x.shape[0], -1, 32).max(axis=2)
            block_err = np.abs(y - x).reshape(x.shape[0], -1, 32).max(axis=2)
            entry["max_block_relative_error"] = float((block_err / np.maximum(amax, 1e-30)).max())
        used, excess = _check_bound(session, track, original, decoded)
        entry["bound_used"] = used
        entry["within_bound"] = not excess
        problems += excess


def _compare_transcoded_track(session: DkvSession, track, ta, tb, entry: dict, problems: list[str]) -> None:
    """Error figures of a transcoded track (SPEC.md 6.6) on the values of its blocks, and their check
    against the bound its parts prove (6.4: the codec's, the re-quantization's, the f16 rounding's)."""
    codec = track.codec
    with np.errstate(invalid="ignore", over="ignore"):
        x = codec.value_rows(ta.rows())
        y = codec.value_rows(tb.rows())
        entry["rmse"] = float(np.sqrt(np.mean((y - x) ** 2)))
        entry["max_abs_error"] = float(np.abs(y - x).max())
        entry["rms_value"] = float(np.sqrt(np.mean(x ** 2)))
        entry["transcoded"] = GGMLType(codec.cache_type).name
        tally = _BoundTally()
        decoded_blocks = np.ascontiguousarray(tb.rows())
        for segment, first, end in session._owned(track.stream):
            parts = session._parts(track, segment)
            context = session.track_context(track, segment) if codec.takes_context else None
            values = codec.decode_values(parts, track.n_values, 0, end - first, context)
            bound = codec.error_bound(parts, track.ggml_type, decoded_blocks[first:end], values=values)
            tally.add(bound.errors(x[first:end], y[first:end]), bound.limit, first, lambda g: f"group {g}")
    entry["bound_used"] = tally.worst
    entry["within_bound"] = tally.first_over is None
    if tally.first_over is not None:
        problems.append(f"{track.name}: {tally.over} of {tally.figures} error figures exceed what the stored transcoded "
                        f"{codec.name} parts prove (SPEC.md 6.4, 6.6); first at {tally.first_over}")


@dataclass
class _BoundTally:
    """Errors against a bound, piece by piece: the largest fraction used, how many figures broke it, the first."""

    worst: float = 0.0
    over: int = 0
    figures: int = 0
    first_over: str | None = None

    def add(self, errors: np.ndarray, limit: np.ndarray, first_row: int, describe) -> None:
        over = ~(errors <= limit)  # NaN errors (a damaged payload decoding to NaN) count as over
        with np.errstate(divide="ignore", invalid="ignore"):
            used = np.where(limit > 0, errors / limit, np.where(errors == 0, 0.0, np.inf))
        used[np.isnan(used)] = np.inf
        self.worst = max(self.worst, float(used.max()) if used.size else 0.0)
        self.figures += over.size
        self.over += int(over.sum())
        if self.first_over is None and over.any():
            row, group = np.argwhere(over)[0]
            self.first_over = (f"row {first_row + row}, {describe(group)}: error {errors[row, group]:.6g}, "
                               f"bound {limit[row, group]:.6g}")


_BOUND_PIECE_VALUES = 1 << 22  # values per piece of a track checked at once (32 MiB per float64 array)


def _check_bound(session: DkvSession, track, original_bits: np.ndarray, decoded_bits: np.ndarray) -> tuple[float, list[str]]:
    """Check the track's decoded rows, segment by segment, against the error bound its codec proves
    from the stored parts (SPEC.md 6.4). Returns the largest fraction of the bound an error used (0
    when every row is exact) and, if some error breaks it, one problem saying where it first did."""
    codec = track.codec
    tally = _BoundTally()
    # in pieces of whole keyframe chunks, so that the float64 work arrays stay small on long sessions
    piece = max(1, _BOUND_PIECE_VALUES // max(track.n_values, 1) // codec.keyframe_interval) * codec.keyframe_interval
    for segment, first, end in session._owned(track.stream):
        # a segment owns its rows from its first row on (SPEC.md 3.2): local rows 0 .. end - first
        parts = session._parts(track, segment)
        for lo in range(0, end - first, piece):
            hi = min(lo + piece, end - first)
            decoded = decoded_bits[first + lo:first + hi]
            bound = codec.error_bound(parts, track.ggml_type, decoded, first_row=lo)
            errors = bound.errors(as_float64(original_bits[first + lo:first + hi], track.ggml_type),
                                  as_float64(decoded, track.ggml_type))
            tally.add(errors, bound.limit, first + lo, lambda g: f"value {g}" if bound.group == 1 else
                      f"values {g * bound.group}..{(g + 1) * bound.group - 1} (L2)")
    if tally.first_over is None:
        return tally.worst, []
    return tally.worst, [f"{track.name}: {tally.over} of {tally.figures} error figures exceed what the stored {codec.name} "
                         f"parts prove (SPEC.md 6.4); first at {tally.first_over}"]
