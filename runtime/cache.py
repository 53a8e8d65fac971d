"""DeltaKVCache: a compressed, persistent prompt cache for llama-cpp-python.

    llm.set_cache(DeltaKVCache("~/.cache/deltakv", capacity_bytes=2 << 30, llm=llm))

Works as llama-cpp-python's own LlamaRAMCache / LlamaDiskCache do (longest-prefix lookup,
least-recently-used eviction by bytes), but each entry is a .dkv file: the whole llama.cpp state
compressed by a codec, the token ids, and only the last row of logits (llama-cpp-python replays
the last token after a cache load, so no more is needed) instead of n_tokens x n_vocab floats.
Entries survive a restart: the folder (or the store, ``store=``) is the cache. The first argument
may also be a store URL (``redis://host:6379/0``, ``s3://bucket/prefix``: see
``deltakv_format.stores.open_store``), so that several processes and machines share one cache.

Three parts, one concern each: the store keeps the bytes of the entries under their names
(``deltakv_format.stores``: a local folder today, any :class:`SessionStore`), an
:class:`LruByBytes` over it evicts least recently used entries down to the capacity, and this
module is the llama-cpp-python adapter: fingerprints, and llama-cpp-python states to and from
sessions.

Several models (or one model with several KV types) may share a folder. Token ids alone do not
say which context a state belongs to, and llama-cpp-python calls the cache outside its own error
handling (``load_state`` raises on a state of another shape), so each entry records the
fingerprint of the context it came from (``deltakv.runtime.context.*``) and is served only to a
context with the same fingerprint; see :class:`DeltaKVCache` for what the fingerprint holds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import threading
import time
import warnings
from dataclasses import dataclass, field

import llama_cpp
import numpy as np
from llama_cpp.llama import Llama
from llama_cpp.llama import LlamaState as LlamaCppState
from llama_cpp.llama_cache import BaseLlamaCache

from deltakv_format.codecs import get_codec
from deltakv_format.constants import DEFAULT_CODEC, GGMLType, GGUFValueType
from deltakv_format.container import TensorData
from deltakv_format.errors import CorruptError, DeltaKVError, TruncatedError
from deltakv_format.gguf_io import KeyValue
from deltakv_format.llama_state import parse_state
from deltakv_format.session_rebuild import PendingPayload, rebuild_into, session_state
from deltakv_format.model_info import model_file_digest
from deltakv_format.session import DkvSession, codecs_of_roles, rope_for_state, session_bytes
from deltakv_format.state_model import Framing, LlamaState
from deltakv_format.stores import (
    EntryNotFoundError,
    LocalDirectoryStore,
    LruByBytes,
    SessionStore,
    StoreBackendError,
    StoreError,
    entry_in_use,
    open_store,
)

from .session import _model_info, model_desc

KEY_N_TOKENS = "deltakv.runtime.n_tokens"
KEY_SEED = "deltakv.runtime.seed"
KEY_SCORES_SHAPE = "deltakv.runtime.scores_shape"
KEY_CONTEXT_PREFIX = "deltakv.runtime.context."  # one key per fingerprint field
TENSOR_INPUT_IDS = "runtime.input_ids"  # the n_tokens ids the state holds
TENSOR_KEY = "runtime.key"  # the tokens the entry was stored under (llama-cpp-python adds the last sampled one)
TENSOR_LAST_LOGITS = "runtime.last_logits"

# Entries are named by a digest of their fingerprint and key. Other .dkv files in the folder are
# not the cache's: it neither reads them (another program may be appending to them) nor deletes them.
ENTRY_NAME = re.compile(r"[0-9a-f]{32}\.dkv")

BROKEN = (CorruptError, TruncatedError)  # a file no reader can use (other errors: gone, a newer version, ...)

Fingerprint = dict  # field name -> int or str


# ---- fingerprints ------------------------------------------------------------------------


def _model_file_digest(path) -> str:
    """The model file's identity (model_info.model_file_digest: its size and 16 pieces of it)."""
    try:
        return model_file_digest(path)
    except OSError as e:  # the file was moved after loading: the metadata digest still separates most models
        return f"unreadable: {type(e).__name__}"


