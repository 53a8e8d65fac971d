"""Save, load and extend a live llama-cpp-python context as a .dkv.

    from deltakv_runtime import save, load, extend
    save(llm, "chat.dkv")            # the context's sequence, compressed
    load(llm2, "chat.dkv")           # into a fresh Llama of the same model; generate() continues
    extend(llm, "chat.dkv")          # append what was evaluated since, O(new tokens)

The state goes through llama.cpp's own sequence-state API (``llama_state_seq_get_data`` /
``llama_state_seq_set_data``), so what is stored is what llama.cpp would write to a ``ggsq`` file;
``deltakv restore chat.dkv`` turns it into one that ``llama_state_seq_load_file`` accepts.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from deltakv_format.codecs import Codec, get_codec, use_accelerator
from deltakv_format.constants import DEFAULT_CODEC, FLOAT_TYPES, GGMLType, GGUFValueType
from deltakv_format.errors import DeltaKVError, SessionMismatchError
from deltakv_format.gguf_io import KeyValue
from deltakv_format.llama_state import file_version_for, parse_state
from deltakv_format.model_info import ModelInfo
from deltakv_format.operations import opened_session
from deltakv_format.session_append import WholeStateNeeded
from deltakv_format.session_rebuild import rebuild_into
from deltakv_format.session import (
    DkvSession,
    TrackId,
    append_session,
    cell_record_ends,
    codecs_of_roles,
    rope_for_state,
    write_session,
)
from deltakv_format.state_model import Framing, LlamaState

from .tail import add_spare_sequence, spare_tail

KEY_MODEL_DESC = "deltakv.runtime.model_desc"
KEY_N_VOCAB = "deltakv.runtime.n_vocab"
KEY_N_EMBD = "deltakv.runtime.n_embd"
KEY_SEQ_ID = "deltakv.runtime.seq_id"


class _GpuProbe:
    """Whether the GPU kernels can run here, found out once per process."""

    checked = False
    accelerator = None  # the runtime's gpu module when a CUDA/HIP GPU runs its kernels, else None

    @classmethod
    def get(cls):
        if not cls.checked:
            cls.checked = True
            if os.environ.get("DELTAKV_GPU", "1") != "0":
                try:
                    from . import gpu

                    cls.accelerator = gpu if gpu.is_available() else None
                except Exception:  # no toolchain, no driver: the CPU path is always there
                    cls.accelerator = None
        return cls.accelerator


@contextlib.contextmanager
def accelerated():
    """Use the GPU kernels for the codecs when a CUDA/HIP GPU can run them (same bytes as the CPU).

    ``DELTAKV_GPU=0`` turns it off. The first call builds the kernel library if needed
    (README: "GPU"); without a GPU, or if that fails, everything stays on the CPU.
    """
    accelerator = _GpuProbe.get()
    previous = use_accelerator(accelerator) if accelerator is not None else None
    try:
        yield accelerator is not None
    finally:
        if accelerator is not None:
            use_accelerator(previous)


def _llama_cpp():
    import llama_cpp

    return llama_cpp


def model_desc(llm) -> str:
    lc = _llama_cpp()
    buf = ctypes.create_string_buffer(256)
    lc.llama_model_desc(llm.model, buf, ctypes.sizeof(buf))
    return buf.value.decode("utf-8", "replace")


def seq_state_bytes(llm, seq_id: int = 0) -> memoryview:
    """llama_state_seq_get_data of one sequence (a copy of its KV cells)."""
    lc = _llama_cpp()
    size = lc.llama_state_seq_get_size(llm.ctx, seq_id)
    buf = (ctypes.c_uint8 * size)()
    n = lc.llama_state_seq_get_data(llm.ctx, buf, size, seq_id)
    if n == 0 or n > size:
        raise DeltaKVError(f"llama_state_seq_get_data returned {n} bytes for sequence {seq_id} (expected 1..{size})")
    return memoryview(buf).cast("B")[:n]


def set_seq_state_bytes(llm, blob, seq_id: int = 0) -> int:
    """llama_state_seq_set_data from ``blob`` (bytes, a numpy uint8 array, any contiguous buffer)
    without copying it (llama.cpp only reads the buffer); returns the bytes llama.cpp read (0 when
    it refused the state)."""
    lc = _llama_cpp()
    view = np.frombuffer(blob, np.uint8)
    src = ctypes.cast(ctypes.c_void_p(view.ctypes.data), ctypes.POINTER(ctypes.c_uint8))
    return lc.llama_state_seq_set_data(llm.ctx, src, view.size, seq_id)


def _check_seq_id(llm, seq_id: int) -> None:
    n_seq = _llama_cpp().llama_n_seq_max(llm.ctx)
    if not isinstance(seq_id, (int, np.integer)) or not 0 <= seq_id < n_seq:
        raise SessionMismatchError(f"seq_id {seq_id!r}: this context has sequences 0..{n_seq - 1} (n_seq_max = {n_seq})")


def _cell_positions(stream) -> np.ndarray:
    """Positions of a stream's cells, in the cache's order."""
    raw = np.frombuffer(stream.cells, np.uint8)
    one_id = 12 + stream.cell_ext_bytes  # a sequence's own cells name one sequence id each
    if len(raw) == stream.cell_count * one_id:
        return raw.reshape(-1, one_id)[:, :4].copy().view("<i4").reshape(-1).astype(np.int64)
    ends = cell_record_ends(stream.cells, stream.cell_count, stream.cell_ext_bytes)
    starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
    return np.array([int.from_bytes(raw[s:s + 4].tobytes(), "little", signed=True) for s in starts], np.int64)


def _tokens_from_cells(state: LlamaState) -> np.ndarray | None:
    """The sequence's tokens from the cells' own token records (the 12-byte ext record of v10+
    states: i32 x, i32 y, i32 tok), when its fullest stream covers positions 0..n-1 exactly once."""
    streams = [st for sec in state.kv_sections for st in sec.streams if st.cell_count]
    if not streams or streams[0].cell_ext_bytes != 12:
        return None
    stream = max(streams, key=lambda st: st.cell_count)
    ends = cell_record_ends(stream.cells, stream.cell_count, 12)
    starts = np.concatenate([[0], ends[:-1]]).astype(np.int64)
    raw = np.frombuffer(stream.cells, np.uint8)
    pos = np.array([int.from_bytes(raw[s:s + 4].tobytes(), "little", signed=True) for s in starts])
    tok = np.array([int.from_bytes(raw[s + 16:s + 20].tobytes(), "little", signed=True) for s in starts], np.int32)
    order = np.argsort(pos, kind="stable")
    if not np.array_equal(pos[order], np.arange(len(pos))):
        return None
    return tok[order]


def live_state(llm, seq_id: int = 0, *, like: DkvSession | None = None, tokens=None, blob=None) -> LlamaState:
    """The live sequence ``seq_id`` as a ggsq-framed state carrying that sequence's tokens.

    Tokens: ``tokens`` when given; for sequence 0, the ``Llama`` object's own (llama-cpp-python
    evaluates into sequence 0 and tracks only it); otherwise the cells' token records where the
    state has them. ``like``: a session saved from this context; its layout spares parsing the copy
    once per candidate layout (an extend should cost the new tokens, not the session). ``blob``:
    the sequence's ``llama_state_seq_get_data`` bytes, when already copied."""
    _check_seq_id(llm, seq_id)
    hints = {}
    if like is not None and len(set(like.stream_ext)) == 1:
        hints = {"layout": like.layout, "cell_ext_bytes": like.stream_ext[0]}
    state = parse_state(seq_state_bytes(llm, seq_id) if blob is None else blob, framing=Framing.SEQ_STATE, **hints)
    streams = [st for sec in state.kv_sections for st in sec.streams]
    if not any(st.cell_count for st in streams):
        raise DeltaKVError(f"sequence {seq_id} holds no cells: evaluate a prompt into it before saving")
    if tokens is not None:
        tokens = np.ascontiguousarray(np.asarray(tokens).reshape(-1), dtype="<i4")
    elif seq_id == 0:
        tokens = np.ascontiguousarray(llm.input_ids[: llm.n_tokens], dtype="<i4")
    else:
        tokens = _tokens_from_cells(state)
        if tokens is None:
            raise DeltaKVError(
                f"the tokens of sequence {seq_id} are not known: llama-cpp-python's Llama tracks sequence 0 only, and "
                f"this model's cells carry no token records; pass tokens=[...] (the sequence's token ids)")
    top = max(int(_cell_positions(st).max()) for st in streams if st.cell_count)
    if top >= len(tokens):
        raise SessionMismatchError(f"sequence {seq_id} holds cells up to position {top}, but {len(tokens)} tokens "
                                   f"were given for it: they cannot be its tokens")
    return replace(
        state, framing=Framing.SEQUENCE_FILE, file_version=file_version_for(state.layout, Framing.SEQUENCE_FILE),
        token_words=memoryview(tokens.tobytes()),
    )


