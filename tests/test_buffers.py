"""A .dkv in memory: written to a stream or as bytes, read from a buffer, with the file's checks.

The bytes are the ones a path write produces; a buffer reader accepts and refuses exactly what the
path reader accepts and refuses (same error class, same message), zero-copy and read-only.
"""

from __future__ import annotations

import io
import mmap
import random
import struct

import numpy as np
import pytest

from deltakv_format.container import HEADER_CRC_VALUE_OFFSET, DkvFile, TensorData, base_kvs, write_container, write_container_to
from deltakv_format.constants import GGMLType
from deltakv_format.errors import ChecksumError, CorruptError, DeltaKVError, TruncatedError
from deltakv_format.session import DkvSession, session_bytes, write_session

from .synthetic import SyntheticContext, same_state

CODECS = ["raw", "f16", "q8_0", "q4_0", "delta-q4_0", "dkv-q4"]


@pytest.fixture(scope="module")
def state():
    return SyntheticContext(v_trans=1, n_layer=2).state(70)


@pytest.fixture(scope="module")
def dkv_bytes(state):
    return session_bytes(state, "dkv-q4")


# ---- writing ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", CODECS)
def test_session_bytes_are_the_bytes_of_a_path_write(tmp_path, state, codec):
    write_session(state, tmp_path / "s.dkv", codec, k_codec="q8_0").close()
    assert session_bytes(state, codec, k_codec="q8_0") == (tmp_path / "s.dkv").read_bytes()


def test_write_session_to_a_stream_returns_nothing_and_writes_the_same_bytes(tmp_path, state):
    stream = io.BytesIO()
    assert write_session(state, codec="raw", to=stream) is None
    write_session(state, tmp_path / "s.dkv", "raw").close()
    assert stream.getvalue() == (tmp_path / "s.dkv").read_bytes()
    with pytest.raises(TypeError, match="expected a path or to= a binary stream, found both"):
        write_session(state, tmp_path / "t.dkv", "raw", to=io.BytesIO())
    with pytest.raises(TypeError, match="found neither"):
        write_session(state, codec="raw")
    assert not (tmp_path / "t.dkv").exists()


class WriteOnly:
    """A stream that can only be written to (a pipe, a socket, an upload), taking at most
    ``take`` bytes per call as a raw stream may."""

    def __init__(self, take=None):
        self.chunks = []
        self.take = take

    def write(self, data):
        data = bytes(memoryview(data).cast("B")[: self.take])
        self.chunks.append(data)
        return len(data)


def test_write_container_to_never_seeks_and_survives_short_writes(tmp_path):
    kvs = base_kvs()
    tensors = [TensorData("a", GGMLType.I32, (5,), np.arange(5, dtype="<i4")),
               TensorData("b", GGMLType.F32, (3, 2), np.ones(6, "<f4").view("<u4")),
               TensorData("c", GGMLType.I8, (1,), b"\x07")]
    write_container(tmp_path / "c.dkv", kvs, tensors)
    expected = (tmp_path / "c.dkv").read_bytes()
    for stream in (WriteOnly(), WriteOnly(take=7)):
        assert write_container_to(stream, kvs, tensors) == len(expected)
        assert b"".join(stream.chunks) == expected
    with pytest.raises(DeltaKVError, match="tensor 'a': 16 bytes given, its shape and type need 20"):
        write_container_to(io.BytesIO(), kvs, [TensorData("a", GGMLType.I32, (5,), np.arange(4, dtype="<i4"))])


def test_a_non_blocking_raw_stream_that_takes_nothing_is_refused():
    class Full(io.RawIOBase):
        def writable(self):
            return True

        def write(self, data):
            return None  # io's "it would block"

    with pytest.raises(DeltaKVError, match="expected a blocking binary stream, found a non-blocking Full"):
        write_container_to(Full(), base_kvs(), [TensorData("a", GGMLType.I8, (1,), b"\x01")])


# ---- reading ------------------------------------------------------------------------------------------


def as_mmap(raw: bytes) -> mmap.mmap:
    m = mmap.mmap(-1, len(raw))
    m.write(raw)
    return m


BUFFER_KINDS = {
    "bytes": bytes, "bytearray": bytearray, "memoryview": memoryview, "mmap": as_mmap,
    "numpy": lambda raw: np.frombuffer(raw, np.uint8), "2-D numpy": lambda raw: np.frombuffer(raw, np.uint8).reshape(1, -1),
}


@pytest.mark.parametrize("kind", sorted(BUFFER_KINDS))
def test_a_buffer_reads_as_the_file_does(tmp_path, state, dkv_bytes, kind):
    path = tmp_path / "s.dkv"
    path.write_bytes(dkv_bytes)
    buffer = BUFFER_KINDS[kind](dkv_bytes)
    with DkvFile(path) as by_path, DkvFile.from_buffer(buffer) as by_buffer:
        assert by_buffer.path is None and by_buffer.name is None
        assert (by_buffer.data_start, by_buffer.data_end, by_buffer.file_size) == (
            by_path.data_start, by_path.data_end, by_path.file_size)
        assert list(by_buffer.kvs) == list(by_path.kvs)
        for name in by_path.tensor_infos:
            a, b = by_path.tensor(name), by_buffer.tensor(name)
            assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), name
        assert by_buffer.verify() == []
    with DkvSession.from_buffer(buffer) as s:
        assert same_state(state, s.to_llama_state(), payload=False)
        assert s.n_tokens == 70