def _model_digest(llm) -> str:
    """What tells two models of the same description apart: parameters, size, metadata, weights, LoRA."""
    h = hashlib.sha256()
    h.update(str(llama_cpp.llama_model_n_params(llm.model)).encode())
    h.update(str(llama_cpp.llama_model_size(llm.model)).encode())
    h.update(json.dumps(sorted(llm.metadata.items())).encode())
    h.update(_model_file_digest(llm.model_path).encode())
    if getattr(llm, "lora_path", None):
        h.update(f"lora {llm.lora_path} x {llm.lora_scale}".encode())
    return h.hexdigest()[:32]


def context_fingerprint(llm) -> Fingerprint:
    """Everything about a live context that decides whether a whole-context state loads into it.

    Model identity, llama.cpp build (it decides the state layout), KV types, V layout, cache
    sizes (n_ctx, and for SWA models swa_full and n_ubatch) and streams (n_seq_max, kv_unified).
    ``v_trans`` is absent when flash attention is "auto": llama.cpp resolves it inside the
    context and does not say how; the cache learns it from the first state stored."""
    params = llm.context_params
    n_seq_max, kv_unified = int(params.n_seq_max), int(bool(params.kv_unified))
    fp = {
        "source": "llm",
        "llama_cpp_version": llama_cpp.__version__,
        "model_desc": model_desc(llm),
        "model_digest": _model_digest(llm),
        "arch": llm.metadata.get("general.architecture", ""),
        "n_vocab": int(llm.n_vocab()),
        "n_embd": int(llm.n_embd()),
        "n_ctx": int(llm.n_ctx()),
        "n_seq_max": n_seq_max,
        "kv_unified": kv_unified,
        "n_stream": 1 if kv_unified else n_seq_max,  # llama.cpp: one stream per sequence unless unified
        "swa_full": int(bool(params.swa_full)),
        "n_ubatch": int(params.n_ubatch),
        "type_k": int(params.type_k),
        "type_v": int(params.type_v),
    }
    flash = int(params.flash_attn_type)
    if flash == llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED:
        fp["v_trans"] = 0  # flash attention reads V row-major
    elif flash == llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED:
        fp["v_trans"] = 1
    return fp


def _runs(values) -> str:
    """[192]*30 -> '192x30'; per-layer widths compactly, in order."""
    out = []
    for v in values:
        if out and out[-1][0] == v:
            out[-1][1] += 1
        else:
            out.append([v, 1])
    return ",".join(f"{v}x{n}" for v, n in out)


def _uniform(values: set):
    """One value when all agree, else every value (mixed types would be a state llama.cpp never writes)."""
    if len(values) == 1:
        return next(iter(values))
    return ",".join(str(v) for v in sorted(values))


@dataclass(frozen=True)
class StateShape:
    """What a llama.cpp state says about the context that wrote it."""

    fields: Fingerprint  # layout, arch, type_k, type_v, v_trans, n_stream, kv_shape (those it shows)
    section_cells: tuple[int, ...]  # most cells of one stream, per KV cache section


def state_shape(state: LlamaState) -> StateShape:
    """Read the structure of a parsed state; K/V types and layer widths only show where a stream has cells."""
    fields: Fingerprint = {"layout": state.layout.value}
    if state.arch is not None:
        fields["arch"] = state.arch
    types_k, types_v, v_trans, n_streams, described, section_cells = set(), set(), set(), set(), [], []
    for sec in state.kv_sections:
        n_streams.add(len(sec.streams))
        section_cells.append(max((st.cell_count for st in sec.streams), default=0))
        filled = [st for st in sec.streams if st.cell_count]
        if not filled:
            described.append(f"{len(sec.streams)} empty")
            continue
        st = filled[0]  # the streams of one cache share their layers
        types_k.update(t.ggml_type for t in st.k)
        types_v.update(t.ggml_type for t in st.v)
        v_trans.add(st.v_trans)
        extra = (f" ext {st.cell_ext_bytes}" if st.cell_ext_bytes else "") + (f" rot {st.rot}" if st.rot else "")
        described.append(f"{len(sec.streams)} x {st.n_layer} layers: K {_runs(t.n_values for t in st.k)}"
                         f" V {_runs(t.n_values for t in st.v)}{extra}")
    for name, values in (("type_k", types_k), ("type_v", types_v), ("v_trans", v_trans)):
        if values:
            fields[name] = _uniform(values)
    if n_streams:
        fields["n_stream"] = _uniform(n_streams)
    fields["kv_shape"] = "; ".join(described)
    return StateShape(fields, tuple(section_cells))