def _runtime_kvs(llm, seq_id: int) -> list[KeyValue]:
    return [
        KeyValue(KEY_MODEL_DESC, GGUFValueType.STRING, model_desc(llm)),
        KeyValue(KEY_N_VOCAB, GGUFValueType.UINT32, llm.n_vocab()),
        KeyValue(KEY_N_EMBD, GGUFValueType.UINT32, llm.n_embd()),
        KeyValue(KEY_SEQ_ID, GGUFValueType.INT32, int(seq_id)),
    ]


def _resolve_codec(codec, what: str = "codec") -> Codec | str | None:
    """A codec as write_session takes it: an id (checked; write_session gives it its defaults for
    each role) or a Codec."""
    if codec is None:
        return None
    if isinstance(codec, str):
        get_codec(codec)  # an unknown id fails here
        return codec
    if isinstance(codec, Codec):
        return codec
    raise TypeError(f"{what}: expected a codec name such as {DEFAULT_CODEC!r} or a Codec, found {type(codec).__name__}")


def save(llm, path, *, codec: Codec | str | None = DEFAULT_CODEC, seq_id: int = 0,
         k_codec: Codec | str | None = None, v_codec: Codec | str | None = None, tokens=None,
         bits: float | None = None, transcode: bool = False) -> Path:
    """Write the live context's sequence ``seq_id`` to ``path`` as a .dkv (atomically).

    ``codec=None`` is the default codec (dkv-ans: K and V at their default rates, K coded before
    rotary embedding with the model's rotary parameters, read from ``llm.model_path``). ``k_codec`` /
    ``v_codec`` override ``codec`` for the K or V tracks (eval/EVAL.md: K q8_0 with the default for V
    is the near-lossless choice); ``extend`` keeps each track's codec. ``bits``: bits per value of
    the codecs that have a rate (dkv-ans; ``bits=3`` is rate 300), an error for the others.
    ``tokens``: the sequence's token ids, needed for a ``seq_id`` other than 0 (llama-cpp-python
    tracks sequence 0's tokens only) unless the cells carry them. ``transcode``: a quantized cache
    (``type_k``/``type_v`` q8_0 or q4_0) is coded through its values and quantized back on load
    (lossy, SPEC.md 6.6); without it such a cache is stored raw, exact."""
    codec = _resolve_codec(codec) or DEFAULT_CODEC
    k_codec, v_codec = _resolve_codec(k_codec, "k_codec"), _resolve_codec(v_codec, "v_codec")
    codecs_of_roles(codec, k_codec, v_codec, bits)  # a bad codec or bits: before the state is copied
    if seq_id == 0 and tokens is None and llm.n_tokens == 0:
        raise DeltaKVError("the context is empty: evaluate a prompt before saving")
    state = live_state(llm, seq_id, tokens=tokens)
    with accelerated():
        write_session(state, path, codec, k_codec=k_codec, v_codec=v_codec, extra_kvs=_runtime_kvs(llm, seq_id),
                      rope=model_rope(llm, state), bits=bits, transcode=transcode)
    return Path(path)


