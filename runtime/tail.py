"""The live sequence's new cells only, through a spare sequence: what lets ``extend`` cost O(new tokens).

llama.cpp has no API for the state of a token range, only for a whole sequence
(``llama_state_seq_get_data``: 755 MB at 32k tokens of SmolLM2). A context with a unified KV cache
and a spare sequence (``n_seq_max >= 2``, ``kv_unified``: one stream that every sequence shares)
can copy a position range into the spare: ``llama_memory_seq_cp(mem, seq, spare, p0, -1)`` adds
the spare's id to those cells (metadata only, no data copied), ``llama_state_seq_get_data`` of the
spare then writes just them, and ``llama_memory_seq_rm(mem, spare, -1, -1)`` takes the id off again.
In llama.cpp (llama-cpp-python 0.3.36's, src/llama-kv-cache.cpp) the spare's state is the same
bytes as the sequence's own for those cells, in the cache's order, but for the sequence id in each
cell record and after the state's magic, which are rewritten here. With one stream per sequence
(``kv_unified`` false) ``seq_cp`` between streams copies whole buffers only, and aborts the process
(GGML_ASSERT) for a range: such contexts, and those with one sequence, keep the whole-sequence copy.

A sliding-window (iSWA) cache writes only the cells inside the window (positions above
``pos_max - n_swa``), in ring order, so the copy starts no later than the window: its SWA stream is
then whole (row offset 0), and its full-attention stream the tail from ``p0``. What is not read
(the rows before ``p0``) is taken to be what the file stores; :func:`spare_tail` checks what can
be checked without reading it, and :func:`deltakv_format.session_append.append_session` refuses
(``WholeStateNeeded``) a change that reaches before the tail, which the caller then redoes from
the whole sequence.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from deltakv_format.llama_state import file_version_for, parse_state
from deltakv_format.session import DkvSession
from deltakv_format.session_cells import cell_positions, cell_record_ends
from deltakv_format.session_tracks import chunk_rows, source_row_bytes, tracks_by_stream
from deltakv_format.state_model import Framing, KVCacheSection


def _llama_cpp():
    import llama_cpp

    return llama_cpp


def add_spare_sequence(llm, n_seq_max: int = 2):
    """Rebuild ``llm``'s (empty or not: it is emptied) context with ``n_seq_max`` sequences sharing
    one unified KV cache, so that ``extend`` reads only the new cells; returns ``llm``.

    llama-cpp-python 0.3.36's ``Llama(...)`` takes no ``n_seq_max`` (unknown keywords are ignored),
    so the context is made anew with its own parameters but these two. ``Llama.eval`` /
    ``generate`` keep evaluating into sequence 0 as before; the KV cache has as many cells as before,
    shared by the sequences."""
    from llama_cpp import _internals

    if n_seq_max < 2:
        raise ValueError(f"n_seq_max: expected 2 or more (one sequence and a spare), found {n_seq_max}")
    params = llm.context_params
    params.n_seq_max = n_seq_max
    params.kv_unified = True
    llm._ctx.close()  # its KV cache is freed now, not when the Llama goes
    llm._ctx = _internals.LlamaContext(model=llm._model, params=params, verbose=llm.verbose)
    llm.n_tokens = 0
    return llm


def spare_sequence(llm, seq_id: int) -> int | None:
    """An empty sequence of ``llm``'s context other than ``seq_id`` that shares its stream (the
    highest such id), or None when the context has none (n_seq_max = 1, or one stream per sequence)."""
    lc = _llama_cpp()
    n_seq = lc.llama_n_seq_max(llm.ctx)
    if n_seq < 2 or not bool(llm.context_params.kv_unified):
        return None
    mem = lc.llama_get_memory(llm.ctx)
    for s in reversed(range(n_seq)):
        if s != seq_id and lc.llama_memory_seq_pos_max(mem, s) < 0:
            return s
    return None


def _stored_streams_fit(session: DkvSession, swa: bool) -> str | None:
    """Why the stored session is not one whose tail the spare copy can give (None when it is)."""
    if any(kind != "kv" for kind in session.section_kind):
        return "the state has sections besides the KV caches (a recurrent or hybrid model)"
    caches = [session.stream_section.count(i) for i in range(len(session.section_kind))]
    if any(c != 1 for c in caches):
        return f"the KV caches have {caches} streams (one per sequence): the copy would be between streams"
    if len(caches) > (2 if swa else 1):
        return f"{len(caches)} KV caches, of which the copy knows how to read {2 if swa else 1}"
    if not session.stream_cells[0]:
        return "the stored session's first KV cache is empty"
    return None


def spare_tail(llm, session: DkvSession, seq_id: int, tokens=None, seconds: dict | None = None):
    """The live sequence ``seq_id`` from the first row that an append to ``session`` needs, as a
    ggsq-framed state with that sequence's records and tokens, and each stream's row offset
    (``append_session``'s ``row_offsets``); or ``(None, why)`` where the spare copy cannot give it.

    ``tokens``: as for ``live_state``; for a sequence other than 0 they must be given (the cells'
    own token records would need the whole sequence). ``seconds``: filled with the time of the
    copy out of llama.cpp (``state_copy``) and of parsing it (``parse``)."""
    lc = _llama_cpp()
    spare = spare_sequence(llm, seq_id)
    if spare is None:
        return None, (f"the context has no spare sequence sharing the KV stream (n_seq_max = "
                      f"{lc.llama_n_seq_max(llm.ctx)}, kv_unified = {bool(llm.context_params.kv_unified)})")
    n_swa = int(lc.llama_model_n_swa(llm.model))
    why = _stored_streams_fit(session, n_swa > 0)
    if why is not None:
        return None, why
    if tokens is None and seq_id != 0:
        return None, f"the tokens of sequence {seq_id} were not given (the cells' token records need the whole sequence)"
    mem = lc.llama_get_memory(llm.ctx)
    pos_max = int(lc.llama_memory_seq_pos_max(mem, seq_id))
    if pos_max < 0:
        return None, f"sequence {seq_id} holds no cells"

    # The full-attention stream: its stored cells must be positions 0..n-1 in order (then the live
    # rows before the tail, the same positions, are the stored ones); the tail starts on the keyframe
    # chunk of the last stored row, where an append would start.
    old_n, ext = session.stream_cells[0], session.stream_ext[0]
    stored = session.cells(0)
    if len(stored) != old_n * (12 + ext) or not np.array_equal(cell_positions(stored, old_n, ext), np.arange(old_n)):
        return None, "the stored cells are not positions 0..n-1 in order (a shifted or pruned cache)"
    by_stream = tracks_by_stream(session.tracks)
    keep = old_n - 1
    p0 = keep - keep % chunk_rows(by_stream.get(0, []))
    offsets = [p0]
    if len(session.stream_cells) == 2:  # iSWA: the SWA stream whole, from below its window
        p0 = min(p0, max(0, pos_max - n_swa))
        offsets = [p0, 0]
    if pos_max < p0:
        return None, f"sequence {seq_id} ends at position {pos_max}, before the stored row {p0}"

    t = time.perf_counter()
    live_size = int(lc.llama_state_seq_get_size(llm.ctx, seq_id))  # counts the bytes, copies none
    lc.llama_memory_seq_cp(mem, seq_id, spare, p0, -1)
    try:
        from .session import seq_state_bytes

        blob = seq_state_bytes(llm, spare)
    finally:
        lc.llama_memory_seq_rm(mem, spare, -1, -1)
    if seconds is not None:
        seconds["state_copy"] = time.perf_counter() - t

    t = time.perf_counter()
    hints = {"layout": session.layout, "cell_ext_bytes": ext} if len(set(session.stream_ext)) == 1 else {}
    state = parse_state(blob, framing=Framing.SEQ_STATE, **hints)
    streams = [st for sec in state.kv_sections for st in sec.streams]
    if len(streams) != len(session.stream_cells) or not all(st.cell_count for st in streams):
        return None, "the spare sequence's state has another stream count, or an empty stream"
    # Every byte of the whole sequence's state but the rows before the tail is in the spare's (same
    # headers, one cell per row): the difference in size must be exactly those rows.
    row_bytes = [12 + session.stream_ext[g] + sum(source_row_bytes(t) for t in by_stream.get(g, []))
                 for g in range(len(streams))]
    if live_size - len(blob) != sum(o * b for o, b in zip(offsets, row_bytes)):
        return None, (f"sequence {seq_id} holds other cells than the stored ones before position {p0} "
                      f"(its state has {live_size} bytes, the tail {len(blob)})")
    sections = []
    for sec in state.sections:
        if isinstance(sec, KVCacheSection):
            new = []
            for st in sec.streams:
                cells = _with_seq_id(st, seq_id)
                if cells is None:
                    return None, "a cell record of the spare sequence names several sequences"
                new.append(replace(st, cells=cells))
            sec = replace(sec, streams=new)
        sections.append(sec)

    if tokens is not None:
        tokens = np.ascontiguousarray(np.asarray(tokens).reshape(-1), dtype="<i4")
    else:
        tokens = np.ascontiguousarray(llm.input_ids[: llm.n_tokens], dtype="<i4")
    if pos_max >= len(tokens):
        return None, f"sequence {seq_id} holds cells up to position {pos_max}, but {len(tokens)} tokens are known"
    state = replace(state, sections=sections, seq_prefix_id=seq_id if state.seq_prefix_id is not None else None,
                    framing=Framing.SEQUENCE_FILE, file_version=file_version_for(state.layout, Framing.SEQUENCE_FILE),
                    token_words=memoryview(tokens.tobytes()))
    if seconds is not None:
        seconds["parse"] = time.perf_counter() - t
    return (state, offsets), None


def _with_seq_id(stream, seq_id: int) -> memoryview | None:
    """The stream's cell records with the sequence id ``seq_id`` (each names the spare's, once)."""
    rec = 12 + stream.cell_ext_bytes
    ends = cell_record_ends(stream.cells, stream.cell_count, stream.cell_ext_bytes)
    if len(stream.cells) != stream.cell_count * rec or (len(ends) and ends[-1] != len(stream.cells)):
        return None
    raw = np.frombuffer(stream.cells, np.uint8).reshape(stream.cell_count, rec).copy()
    if not np.all(raw[:, 4:8].copy().view("<u4") == 1):
        return None
    raw[:, rec - 4:] = np.frombuffer(np.int32(seq_id).astype("<i4").tobytes(), np.uint8)
    return memoryview(raw.reshape(-1))

