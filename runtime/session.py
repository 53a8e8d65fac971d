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

import ctypes
from dataclasses import replace
from pathlib import Path

import numpy as np

from deltakv_format.codecs import Codec, get_codec
from deltakv_format.constants import DEFAULT_CODEC, GGMLType, GGUFValueType
from deltakv_format.errors import DeltaKVError, SessionMismatchError
from deltakv_format.gguf_io import KeyValue
from deltakv_format.llama_state import file_version_for, parse_state, write_state
from deltakv_format.session import DkvSession, append_session, write_session
from deltakv_format.state_model import Framing, LlamaState

KEY_MODEL_DESC = "deltakv.runtime.model_desc"
KEY_N_VOCAB = "deltakv.runtime.n_vocab"
KEY_N_EMBD = "deltakv.runtime.n_embd"


_GPU_CHECKED = None


def accelerated():
    """Use the GPU kernels for the codecs when a CUDA/HIP GPU can run them (same bytes as the CPU).

    ``DELTAKV_GPU=0`` turns it off. The first call builds the kernel library if needed
    (README: "GPU"); without a GPU, or if that fails, everything stays on the CPU.
    """
    import contextlib
    import os

    from deltakv_format.codecs import use_accelerator

    global _GPU_CHECKED
    if _GPU_CHECKED is None:
        _GPU_CHECKED = False
        if os.environ.get("DELTAKV_GPU", "1") != "0":
            try:
                from . import gpu

                _GPU_CHECKED = gpu if gpu.is_available() else False
            except Exception:  # no toolchain, no driver: the CPU path is always there
                _GPU_CHECKED = False

    @contextlib.contextmanager
    def scope():
        previous = use_accelerator(_GPU_CHECKED) if _GPU_CHECKED else None
        try:
            yield bool(_GPU_CHECKED)
        finally:
            if _GPU_CHECKED:
                use_accelerator(previous)

    return scope()


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


def set_seq_state_bytes(llm, blob: bytes, seq_id: int = 0) -> int:
    """llama_state_seq_set_data from ``blob`` without copying it (llama.cpp only reads the buffer);
    returns the bytes llama.cpp read (0 when it refused the state)."""
    lc = _llama_cpp()
    src = ctypes.cast(ctypes.c_char_p(blob), ctypes.POINTER(ctypes.c_uint8))
    return lc.llama_state_seq_set_data(llm.ctx, src, len(blob), seq_id)


def live_state(llm, seq_id: int = 0, *, like: DkvSession | None = None) -> LlamaState:
    """The live sequence as a ggsq-framed state carrying the context's tokens.

    ``like``: a session saved from this context; its layout spares parsing the copy once per
    candidate layout (an extend should cost the new tokens, not the session)."""
    hints = {}
    if like is not None and len(set(like.stream_ext)) == 1:
        hints = {"layout": like.layout, "cell_ext_bytes": like.stream_ext[0]}
    state = parse_state(seq_state_bytes(llm, seq_id), framing=Framing.SEQ_STATE, **hints)
    tokens = np.ascontiguousarray(llm.input_ids[: llm.n_tokens], dtype="<i4")
    return replace(
        state, framing=Framing.SEQUENCE_FILE, file_version=file_version_for(state.layout, Framing.SEQUENCE_FILE),
        token_words=memoryview(tokens.tobytes()),
    )


def _runtime_kvs(llm) -> list[KeyValue]:
    return [
        KeyValue(KEY_MODEL_DESC, GGUFValueType.STRING, model_desc(llm)),
        KeyValue(KEY_N_VOCAB, GGUFValueType.UINT32, llm.n_vocab()),
        KeyValue(KEY_N_EMBD, GGUFValueType.UINT32, llm.n_embd()),
    ]


