"""DeltaKVCache: a compressed, persistent prompt cache for llama-cpp-python.

    llm.set_cache(DeltaKVCache("~/.cache/deltakv", capacity_bytes=2 << 30))

Works as llama-cpp-python's own LlamaRAMCache / LlamaDiskCache do (longest-prefix lookup,
least-recently-used eviction by bytes), but each entry is a .dkv file: the whole llama.cpp state
compressed by a codec, the token ids, and only the last row of logits (llama-cpp-python replays
the last token after a cache load, so no more is needed) instead of n_tokens x n_vocab floats.
Entries survive a restart: the folder is the cache.
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path

import numpy as np
from llama_cpp.llama import Llama
from llama_cpp.llama import LlamaState as LlamaCppState
from llama_cpp.llama_cache import BaseLlamaCache

from deltakv_format.codecs import get_codec
from deltakv_format.constants import DEFAULT_CODEC, GGMLType, GGUFValueType
from deltakv_format.container import TensorData
from deltakv_format.errors import DeltaKVError
from deltakv_format.gguf_io import KeyValue
from deltakv_format.llama_state import parse_state, write_state
from deltakv_format.session import DkvSession, write_session
from deltakv_format.state_model import Framing

KEY_N_TOKENS = "deltakv.runtime.n_tokens"
KEY_SEED = "deltakv.runtime.seed"
KEY_SCORES_SHAPE = "deltakv.runtime.scores_shape"
TENSOR_INPUT_IDS = "runtime.input_ids"
TENSOR_LAST_LOGITS = "runtime.last_logits"


class DeltaKVCache(BaseLlamaCache):
    """A llama-cpp-python prompt cache of .dkv files in ``directory``, at most ``capacity_bytes`` on disk."""

    def __init__(self, directory, capacity_bytes: int = 2 << 30, codec: str = DEFAULT_CODEC, *,
                 k_codec: str | None = None, v_codec: str | None = None):
        """``codec`` codes the cached states; ``k_codec`` / ``v_codec`` give K or V another one
        (``k_codec="q8_0"``: q8_0-level quality at 0.42 of f16, eval/EVAL.md)."""
        super().__init__(capacity_bytes)
        self.directory = Path(directory).expanduser()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.codec = get_codec(codec)
        self.k_codec = get_codec(k_codec) if k_codec else None
        self.v_codec = get_codec(v_codec) if v_codec else None
        self._entries: OrderedDict[tuple[int, ...], Path] = OrderedDict()  # least recently used first
        self._scan()

    def _scan(self) -> None:
        """Rebuild the index from the folder, oldest access first (a restart keeps the cache)."""
        found = []
        for path in self.directory.glob("*.dkv"):
            try:
                with DkvSession(path, verify_checksums=True) as s:
                    ids = tuple(int(t) for t in s.file.tensor(TENSOR_INPUT_IDS))
            except (DeltaKVError, OSError):
                continue  # a foreign or damaged file is not ours to use
            found.append((path.stat().st_mtime_ns, ids, path))
        for _, ids, path in sorted(found):
            self._entries[ids] = path

    @property
    def cache_size(self) -> int:
        total = 0
        for path in self._entries.values():
            try:
                total += path.stat().st_size
            except FileNotFoundError:
                pass
        return total

    def _find_longest_prefix_key(self, key: tuple[int, ...]) -> tuple[int, ...] | None:
        best, best_len = None, 0
        for k in self._entries:
            n = Llama.longest_token_prefix(k, key)
            if n > best_len:
                best, best_len = k, n
        return best

    def __contains__(self, key) -> bool:
        return self._find_longest_prefix_key(tuple(key)) is not None

    def __getitem__(self, key) -> LlamaCppState:
        found = self._find_longest_prefix_key(tuple(key))
        if found is None:
            raise KeyError("no cached state shares a prefix with these tokens")
        path = self._entries[found]
        try:
            with DkvSession(path) as s:
                state = s.to_llama_state()
                ids = np.array(s.file.tensor(TENSOR_INPUT_IDS), dtype=np.intc)
                last = np.array(s.file.tensor(TENSOR_LAST_LOGITS)).view(np.float32).reshape(-1)
                shape = tuple(int(v) for v in s.file.value(KEY_SCORES_SHAPE))
                n_tokens = int(s.file.value(KEY_N_TOKENS))
                seed = int(s.file.value(KEY_SEED))
        except (DeltaKVError, OSError) as e:
            self._entries.pop(found, None)
            raise KeyError(f"cached state {path} is unreadable: {e}") from e
        blob = write_state(state)
        scores = np.zeros(shape, dtype=np.single)
        if shape[0]:
            scores[-1, : last.size] = last
        self._entries.move_to_end(found)
        os.utime(path)
        return LlamaCppState(input_ids=ids, scores=scores, n_tokens=n_tokens, llama_state=blob,
                             llama_state_size=len(blob), seed=seed)

    def __setitem__(self, key, value: LlamaCppState) -> None:
        key = tuple(int(t) for t in key)
        state = parse_state(memoryview(value.llama_state)[: value.llama_state_size], framing=Framing.STATE)
        scores = np.asarray(value.scores, dtype=np.float32)
        last = scores[-1] if scores.shape[0] else np.zeros(0, np.float32)
        name = hashlib.sha256(np.asarray(key, dtype="<i4").tobytes()).hexdigest()[:32] + ".dkv"
        path = self.directory / name
        extra_kvs = [
            KeyValue(KEY_N_TOKENS, GGUFValueType.UINT64, int(value.n_tokens)),
            KeyValue(KEY_SEED, GGUFValueType.UINT64, int(value.seed) & (2**64 - 1)),
            KeyValue(KEY_SCORES_SHAPE, GGUFValueType.ARRAY, np.asarray(scores.shape, np.uint64), GGUFValueType.UINT64),
        ]
        ids = np.asarray(value.input_ids, dtype="<i4")
        extra_tensors = [
            TensorData(TENSOR_INPUT_IDS, GGMLType.I32, (len(ids),), ids),
            TensorData(TENSOR_LAST_LOGITS, GGMLType.F32, (last.size,), np.ascontiguousarray(last, np.float32).view(np.uint32)),
        ]
        if len(ids) == 0 or last.size == 0:
            extra_tensors = [t for t in extra_tensors if t.shape[0]]
        write_session(state, path, self.codec, k_codec=self.k_codec, v_codec=self.v_codec,
                      extra_kvs=extra_kvs, extra_tensors=extra_tensors).close()
        self._entries.pop(key, None)
        self._entries[key] = path
        while self.cache_size > self.capacity_bytes and len(self._entries) > 1:
            _, oldest = self._entries.popitem(last=False)
            try:
                oldest.unlink()
            except FileNotFoundError:
                pass
