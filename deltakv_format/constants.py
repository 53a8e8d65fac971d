"""The tables of the Delta-KV format: every magic number, size and name lives here.

SPEC.md is normative; ``tests/test_spec_agreement.py`` checks that the values
below are the ones SPEC.md states.
"""

from __future__ import annotations

from enum import IntEnum

# ---- the container ---------------------------------------------------------

FORMAT_VERSION = 1
"""Delta-KV format version written by this library (``deltakv.version``)."""

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
ALIGNMENT = 64
"""Byte alignment of every tensor's data (``general.alignment``)."""

ARCHITECTURE = "deltakv"
"""``general.architecture`` of a .dkv file; no llama.cpp model loader accepts it."""

HEADER_RESERVE_MIN = 64 * 1024
"""Smallest header region a writer reserves, so that appends rewrite the header in place."""

JOURNAL_SUFFIX = "-journal"
JOURNAL_MAGIC = b"DKVJ"
JOURNAL_VERSION = 1

# Hard limits a reader enforces before allocating anything (hostile sizes).
MAX_KEY_LENGTH = 65535
MAX_STRING_LENGTH = 1 << 24
MAX_HEADER_ITEMS = 1 << 24
MAX_DIMS = 4


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
CODECS = (CODEC_RAW, CODEC_F16, CODEC_Q8_0, CODEC_Q4_0, CODEC_DELTA_Q4_0, CODEC_DKV_Q4)
DEFAULT_CODEC = CODEC_DKV_Q4
DEFAULT_KEYFRAME_INTERVAL = 32
ROTATION_SIZES = (0, 16, 64, 256)
"""Allowed Walsh-Hadamard sizes: powers of four, so that 1/sqrt(size) is an exact power of two."""
