"""Parse and write llama.cpp state bytes: session files, sequence files and in-memory states.

What the bytes are (docs/llama-state.md has them in full, with the llama.cpp sources they come
from; the ``has_*`` / ``allows_*`` conditions are traits of the body's :class:`BodyLayout`):

Framing
    session file   u32 'ggsn' (0x6767736E), u32 version, u32 n_tokens, i32 tokens[n], whole-context body
    sequence file  u32 'ggsq' (0x67677371), u32 version, u32 n_tokens, i32 tokens[n], sequence body
    whole state    (``llama_state_get_data``) the whole-context body, nothing before it
    sequence state (``llama_state_seq_get_data``) [u32 0xAF143CD8, i32 source seq_id] sequence body;
                   the prefix exists in the builds of layouts with has_seq_state_prefix

Bodies
    whole-context  [u32 len + arch string: has_arch_string]; [legacy outputs: has_outputs_section];
                   memory modules
    sequence       memory modules only

    legacy outputs i32 n_outputs, i32 output_pos[n_outputs],
                   u64 n_logits, f32[n_logits], u64 n_embd, f32[n_embd]

Memory modules, in order: zero, one or two attention KV caches (iSWA with has_swa_cache: the
full-attention cache, then the SWA cache), then possibly a recurrent block (hybrid and recurrent
models). An attention KV cache (``llama_kv_cache::state_write``)::

    [u32 n_stream]                      has_n_stream
    per stream:
      u32 cell_count                    with n_stream: 0 means nothing else for this stream
      per cell: i32 pos, u32 n_seq_id, [ext: i32 x, i32 y, i32 tok], i32 seq_id[n_seq_id]
                                        (ext: allows_cell_ext_records and an M-RoPE / PLE model)
      u32 v_trans, u32 n_layer
      [u32 n_rot_k, u32 n_rot_v]        has_rotation_fields
      per layer K: i32 type, u64 row_bytes, row_bytes * cell_count bytes
      per layer V (none for MLA caches):
        v_trans 0: i32 type, u64 row_bytes, row_bytes * cell_count bytes
        v_trans 1: i32 type, u32 element_bytes, u32 n_embd_v_gqa, n_embd_v_gqa * cell_count elements

Neither the per-cell ext record, the number of KV caches, nor (for the old version 9/2 files)
the presence of n_stream and of the legacy outputs is stored anywhere. Without a model the parser
tries every candidate layout the version allows and keeps those whose sizes line up and which
end exactly at the end of the buffer; if the survivors do not cut the bytes into the same pieces,
it raises :class:`AmbiguousLayoutError` (a :class:`ModelInfo` resolves it). Candidates that cut the
bytes identically (e.g. a whole state of llama.cpp v9-2026 vs v10 without ext records) are
resolved deterministically, preferring the newest layout.

Conversions :func:`write_state` can do
    session file  <-> whole state     (to a session file: needs the token list)
    sequence file <-> sequence state  (to a sequence file: needs the token list; to a sequence
                                       state of a layout with has_seq_state_prefix: writes the
                                       0xAF143CD8 prefix)
    whole-context <-> sequence bodies: impossible (different cells, arch string); raises.

Every read is bounds-checked; bad input raises a :class:`DeltaKVError` subclass naming what was
expected, what was found and the byte offset. No allocation is proportional to a count read
from the input before that count is checked against the bytes that remain.

Adding a llama.cpp state version
    The layouts are data: ``BodyLayout`` in ``constants.py`` has one member per layout, and the
    version tables, the order in which layouts are tried and preferred (newest first), the layouts
    a prefixed sequence state can have and every ``has_*`` test in this module are derived from its
    rows. For a version whose body combines parts that existing traits already describe:

    1. ``constants.py``: append one member at the end of ``BodyLayout`` (members are oldest first),
       with its value (the name stored in ``deltakv.source.layout``), the builds that write it,
       its session and sequence version words and its traits.
    2. A fixture: the files a build of that version writes, in ``fixtures/`` (``make_fixtures.py``
       writes them; ``fixtures/README.md`` says which build, model and framing each is), and one line
       per file in ``EXPECTED`` of ``tests/test_llama_state.py``, which requires every fixture there.
    3. ``SPEC.md`` section 4: the layout's row and its name among the values of
       ``deltakv.source.layout`` (``tests/test_layouts.py`` checks both).

    A version that adds a part no trait describes also needs a new ``LayoutTraits`` field (every row
    states it), its read in ``_parse_kv_block`` or ``_parse_bodies``, its write in ``_kv_chunks`` or
    ``_body_chunks``, a field to carry it in ``state_model.py`` (as ``KVStream.rot`` carries the
    rotation fields) and, to store it in a ``.dkv``, a session key (``session.py``, SPEC.md section 3).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO, Iterator, Sequence

import numpy as np

from .constants import (
    CELL_EXT_BYTES,
    CELL_RECORD_HEAD,
    CELL_SEQ_ID_BYTES,
    GGML_BLOCK_SIZES,
    MAX_ARCH_LENGTH,
    MAX_KV_CACHES,
    PACKED_TOKENS_MARKER,
    ROTATION_FIELDS,
    ROW_TENSOR_HEAD,
    SEQ_STATE_MAGIC,
    SEQ_STATE_PREFIX,
    SEQUENCE_MAGIC,
    SESSION_MAGIC,
    STATE_FILE_HEAD,
    STREAM_HEAD,
    TRANSPOSED_V_HEAD,
)
from .errors import (
    AmbiguousLayoutError,
    BadMagicError,
    CorruptError,
    DeltaKVError,
    LimitExceededError,
    SessionMismatchError,
    TruncatedError,
    UnsupportedVersionError,
)
from .model_info import ModelInfo
from .state_model import (
    APPENDIX_ROLE,
    BodyLayout,
    Framing,
    KVCacheSection,
    KVStream,
    KVTensor,
    LlamaState,
    OpaqueSection,
)

__all__ = [
    "SESSION_MAGIC",
    "SEQUENCE_MAGIC",
    "SEQ_STATE_MAGIC",
    "CELL_EXT_BYTES",
    "SESSION_VERSION_LAYOUTS",
    "SEQUENCE_VERSION_LAYOUTS",
    "ServerTokens",
    "parse_state",
    "parse_server_tokens",
    "write_state",
    "write_state_to",
    "iter_state_chunks",
    "file_version_for",
]

# The tables from here to _ROTATION_LAYOUTS are derived from BodyLayout's rows: a new layout
# changes none of them.

# Newest first: the order in which layouts are tried and identical readings preferred.
_LAYOUT_ORDER: tuple[BodyLayout, ...] = tuple(reversed(BodyLayout))

_FILE_MAGIC = {Framing.SESSION_FILE: SESSION_MAGIC, Framing.SEQUENCE_FILE: SEQUENCE_MAGIC}


def file_version_for(layout: BodyLayout, framing: Framing) -> int:
    """The ggsn/ggsq version word llama.cpp writes for a body of ``layout``."""
    traits = BodyLayout(layout).traits
    if framing == Framing.SESSION_FILE:
        return traits.session_file_version
    if framing == Framing.SEQUENCE_FILE:
        return traits.sequence_file_version
    raise DeltaKVError(f"framing {Framing(framing).value!r} has no version word")


def _layouts_by_version(framing: Framing) -> dict[int, tuple[BodyLayout, ...]]:
    versions = sorted({file_version_for(layout, framing) for layout in BodyLayout})
    return {v: tuple(lay for lay in _LAYOUT_ORDER if file_version_for(lay, framing) == v) for v in versions}


SESSION_VERSION_LAYOUTS: dict[int, tuple[BodyLayout, ...]] = _layouts_by_version(Framing.SESSION_FILE)
"""Session file version word -> the layouts a body under it can have, newest first."""
SEQUENCE_VERSION_LAYOUTS: dict[int, tuple[BodyLayout, ...]] = _layouts_by_version(Framing.SEQUENCE_FILE)
"""Sequence file version word -> the layouts a body under it can have, newest first."""
_VERSION_LAYOUTS = {Framing.SESSION_FILE: SESSION_VERSION_LAYOUTS, Framing.SEQUENCE_FILE: SEQUENCE_VERSION_LAYOUTS}

# A sequence state that starts with SEQ_STATE_MAGIC was written by a build of one of these.
_SEQ_PREFIX_LAYOUTS = tuple(lay for lay in _LAYOUT_ORDER if lay.traits.has_seq_state_prefix)
# The layouts that can hold a stream's n_rot_k / n_rot_v (named in an error when another cannot).
_ROTATION_LAYOUTS = tuple(lay.value for lay in BodyLayout if lay.traits.has_rotation_fields)

_WHOLE_FRAMINGS = (Framing.SESSION_FILE, Framing.STATE)

_U32 = struct.Struct("<I")
_I32 = struct.Struct("<i")
_U64 = struct.Struct("<Q")


# ---- reading -------------------------------------------------------------------------------


class _Reader:
    """Bounds-checked little-endian reads from a memoryview of bytes."""

    __slots__ = ("mv", "pos", "end")

    def __init__(self, mv: memoryview, pos: int = 0, end: int | None = None):
        self.mv = mv
        self.pos = pos
        self.end = len(mv) if end is None else end

    @property
    def remaining(self) -> int:
        return self.end - self.pos

    def _need(self, n: int, what: str) -> None:
        if n > self.end - self.pos:
            raise TruncatedError(
                f"{what}: expected {n} bytes, found {self.end - self.pos} before the end of the input",
                offset=self.pos,
            )

    def u32(self, what: str) -> int:
        self._need(4, what)
        (v,) = _U32.unpack_from(self.mv, self.pos)
        self.pos += 4
        return v

    def i32(self, what: str) -> int:
        self._need(4, what)
        (v,) = _I32.unpack_from(self.mv, self.pos)
        self.pos += 4
        return v

    def u64(self, what: str) -> int:
        self._need(8, what)
        (v,) = _U64.unpack_from(self.mv, self.pos)
        self.pos += 8
        return v

    def take(self, n: int, what: str) -> memoryview:
        self._need(n, what)
        out = self.mv[self.pos : self.pos + n]
        self.pos += n
        return out

    def check_count(self, count: int, unit_bytes: int, what: str, at: int) -> None:
        """Reject a count whose items (at least ``unit_bytes`` each) cannot fit in what remains."""
        if unit_bytes and count > self.remaining // unit_bytes:
            # More than the whole input could hold: a hostile or corrupt size. Otherwise the
            # size is plausible and the input was cut short.
            cls = LimitExceededError if count * unit_bytes > len(self.mv) else TruncatedError
            raise cls(
                f"{what} = {count}: expected at least {count * unit_bytes} more bytes, "
                f"found {self.remaining}",
                offset=at,
            )


@dataclass(frozen=True)
class _Candidate:
    layout: BodyLayout
    whole: bool  # whole-context body (arch string) vs sequence body
    ext_bytes: int
    n_kv_blocks: int
    v_present: bool

    def describe(self) -> str:
        kind = "whole-context" if self.whole else "sequence"
        parts = [f"layout {self.layout.value}", f"{kind} body", f"{self.n_kv_blocks} KV cache(s)"]
        parts.append(f"{self.ext_bytes}-byte cell ext records" if self.ext_bytes else "no cell ext records")
        if not self.v_present:
            parts.append("no V tensors (MLA)")
        return ", ".join(parts)


def _known_type(t: int, what: str, at: int) -> tuple[int, int]:
    sizes = GGML_BLOCK_SIZES.get(t)
    if sizes is None:
        raise CorruptError(f"{what}: expected a ggml type id, found {t}", offset=at)
    return sizes


def _parse_cells(r: _Reader, cell_count: int, ext_bytes: int, spans: list) -> memoryview:
    """The per-cell records of one stream, returned as one zero-copy slice."""
    start = r.pos
    unit = CELL_RECORD_HEAD.size + ext_bytes
    r.check_count(cell_count, unit, "cell_count", start - 4)
    if cell_count:
        # Fast path: every cell has as many seq ids as the first one (the usual case).
        r._need(unit, "cell record")
        _, k = CELL_RECORD_HEAD.unpack_from(r.mv, start)
        words_per_cell = (unit + CELL_SEQ_ID_BYTES * k) // 4
        if k <= 64 and cell_count <= r.remaining // (4 * words_per_cell):
            words = np.frombuffer(r.mv, dtype="<u4", count=cell_count * words_per_cell, offset=start)
            n_seq_ids = words[1::words_per_cell]  # n_seq_id is the second word of CELL_RECORD_HEAD
            if bool(np.all(n_seq_ids == k)):
                r.pos = start + cell_count * words_per_cell * 4
                spans.append(("cells", start, r.pos))
                return r.mv[start : r.pos]
    for i in range(cell_count):
        r.i32("cell pos")
        at = r.pos
        n_seq_id = r.u32("cell n_seq_id")
        if ext_bytes:
            r.take(ext_bytes, "cell ext record")
        r.check_count(n_seq_id, CELL_SEQ_ID_BYTES, f"n_seq_id of cell {i}", at)
        r.take(CELL_SEQ_ID_BYTES * n_seq_id, "cell seq ids")
    spans.append(("cells", start, r.pos))
    return r.mv[start : r.pos]


def _parse_kv_block(
    r: _Reader,
    cand: _Candidate,
    spans: list,
    expect_layers: list[int] | None,
    model: ModelInfo | None,
) -> KVCacheSection:
    has_n_stream = cand.layout.traits.has_n_stream
    block_start = r.pos
    if has_n_stream:
        at = r.pos
        n_stream = r.u32("n_stream")
        if n_stream == 0:
            raise CorruptError("n_stream: expected at least 1, found 0", offset=at)
        r.check_count(n_stream, 4, "n_stream", at)
    else:
        n_stream = 1
    streams: list[KVStream] = []
    for s in range(n_stream):
        at = r.pos
        cell_count = r.u32(f"cell_count of stream {s}")
        if cell_count == 0 and has_n_stream:
            streams.append(KVStream(0, r.mv[r.pos : r.pos], cand.ext_bytes, None, None, None))
            continue
        cells = _parse_cells(r, cell_count, cand.ext_bytes, spans)
        at = r.pos
        v_trans = r.u32("v_trans")
        if v_trans > 1:
            raise CorruptError(f"v_trans: expected 0 or 1, found {v_trans}", offset=at)
        at = r.pos
        n_layer = r.u32("n_layer")
        r.check_count(n_layer, ROW_TENSOR_HEAD.size, "n_layer", at)
        if n_layer == 0:
            raise CorruptError("n_layer: expected at least 1, found 0", offset=at)
        if expect_layers is not None and n_layer != len(expect_layers):
            raise SessionMismatchError(
                f"n_layer: the model puts {len(expect_layers)} layers in this KV cache, the state has {n_layer}",
                offset=at,
            )
        rot = None
        if cand.layout.traits.has_rotation_fields:
            rot = (r.u32("n_rot_k"), r.u32("n_rot_v"))
        ks: list[KVTensor] = []
        for il in range(n_layer):
            at = r.pos
            t = r.i32(f"K type of layer {il}")
            block_values, block_bytes = _known_type(t, f"K type of layer {il}", at)
            if ks and t != ks[0].ggml_type:
                # llama.cpp creates every K tensor of a cache with the context's one type_k
                raise CorruptError(
                    f"K type of layer {il}: expected {ks[0].ggml_type} like layer 0 (one K type per cache), found {t}",
                    offset=at,
                )
            at = r.pos
            row_bytes = r.u64(f"K row size of layer {il}")
            if row_bytes == 0 or row_bytes % block_bytes:
                raise CorruptError(
                    f"K row size of layer {il}: expected a positive multiple of {block_bytes} bytes, found {row_bytes}",
                    offset=at,
                )
            r.check_count(cell_count, row_bytes, f"cell_count x K row size of layer {il}", at)
            n_values = row_bytes // block_bytes * block_values
            if model is not None and expect_layers is not None and not model.is_mla:
                want = model.n_embd_k_gqa(expect_layers[il])
                if n_values != want:
                    raise SessionMismatchError(
                        f"K of layer {expect_layers[il]}: the model has {want} values per cell, the state {n_values}",
                        offset=at,
                    )
            start = r.pos
            data = r.take(row_bytes * cell_count, f"K data of layer {il}")
            spans.append(("k", start, r.pos, t))
            ks.append(KVTensor(t, cell_count, n_values, False, data))
        vs: list[KVTensor] = []
        if cand.v_present:
            for il in range(n_layer):
                at = r.pos
                t = r.i32(f"V type of layer {il}")
                block_values, block_bytes = _known_type(t, f"V type of layer {il}", at)
                if vs and t != vs[0].ggml_type:
                    raise CorruptError(
                        f"V type of layer {il}: expected {vs[0].ggml_type} like layer 0 (one V type per cache), "
                        f"found {t}",
                        offset=at,
                    )
                if not v_trans:
                    at = r.pos
                    row_bytes = r.u64(f"V row size of layer {il}")
                    if row_bytes == 0 or row_bytes % block_bytes:
                        raise CorruptError(
                            f"V row size of layer {il}: expected a positive multiple of {block_bytes} bytes, found {row_bytes}",
                            offset=at,
                        )
                    r.check_count(cell_count, row_bytes, f"cell_count x V row size of layer {il}", at)
                    n_values = row_bytes // block_bytes * block_values
                    nbytes = row_bytes * cell_count
                else:
                    at = r.pos
                    el = r.u32(f"V element size of layer {il}")
                    if el != block_bytes:
                        raise CorruptError(
                            f"V element size of layer {il}: expected {block_bytes} (ggml_type_size of type {t}), found {el}",
                            offset=at,
                        )
                    at = r.pos
                    n_values = r.u32(f"V n_embd_v_gqa of layer {il}")
                    if n_values == 0:
                        raise CorruptError(f"V n_embd_v_gqa of layer {il}: expected > 0, found 0", offset=at)
                    r.check_count(cell_count * el, n_values, f"n_embd_v_gqa of layer {il} x cells", at)
                    nbytes = n_values * cell_count * el
                if model is not None and expect_layers is not None:
                    want = model.n_embd_v_gqa(expect_layers[il])
                    if n_values != want:
                        raise SessionMismatchError(
                            f"V of layer {expect_layers[il]}: the model has {want} values per cell, "
                            f"the state {n_values}",
                            offset=at,
                        )
                start = r.pos
                data = r.take(nbytes, f"V data of layer {il}")
                spans.append(("v", start, r.pos, t, v_trans))
                vs.append(KVTensor(t, cell_count, n_values, bool(v_trans), data))
        streams.append(KVStream(cell_count, cells, cand.ext_bytes, v_trans, n_layer, rot, ks, vs))
    spans.append(("kvblock", block_start, r.pos, has_n_stream))
    return KVCacheSection(has_n_stream, streams)


def _parse_outputs(r: _Reader, model: ModelInfo | None) -> OpaqueSection:
    """Legacy outputs: n_logits is n_outputs x n_vocab (or 0), n_embd is n_outputs x n_embd (or 0)."""
    start = r.pos
    at = r.pos
    n_outputs = r.i32("n_outputs")
    if n_outputs < 0:
        raise CorruptError(f"n_outputs: expected >= 0, found {n_outputs}", offset=at)
    r.check_count(n_outputs, 4, "n_outputs", at)
    r.take(4 * n_outputs, "output positions")
    for what in ("n_logits", "n_embd"):
        at = r.pos
        n = r.u64(what)
        if n and (n_outputs == 0 or n % n_outputs):
            raise CorruptError(f"{what}: expected a multiple of n_outputs = {n_outputs}, found {n}", offset=at)
        per_output = None
        if model is not None:
            per_output = model.n_vocab if what == "n_logits" else model.embedding_length
        if n and per_output and n != n_outputs * per_output:
            raise CorruptError(
                f"{what}: expected 0 or n_outputs x {per_output} = {n_outputs * per_output}, found {n}", offset=at
            )
        r.check_count(n, 4, what, at)
        r.take(4 * n, what.replace("n_", "") + " values")
    return OpaqueSection("outputs", r.mv[start : r.pos])


def _walk_recurrent(mv: memoryview, start: int, end: int) -> bool:
    """True if [start, end) is exactly one recurrent memory block (llama_memory_recurrent::state_write)."""
    r = _Reader(mv, start, end)
    try:
        cell_count = r.u32("recurrent cell_count")
        r.check_count(cell_count, CELL_RECORD_HEAD.size, "recurrent cell_count", start)
        for _ in range(cell_count):
            r.i32("pos")
            n = r.u32("n_seq_id")
            r.check_count(n, 4, "n_seq_id", r.pos)
            r.take(4 * n, "seq ids")
        if r.u32("s_trans") != 0:
            return False
        n_layer = r.u32("n_layer")
        if not 0 < n_layer <= 1 << 16:
            return False
        n_entries = 0
        while r.remaining:
            t = r.i32("type")
            if t not in GGML_BLOCK_SIZES:
                return False
            row = r.u64("row size")
            r.check_count(cell_count, row, "row size", r.pos)
            r.take(row * cell_count, "data")
            n_entries += 1
            if n_entries > 2 * n_layer:
                return False
        return n_entries > 0
    except DeltaKVError:
        return False


def _finish(r: _Reader, mv: memoryview, model: ModelInfo | None, n_blocks: int,
            appendix_allowed: bool = False) -> OpaqueSection | None:
    """Check that the body may end after ``n_blocks`` KV caches; the recurrent block, if one follows,
    or (``appendix_allowed``: a sequence file) the bytes after the body as an ``appendix``."""
    if model is not None and model.has_recurrent:
        # The model says a recurrent block follows; its inner layout depends on the model
        # (PLE conv rows, transposed S), so it is kept whole.
        if not r.remaining:
            raise TruncatedError("recurrent memory block: expected it after the KV caches, found the end", offset=r.pos)
        return OpaqueSection("recurrent", mv[r.pos : r.end])
    if r.remaining:
        if model is None and _walk_recurrent(mv, r.pos, r.end):
            return OpaqueSection("recurrent", mv[r.pos : r.end])
        if appendix_allowed and n_blocks > 0:
            # llama_state_seq_load_file reads up to the end of its payload and ignores the rest,
            # so servers append their own records there (context checkpoints, llama.cpp PR
            # #26004): kept byte-exact, never interpreted.
            return OpaqueSection(APPENDIX_ROLE, mv[r.pos : r.end])
        raise CorruptError(
            f"end of state: expected the body to end here, found {r.remaining} more bytes "
            "that are neither a KV cache nor a recurrent memory block",
            offset=r.pos,
        )
    if n_blocks == 0:
        raise CorruptError("memory: expected at least one KV cache or recurrent block, found none", offset=r.pos)
    return None


def _parse_bodies(
    mv: memoryview,
    body_start: int,
    cand: _Candidate,
    model: ModelInfo | None,
    plans: list[list[list[int]]] | None,
    results: list,
    failures: list,
    appendix_allowed: bool = False,
) -> None:
    """Read the body in ``cand``'s layout with every allowed number of KV caches.

    Readings that fit go to ``results`` as (candidate, arch bytes, sections, spans); readings that
    do not go to ``failures`` as (offset, candidate, error class, message).
    """

    def fail(c: _Candidate, e: DeltaKVError) -> None:
        failures.append((e.offset if e.offset is not None else -1, c, type(e), e.bare_message))

    r = _Reader(mv, body_start)
    prefix: list = []
    prefix_spans: list = []
    arch_bytes = None
    try:
        if cand.whole and cand.layout.traits.has_arch_string:
            at = r.pos
            n = r.u32("arch string length")
            if not 0 < n <= MAX_ARCH_LENGTH:
                raise CorruptError(f"arch string length: expected 1..{MAX_ARCH_LENGTH}, found {n}", offset=at)
            arch_bytes = bytes(r.take(n, "arch string"))
            if model is not None and arch_bytes != model.arch.encode():
                raise SessionMismatchError(
                    f"arch: the model is {model.arch!r}, the state was written by "
                    f"{arch_bytes.decode('utf-8', 'replace')!r}",
                    offset=at + 4,
                )
        if cand.whole and cand.layout.traits.has_outputs_section:
            prefix.append(_parse_outputs(r, model))
            prefix_spans.append(("outputs", r.pos))
    except DeltaKVError as e:
        fail(cand, e)
        return
    memory_start = r.pos

    def attempt(blocks: list[list[int]] | None, n_max: int) -> None:
        # One pass: after each KV cache, note whether the body may end there.
        r.pos = memory_start
        sections, spans = list(prefix), list(prefix_spans)
        appendix_reading = None  # the reading just added that ends in an appendix, if any
        for k in range(n_max + 1):
            c = _Candidate(cand.layout, cand.whole, cand.ext_bytes, k, cand.v_present)
            if blocks is None or k == len(blocks):
                tail_at = r.pos
                try:
                    tail = _finish(r, mv, model, k, appendix_allowed)
                except DeltaKVError as e:
                    fail(c, e)
                else:
                    out_sections, out_spans = list(sections), list(spans)
                    if tail is not None:
                        out_sections.append(tail)
                        out_spans.append(("appendix" if tail.role == APPENDIX_ROLE else "tail", tail_at, r.end))
                    results.append((c, arch_bytes, out_sections, out_spans))
                    appendix_reading = results[-1] if tail is not None and tail.role == APPENDIX_ROLE else None
            if k == n_max:
                return
            block_at = r.pos
            try:
                sections.append(_parse_kv_block(r, cand, spans, blocks[k] if blocks else None, model))
            except DeltaKVError as e:
                if appendix_reading is not None and e.offset is not None and e.offset > block_at:
                    # The bytes after the body start like one more KV cache (a plausible first
                    # count) that runs out or breaks further on: a cut-off or damaged file (an
                    # iSWA file's SWA cache cut short), not an appendix. Report it as such.
                    results.remove(appendix_reading)
                fail(_Candidate(cand.layout, cand.whole, cand.ext_bytes, k + 1, cand.v_present), e)
                return

    if plans is None:
        attempt(None, MAX_KV_CACHES)
    else:
        for blocks in plans:
            attempt(blocks, len(blocks))


def _appendix_bytes(result) -> int:
    return sum(end - start for kind, start, end in (sp for sp in result[3] if sp[0] == "appendix"))


def _fewest_appendix_bytes(results: list) -> list:
    if not results:
        return results
    fewest = min(_appendix_bytes(res) for res in results)
    return [res for res in results if _appendix_bytes(res) == fewest]


def _candidates(
    layouts: Sequence[BodyLayout], whole: bool, model: ModelInfo | None, cell_ext_bytes: int | None = None
) -> list[tuple[_Candidate, list[list[list[int]]] | None]]:
    out = []
    if model is not None:
        ext_options = (CELL_EXT_BYTES if model.cell_ext else 0,)
        v_options = (not model.is_mla,)
    else:
        ext_options = (0, CELL_EXT_BYTES)
        v_options = (True, False)
    if cell_ext_bytes is not None:
        ext_options = tuple(e for e in ext_options if e == cell_ext_bytes)
    for layout in layouts:
        plans = None
        if model is not None:
            # Before the SWA cache (llama.cpp of 2025-05) one cache held every layer.
            plans = model.kv_cache_layers(sequence=not whole, single_cache=not layout.traits.has_swa_cache)
        for ext in ext_options:
            if ext and not layout.traits.allows_cell_ext_records:
                continue
            for v in v_options:
                out.append((_Candidate(layout, whole, ext, -1, v), plans))
    return out


_ARCH_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


def _looks_like_arch(mv: memoryview) -> bool:
    if len(mv) < 4:
        return False
    (n,) = _U32.unpack_from(mv, 0)
    return 0 < n <= 64 and len(mv) >= 4 + n and all(c in _ARCH_CHARS for c in bytes(mv[4 : 4 + n]))


def _as_memoryview(buf) -> memoryview:
    try:
        mv = memoryview(buf)
    except TypeError as e:
        raise DeltaKVError(f"expected bytes, bytearray, memoryview or mmap, found {type(buf).__name__}") from e
    if mv.ndim != 1 or mv.itemsize != 1:
        mv = mv.cast("B")
    return mv


def parse_state(buf, *, framing: Framing | None = None, model: ModelInfo | None = None,
                layout: BodyLayout | None = None, cell_ext_bytes: int | None = None) -> LlamaState:
    """Parse llama.cpp state bytes into a :class:`LlamaState` whose payloads are views into ``buf``.

    ``framing`` forces how the bytes are framed (otherwise detected from the magic numbers);
    ``model`` (from :meth:`ModelInfo.from_gguf`) fixes the number of KV caches, their layer
    counts and row sizes and the per-cell ext record, which removes the layout guesswork.
    A model whose layout does not fit the bytes raises :class:`SessionMismatchError` saying what
    the model says and what the bytes hold (read without the model), e.g. 1 KV cache of 30
    layers vs 2 KV caches of 3 + 15 layers.
    ``layout`` / ``cell_ext_bytes``, when known (an append knows them from the stored session),
    skip trying the other layouts, each of which reads every cell record.
    """
    mv = _as_memoryview(buf)
    try:
        return _parse_state(mv, framing, model, layout, cell_ext_bytes)
    except DeltaKVError:
        if model is None:
            raise
        # The model-guided reading stops at the first thing the model contradicts, which says
        # little about the state ("30 layers in this KV cache, the state has 3" for a state of
        # 18 layers in 2 caches). If the bytes read without the model, compare the whole layouts.
        try:
            alone = _parse_state(mv, framing, None, layout, cell_ext_bytes)
        except DeltaKVError:
            alone = None  # the bytes do not read without the model either
        differences = [] if alone is None else layout_differences(model, alone)
        del alone
        if not differences:
            raise  # nothing better to say: the model-guided error stands
    # Raised after the except block, so that the new error does not carry the model-guided one as its
    # __context__ (that traceback's frames hold views of ``buf``: an mmap cannot close while they live).
    raise SessionMismatchError(f"the model's layout ({model.arch}, {model.n_layer} layers) does not fit this "
                               f"state: {'; '.join(differences)}")


def layout_differences(model: ModelInfo, state: LlamaState) -> list[str]:
    """What ``model`` says about the layout of a state that ``state`` (read without it) contradicts:
    arch, KV caches and their layer counts, values per K/V cell, cell ext records, recurrent block."""
    out = []
    if state.arch_bytes is not None and state.arch_bytes != model.arch.encode():
        out.append(f"arch: the model is {model.arch!r}, the state was written by "
                   f"{bytes(state.arch_bytes).decode('utf-8', 'replace')!r}")
    whole = state.framing in _WHOLE_FRAMINGS
    plans = model.kv_cache_layers(sequence=not whole, single_cache=state.layout == BodyLayout.V9_OUTPUTS)
    # Layers per KV cache as the bytes have them; None for a cache whose streams are all empty
    # (an empty stream writes no n_layer word).
    found = [max((st.n_layer for st in sec.streams if st.n_layer is not None), default=None)
             for sec in state.kv_sections]

    def fits(plan):
        return len(plan) == len(found) and all(n is None or n == len(p) for n, p in zip(found, plan))

    def caches(counts):
        if not counts:
            return "no KV cache"
        layers = " + ".join("?" if n is None else str(n) for n in counts)
        return f"{len(counts)} KV cache{'s' if len(counts) > 1 else ''} of {layers} layers"

    if not any(fits(plan) for plan in plans):
        out.append(f"KV caches: the model has {' or '.join(caches([len(c) for c in plan]) for plan in plans)}, "
                   f"the state {caches(found)}")
    streams = [st for sec in state.kv_sections for st in sec.streams]
    kv_layers = model.kv_layers()
    for role, tensors, per_layer in (("K", lambda st: st.k, model.n_embd_k_gqa), ("V", lambda st: st.v, model.n_embd_v_gqa)):
        has = sorted({t.n_values for st in streams for t in tensors(st)})
        if role == "V" and model.is_mla:
            if has:
                out.append("V tensors: the model (MLA) has none, the state has them")
            continue
        want = sorted({per_layer(il) for il in kv_layers})
        if has and want and has != want:
            out.append(f"{role} values per cell: the model has {', '.join(map(str, want))}, "
                       f"the state {', '.join(map(str, has))}")
        elif role == "V" and want and not has and any(st.cell_count for st in streams):
            out.append("V tensors: the model has them, the state none (an MLA cache)")
    if state.layout.traits.allows_cell_ext_records:
        want_ext = CELL_EXT_BYTES if model.cell_ext else 0
        has_ext = sorted({st.cell_ext_bytes for st in streams if st.cell_count})
        if has_ext and has_ext != [want_ext]:
            def ext(n):
                return f"{n}-byte ext records" if n else "no ext records"
            out.append(f"cell records: the model's carry {ext(want_ext)}, the state's {ext(has_ext[0])}")
    has_recurrent = any(isinstance(sec, OpaqueSection) and sec.role == "recurrent" for sec in state.sections)
    if model.has_recurrent != has_recurrent:
        out.append(f"recurrent block: the model ({'recurrent or hybrid' if model.has_recurrent else 'attention only'}) "
                   f"{'ends' if model.has_recurrent else 'does not end'} the state with one, the state "
                   f"{'has one' if has_recurrent else 'has none'}")
    return out


def _parse_state(mv: memoryview, framing: Framing | None, model: ModelInfo | None, layout: BodyLayout | None,
                 cell_ext_bytes: int | None) -> LlamaState:
    n = len(mv)
    if n < 4:
        raise TruncatedError(f"llama.cpp state: expected at least 4 bytes, found {n}", offset=0)
    (word0,) = _U32.unpack_from(mv, 0)

    if framing is None:
        if word0 == SESSION_MAGIC:
            framing = Framing.SESSION_FILE
        elif word0 == SEQUENCE_MAGIC:
            framing = Framing.SEQUENCE_FILE
        elif word0 == SEQ_STATE_MAGIC:
            framing = Framing.SEQ_STATE
    else:
        framing = Framing(framing)
        want = _FILE_MAGIC.get(framing)
        if want is not None and word0 != want:
            raise BadMagicError(
                f"{framing.value} file: expected magic 0x{want:08X} ('{framing.value}'), found 0x{word0:08X}",
                offset=0,
            )

    file_version = None
    token_words = None
    seq_prefix_id = None
    body_start = 0

    if framing in (Framing.SESSION_FILE, Framing.SEQUENCE_FILE):
        r = _Reader(mv)
        r.u32("magic")
        at = r.pos
        file_version = r.u32("version")
        table = _VERSION_LAYOUTS[framing]
        if file_version not in table:
            raise UnsupportedVersionError(
                f"{framing.value} file version: expected one of {sorted(table)}, found {file_version}", offset=at
            )
        layouts: Sequence[BodyLayout] = table[file_version]
        at = r.pos
        n_tokens = r.u32("n_tokens")
        r.check_count(n_tokens, 4, "n_tokens", at)
        token_words = r.take(4 * n_tokens, "tokens")
        body_start = r.pos
        kinds = (framing == Framing.SESSION_FILE,)
    elif framing == Framing.SEQ_STATE and word0 == SEQ_STATE_MAGIC:
        r = _Reader(mv)
        r.u32("sequence state magic")
        seq_prefix_id = r.i32("source seq_id")
        body_start = r.pos
        layouts = _SEQ_PREFIX_LAYOUTS
        kinds = (False,)
    else:
        layouts = _LAYOUT_ORDER
        if framing == Framing.STATE:
            kinds = (True,)
        elif framing == Framing.SEQ_STATE:
            kinds = (False,)
        else:
            # No magic: a whole-context body starts with the arch string, a sequence body with
            # n_stream or cell_count. Try the likelier kind first; errors are reported for it.
            kinds = (True, False) if _looks_like_arch(mv) else (False, True)

    if layout is not None:
        if layout not in layouts:
            raise UnsupportedVersionError(
                f"expected a state of layout {BodyLayout(layout).value}; its framing allows only "
                f"{', '.join(lay.value for lay in layouts)}", offset=0)
        layouts = (BodyLayout(layout),)
    results = []
    # (offset, candidate, error class, message): no exception objects are kept, so that no
    # traceback cycle pins views of ``buf`` (an mmap cannot close while views exist).
    first_failures: list[tuple[int, _Candidate, type, str]] = []
    for i, whole in enumerate(kinds):
        failures = first_failures if i == 0 else []
        for cand, plans in _candidates(layouts, whole, model, cell_ext_bytes):
            _parse_bodies(mv, body_start, cand, model, plans, results, failures,
                          appendix_allowed=framing == Framing.SEQUENCE_FILE)

    if not results:
        # Report the candidate that got furthest (the first one tried among equals): its error
        # is the most specific one.
        furthest = max(f[0] for f in first_failures)
        offset, cand, cls, message = next(f for f in first_failures if f[0] == furthest)
        desc = "" if len(first_failures) == 1 else (
            f" (tried {len(first_failures)} layouts; the one that read furthest: {cand.describe()})"
        )
        raise cls(message + desc, offset=offset if offset >= 0 else None)

    # A recurrent block is structurally a KV cache without n_stream (cells, then type/row-size/data
    # entries): without a model, read trailing bytes as recurrent only if no all-KV reading fits.
    if model is None:
        kv_only = [res for res in results if not any(sp[0] == "tail" for sp in res[3])]
        results = kv_only or results
    # Bytes after a sequence file's body are an appendix only when no reading takes them as state
    # (an iSWA file's SWA cache must not pass for one), and then as few of them as possible.
    results = _fewest_appendix_bytes(results)
    signatures = {}
    for res in results:
        key = (res[0].whole, tuple(res[3]))
        signatures.setdefault(key, res)
    if len(signatures) > 1:
        names = "; ".join(sorted({res[0].describe() for res in signatures.values()}))
        raise AmbiguousLayoutError(
            f"the bytes fit {len(signatures)} different llama.cpp state layouts ({names}); "
            "pass the model (--model MODEL.gguf, parse_state(model=ModelInfo.from_gguf(...))) to decide",
            offset=body_start,
        )
    order = {lay: i for i, lay in enumerate(_LAYOUT_ORDER)}
    results.sort(key=lambda res: (order[res[0].layout], res[0].ext_bytes, not res[0].v_present))
    cand, arch_bytes, sections, _ = results[0]

    if framing is None:
        framing = Framing.STATE if cand.whole else Framing.SEQ_STATE
    arch = None
    if arch_bytes is not None:
        try:
            arch = arch_bytes.decode("utf-8")
        except UnicodeDecodeError:
            arch = None
    return LlamaState(
        framing=framing,
        layout=cand.layout,
        file_version=file_version,
        token_words=token_words,
        seq_prefix_id=seq_prefix_id,
        arch=arch,
        arch_bytes=arch_bytes,
        sections=sections,
    )


# ---- llama-server's packed token field --------------------------------------------------


@dataclass
class ServerTokens:
    """llama-server's packed slot token field (server_tokens::serialize)."""

    format_version: int
    tokens: np.ndarray  # int32, media positions are -1
    media_starts: list[int]
    media_chunks: list[memoryview]

    def text_tokens(self) -> np.ndarray:
        return self.tokens[self.tokens != -1]