_MODEL_INFO: dict[str, ModelInfo | None] = {}


def _model_info(llm) -> ModelInfo | None:
    path = getattr(llm, "model_path", None)
    if path is None:
        return None
    if path not in _MODEL_INFO:
        try:
            _MODEL_INFO[path] = ModelInfo.from_gguf(path)
        except (DeltaKVError, OSError, ValueError):
            _MODEL_INFO[path] = None  # a model deltakv cannot read: llama.cpp's own checks remain
    return _MODEL_INFO[path]


def model_rope(llm, state: LlamaState):
    """The rotary parameters of ``llm``'s model for the KV caches of ``state`` (write_session's
    ``rope``), from the model's GGUF header (read once per model file); None when it cannot be read."""
    return rope_for_state(_model_info(llm), state)


def _expected_v_trans(llm) -> int | None:
    """llama.cpp stores V transposed unless flash attention is on (None: decided at run time)."""
    lc = _llama_cpp()
    fa = int(llm.context_params.flash_attn_type)
    return {int(lc.LLAMA_FLASH_ATTN_TYPE_ENABLED): 0, int(lc.LLAMA_FLASH_ATTN_TYPE_DISABLED): 1}.get(fa)


def _session_caches(session: DkvSession) -> list[list[int]]:
    """The streams of each KV section of a stored session, in order."""
    return [[g for g, sec in enumerate(session.stream_section) if sec == i]
            for i, kind in enumerate(session.section_kind) if kind == "kv"]


