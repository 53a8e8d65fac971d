"""Typed view of a llama.cpp state: what ``llama_state.parse_state`` produces and ``write_state`` consumes.

A llama.cpp state is framing (file magic, version, token field, sequence prefix),
a body (arch string, legacy outputs, memory modules) and, inside the attention KV
caches, per-layer K/V payloads. Everything that is not a K/V payload is kept as
exact bytes or as the integers it was read from, so that writing the parsed
state back yields the input byte for byte.

K/V payloads are exposed token-major ("one row per cell"): ``KVTensor.rows()``
returns a ``(cell_count, n_values)`` view of element bit patterns for float
types, or ``(cell_count, row_bytes)`` bytes for quantized types. A transposed V
(``v_trans == 1``) is stored by llama.cpp channel-major; ``rows()`` transposes
it and ``KVTensor.payload_from_rows`` transposes back.

Which parts a body has depends on its :class:`BodyLayout`, whose traits (one row per layout)
live with the other format tables in ``constants.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from .constants import FLOAT_TYPES, GGML_BLOCK_SIZES, PACKED_TOKENS_MARKER, BodyLayout, GGMLType


class Framing(str, Enum):
    """How the state reached the user (docs/llama-state.md, "The four ways a state reaches a user")."""

    SESSION_FILE = "ggsn"  # llama_state_save_file
    SEQUENCE_FILE = "ggsq"  # llama_state_seq_save_file, llama-server slot save
    STATE = "state"  # llama_state_get_data (whole context, in memory)
    SEQ_STATE = "seqstate"  # llama_state_seq_get_data (one sequence, in memory)


def element_dtype(ggml_type: int) -> np.dtype:
    """numpy dtype of one element's bit pattern for float cache types."""
    return np.dtype(np.uint32) if ggml_type == GGMLType.F32 else np.dtype(np.uint16)


@dataclass
class KVTensor:
    """One layer's K or V payload of one stream, as llama.cpp wrote it."""

    ggml_type: int
    cell_count: int
    n_values: int  # values per cell (n_embd_k_gqa or n_embd_v_gqa)
    transposed: bool  # V with v_trans == 1: element-major, as llama.cpp stores it
    data: memoryview  # exactly the payload bytes (row_bytes * cell_count)

    @property
    def is_float(self) -> bool:
        return self.ggml_type in FLOAT_TYPES

    @property
    def row_bytes(self) -> int:
        block_values, block_bytes = GGML_BLOCK_SIZES[self.ggml_type]
        return self.n_values // block_values * block_bytes

    @property
    def element_bytes(self) -> int:
        """ggml_type_size: bytes of one block (of one element for float types)."""
        return GGML_BLOCK_SIZES[self.ggml_type][1]

    def rows(self) -> np.ndarray:
        """Token-major rows: element bits (float types) or raw row bytes (others)."""
        buf = np.frombuffer(self.data, dtype=np.uint8)
        if self.is_float:
            dt = element_dtype(self.ggml_type)
            if self.transposed:
                return buf.view(dt).reshape(self.n_values, self.cell_count).T
            return buf.view(dt).reshape(self.cell_count, self.n_values)
        if self.transposed:
            # Element-major quantized V cannot exist (ggml needs flash attention for it);
            # keep the bytes channel-major so that they still round-trip.
            return buf.reshape(self.n_values, self.cell_count * self.element_bytes)
        return buf.reshape(self.cell_count, self.row_bytes)

    @staticmethod
    def payload_from_rows(rows: np.ndarray, transposed: bool) -> memoryview:
        """Inverse of :meth:`rows`: the payload bytes as llama.cpp stores them (a view of ``rows``
        when they are already laid out that way: loading a session copies each payload once less)."""
        if transposed and rows.dtype != np.uint8:
            rows = rows.T
        return memoryview(np.ascontiguousarray(rows)).cast("B")


@dataclass
class KVStream:
    """One stream of an attention KV cache (``llama_kv_cache::state_write``)."""

    cell_count: int
    cells: memoryview  # the per-cell records exactly as written (pos, n_seq_id, [ext], seq ids)
    cell_ext_bytes: int  # 0 or the size of the per-cell ext record (12 in v10+ with M-RoPE/PLE)
    v_trans: int | None  # None when cell_count == 0 (nothing else written)
    n_layer: int | None
    rot: tuple[int, int] | None  # (n_rot_k, n_rot_v) in v11, else None
    k: list[KVTensor] = field(default_factory=list)
    v: list[KVTensor] = field(default_factory=list)  # may be shorter than k (layers without V)


@dataclass
class KVCacheSection:
    """An attention KV cache; iSWA models write two (full-attention first, then SWA)."""

    has_n_stream: bool  # False only in the oldest v9 layout
    streams: list[KVStream]


APPENDIX_ROLE = "appendix"
"""Role of the bytes after a sequence file's body (llama_state_seq_load_file ignores them; newer
llama-servers append context checkpoints there): kept byte-exact, written back only into a
sequence file, never into an in-memory state."""


@dataclass
class OpaqueSection:
    """Bytes kept as they are: legacy outputs/logits/embeddings, recurrent state, a file's appendix."""

    role: str  # "outputs", "recurrent", ...
    data: memoryview


Section = KVCacheSection | OpaqueSection


@dataclass
class LlamaState:
    """A whole parsed llama.cpp state (any framing, any supported layout)."""

    framing: Framing
    layout: BodyLayout
    file_version: int | None  # ggsn/ggsq version word; None for in-memory blobs
    token_words: memoryview | None  # the token field after n_tokens, as int32 words (files only)
    seq_prefix_id: int | None  # source seq_id after 0xAF143CD8 in newer seq blobs; None if absent
    arch: str | None  # whole-context bodies only
    arch_bytes: bytes | None  # the arch string exactly as stored (kept even if not UTF-8)
    sections: list[Section] = field(default_factory=list)

    @property
    def kv_sections(self) -> list[KVCacheSection]:
        return [s for s in self.sections if isinstance(s, KVCacheSection)]

    def tokens(self) -> np.ndarray | None:
        """Plain token ids when the token field is a plain list; None for packed or absent fields."""
        if self.token_words is None:
            return None
        words = np.frombuffer(self.token_words, dtype="<i4")
        if len(words) and words[0] == PACKED_TOKENS_MARKER:
            return None  # llama-server's packed token blob
        return words