def parse_server_tokens(token_words) -> ServerTokens | None:
    """Decode a packed llama-server token field; None if it is a plain token list."""
    mv = _as_memoryview(token_words)
    if len(mv) < 4 or _I32.unpack_from(mv, 0)[0] != PACKED_TOKENS_MARKER:
        return None
    r = _Reader(mv, 4)
    version = r.u32("server tokens format version")
    at = r.pos
    n = r.u32("server tokens count")
    r.check_count(n, 4, "server tokens count", at)
    tokens = np.frombuffer(r.take(4 * n, "server tokens"), dtype="<i4")
    at = r.pos
    n_media = r.u32("media count")
    r.check_count(n_media, 8, "media count", at)
    starts = [r.u32("media start") for _ in range(n_media)]
    chunks = []
    for i in range(n_media):
        at = r.pos
        length = r.u32(f"media chunk {i} length")
        r.check_count(length, 1, f"media chunk {i} length", at)
        chunks.append(r.take(length, f"media chunk {i}"))
    if r.remaining >= 4 or any(mv[r.pos :]):
        raise CorruptError(
            f"server tokens: expected at most 3 zero padding bytes, found {r.remaining} bytes", offset=r.pos
        )
    return ServerTokens(version, tokens, starts, chunks)


# ---- writing -----------------------------------------------------------------------------