def _check_layers(llm, session: DkvSession) -> None:
    """The session's KV caches have the layers and row sizes this model's caches have."""
    info = _model_info(llm)
    if info is None:
        return
    caches = _session_caches(session)
    tracks = {t.id: t for t in session.tracks}

    def fits(plan) -> bool:
        if len(plan) != len(caches):
            return False
        for layers, streams in zip(plan, caches):
            for g in streams:
                if not session.stream_cells[g]:
                    continue
                if session.stream_n_layer[g] >= 0 and session.stream_n_layer[g] != len(layers):
                    return False
                if session.stream_n_k[g] != len(layers):
                    return False
                for j, il in enumerate(layers):
                    k = tracks[TrackId(g, j, "k")]
                    if k.ggml_type in FLOAT_TYPES and k.n_values != info.n_embd_k_gqa(il):
                        return False
        return True

    plans = info.kv_cache_layers(sequence=True)
    if any(fits(plan) for plan in plans):
        return
    have = []
    for streams in caches:
        g = next((g for g in streams if session.stream_cells[g]), None)
        if g is not None:
            k0 = tracks.get(TrackId(g, 0, "k"))
            have.append(f"{session.stream_n_k[g]} layers" + (f" of {k0.n_values}-value K rows" if k0 else ""))
    want = [f"{len(layers)} layers" + (f" of {info.n_embd_k_gqa(layers[0])}-value K rows" if layers else "")
            for layers in plans[0]]
    raise SessionMismatchError(f"the session's KV caches hold {', '.join(have) or 'nothing'}; this model "
                               f"({model_desc(llm)}) has {', '.join(want) or 'no KV cache'}")


def _check_fits(llm, session: DkvSession, seq_id: int, live: LlamaState | None = None) -> LlamaState:
    """Everything llama.cpp would refuse, or take and get wrong, checked before it is asked; returns
    the live sequence's own state (the structure of this context's caches)."""
    _check_seq_id(llm, seq_id)
    desc = session.file.value(KEY_MODEL_DESC, None)
    if desc is not None and desc != model_desc(llm):
        raise SessionMismatchError(f"the session was saved with model {desc!r}; this context runs {model_desc(llm)!r}")
    for key, value in ((KEY_N_VOCAB, llm.n_vocab()), (KEY_N_EMBD, llm.n_embd())):
        stored = session.file.value(key, None)
        if stored is not None and stored != value:
            raise SessionMismatchError(f"{key}: the session has {stored}, this model {value}")
    if live is None:
        live = parse_state(seq_state_bytes(llm, seq_id), framing=Framing.SEQ_STATE)
    live_caches = [len(sec.streams) for sec in live.kv_sections]
    stored_caches = [len(c) for c in _session_caches(session)]
    if len(live_caches) != len(stored_caches):
        raise SessionMismatchError(f"the session holds {len(stored_caches)} KV caches, this context has "
                                   f"{len(live_caches)} (another model, or an iSWA model saved with another swa_full)")
    if live_caches != stored_caches:
        params = llm.context_params
        raise SessionMismatchError(
            f"the session's KV caches have {stored_caches} streams, this context's {live_caches} (n_seq_max = "
            f"{params.n_seq_max}, kv_unified = {bool(params.kv_unified)}): make the context with the same n_seq_max "
            f"and kv_unified as the one that saved it")
    _check_layers(llm, session)
    want_v_trans = _expected_v_trans(llm)
    for g, cells in enumerate(session.stream_cells):
        v_trans = session.stream_v_trans[g]
        if cells and v_trans >= 0 and want_v_trans is not None and v_trans != want_v_trans:
            saved = "off" if v_trans else "on"
            raise SessionMismatchError(
                f"the session's V cache is stored {'transposed' if v_trans else 'plain'} (saved with flash attention "
                f"{saved}); this context has flash attention {'off' if want_v_trans else 'on'}: make it with "
                f"flash_attn={v_trans == 0}")
    cells = max(session.stream_cells) if session.stream_cells else 0
    if cells > llm.n_ctx():
        raise SessionMismatchError(f"the session holds {cells} cells; this context has n_ctx = {llm.n_ctx()}")
    params = llm.context_params
    want = {"k": int(params.type_k), "v": int(params.type_v)}
    for t in session.tracks:
        live_type = want[t.id.role]
        if t.ggml_type != live_type:
            raise SessionMismatchError(
                f"{t.name}: the session's cache is {GGMLType(t.ggml_type).name}, this context's type_{t.id.role} "
                f"is {GGMLType(live_type).name}"
            )
    return live