def test_buffer_tensors_are_read_only_views_that_keep_the_bytes_alive(dkv_bytes):
    owner = bytearray(dkv_bytes)
    view = memoryview(owner)
    f = DkvFile.from_buffer(view)
    name = max(f.tensor_infos, key=lambda n: f.tensor_infos[n].nbytes)
    tensor = f.tensor(name)
    assert np.shares_memory(tensor, np.frombuffer(owner, np.uint8))  # zero-copy
    assert not tensor.flags.writeable
    with pytest.raises(ValueError):
        tensor[...] = 0
    expected = tensor.copy()
    f.close()
    view.release()  # the caller lets go of its view, as a store's reader does ...
    with pytest.raises(BufferError):
        owner.extend(b"x")  # ... but the tensor still pins the buffer: it cannot move or be freed
    assert np.array_equal(tensor, expected)
    del tensor, f  # (the parsed header's arrays are views too)
    owner.extend(b"x")  # once the last view is gone the buffer is its owner's again


def test_a_buffer_that_is_not_bytes_or_not_contiguous_is_refused(dkv_bytes):
    with pytest.raises(TypeError, match="expected a bytes-like object .* found str"):
        DkvFile.from_buffer("not bytes")
    strided = np.frombuffer(dkv_bytes * 2, np.uint8)[::2]
    with pytest.raises(DeltaKVError, match="expected a contiguous buffer, found a strided 1-D view"):
        DkvFile.from_buffer(strided)


def test_errors_name_the_buffer_when_it_has_a_name(dkv_bytes):
    broken = bytearray(dkv_bytes)
    broken[HEADER_CRC_VALUE_OFFSET] ^= 0x01  # the stored header checksum itself
    with pytest.raises(ChecksumError) as named:
        DkvSession.from_buffer(broken, name="redis://cache/abc.dkv")
    assert str(named.value).startswith("redis://cache/abc.dkv: ")
    with pytest.raises(ChecksumError) as unnamed:
        DkvFile.from_buffer(broken)
    assert str(unnamed.value).startswith("offset ")
    with DkvFile.from_buffer(dkv_bytes, name="mem") as f:
        with pytest.raises(CorruptError, match="^mem: missing tensor 'nope'"):
            f.tensor("nope")
    with pytest.raises(TruncatedError, match="buffer is 10 bytes; a GGUF header needs at least 24"):
        DkvFile.from_buffer(dkv_bytes[:10])


def test_trailing_bytes_in_a_buffer_are_reported_as_in_a_file(tmp_path, dkv_bytes):
    (tmp_path / "s.dkv").write_bytes(dkv_bytes + b"\0" * 5)
    with DkvFile(tmp_path / "s.dkv") as by_path, DkvFile.from_buffer(dkv_bytes + b"\0" * 5) as by_buffer:
        assert by_buffer.verify() == by_path.verify() == ["5 bytes after the last tensor (an interrupted append?)"]


def outcome(open_session, source):
    """What a reader makes of a .dkv: its error (class and message without the location) or
    its tokens, verify() problems and rebuilt state's payload sizes."""
    try:
        with open_session(source) as s:
            return ("ok", s.n_tokens, tuple(s.file.verify()), s.source_bytes())
    except DeltaKVError as e:
        return (type(e).__name__, e.bare_message, e.offset)


def test_buffer_and_path_readers_accept_and_refuse_the_same_mutations(tmp_path, dkv_bytes):
    rng = random.Random(11)
    with DkvFile.from_buffer(dkv_bytes) as f:
        data_start, size = f.data_start, f.file_size
    path = tmp_path / "m.dkv"
    kinds = {"ok": 0}
    for i in range(240):
        raw = bytearray(dkv_bytes)
        if i % 4 == 0:
            raw = raw[: rng.randrange(0, size)]  # truncated
        elif i % 4 == 1:
            at = rng.randrange(0, data_start)
            struct.pack_into("<B", raw, at, rng.randrange(256))  # a header byte
        elif i % 4 == 2:
            at = rng.randrange(0, min(data_start, 600))
            struct.pack_into("<Q", raw, at, rng.choice([0, 1, 1 << 40, (1 << 64) - 1]))  # a size field, maybe
        else:
            raw[rng.randrange(data_start, size)] ^= 1 << rng.randrange(8)  # a payload bit
        path.write_bytes(raw)
        by_path = outcome(DkvSession, path)
        by_buffer = outcome(DkvSession.from_buffer, bytes(raw))
        assert by_buffer == by_path, i
        kinds[by_path[0]] = kinds.get(by_path[0], 0) + 1
    assert len(kinds) >= 4, kinds  # the mutations reached several checks
