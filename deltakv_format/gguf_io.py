"""GGUF v3 header serialisation and a hardened header parser.

Only what Delta-KV needs: key-values of every GGUF type, tensor infos, and
alignment. The parser never trusts a count: every length is checked against the
bytes that remain before anything is allocated, and every failure is a
:class:`~deltakv_format.errors.DeltaKVError` that names the offset.

It is the one GGUF reader of the package: the .dkv container, the model reader
(``model_info``, which reads a model's key-values only and skips its vocabulary's
strings) and the fuzz mutators (which ask where its integer fields are) all use
:func:`parse_header`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from .constants import (
    GGML_BLOCK_SIZES,
    GGUF_MAGIC,
    GGUF_VERSION,
    MAX_DIMS,
    MAX_HEADER_ITEMS,
    MAX_KEY_LENGTH,
    MAX_STRING_LENGTH,
    GGMLType,
    GGUFValueType,
)
from .errors import BadMagicError, CorruptError, LimitExceededError, TruncatedError, UnsupportedVersionError

_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_ARRAY_DTYPES = {
    GGUFValueType.UINT8: "<u1",
    GGUFValueType.INT8: "<i1",
    GGUFValueType.UINT16: "<u2",
    GGUFValueType.INT16: "<i2",
    GGUFValueType.UINT32: "<u4",
    GGUFValueType.INT32: "<i4",
    GGUFValueType.FLOAT32: "<f4",
    GGUFValueType.BOOL: "<u1",
    GGUFValueType.UINT64: "<u8",
    GGUFValueType.INT64: "<i8",
    GGUFValueType.FLOAT64: "<f8",
}


@dataclass(frozen=True)
class SkippedStrings:
    """An array of strings that ``parse_header(skip_string_arrays=True)`` skipped; only its length is kept."""

    count: int

    def __len__(self) -> int:
        return self.count


@dataclass(frozen=True)
class KeyValue:
    key: str
    value_type: GGUFValueType
    value: object  # int/float/bool/str, list[str] (or SkippedStrings), or a numpy array for numeric arrays
    element_type: GGUFValueType | None = None  # arrays only
    value_offset: int = -1  # where the value's bytes start in the file (parsed headers only)


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # GGUF order: shape[0] is the innermost (contiguous) dimension
    ggml_type: int
    offset: int  # relative to the start of the data section

    @property
    def n_values(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        block_values, block_bytes = GGML_BLOCK_SIZES[self.ggml_type]
        return self.n_values // block_values * block_bytes


@dataclass
class GGUFHeader:
    version: int
    kvs: dict[str, KeyValue]
    tensors: list[TensorInfo]
    header_end: int  # first byte after the tensor infos
    alignment: int

    @property
    def data_start(self) -> int:
        return align_up(self.header_end, self.alignment)


def align_up(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


# ---- writing ------------------------------------------------------------------------


def _pack_string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def pack_value(value_type: GGUFValueType, value, element_type: GGUFValueType | None = None) -> bytes:
    if value_type == GGUFValueType.STRING:
        return _pack_string(value)
    if value_type == GGUFValueType.ARRAY:
        if element_type == GGUFValueType.STRING:
            return struct.pack("<IQ", element_type, len(value)) + b"".join(_pack_string(s) for s in value)
        arr = np.asarray(value, dtype=_ARRAY_DTYPES[element_type])
        return struct.pack("<IQ", element_type, arr.size) + arr.tobytes()
    return struct.pack(_SCALAR_FORMATS[value_type], value)


def pack_kv(kv: KeyValue) -> bytes:
    return _pack_string(kv.key) + struct.pack("<I", kv.value_type) + pack_value(kv.value_type, kv.value, kv.element_type)


def pack_tensor_info(info: TensorInfo) -> bytes:
    out = _pack_string(info.name) + struct.pack("<I", len(info.shape))
    out += struct.pack(f"<{len(info.shape)}Q", *info.shape)
    return out + struct.pack("<IQ", info.ggml_type, info.offset)


def pack_header(kvs: list[KeyValue], tensors: list[TensorInfo]) -> bytes:
    """Header bytes up to the end of the tensor infos (no padding)."""
    parts = [GGUF_MAGIC, struct.pack("<IQQ", GGUF_VERSION, len(tensors), len(kvs))]
    parts += [pack_kv(kv) for kv in kvs]
    parts += [pack_tensor_info(t) for t in tensors]
    return b"".join(parts)


# ---- reading ------------------------------------------------------------------------


_U64 = struct.Struct("<Q")


def _item_sizes(fmt: str) -> list[int]:
    """The byte width of each item of a little-endian struct format such as ``"<IQ"`` or ``"<3Q"``."""
    sizes, repeat = [], ""
    for c in fmt.lstrip("<"):
        if c.isdigit():
            repeat += c
            continue
        sizes += [struct.calcsize("<" + c)] * int(repeat or 1)
        repeat = ""
    return sizes


class _Cursor:
    def __init__(self, buf, limit: int, what: str, fields: list | None = None):
        self.buf = buf
        self.pos = 0
        self.limit = limit
        self.what = what
        self.fields = fields  # where given: (offset, width) of every integer or float field read

    def note(self, offset: int, width: int) -> None:
        if self.fields is not None:
            self.fields.append((offset, width))

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or self.pos + n > self.limit:
            raise TruncatedError(
                f"{self.what} ends inside {what}: needed {n} bytes, {self.limit - self.pos} remain", offset=self.pos
            )
        view = memoryview(self.buf)[self.pos:self.pos + n]
        self.pos += n
        return view

    def unpack(self, fmt: str, what: str):
        size = struct.calcsize(fmt)
        if self.fields is not None:
            at = self.pos
            for width in _item_sizes(fmt):
                self.note(at, width)
                at += width
        return struct.unpack(fmt, self.take(size, what))

    def count(self, what: str, element_bytes: int, cap: int) -> int:
        at = self.pos
        (n,) = self.unpack("<Q", what)
        # A count is plausible only if its elements could fit in the bytes that remain.
        if n > cap or n * element_bytes > self.limit - self.pos:
            raise LimitExceededError(
                f"{what} is {n}, more than the {self.limit - self.pos} remaining bytes can hold (limit {cap})",
                offset=at,
            )
        return n

    def string(self, what: str, cap: int = MAX_STRING_LENGTH) -> str:
        n = self.count(f"length of {what}", 1, cap)
        at = self.pos
        raw = self.take(n, what)
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError as e:
            raise CorruptError(f"{what} is not valid UTF-8 ({e.reason})", offset=at) from e

    def skip_strings(self, n: int, what: str, cap: int = MAX_STRING_LENGTH) -> None:
        """Step over ``n`` strings, each length checked as :meth:`string` checks it, none decoded
        (a model's vocabulary: hundreds of thousands of them)."""
        buf, pos, limit = self.buf, self.pos, self.limit
        for _ in range(n):
            if limit - pos < 8:
                self.pos = pos
                self.take(8, f"length of {what}")  # raises TruncatedError with this cursor's wording
            self.note(pos, 8)
            (length,) = _U64.unpack_from(buf, pos)
            if length > cap or length > limit - pos - 8:
                raise LimitExceededError(
                    f"length of {what} is {length}, more than the {limit - pos - 8} remaining bytes can hold "
                    f"(limit {cap})", offset=pos)
            pos += 8 + length
        self.pos = pos


def _read_value(cur: _Cursor, value_type: int, key: str, skip_string_arrays: bool = False):
    if value_type == GGUFValueType.STRING:
        return cur.string(f"string value of {key!r}"), None
    if value_type == GGUFValueType.ARRAY:
        (element_type,) = cur.unpack("<I", f"array type of {key!r}")
        if element_type == GGUFValueType.STRING:
            n = cur.count(f"array length of {key!r}", 8, MAX_HEADER_ITEMS)
            if skip_string_arrays:
                cur.skip_strings(n, f"element of {key!r}")
                return SkippedStrings(n), GGUFValueType.STRING
            return [cur.string(f"element of {key!r}") for _ in range(n)], GGUFValueType.STRING
        if element_type not in _ARRAY_DTYPES:
            raise CorruptError(
                f"array of {key!r} has element type {element_type}; expected a scalar GGUF type or string",
                offset=cur.pos - 4,
            )
        dt = np.dtype(_ARRAY_DTYPES[element_type])
        n = cur.count(f"array length of {key!r}", dt.itemsize, MAX_STRING_LENGTH)
        at = cur.pos
        raw = cur.take(n * dt.itemsize, f"array of {key!r}")
        if cur.fields is not None:  # the first few entries and the last: where sizes and ends tend to be
            for i in sorted({i for i in (0, 1, 2, 3, n - 1) if 0 <= i < n}):
                cur.note(at + i * dt.itemsize, dt.itemsize)
        return np.frombuffer(raw, dtype=dt), GGUFValueType(element_type)
    if value_type not in _SCALAR_FORMATS:
        raise CorruptError(f"key {key!r} has value type {value_type}; expected 0..12", offset=cur.pos - 4)
    (value,) = cur.unpack(_SCALAR_FORMATS[value_type], f"value of {key!r}")
    return value, None


def parse_header(buf, size: int | None = None, *, what: str = "GGUF header", versions: tuple[int, ...] = (GGUF_VERSION,),
                 key_values_only: bool = False, skip_string_arrays: bool = False,
                 fields: list | None = None) -> GGUFHeader:
    """Parse a GGUF header from ``buf`` (bytes, memoryview or mmap).

    ``versions``: the GGUF versions accepted (v2 and v3 share this layout; a .dkv is v3).
    ``key_values_only``: stop after the key-values (a model's tensor infos may use ggml types this
    reader does not know); the header then has no tensors. ``skip_string_arrays``: arrays of strings
    are stepped over (every length still checked) and kept as :class:`SkippedStrings`.
    ``fields``: a list to append ``(offset, width)`` of every integer and float field read to, for
    the fuzz mutators (on an error, the fields before it are there).
    """
    limit = len(buf) if size is None else size
    cur = _Cursor(buf, limit, what, fields)
    magic = bytes(cur.take(4, "magic"))
    if magic != GGUF_MAGIC:
        raise BadMagicError(f"expected magic {GGUF_MAGIC!r} (a GGUF / .dkv file), found {magic!r}", offset=0)
    (version,) = cur.unpack("<I", "version")
    if version not in versions:
        expected = " or ".join(str(v) for v in versions)
        raise UnsupportedVersionError(f"expected GGUF version {expected}, found {version}", offset=4)
    n_tensors = cur.count("tensor count", 24, MAX_HEADER_ITEMS)
    n_kv = cur.count("key-value count", 13, MAX_HEADER_ITEMS)
    kvs: dict[str, KeyValue] = {}
    for _ in range(n_kv):
        at = cur.pos
        key = cur.string("key", MAX_KEY_LENGTH)
        if key in kvs:
            raise CorruptError(f"key {key!r} appears twice", offset=at)
        (value_type,) = cur.unpack("<I", f"type of {key!r}")
        value_offset = cur.pos
        value, element_type = _read_value(cur, value_type, key, skip_string_arrays)
        kvs[key] = KeyValue(key, GGUFValueType(value_type), value, element_type, value_offset)
    alignment = 32
    if "general.alignment" in kvs:
        kv = kvs["general.alignment"]
        alignment = kv.value if kv.value_type == GGUFValueType.UINT32 else 0
        if not alignment or alignment & (alignment - 1):
            raise CorruptError(f"general.alignment must be a power of two u32, found {kv.value!r}", offset=kv.value_offset)
    if key_values_only:
        return GGUFHeader(version, kvs, [], cur.pos, alignment)
    tensors = []
    names = set()
    for _ in range(n_tensors):
        at = cur.pos
        name = cur.string("tensor name", MAX_KEY_LENGTH)
        if name in names:
            raise CorruptError(f"tensor {name!r} appears twice", offset=at)
        names.add(name)
        (n_dims,) = cur.unpack("<I", f"dimension count of {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise CorruptError(f"tensor {name!r} has {n_dims} dimensions; expected 1..{MAX_DIMS}", offset=cur.pos - 4)
        shape = cur.unpack(f"<{n_dims}Q", f"shape of {name!r}")
        ggml_type, offset = cur.unpack("<IQ", f"type and offset of {name!r}")
        if ggml_type not in GGML_BLOCK_SIZES:
            raise CorruptError(f"tensor {name!r} has ggml type {ggml_type}, unknown to this reader", offset=cur.pos - 12)
        n_values = 1
        for d in shape:
            n_values *= d
            if n_values > 1 << 62:
                raise LimitExceededError(f"tensor {name!r} shape {shape} overflows", offset=at)
        block_values = GGML_BLOCK_SIZES[ggml_type][0]
        if shape[0] % block_values:
            raise CorruptError(
                f"tensor {name!r}: innermost dimension {shape[0]} is not a multiple of the "
                f"{GGMLType(ggml_type).name} block size {block_values}",
                offset=at,
            )
        if offset % alignment:
            raise CorruptError(f"tensor {name!r} offset {offset} is not a multiple of the alignment {alignment}", offset=at)
        tensors.append(TensorInfo(name, tuple(shape), ggml_type, offset))
    return GGUFHeader(version, kvs, tensors, cur.pos, alignment)