def _check_size(llm, session: DkvSession, seq_id: int, path) -> None:
    """The session fits the context's size: checked first, from the header alone."""
    cells = max(session.stream_cells, default=0)
    if cells > llm.n_ctx():
        raise SessionMismatchError(f"{path} holds {cells} cells; this context has n_ctx = {llm.n_ctx()}")
    # llama-cpp-python sizes its token list by the n_ctx it was given; llama.cpp may pad its own.
    room = min(len(llm.input_ids), llm.n_ctx())
    if seq_id == 0 and session.n_tokens > room:
        raise SessionMismatchError(f"{path} holds {session.n_tokens} tokens; this context has n_ctx = {room}")


def load(llm, path, *, seq_id: int = 0, seconds: dict | None = None) -> int:
    """Load a .dkv (a path or a store URL) into ``llm`` (a Llama of the same model) as sequence ``seq_id``; returns the token count.

    Afterwards ``llm.create_completion`` / ``llm.generate`` continue where the session stopped (for
    sequence 0, the one llama-cpp-python's Llama tracks: its token list becomes the session's; for
    another sequence that list is left alone). On a mismatch (a context too small, checked first;
    another model, layer count, KV type, V layout, stream count) raises SessionMismatchError before
    llama.cpp is asked; if llama.cpp itself refuses the state, the sequence is put back as it was.

    The state is rebuilt once, into the one buffer ``llama_state_seq_set_data`` reads (every track
    decoded in place, ``session_rebuild.rebuild_into``); the .dkv is read through its mapping.
    ``seconds`` (a dict) gets where the time went: ``open`` (header, checks), ``read`` (the file's
    tensors through the mapping, checksums), ``decode`` (planning and decoding into the buffer),
    ``set_data`` (llama.cpp taking it).
    """
    seconds = {} if seconds is None else seconds
    t0 = time.perf_counter()
    with opened_session(path) as session:  # a path, or a store URL (redis://, s3://, ...)
        _check_size(llm, session, seq_id, path)
        if session.token_format != "plain":
            raise DeltaKVError(f"{path} holds no token list (it was not saved from a session or sequence file)")
        _check_seq_id(llm, seq_id)
        live_blob = seq_state_bytes(llm, seq_id)  # the context's own structure, and what to put back on refusal
        live = _check_fits(llm, session, seq_id, live=parse_state(live_blob, framing=Framing.SEQ_STATE))
        tokens = session.tokens()
        steps = {}
        t1 = time.perf_counter()
        with accelerated():
            blob = rebuild_into(session, framing=Framing.SEQ_STATE, seconds=steps)
    t2 = time.perf_counter()
    had_cells = any(st.cell_count for sec in live.kv_sections for st in sec.streams)
    del live
    previous = live_blob if had_cells else None
    live_blob = None
    n = set_seq_state_bytes(llm, blob, seq_id)
    seconds.update(open=t1 - t0 + steps["plan"], read=steps["read"], decode=steps["decode"],
                   set_data=time.perf_counter() - t2)
    if n != blob.size:
        if previous is not None:
            set_seq_state_bytes(llm, previous, seq_id)
        raise SessionMismatchError(f"llama.cpp refused the restored state of {path} (read {n} of {blob.size} bytes); "
                                   f"sequence {seq_id} was left as it was")
    if seq_id == 0:
        llm.input_ids[: len(tokens)] = tokens
        llm.n_tokens = len(tokens)
        llm._requires_eval = True  # logits are not stored: generate() replays the last token
    return len(tokens)