def save(llm, path, *, codec: Codec | str = DEFAULT_CODEC, seq_id: int = 0,
         k_codec: Codec | str | None = None, v_codec: Codec | str | None = None) -> Path:
    """Write the live context's sequence ``seq_id`` to ``path`` as a .dkv (atomically).

    ``k_codec`` / ``v_codec`` override ``codec`` for the K or V tracks (eval/EVAL.md: K q8_0 with
    the default for V is the near-lossless choice); ``extend`` keeps each track's codec."""
    if llm.n_tokens == 0:
        raise DeltaKVError("the context is empty: evaluate a prompt before saving")
    codec = get_codec(codec) if isinstance(codec, str) else codec
    state = live_state(llm, seq_id)
    with accelerated():
        write_session(state, path, codec, k_codec=k_codec, v_codec=v_codec, extra_kvs=_runtime_kvs(llm)).close()
    return Path(path)


def _check_fits(llm, session: DkvSession) -> None:
    desc = session.file.value(KEY_MODEL_DESC, None)
    if desc is not None and desc != model_desc(llm):
        raise SessionMismatchError(f"the session was saved with model {desc!r}; this context runs {model_desc(llm)!r}")
    for key, live in ((KEY_N_VOCAB, llm.n_vocab()), (KEY_N_EMBD, llm.n_embd())):
        stored = session.file.value(key, None)
        if stored is not None and stored != live:
            raise SessionMismatchError(f"{key}: the session has {stored}, this model {live}")
    cells = max(session.stream_cells) if session.stream_cells else 0
    if cells > llm.n_ctx():
        raise SessionMismatchError(f"the session holds {cells} cells; this context has n_ctx = {llm.n_ctx()}")
    params = llm.context_params
    want = {"k": int(params.type_k), "v": int(params.type_v)}
    for t in session.tracks:
        live_type = want[t.name[-1]]
        if t.ggml_type != live_type:
            raise SessionMismatchError(
                f"{t.name}: the session's cache is {GGMLType(t.ggml_type).name}, this context's type_{t.name[-1]} "
                f"is {GGMLType(live_type).name}"
            )


def load(llm, path, *, seq_id: int = 0) -> int:
    """Load a .dkv into ``llm`` (a Llama of the same model) as sequence ``seq_id``; returns the token count.

    Afterwards ``llm.create_completion`` / ``llm.generate`` continue where the session stopped.
    On a mismatch (another model, a smaller n_ctx, another KV type) raises SessionMismatchError
    and leaves the context as it was; if llama.cpp itself refuses the state, the sequence is empty.
    """
    with DkvSession(path) as session:
        _check_fits(llm, session)
        tokens = session.tokens()
        if tokens is None:
            raise DeltaKVError(f"{path} holds no token list (it was not saved from a session or sequence file)")
        with accelerated():
            state = session.to_llama_state()
    blob = write_state(state, framing=Framing.SEQ_STATE)
    n = set_seq_state_bytes(llm, blob, seq_id)
    if n != len(blob):
        llm.n_tokens = 0
        raise SessionMismatchError(f"llama.cpp refused the restored state of {path} (read {n} of {len(blob)} bytes)")
    llm.input_ids[: len(tokens)] = tokens
    llm.n_tokens = len(tokens)
    llm._requires_eval = True  # logits are not stored: generate() replays the last token
    return len(tokens)


def extend(llm, path, *, seq_id: int = 0) -> dict:
    """Append to ``path`` the tokens ``llm`` evaluated since the file was written.

    The stored tokens must be a prefix of the live ones. Cost: the new tokens (plus the
    re-encoded last partial keyframe chunk), not the session.
    """
    with DkvSession(path) as session:
        _check_fits(llm, session)
        stored = session.tokens()
        live = np.asarray(llm.input_ids[: llm.n_tokens], dtype=np.int32)
        if stored is None or len(stored) > len(live) or not np.array_equal(live[: len(stored)], stored):
            raise SessionMismatchError(
                f"the {0 if stored is None else len(stored)} tokens stored in {path} are not a prefix of the "
                f"context's {len(live)} tokens; save it anew instead"
            )
        state = live_state(llm, seq_id, like=session)
    with accelerated():
        return append_session(path, state)