def _check_len(what: str, data, want: int) -> None:
    if len(data) != want:
        raise CorruptError(f"{what}: expected {want} payload bytes, found {len(data)}")


def _kv_chunks(sec: KVCacheSection, layout: BodyLayout) -> Iterator[bytes | memoryview]:
    traits = layout.traits
    if sec.has_n_stream != traits.has_n_stream:
        raise DeltaKVError(
            f"KV cache with has_n_stream={sec.has_n_stream} cannot be written in layout {layout.value}"
        )
    if sec.has_n_stream:
        yield _U32.pack(len(sec.streams))
    elif len(sec.streams) != 1:
        raise DeltaKVError(f"layout {layout.value} holds exactly one stream per KV cache, found {len(sec.streams)}")
    for si, st in enumerate(sec.streams):
        yield _U32.pack(st.cell_count)
        if st.cell_count == 0 and sec.has_n_stream:
            continue
        if st.cell_ext_bytes and not traits.allows_cell_ext_records:
            raise DeltaKVError(f"cell ext records cannot be written in layout {layout.value}")
        yield st.cells
        if st.v_trans is None or st.n_layer is None:
            raise DeltaKVError(f"stream {si}: v_trans and n_layer are needed for a stream with cells")
        yield STREAM_HEAD.pack(st.v_trans, st.n_layer)
        if traits.has_rotation_fields:
            yield ROTATION_FIELDS.pack(*(st.rot or (0, 0)))
        elif st.rot not in (None, (0, 0)):
            raise DeltaKVError(
                f"stream {si}: Hadamard rotation {st.rot} needs layout {' or '.join(_ROTATION_LAYOUTS)}, "
                f"not {layout.value}"
            )
        if len(st.k) != st.n_layer or len(st.v) not in (0, st.n_layer):
            raise CorruptError(f"stream {si}: n_layer {st.n_layer}, but {len(st.k)} K and {len(st.v)} V tensors")
        for il, t in enumerate(st.k):
            _check_len(f"stream {si} K layer {il}", t.data, t.row_bytes * st.cell_count)
            yield ROW_TENSOR_HEAD.pack(t.ggml_type, t.row_bytes)
            yield t.data
        for il, t in enumerate(st.v):
            if t.transposed != bool(st.v_trans):
                raise CorruptError(f"stream {si} V layer {il}: transposed={t.transposed} but v_trans={st.v_trans}")
            if st.v_trans:
                _check_len(f"stream {si} V layer {il}", t.data, t.n_values * st.cell_count * t.element_bytes)
                yield TRANSPOSED_V_HEAD.pack(t.ggml_type, t.element_bytes, t.n_values)
            else:
                _check_len(f"stream {si} V layer {il}", t.data, t.row_bytes * st.cell_count)
                yield ROW_TENSOR_HEAD.pack(t.ggml_type, t.row_bytes)
            yield t.data