def extend(llm, path, *, seq_id: int = 0, tokens=None, whole_sequence: bool = False) -> dict:
    """Bring ``path`` up to the live sequence ``seq_id``: append what was evaluated since it was written.

    Cost: the new tokens (plus one re-encoded keyframe chunk), not the session, where the context
    has a spare sequence sharing its KV cache (``n_seq_max >= 2`` and ``kv_unified``; make one with
    :func:`add_spare_sequence`): only the cells from the last stored keyframe chunk on are copied
    out of llama.cpp, through the spare (``runtime/tail.py``). Other contexts (llama-cpp-python's
    default n_seq_max = 1, or one KV stream per sequence), and changes that reach before those cells,
    copy the whole sequence (``llama_state_seq_get_data``: O(session) bytes) and compare every cell.
    A sliding-window cache copies and codes its window as well. Where the change is not an append
    (the stored tokens are no longer a prefix of the live ones, cells were removed), the file is
    rewritten, crash-safe. ``tokens``: as for :func:`save` (a sequence other than 0 without them
    copies the whole sequence, to read the cells' token records). ``whole_sequence``: copy the whole
    sequence even where the spare would do (both write the same bytes).

    Returns ``rows_added``, ``tokens_added``, ``rewritten`` (None, or why the whole file was written
    anew), ``path`` (``"spare-sequence"`` or ``"whole-sequence"``: which copy ran), ``why_whole``
    (why the spare could not be used; None when it was, or when ``whole_sequence`` asked for it) and
    ``seconds`` (``state_copy``, ``parse``, ``encode``, ``write``: where the time went).
    """
    # Opened once, for the append: the header the checks read is the one appended to (the file
    # stays locked against other writers until the append is done).
    with DkvSession.open_for_append(path) as session:
        saved_from = session.file.value(KEY_SEQ_ID, None)
        if saved_from is not None and saved_from != seq_id:
            raise SessionMismatchError(f"{path} was saved from sequence {saved_from}; extend(seq_id={seq_id}) would store "
                                       f"another sequence's cells in it: pass seq_id={saved_from}, or save anew")
        _check_seq_id(llm, seq_id)
        why = None
        if not whole_sequence:
            seconds = {}
            tail, why = spare_tail(llm, session, seq_id, tokens, seconds)
            if tail is not None:
                state, offsets = tail
                _check_fits(llm, session, seq_id, live=state)
                try:
                    with accelerated():
                        result = append_session(session, state, rope=model_rope(llm, state), row_offsets=offsets,
                                                seconds=seconds)
                    return {**result, "path": "spare-sequence", "why_whole": None, "seconds": seconds}
                except WholeStateNeeded as e:  # nothing was written: the whole sequence decides
                    why = str(e)
        seconds = {}
        t = time.perf_counter()
        blob = seq_state_bytes(llm, seq_id)
        seconds["state_copy"] = time.perf_counter() - t
        t = time.perf_counter()
        state = live_state(llm, seq_id, like=session, tokens=tokens, blob=blob)
        seconds["parse"] = time.perf_counter() - t
        _check_fits(llm, session, seq_id, live=state)  # the copy of the sequence is taken once
        with accelerated():
            # appends keep each track's stored codec; the rotary parameters serve a rewrite
            result = append_session(session, state, rope=model_rope(llm, state), seconds=seconds)
        return {**result, "path": "whole-sequence", "why_whole": why, "seconds": seconds}