def state_fingerprint(value: LlamaCppState, shape: StateShape) -> Fingerprint:
    """The fingerprint an unbound cache can read off a llama-cpp-python state: its structure,
    llama-cpp-python's n_ctx (the length of input_ids) and n_vocab (the width of scores)."""
    return {
        "source": "state",
        "llama_cpp_version": llama_cpp.__version__,
        "n_ctx": len(value.input_ids),
        "n_vocab": int(np.shape(value.scores)[1]),
        **shape.fields,
    }


def _shown(name: str, value) -> str:
    if name in ("type_k", "type_v") and isinstance(value, int):
        try:
            return GGMLType(value).name.lower()
        except ValueError:
            return f"ggml type {value}"
    return repr(value)


def shape_problems(expected: Fingerprint, shape: StateShape, n_vocab: int | None) -> list[str]:
    """How a state's structure differs from what a context with fingerprint ``expected`` loads
    (only what both say is compared; an empty list: it fits)."""
    problems = []
    for name, found in shape.fields.items():
        want = expected.get(name)
        if want is not None and want != found:
            problems.append(f"{name}: expected {_shown(name, want)}, found {_shown(name, found)}")
    if n_vocab is not None and expected.get("n_vocab") not in (None, n_vocab):
        problems.append(f"n_vocab: expected {expected['n_vocab']} logits per token, found {n_vocab}")
    cells = max(shape.section_cells, default=0)
    if "n_ctx" in expected and cells > expected["n_ctx"]:
        problems.append(f"cells: expected at most n_ctx = {expected['n_ctx']}, found {cells}")
    return problems


def _fingerprint_kvs(fp: Fingerprint) -> list[KeyValue]:
    kvs = []
    for name, value in sorted(fp.items()):
        if isinstance(value, str):
            kvs.append(KeyValue(KEY_CONTEXT_PREFIX + name, GGUFValueType.STRING, value))
        else:
            kvs.append(KeyValue(KEY_CONTEXT_PREFIX + name, GGUFValueType.INT64, int(value)))
    return kvs


def _file_fingerprint(session: DkvSession) -> Fingerprint:
    n = len(KEY_CONTEXT_PREFIX)
    return {key[n:]: (kv.value if isinstance(kv.value, str) else int(kv.value))
            for key, kv in session.file.kvs.items() if key.startswith(KEY_CONTEXT_PREFIX)}


def _entry_name(fp: Fingerprint, key: tuple[int, ...]) -> str:
    # The fingerprint is part of the name: two contexts storing the same tokens get two entries.
    h = hashlib.sha256(json.dumps(sorted(fp.items())).encode())
    h.update(np.asarray(key, dtype="<i4").tobytes())
    return h.hexdigest()[:32] + ".dkv"


# ``with _reading(path):`` marks the entry file ``path`` of a local store as being read by this
# process: no cache evicts or deletes it meanwhile (the registry is the stores' own).
_reading = entry_in_use


# ---- the cache ---------------------------------------------------------------------------


@dataclass
class _Entry:
    name: str
    key: tuple[int, ...]
    fingerprint: Fingerprint
    n_tokens: int
    section_cells: tuple[int, ...]


_SKIP = object()  # what _store_calls yields when the store is off and not yet due for a try


class _Unusable(Exception):
    """An entry that cannot be served; ``delete``: its file is broken for every reader."""

    def __init__(self, reason: str, delete: bool):
        super().__init__(reason)
        self.delete = delete


@dataclass
class _Learned:
    """What an unbound cache knows of its context from the states stored into it."""

    conflicting: bool = False  # states of two contexts were stored: it cannot tell which asks
    score_rows: int | None = None  # rows of llama-cpp-python's scores, once a state shows them
    score_rows_at_least: int = 0
    section_cells_at_least: list[int] = field(default_factory=list)