def _body_chunks(state: LlamaState, whole: bool, appendix: bool) -> Iterator[bytes | memoryview]:
    if whole and state.layout.traits.has_arch_string:
        if state.arch_bytes is None:
            raise DeltaKVError("a whole-context body needs the arch string; this state has none")
        yield _U32.pack(len(state.arch_bytes)) + state.arch_bytes
    for sec in state.sections:
        if isinstance(sec, KVCacheSection):
            yield from _kv_chunks(sec, state.layout)
        elif isinstance(sec, OpaqueSection):
            if sec.role == "outputs" and not (whole and state.layout.traits.has_outputs_section):
                kind = "whole-context" if whole else "sequence"
                raise DeltaKVError(f"legacy outputs cannot be written in a {kind} body of layout {state.layout.value}")
            if sec.role == APPENDIX_ROLE and not appendix:
                continue  # a file's appendix, not state: an in-memory state ends with its payload
            yield sec.data
        else:
            raise DeltaKVError(f"unknown section {type(sec).__name__}")


def iter_state_chunks(
    state: LlamaState,
    *,
    framing: Framing | None = None,
    file_version: int | None = None,
    tokens=None,
    seq_id: int | None = None,
) -> Iterator[bytes | memoryview]:
    """The bytes of ``state`` in ``framing`` (default: its own), as a sequence of chunks."""
    target = Framing(framing) if framing is not None else state.framing
    src_whole = state.framing in _WHOLE_FRAMINGS
    dst_whole = target in _WHOLE_FRAMINGS
    if src_whole != dst_whole:
        raise DeltaKVError(
            f"cannot convert a {state.framing.value} state to {target.value}: whole-context and sequence "
            "bodies hold different cells (and only the former the arch string)"
        )
    if target in (Framing.SESSION_FILE, Framing.SEQUENCE_FILE):
        magic = _FILE_MAGIC[target]
        table = _VERSION_LAYOUTS[target]
        if file_version is None:
            if state.framing == target and state.file_version is not None:
                file_version = state.file_version
            else:
                file_version = file_version_for(state.layout, target)
        if state.layout not in table.get(file_version, ()):
            raise UnsupportedVersionError(
                f"{target.value} version {file_version} cannot hold a body of layout {state.layout.value} "
                f"(expected version {file_version_for(state.layout, target)})"
            )
        if tokens is not None:
            words = np.ascontiguousarray(np.asarray(tokens, dtype="<i4")).tobytes()
        elif state.token_words is not None:
            words = state.token_words
        else:
            raise DeltaKVError(f"writing a {target.value} file needs the token list: pass tokens=")
        if len(words) % 4:
            raise CorruptError(f"token field: expected a multiple of 4 bytes, found {len(words)}")
        yield STATE_FILE_HEAD.pack(magic, file_version, len(words) // 4)
        yield words
    elif target == Framing.SEQ_STATE:
        if file_version is not None:
            raise DeltaKVError("in-memory sequence states have no version word; do not pass file_version")
        prefix_id = seq_id if seq_id is not None else state.seq_prefix_id
        if state.framing == Framing.SEQ_STATE:
            want_prefix = state.seq_prefix_id is not None or seq_id is not None
        else:
            # the builds that write this layout prefix every in-memory sequence state, or none
            want_prefix = seq_id is not None or state.layout.traits.has_seq_state_prefix
        if want_prefix:
            yield SEQ_STATE_PREFIX.pack(SEQ_STATE_MAGIC, prefix_id if prefix_id is not None else 0)
    elif file_version is not None:
        raise DeltaKVError("in-memory whole states have no version word; do not pass file_version")
    yield from _body_chunks(state, dst_whole, appendix=target == Framing.SEQUENCE_FILE)


def write_state(
    state: LlamaState,
    *,
    framing: Framing | None = None,
    file_version: int | None = None,
    tokens=None,
    seq_id: int | None = None,
) -> bytes:
    """The llama.cpp bytes of ``state``: identical to the parsed input when nothing changed.

    ``framing`` converts (see the module docstring for which conversions exist);
    ``tokens`` replaces or supplies the token list of a session/sequence file;
    ``file_version`` overrides the version word (it must fit the body layout);
    ``seq_id`` sets the source seq_id of a sequence state's 0xAF143CD8 prefix.
    """
    return b"".join(
        iter_state_chunks(state, framing=framing, file_version=file_version, tokens=tokens, seq_id=seq_id)
    )


def write_state_to(fileobj: BinaryIO, state: LlamaState, **kwargs) -> int:
    """Like :func:`write_state`, writing into a binary file object; returns the byte count."""
    total = 0
    for chunk in iter_state_chunks(state, **kwargs):
        fileobj.write(chunk)
        total += len(chunk)
    return total