class DeltaKVCache(BaseLlamaCache):
    """A llama-cpp-python prompt cache of .dkv files in ``directory``, at most ``capacity_bytes`` on disk.

    ``store=`` in place of ``directory`` keeps the entries in any
    :class:`~deltakv_format.stores.SessionStore` (``DeltaKVCache(directory)`` is
    ``DeltaKVCache(store=LocalDirectoryStore(directory))``); "folder" below means the store.

    Pass ``llm=``, the Llama the cache is set on. An entry is served only to a context with the
    fingerprint of the one that stored it: the model (llama_model_desc, n_vocab, n_embd and a
    digest of its parameters, metadata, pieces of its file and its LoRA), the llama.cpp build,
    the KV types (type_k, type_v), the V layout (flash attention or not), n_ctx, n_seq_max,
    kv_unified, swa_full and n_ubatch. Entries of other contexts stay in the folder (another
    model may use them) and count towards the capacity; eviction is least recently used first,
    by bytes, over the whole folder, the store's last-use time (a file's modification time) being
    the shared clock.

    Without ``llm=`` the cache cannot know which context asks (llama-cpp-python gives a cache
    only tokens), so it learns the context from the states stored into it: their structure
    (layout, arch, K/V types, V layout, streams, layers and row widths), llama-cpp-python's
    n_ctx (the length of input_ids) and n_vocab (the width of scores). It serves only entries
    stored by a cache without ``llm=`` whose learned fingerprint is the same, and whose cells fit
    what the context has shown it holds. Before the first state is stored it serves nothing: any
    entry could be another model's, and llama-cpp-python raises on a state it cannot load (on
    every request, since nothing evicts it), where a miss costs only evaluating the prompt. It
    cannot tell two models of the same shape apart (a base model and its fine-tune) nor see
    n_seq_max, so give ``llm=`` when a folder may be shared. States of two different contexts
    stored into one unbound cache make it stop serving (with a warning).

    Before an entry is handed out, the decoded state is checked against the fingerprint (types,
    V layout, streams, vocabulary, cells); an entry that fails to read or to fit is dropped with
    a warning and the lookup is a miss, so llama-cpp-python evaluates the prompt instead.
    Broken entries are deleted. Only files named like the cache's entries are looked at.

    A store that fails (a Redis server that cannot be reached, at construction or in the middle
    of a run; a folder that went away) never raises into a completion: the cache warns once
    (RuntimeWarning) and is off meanwhile (every lookup a miss, states not stored), trying the
    store again at most every ``retry_interval_s`` seconds; when the store answers again the
    cache works as before, without another warning until the next failure.
    """

    def __init__(self, directory=None, capacity_bytes: int = 2 << 30, codec: str = DEFAULT_CODEC, *,
                 k_codec: str | None = None, v_codec: str | None = None, llm: Llama | None = None,
                 store: SessionStore | None = None, bits: float | None = None, retry_interval_s: float = 1.0,
                 transcode: bool = False):
        """``codec`` codes the cached states; ``k_codec`` / ``v_codec`` give K or V another one
        (``k_codec="q8_0"``: q8_0-level quality at 0.42 of f16, eval/EVAL.md). ``bits``: bits per
        value of the codecs with a rate (dkv-ans, the default; 3 -> rate 300), an error for others.
        With ``llm=``, dkv-ans codes K before rotary embedding with the model's rotary parameters;
        without it, K as it is. ``directory``: a folder, or a store URL (``open_store``).
        ``retry_interval_s``: how often a store that failed is tried again (see the class).
        ``transcode``: a quantized cache (``type_k``/``type_v`` q8_0, q4_0) is stored through its
        values and quantized back when served (lossy, SPEC.md 6.6); without it, raw."""
        super().__init__(capacity_bytes)
        if (directory is None) == (store is None):
            raise TypeError(f"DeltaKVCache: expected a directory or store=, found "
                            f"{'both' if store is not None else 'neither'}")
        self.store = open_store(directory) if store is None else store
        # The folder, for a local store (callers of earlier versions read it).
        self.directory = self.store.directory if isinstance(self.store, LocalDirectoryStore) else None
        self._lru = LruByBytes(self.store, owns=ENTRY_NAME.fullmatch)
        # The codec of each role, as write_session makes it (an id gets its defaults for the role).
        roles = codecs_of_roles(codec, k_codec or None, v_codec or None, bits)
        self.codec = get_codec(codec) if isinstance(codec, str) else codec  # deltakv.codec of the entries
        self.k_codec, self.v_codec = roles["k"], roles["v"]
        self.transcode = bool(transcode)
        self._lock = threading.RLock()
        self._entries: dict[str, _Entry] = {}  # by entry name
        self._rejected: dict[str, tuple[int, int]] = {}  # entry name -> (size, last use) of an entry not to serve
        self._learned = _Learned()
        # The model's header (its rotary parameters), not the Llama: see below.
        self._model_info = _model_info(llm) if llm is not None else None
        if llm is not None:
            self._fingerprint: Fingerprint | None = context_fingerprint(llm)
            # Sizes of llama-cpp-python's arrays that load_state copies into (not the Llama itself:
            # the Llama holds the cache, and a reference back would keep the model alive for the GC).
            self._input_ids_len: int | None = len(llm.input_ids)
            self._score_rows: int | None = int(llm.scores.shape[0])
        else:
            self._fingerprint = self._input_ids_len = self._score_rows = None
        self.retry_interval_s = float(retry_interval_s)
        self._store_down = False  # the store failed, and has not answered since
        self._next_try = 0.0  # time.monotonic() at which a failed store is tried again
        self._warned: set[str] = set()  # reasons a state was not stored, each warned of once
        with self._store_calls():
            self._refresh()

    # -- a store that fails --------------------------------------------------------------

    @contextlib.contextmanager
    def _store_calls(self):
        """``with self._store_calls():`` the store's failures (OSError) end the block and turn
        the cache off, with one warning, until the store answers again; the block is skipped
        while the store is off and not yet due for another try (it yields ``_SKIP`` then).
        ``self.store_available`` says afterwards whether the store answered."""
        if self._store_down and time.monotonic() < self._next_try:
            self.store_available = False
            yield _SKIP
            return
        try:
            yield None
        except OSError as e:  # StoreUnavailableError and every other failure of the storage
            if not self._store_down:
                warnings.warn(f"DeltaKVCache: the store {self.store!r} failed ({e}); the cache is off (lookups "
                              f"miss, states are not stored) and tries the store again every "
                              f"{self.retry_interval_s:g} s", RuntimeWarning, stacklevel=4)
            self._store_down = True
            self._next_try = time.monotonic() + self.retry_interval_s
            self.store_available = False
            return  # the exception ends here: the caller goes on after its block (a miss)
        except BaseException:
            self._store_down, self.store_available = False, True  # the store answered (a KeyError: a miss)
            raise
        self._store_down, self.store_available = False, True

    @property
    def bound(self) -> bool:
        return self._input_ids_len is not None

    # -- index ---------------------------------------------------------------------------

    def _refresh(self) -> None:
        """Bring the index up to date with the store (other caches and processes write to it)."""
        found = {info.name: info for info in self._lru.entries()}
        for name in [n for n in self._entries if n not in found]:
            del self._entries[name]
        for name in [n for n in self._rejected if n not in found]:
            del self._rejected[name]
        for name, info in found.items():
            if name in self._entries:
                continue
            if self._rejected.get(name) == (info.size, info.last_used_ns):
                continue
            entry = self._index(name)
            if entry is None:
                self._rejected[name] = (info.size, info.last_used_ns)
            else:
                self._entries[name] = entry

    def _index(self, name: str) -> _Entry | None:
        """Read an entry's header (not its payloads); None for an entry that is not usable."""
        try:
            with (self._lru.reading(name), self.store.get(name) as data,
                  DkvSession.from_buffer(data, name=self.store.locate(name)) as s):
                # Entries of earlier versions have no key tensor (nor a fingerprint: never served).
                key_tensor = TENSOR_KEY if s.file.has_tensor(TENSOR_KEY) else TENSOR_INPUT_IDS
                key = tuple(int(t) for t in s.file.tensor(key_tensor)) if s.file.has_tensor(key_tensor) else ()
                n_tokens = int(s.file.value(KEY_N_TOKENS, 0))
                cells = {}
                for section, count in zip(s.stream_section, s.stream_cells):
                    cells[section] = max(cells.get(section, 0), count)
                return _Entry(name, key, _file_fingerprint(s), n_tokens, tuple(cells[k] for k in sorted(cells)))
        except BROKEN as e:  # checksum, truncation, broken structure: broken for every reader
            self._warn(name, str(e))
            self._lru.delete_unless_in_use(name)
            return None
        except StoreBackendError:
            raise  # the store failed, not the entry: the cache goes off (_store_calls)
        except (DeltaKVError, OSError):
            return None  # gone meanwhile, or a format version this reader does not know: not ours to judge

    def _servable(self, entry: _Entry) -> bool:
        fp = self._fingerprint
        if fp is None or self._learned.conflicting or entry.fingerprint != fp:
            return False
        if self.bound:
            return True
        if self._unbound_score_rows(entry.n_tokens) is None:
            return False
        # Beyond the first KV cache (the SWA cache of iSWA models, sized by settings a state does
        # not show), serve only as many cells as this context has been seen to hold.
        seen = self._learned.section_cells_at_least
        return all(i == 0 or (i < len(seen) and n <= seen[i]) for i, n in enumerate(entry.section_cells))

    def _unbound_score_rows(self, n_tokens: int) -> int | None:
        """Rows load_state copies scores into (min(n_tokens, rows of llm.scores)), when known."""
        rows = self._learned.score_rows
        if rows is not None:
            return min(n_tokens, rows)
        return n_tokens if n_tokens <= self._learned.score_rows_at_least else None

    def _longest_prefix_entry(self, key: tuple[int, ...]) -> _Entry | None:
        best, best_len = None, 0
        for entry in self._entries.values():
            if not self._servable(entry):
                continue
            n = Llama.longest_token_prefix(entry.key, key)
            if n > best_len:
                best, best_len = entry, n
        return best

    # -- BaseLlamaCache ------------------------------------------------------------------

    @property
    def cache_size(self) -> int:
        """Bytes of every entry in the folder, whichever context stored it (0 while the store fails)."""
        with self._lock, self._store_calls() as skip:
            if skip is not _SKIP:
                return self._lru.total_bytes()
        return 0

    def _find_longest_prefix_key(self, key: tuple[int, ...]) -> tuple[int, ...] | None:
        with self._lock, self._store_calls() as skip:
            if skip is not _SKIP:
                self._refresh()
                entry = self._longest_prefix_entry(tuple(key))
                return None if entry is None else entry.key
        return None

    def __contains__(self, key) -> bool:
        return self._find_longest_prefix_key(tuple(int(t) for t in key)) is not None

    def __getitem__(self, key) -> LlamaCppState:
        key = tuple(int(t) for t in key)
        with self._lock, self._store_calls() as skip:
            if skip is not _SKIP:
                return self._lookup(key)
        raise KeyError(f"the store {self.store!r} is not available: the prompt is evaluated")

    def _lookup(self, key: tuple[int, ...]) -> LlamaCppState:
        """__getitem__ under the lock, the store answering."""
        self._refresh()
        entry = self._longest_prefix_entry(key)
        if entry is None:
            raise KeyError("no cached state of this context shares a prefix with these tokens")
        try:
            state = self._read(entry)
        except EntryNotFoundError:  # another cache on the store evicted it since the listing
            self._entries.pop(entry.name, None)
            raise KeyError(f"cached state {self.store.locate(entry.name)} was removed meanwhile") from None
        except _Unusable as e:
            self._drop(entry, str(e), e.delete)
            raise KeyError(f"cached state {self.store.locate(entry.name)} cannot be used: {e}") from e
        self._lru.touch(entry.name)  # the shared least-recently-used clock
        return state

    @contextlib.contextmanager
    def _opened(self, name: str):
        """The entry as a session over the store's bytes; _Unusable if it does not open as one."""
        # EntryNotFoundError: gone meanwhile; an OSError: the store failed, not the entry (the
        # cache goes off: _store_calls); any other refusal of the store: not servable.
        try:
            data = self.store.get(name)
        except (EntryNotFoundError, OSError):
            raise
        except DeltaKVError as e:
            raise _Unusable(str(e), delete=False) from e
        with data:
            try:
                session = DkvSession.from_buffer(data, name=self.store.locate(name))
            except DeltaKVError as e:
                raise _Unusable(str(e), delete=isinstance(e, BROKEN)) from e
            with session:
                yield session

    def _read(self, entry: _Entry) -> LlamaCppState:
        with self._lru.reading(entry.name), self._opened(entry.name) as s:
            try:
                if _file_fingerprint(s) != entry.fingerprint:
                    # Same name, so the same fingerprint unless rewritten by something else.
                    raise _Unusable("its fingerprint changed since it was indexed", delete=False)
                # the structure from the header (nothing decoded yet): a state that does not fit is
                # refused before its tracks are decoded
                shape = state_shape(session_state(s, PendingPayload, copy=False))
                ids = np.array(s.file.tensor(TENSOR_INPUT_IDS), dtype=np.intc) if s.file.has_tensor(
                    TENSOR_INPUT_IDS) else np.zeros(0, np.intc)
                last = (np.array(s.file.tensor(TENSOR_LAST_LOGITS)).view(np.float32).reshape(-1)
                        if s.file.has_tensor(TENSOR_LAST_LOGITS) else np.zeros(0, np.float32))
                n_vocab = int(s.file.value(KEY_SCORES_SHAPE)[1])
                n_tokens = int(s.file.value(KEY_N_TOKENS))
                seed = int(s.file.value(KEY_SEED))
                # the state's structure (an entry's key-values could say one thing and its tracks
                # another, and load_state would raise on every request) and the arrays beside it
                problems = shape_problems(self._fingerprint, shape, n_vocab)
                if last.size not in (0, n_vocab):
                    problems.append(f"last logits: expected {n_vocab} values, found {last.size}")
                if ids.size > n_tokens:
                    problems.append(f"input ids: expected at most n_tokens = {n_tokens}, found {ids.size}")
                # every track decoded straight into the one buffer load_state copies from (no typed
                # state joined afterwards: the entry is held once, not twice)
                blob = None if problems else rebuild_into(s)
            except DeltaKVError as e:
                raise _Unusable(str(e), delete=isinstance(e, BROKEN)) from e
            except (KeyError, ValueError, TypeError, IndexError) as e:
                raise _Unusable(f"inconsistent entry ({type(e).__name__}: {e})", delete=True) from e
            except Exception as e:  # noqa: BLE001 - llama-cpp-python lets anything but KeyError end the completion
                raise _Unusable(f"unreadable ({type(e).__name__}: {e})", delete=False) from e
        if problems:
            raise _Unusable("it does not fit this context: " + "; ".join(problems), delete=True)
        return self._llama_cpp_state(ids, last, n_vocab, n_tokens, seed, blob)

    def _llama_cpp_state(self, ids, last, n_vocab, n_tokens, seed, blob) -> LlamaCppState:
        """A LlamaState with arrays of the sizes the asking Llama's load_state copies into."""
        if self.bound:
            ids_len, rows = self._input_ids_len, min(n_tokens, self._score_rows)
        else:
            ids_len, rows = int(self._fingerprint["n_ctx"]), self._unbound_score_rows(n_tokens)
        input_ids = np.zeros(max(ids_len, ids.size), dtype=np.intc)
        input_ids[: ids.size] = ids
        scores = np.zeros((rows, n_vocab), dtype=np.single)
        if rows:
            scores[-1, : last.size] = last
        return LlamaCppState(input_ids=input_ids, scores=scores, n_tokens=n_tokens, llama_state=blob,
                             llama_state_size=len(blob), seed=seed)

    def _warn(self, name: str, reason: str) -> None:
        warnings.warn(f"DeltaKVCache: dropping cached state {self.store.locate(name)}: {reason}; "
                      "llama.cpp evaluates the prompt instead", RuntimeWarning, stacklevel=4)

    def _drop(self, entry: _Entry, reason: str, delete: bool) -> None:
        """Take an unusable entry out of the index, once; delete it if it is broken for every reader."""
        self._entries.pop(entry.name, None)
        self._warn(entry.name, reason)
        if delete and self._lru.delete_unless_in_use(entry.name):
            return
        info = self._lru.info(entry.name)
        if info is not None:
            self._rejected[entry.name] = (info.size, info.last_used_ns)

    def __setitem__(self, key, value: LlamaCppState) -> None:
        key = tuple(int(t) for t in key)
        state = parse_state(memoryview(value.llama_state)[: value.llama_state_size], framing=Framing.STATE)
        shape = state_shape(state)
        scores = np.asarray(value.scores, dtype=np.float32)
        with self._lock:
            fp = self._fingerprint_for_store(value, shape, int(scores.shape[1]))
            last = scores[-1] if scores.shape[0] else np.zeros(0, np.float32)
            name = _entry_name(fp, key)
            n_tokens = int(value.n_tokens)
            extra_kvs = [
                KeyValue(KEY_N_TOKENS, GGUFValueType.UINT64, n_tokens),
                KeyValue(KEY_SEED, GGUFValueType.UINT64, int(value.seed) & (2**64 - 1)),
                KeyValue(KEY_SCORES_SHAPE, GGUFValueType.ARRAY, np.asarray(scores.shape, np.uint64), GGUFValueType.UINT64),
                *_fingerprint_kvs(fp),
            ]
            # Only the ids the state holds: llama-cpp-python's input_ids is n_ctx long, the rest stale.
            ids = np.asarray(value.input_ids[:n_tokens], dtype="<i4")
            key_ids = np.asarray(key, dtype="<i4")
            extra_tensors = [
                TensorData(TENSOR_INPUT_IDS, GGMLType.I32, (len(ids),), ids),
                TensorData(TENSOR_KEY, GGMLType.I32, (len(key_ids),), key_ids),
                TensorData(TENSOR_LAST_LOGITS, GGMLType.F32, (last.size,), np.ascontiguousarray(last, np.float32).view(np.uint32)),
            ]
            extra_tensors = [t for t in extra_tensors if t.shape[0]]  # GGUF tensors cannot be empty
            with self._store_calls() as skip:
                if skip is _SKIP:
                    return  # the store is off: the state is not stored
                data = session_bytes(state, self.codec, k_codec=self.k_codec, v_codec=self.v_codec,
                                     extra_kvs=extra_kvs, extra_tensors=extra_tensors,
                                     rope=rope_for_state(self._model_info, state), transcode=self.transcode)
                try:
                    self.store.put(name, data)
                except StoreError as e:
                    if isinstance(e, OSError):
                        raise
                    # The store refuses this entry (too large for it): not stored, warned of once.
                    if type(e).__name__ not in self._warned:
                        self._warned.add(type(e).__name__)
                        warnings.warn(f"DeltaKVCache: a state was not stored: {e}", RuntimeWarning, stacklevel=3)
                    return
                self._entries[name] = _Entry(name, key, dict(fp), n_tokens, shape.section_cells)
                self._rejected.pop(name, None)
                for evicted in self._lru.evict(self.capacity_bytes, keep=name):
                    self._entries.pop(evicted, None)

    def _fingerprint_for_store(self, value: LlamaCppState, shape: StateShape, n_vocab: int) -> Fingerprint:
        """The fingerprint a new entry records; a bound cache refuses a state of another context,
        an unbound one learns its context from the states it is given."""
        if self.bound:
            if "v_trans" not in self._fingerprint and "v_trans" in shape.fields:
                self._fingerprint["v_trans"] = shape.fields["v_trans"]  # flash attention "auto", now resolved
            problems = shape_problems(self._fingerprint, shape, n_vocab)
            if problems:
                raise ValueError(f"DeltaKVCache bound to a {self._fingerprint['model_desc']} context was given the state "
                                 f"of another context: {'; '.join(problems)} (pass llm= the Llama the cache is set on)")
            return self._fingerprint
        fp = state_fingerprint(value, shape)
        learned = self._learned
        if "v_trans" not in shape.fields:
            return fp  # an empty state shows no K/V layout: nothing to learn, and never served
        if self._fingerprint is None:
            self._fingerprint = fp
        elif fp != self._fingerprint:
            if not learned.conflicting:
                learned.conflicting = True
                differs = sorted(k for k in fp.keys() | self._fingerprint.keys() if fp.get(k) != self._fingerprint.get(k))
                warnings.warn(f"DeltaKVCache without llm= was given states of two different contexts ({', '.join(differs)} "
                              "differ); it cannot tell which one asks and serves nothing from now on: give each "
                              "Llama its own DeltaKVCache(..., llm=llm)", RuntimeWarning, stacklevel=3)
            return fp
        rows, n_tokens = int(np.shape(value.scores)[0]), int(value.n_tokens)
        if rows < n_tokens:
            learned.score_rows = rows  # scores is capped: this is its size
        learned.score_rows_at_least = max(learned.score_rows_at_least, rows)
        seen = learned.section_cells_at_least
        for i, n in enumerate(shape.section_cells):
            if i < len(seen):
                seen[i] = max(seen[i], n)
            else:
                seen.append(n)
        return fp
