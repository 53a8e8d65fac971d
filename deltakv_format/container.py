"""The .dkv container: a GGUF v3 file with checksums, a reserved header region and crash-safe append.

Writing a new file goes through a temporary file, fsync and an atomic rename.
Appending writes the new tensors after the committed end of the file, then
commits the new header through a redo journal (``<path>-journal``): the file on
disk is always the complete old or the complete new snapshot (SPEC.md, "Append").

Only writers change a file. Recovering an interrupted append's journal is a step of
every writer (:func:`recover_journal`, done by :func:`write_container` and
:meth:`DkvFile.open_for_append`); a reader that finds a committed journal reads the
journal's header in place of the file's and leaves both alone.
"""

from __future__ import annotations

import contextlib
import io
import mmap
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import crc32c as _crc32c
import numpy as np

from .constants import (
    ALIGNMENT,
    ARCHITECTURE,
    FORMAT_VERSION,
    READABLE_VERSIONS,
    GGML_BLOCK_SIZES,
    HEADER_RESERVE_APPENDS,
    HEADER_RESERVE_MIN,
    HEADER_RESERVE_PAYLOAD_DIVISOR,
    JOURNAL_HEADER,
    JOURNAL_MAGIC,
    JOURNAL_PREAMBLE_BYTES,
    JOURNAL_SUFFIX,
    JOURNAL_VERSION,
    GGMLType,
    GGUFValueType,
)
from .errors import (
    BadMagicError,
    ChecksumError,
    CorruptError,
    DeltaKVError,
    TruncatedError,
    UnsupportedVersionError,
)
from .gguf_io import GGUFHeader, KeyValue, TensorInfo, align_up, pack_header, parse_header

KEY_HEADER_CRC = "deltakv.header_crc32c"
KEY_TENSOR_CRC = "deltakv.tensor_crc32c"
KEY_RESERVE = "deltakv.header_reserve"
KEY_VERSION = "deltakv.version"



def crc32c(data, crc: int = 0) -> int:
    """CRC-32C (Castagnoli): catches every single-bit error and every burst up to 32 bits."""
    return _crc32c.crc32c(data, crc)


def element_view_dtype(ggml_type: int) -> np.dtype:
    """How a tensor's bytes are viewed: element bit patterns for floats, bytes for blocks."""
    return {
        GGMLType.F16: np.dtype("<u2"),
        GGMLType.BF16: np.dtype("<u2"),
        GGMLType.F32: np.dtype("<u4"),
        GGMLType.I32: np.dtype("<i4"),
        GGMLType.I8: np.dtype("u1"),
    }.get(ggml_type, np.dtype("u1"))


@dataclass
class TensorData:
    """A tensor to write: ``shape`` in GGUF order (innermost first), ``data`` its bytes."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]
    data: object  # bytes-like / contiguous numpy array

    def nbytes(self) -> int:
        return TensorInfo(self.name, self.shape, self.ggml_type, 0).nbytes


# ---- header building ----------------------------------------------------------------


def _with_crc_fields(kvs: list[KeyValue], tensor_crcs: list[int], reserve: int) -> list[KeyValue]:
    """Order: header CRC first (so its value sits at a fixed place), then the caller's keys,
    the tensor CRCs, and the reserve padding last."""
    out = [KeyValue(KEY_HEADER_CRC, GGUFValueType.UINT32, 0)]
    out += [kv for kv in kvs if kv.key not in (KEY_HEADER_CRC, KEY_TENSOR_CRC, KEY_RESERVE)]
    out.append(KeyValue(KEY_TENSOR_CRC, GGUFValueType.ARRAY, np.asarray(tensor_crcs, np.uint32), GGUFValueType.UINT32))
    out.append(KeyValue(KEY_RESERVE, GGUFValueType.ARRAY, np.zeros(reserve, np.uint8), GGUFValueType.UINT8))
    return out


def _header_crc_offset(kvs_first_key: str = KEY_HEADER_CRC) -> int:
    # magic(4) version(4) n_tensors(8) n_kv(8) key_len(8) key type(4)
    return 24 + 8 + len(kvs_first_key.encode()) + 4


HEADER_CRC_VALUE_OFFSET = _header_crc_offset()


def header_reserve(bare: int, payload: int, growth: int | None = None) -> int:
    """How many bytes of ``deltakv.header_reserve`` a new file gets (SPEC.md section 2, rule 3).

    ``bare``: the header's size without reserve; ``payload``: the bytes of its data section;
    ``growth``: how many bytes one append adds to the header (the session layer knows:
    :func:`session_writer.segment_header_growth`), or None for a container of unknown use.

    A full reserve lets appends rewrite the header in place; once it is used up, the next append
    rewrites the whole file (SPEC.md section 8), which costs O(file). A session's reserve is room
    for HEADER_RESERVE_APPENDS appends, capped at 1/HEADER_RESERVE_PAYLOAD_DIVISOR of the payload:
    a fixed 64 KiB reserve (until issue 12) made the header 15% of a 63-token SmolLM2 session. The
    cap keeps the reserve within ~3% of any file, and it only binds where a rewrite is cheap:
    a session then holds at least payload / (DIVISOR * growth) appends in place, so rewriting the
    file every that many appends costs each append about DIVISOR * growth bytes of writing on
    average, whatever the session's size (an in-place append writes its header twice anyway,
    journal and file). The floor leaves room for small changes. Readers accept any reserve.
    Without ``growth``, the header may double (the rule of the first writers).
    """
    if growth is None:
        return max(HEADER_RESERVE_MIN, bare)
    return max(HEADER_RESERVE_MIN, min(HEADER_RESERVE_APPENDS * growth, payload // HEADER_RESERVE_PAYLOAD_DIVISOR))


def build_header(kvs: list[KeyValue], tensors: list[TensorInfo], tensor_crcs: list[int], data_start: int | None,
                 growth: int | None = None) -> bytes:
    """Header bytes exactly ``data_start`` long (the reserve fills the gap), with its CRC set.

    With ``data_start=None`` the smallest aligned header with the reserve :func:`header_reserve`
    gives (``growth``: one append's header growth) is built.
    Returns b"" if the header does not fit in ``data_start`` bytes.
    """
    bare = len(pack_header(_with_crc_fields(kvs, tensor_crcs, 0), tensors))
    if data_start is None:
        payload = max((t.offset + t.nbytes for t in tensors), default=0)
        data_start = align_up(bare + header_reserve(bare, payload, growth), ALIGNMENT)
    reserve = data_start - bare
    if reserve < 0:
        return b""
    header = bytearray(pack_header(_with_crc_fields(kvs, tensor_crcs, reserve), tensors))
    if len(header) != data_start:  # the reserve's own length word can only shift it by whole bytes
        raise DeltaKVError(f"header is {len(header)} bytes, expected exactly data_start = {data_start}")
    crc = crc32c(bytes(header))
    struct.pack_into("<I", header, HEADER_CRC_VALUE_OFFSET, crc)
    return bytes(header)


def header_crc(buf, data_start: int) -> int:
    """CRC-32C of the header with the CRC value's own four bytes taken as zero."""
    crc = crc32c(bytes(buf[:HEADER_CRC_VALUE_OFFSET]))
    crc = crc32c(b"\0\0\0\0", crc)
    return crc32c(bytes(buf[HEADER_CRC_VALUE_OFFSET + 4:data_start]), crc)


def layout_tensors(tensors: list[TensorData], first_offset: int = 0) -> list[TensorInfo]:
    infos = []
    offset = first_offset
    for t in tensors:
        offset = align_up(offset, ALIGNMENT)
        infos.append(TensorInfo(t.name, tuple(t.shape), t.ggml_type, offset))
        offset += t.nbytes()
    return infos


def _as_bytes(data) -> memoryview:
    if isinstance(data, np.ndarray):
        data = np.ascontiguousarray(data)
        return memoryview(data).cast("B")
    return memoryview(data).cast("B")


def _write_tensors(f, tensors: list[TensorData], infos: list[TensorInfo], data_start: int, progress=None) -> list[int]:
    crcs = []
    pos = f.tell()
    for t, info in zip(tensors, infos):
        target = data_start + info.offset
        if target > pos:
            f.write(b"\0" * (target - pos))
        raw = _as_bytes(t.data)
        if len(raw) != info.nbytes:
            raise DeltaKVError(f"tensor {t.name!r}: {len(raw)} bytes given, its shape and type need {info.nbytes}")
        f.write(raw)
        crcs.append(crc32c(raw))
        pos = target + info.nbytes
        if progress is not None:
            progress(info.nbytes)
    return crcs


def _default_mode() -> int:
    """rw for whom the umask allows: mkstemp's 0600 would make saved sessions private by accident."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_stale_temps(path: Path) -> None:
    """Delete the temporary files ``.{name}.*.tmp`` that killed writers of ``path`` left behind.

    A live writer holds an exclusive flock on its temporary file; the lock dies with the process,
    so a temporary file whose lock can be taken belongs to a dead writer.
    """
    import fcntl
    import glob

    for tmp in glob.glob(os.path.join(glob.escape(str(path.parent)), f".{glob.escape(path.name)}.*.tmp")):
        try:
            fd = os.open(tmp, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue  # its writer is alive
        try:
            os.unlink(tmp)
        except OSError:
            pass
        finally:
            os.close(fd)


def temp_file_for(path) -> tuple[int, str]:
    """A new temporary file in ``path``'s folder (``.{name}.XXXXXXXX.tmp``), flock-ed for as long
    as this process lives; stale ones left by killed writers are removed first."""
    import fcntl

    path = Path(path)
    _remove_stale_temps(path)
    while True:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        fcntl.flock(fd, fcntl.LOCK_EX)
        if os.fstat(fd).st_nlink:
            return fd, tmp
        os.close(fd)  # a concurrent cleaner took it between mkstemp and flock: take another


def base_kvs() -> list[KeyValue]:
    return [
        KeyValue("general.architecture", GGUFValueType.STRING, ARCHITECTURE),
        KeyValue("general.alignment", GGUFValueType.UINT32, ALIGNMENT),
        KeyValue(KEY_VERSION, GGUFValueType.UINT32, FORMAT_VERSION),
    ]


@contextlib.contextmanager
def replacing_file(path: Path):
    """A file object whose content replaces ``path`` atomically on success (temp file in the same
    folder, fsync, rename, fsync of the folder); on any failure the temp file goes and ``path`` stays."""
    path = Path(path)
    fd, tmp = temp_file_for(path)
    try:
        os.fchmod(fd, _default_mode())
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_container(path, kvs: list[KeyValue], tensors: list[TensorData], progress=None, *, growth: int | None = None) -> int:
    """Write a complete .dkv atomically: temp file in the same folder, fsync, rename. Returns the
    size of the file written. ``growth``: one append's header growth, which sizes the header
    reserve (:func:`header_reserve`).

    An interrupted append's journal for ``path`` is recovered first: left behind, it would be read
    as a committed header of the new file."""
    path = Path(path)
    recover_journal(path)
    infos = layout_tensors(tensors)
    # First pass sizes the header; CRCs are only known after the data is written.
    provisional = build_header(kvs, infos, [0] * len(infos), None, growth)
    data_start = len(provisional)
    with replacing_file(path) as f:
        f.write(provisional)
        crcs = _write_tensors(f, tensors, infos, data_start, progress)
        file_size = f.tell()
        header = build_header(kvs, infos, crcs, data_start)
        f.seek(0)
        f.write(header)
    return file_size


def _write_all(stream, data) -> None:
    """``stream.write(data)`` until every byte is taken: a raw stream (a socket, a pipe opened
    unbuffered) may take fewer bytes than it is given."""
    view = memoryview(data).cast("B")
    while view:
        n = stream.write(view)
        if n is None:
            if isinstance(stream, io.RawIOBase):  # io's word for "would block"
                raise DeltaKVError(f"the stream took none of {len(view)} bytes: expected a blocking binary "
                                   f"stream, found a non-blocking {type(stream).__name__}")
            return  # a file-like object that returns nothing from write takes everything
        view = view[n:]


def write_container_to(stream, kvs: list[KeyValue], tensors: list[TensorData], progress=None, *,
                       growth: int | None = None) -> int:
    """Write a complete .dkv to a writable binary ``stream``, front to back; returns its size.

    The bytes are those :func:`write_container` puts in a file. They are written in order without
    seeking (write_container fills the tensor checksums in after the data; here they are computed
    first, from the tensors in memory), so a pipe, a socket or an upload will do. Nothing here is
    atomic: whoever reads the stream sees the bytes as they come (a store makes them appear at once).
    """
    infos = layout_tensors(tensors)
    crcs = []
    for t, info in zip(tensors, infos):
        raw = _as_bytes(t.data)
        if len(raw) != info.nbytes:
            raise DeltaKVError(f"tensor {t.name!r}: {len(raw)} bytes given, its shape and type need {info.nbytes}")
        crcs.append(crc32c(raw))
    header = build_header(kvs, infos, crcs, None, growth)  # its size does not depend on the checksums' values
    _write_all(stream, header)
    data_start = pos = len(header)
    for t, info in zip(tensors, infos):
        target = data_start + info.offset
        if target > pos:
            _write_all(stream, b"\0" * (target - pos))
        _write_all(stream, _as_bytes(t.data))
        pos = target + info.nbytes
        if progress is not None:
            progress(info.nbytes)
    return pos


# ---- reading --------------------------------------------------------------------------


@dataclass
class Journal:
    committed_size: int
    header: bytes


def _read_journal(path: Path) -> Journal | None:
    """The redo journal of an interrupted append, or None if absent or incomplete."""
    jpath = Path(str(path) + JOURNAL_SUFFIX)
    try:
        if jpath.stat().st_size > JOURNAL_PREAMBLE_BYTES + os.path.getsize(path):
            return None  # a header longer than the file it commits: not a journal of this file
        raw = jpath.read_bytes()
    except FileNotFoundError:
        return None
    if len(raw) < JOURNAL_PREAMBLE_BYTES or raw[:len(JOURNAL_MAGIC)] != JOURNAL_MAGIC:
        return None
    version, committed_size, header_len, crc = JOURNAL_HEADER.unpack_from(raw, len(JOURNAL_MAGIC))
    if version != JOURNAL_VERSION or len(raw) != JOURNAL_PREAMBLE_BYTES + header_len:
        return None
    if crc32c(raw[JOURNAL_PREAMBLE_BYTES:]) != crc:
        return None  # written only partly: the main header was never touched
    if not header_len <= committed_size <= os.path.getsize(path):
        # The tensors a journal commits were fsynced before it was written, so a journal that
        # points past the end of the file belongs to another file (stale): never replay it.
        return None
    return Journal(committed_size, raw[JOURNAL_PREAMBLE_BYTES:])


def _replay_journal(path: Path, journal: Journal) -> None:
    with open(path, "r+b") as f:
        f.write(journal.header)
        f.truncate(journal.committed_size)
        f.flush()
        os.fsync(f.fileno())
    os.unlink(str(path) + JOURNAL_SUFFIX)
    _fsync_dir(path)


def _open_locked(path: Path):
    """``path`` opened for update under an exclusive flock (SPEC.md 8, step 1).

    The lock is taken on the file the path names once the lock is held: a writer that renamed a
    new file over the path while this one waited leaves it holding the lock of a file no one reads,
    so it takes the new file's instead."""
    import fcntl

    while True:
        try:
            f = open(path, "r+b")
        except FileNotFoundError as e:
            raise DeltaKVError(f"no such file: {path}") from e
        except IsADirectoryError as e:
            raise DeltaKVError(f"{path} is a folder, expected a .dkv file") from e
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            locked, named = os.fstat(f.fileno()), os.stat(path)
        except FileNotFoundError:
            f.close()
            continue  # renamed away while we waited: the next open tells whether a file is there
        except BaseException:
            f.close()
            raise
        if (locked.st_dev, locked.st_ino) == (named.st_dev, named.st_ino):
            return f
        f.close()


def _recover_locked(path: Path) -> str | None:
    jpath = Path(str(path) + JOURNAL_SUFFIX)
    if not os.path.lexists(jpath):
        return None
    journal = _read_journal(path)
    if journal is not None:
        _replay_journal(path, journal)
        return "replayed"
    os.unlink(jpath)  # short, torn or another file's: the append never committed
    return "discarded"


def recover_journal(path) -> str | None:
    """Finish or undo an interrupted append of ``path`` (SPEC.md 8, "Recovery"), under the file's
    lock: a committed journal is replayed into the file, any other journal deleted.

    A step of every writer, before it writes; readers never call it. Returns ``"replayed"``,
    ``"discarded"`` or None (no journal)."""
    path = Path(path)
    jpath = Path(str(path) + JOURNAL_SUFFIX)
    if not os.path.lexists(jpath):
        return None
    if not os.path.exists(path):
        os.unlink(jpath)  # the journal of a file that is gone commits nothing
        return "discarded"
    lock = _open_locked(path)
    try:
        return _recover_locked(path)
    finally:
        lock.close()


class DkvFile:
    """A memory-mapped .dkv file. Tensor reads are zero-copy numpy views into the map.

    ``DkvFile(path)`` only reads: where an append committed its journal but did not yet write the
    header in place, it reads the journal's header (SPEC.md 8) and leaves the file and the journal
    as they are. :meth:`open_for_append` opens the file for a writer.
    """

    def __init__(self, path, *, verify_checksums: bool = True, _locked=None):
        self.path = Path(path)
        self.verify_checksums = verify_checksums
        self._verified: set[str] = set()  # tensors whose CRC tensor() has checked
        # (lock, reader): the flock-ed descriptor a writer writes through, and one of the same file to map.
        # Two open files, because the map keeps a duplicate of the one it maps, and the header's arrays
        # keep the map open after close(): the lock must go with close() all the same.
        self._lock_file = _locked[0] if _locked is not None else None
        self.locked = _locked is not None
        # A locked file's journal was recovered when it was locked (a writer's first step).
        journal = None if self.locked else _read_journal(self.path)
        if self.locked:
            self._file = _locked[1]
        else:
            try:
                self._file = open(self.path, "rb")
            except FileNotFoundError as e:
                raise DeltaKVError(f"no such file: {self.path}") from e
            except IsADirectoryError as e:
                raise DeltaKVError(f"{self.path} is a folder, expected a .dkv file") from e
        try:
            self.file_size = os.fstat(self._file.fileno()).st_size
            if self.file_size < 24:
                raise TruncatedError(f"file is {self.file_size} bytes; a GGUF header needs at least 24", path=str(path))
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)
            self._buf = memoryview(self._map)
            header_buf = journal.header if journal is not None else self._buf
            self.header = self._parse(header_buf, verify_checksums)
        except DeltaKVError as e:
            self.close()
            if e.path is None:
                raise type(e)(e.bare_message, offset=e.offset, path=str(self.path)) from e
            raise
        except BaseException:
            self.close()
            raise

    @classmethod
    def open_for_append(cls, path, *, verify_checksums: bool = True) -> "DkvFile":
        """Open ``path`` for a writer: take its exclusive lock (held until :meth:`close`), recover an
        interrupted append's journal, then read the header (SPEC.md 8, step 1).
        :func:`append_container` takes a file opened this way."""
        path = Path(path)
        while True:
            lock = _open_locked(path)
            try:
                _recover_locked(path)
                reader = open(path, "rb")
            except BaseException:
                lock.close()
                raise
            locked, read = os.fstat(lock.fileno()), os.fstat(reader.fileno())
            if (locked.st_dev, locked.st_ino) == (read.st_dev, read.st_ino):
                return cls(path, verify_checksums=verify_checksums, _locked=(lock, reader))
            reader.close()  # a new file was renamed over the path meanwhile: lock that one
            lock.close()

    @classmethod
    def from_buffer(cls, buffer, *, verify_checksums: bool = True, name: str | None = None) -> "DkvFile":
        """A .dkv held in memory: bytes, bytearray, memoryview, mmap or any C-contiguous buffer.

        The same checks and checksums as opening a file, zero-copy: tensors are read-only numpy
        views into ``buffer``, which must not change while they live (they keep it alive). There
        is no journal handling: a journal belongs to a file on disk, and a buffer is one snapshot
        taken whole. ``name`` says in error messages where the bytes came from.
        """
        try:
            view = memoryview(buffer)
        except TypeError as e:
            raise TypeError(f"DkvFile.from_buffer: expected a bytes-like object (bytes, memoryview, mmap), "
                            f"found {type(buffer).__name__}") from e
        if not view.c_contiguous:
            raise DeltaKVError(f"DkvFile.from_buffer: expected a contiguous buffer, found a strided "
                               f"{view.ndim}-D view of shape {view.shape}", path=name)
        self = cls.__new__(cls)
        self.path = None
        self._buffer_name = name
        self.verify_checksums = verify_checksums
        self._verified = set()
        self._file = None
        self._lock_file = None
        self.locked = False  # a buffer is never appended to
        self._buf = view.cast("B").toreadonly()
        # Tensor views are taken from this array, which holds a view of the buffer that nobody
        # releases: numpy keeps no export on a memoryview it is given, so views taken from one
        # that its owner releases (a store's reader does) would point into freed memory.
        self._map = np.frombuffer(view.cast("B").toreadonly(), dtype=np.uint8)
        self.file_size = len(self._buf)
        try:
            if self.file_size < 24:
                raise TruncatedError(f"buffer is {self.file_size} bytes; a GGUF header needs at least 24")
            self.header = self._parse(self._buf, verify_checksums)
        except DeltaKVError as e:
            self.close()
            if e.path is None and name is not None:
                raise type(e)(e.bare_message, offset=e.offset, path=name) from e
            raise
        except BaseException:
            self.close()
            raise
        return self

    @property
    def name(self) -> str | None:
        """Where the bytes come from, for messages: the path, or the name given to from_buffer."""
        return str(self.path) if self.path is not None else getattr(self, "_buffer_name", None)

    # -- structure checks ---------------------------------------------------------------

    def _parse(self, header_buf, verify_checksums: bool) -> GGUFHeader:
        header = parse_header(header_buf, what=".dkv header")
        kvs = header.kvs
        arch = kvs.get("general.architecture")
        if arch is None or arch.value_type != GGUFValueType.STRING or arch.value != ARCHITECTURE:
            found = "no general.architecture" if arch is None else (
                arch.value if arch.value_type == GGUFValueType.STRING else f"a {arch.value_type.name} value")
            raise BadMagicError(f"a GGUF file but not a Delta-KV session: expected architecture {ARCHITECTURE!r}, found {found!r}")
        version = kvs.get(KEY_VERSION)
        if version is None or version.value_type != GGUFValueType.UINT32:
            raise CorruptError(f"missing {KEY_VERSION} (u32)")
        if version.value not in READABLE_VERSIONS:
            raise UnsupportedVersionError(
                f"Delta-KV format version {version.value}; this reader implements versions "
                f"{', '.join(map(str, READABLE_VERSIONS))}",
                offset=version.value_offset,
            )
        first = next(iter(kvs))
        if first != KEY_HEADER_CRC or kvs[first].value_type != GGUFValueType.UINT32:
            raise CorruptError(f"the first key must be {KEY_HEADER_CRC} (u32), found {first!r}")
        data_start = header.data_start
        if data_start > len(header_buf):
            raise TruncatedError(f"header region ends at {data_start}, the file has {len(header_buf)} bytes")
        stored = kvs[KEY_HEADER_CRC].value
        actual = header_crc(header_buf, data_start)
        if verify_checksums and stored != actual:
            raise ChecksumError(f"header checksum mismatch: stored {stored:#010x}, computed {actual:#010x}", offset=HEADER_CRC_VALUE_OFFSET)
        crcs = kvs.get(KEY_TENSOR_CRC)
        if crcs is None or crcs.element_type != GGUFValueType.UINT32 or len(crcs.value) != len(header.tensors):
            raise CorruptError(f"{KEY_TENSOR_CRC} must hold one u32 per tensor ({len(header.tensors)})")
        end = 0
        for info in header.tensors:
            if info.offset < end:
                raise CorruptError(f"tensor {info.name!r} at data offset {info.offset} overlaps the previous tensor (ends at {end})")
            end = info.offset + info.nbytes
            if data_start + end > self.file_size:
                raise TruncatedError(
                    f"tensor {info.name!r} ends at file offset {data_start + end}, the file has {self.file_size} bytes",
                    offset=data_start + info.offset,
                )
        self.data_start = data_start
        self.data_end = data_start + end
        self.tensor_infos = {t.name: t for t in header.tensors}
        self._tensor_crc = dict(zip((t.name for t in header.tensors), (int(c) for c in crcs.value)))
        return header

    def verify(self) -> list[str]:
        """Check every tensor's CRC and that padding is zero; returns the problems found."""
        problems = []
        pos = self.data_start
        for info in self.header.tensors:
            start = self.data_start + info.offset
            if start > pos and np.frombuffer(self._buf, np.uint8, start - pos, pos).any():
                problems.append(f"non-zero padding between file offsets {pos} and {start}")
            crc = crc32c(self._buf[start:start + info.nbytes])
            if crc != self._tensor_crc[info.name]:
                problems.append(
                    f"tensor {info.name!r} (file offset {start}): checksum mismatch, stored "
                    f"{self._tensor_crc[info.name]:#010x}, computed {crc:#010x}"
                )
            pos = start + info.nbytes
        if self.file_size > self.data_end:
            problems.append(f"{self.file_size - self.data_end} bytes after the last tensor (an interrupted append?)")
        return problems

    def verify_tensor(self, name: str) -> None:
        info = self.tensor_infos[name]
        start = self.data_start + info.offset
        crc = crc32c(self._buf[start:start + info.nbytes])
        if crc != self._tensor_crc[name]:
            raise ChecksumError(
                f"tensor {name!r}: checksum mismatch, stored {self._tensor_crc[name]:#010x}, computed {crc:#010x}",
                offset=start, path=self.name,
            )
        self._verified.add(name)

    def verify_tensors(self, *, release: bool = False) -> None:
        """Check the CRC of every tensor not checked yet (raises ChecksumError on the first mismatch);
        :meth:`tensor` then reads them without checking again. ``release``: each tensor's pages leave
        the resident set once checked (:meth:`release`)."""
        for name in self.tensor_infos:
            if name not in self._verified:
                self.verify_tensor(name)
                if release:
                    self.release([name])

    def read_ahead(self) -> None:
        """Ask the OS to read the mapped tensor bytes in now (madvise WILLNEED; a no-op for a buffer
        or where the platform has no madvise): one sequential read instead of a fault per page."""
        m = self._map
        advise = getattr(mmap, "MADV_WILLNEED", None)
        if isinstance(m, mmap.mmap) and advise is not None and self.data_end > self.data_start:
            start = self.data_start - self.data_start % mmap.PAGESIZE
            try:
                m.madvise(advise, start, self.data_end - start)
            except (OSError, ValueError):
                pass  # advice only

    def release(self, names) -> None:
        """Take the mapped pages of tensors ``names`` out of this process's resident set (madvise
        DONTNEED; the page cache keeps them, a later read maps them again): a streamed reader calls
        it on what it has decoded, so that its resident set does not grow with the file. A no-op for
        a buffer or where the platform has no madvise."""
        m = self._map
        advise = getattr(mmap, "MADV_DONTNEED", None)
        if not isinstance(m, mmap.mmap) or advise is None:
            return
        for name in names:
            info = self.tensor_infos.get(name)
            if info is None or not info.nbytes:
                continue
            start = self.data_start + info.offset
            first = start - start % mmap.PAGESIZE
            try:
                m.madvise(advise, first, start + info.nbytes - first)
            except (OSError, ValueError):
                return  # advice only

    # -- access -------------------------------------------------------------------------

    @property
    def kvs(self) -> dict[str, KeyValue]:
        return self.header.kvs

    def value(self, key: str, default=...):
        kv = self.header.kvs.get(key)
        if kv is None:
            if default is ...:
                raise CorruptError(f"missing key {key!r}", path=self.name)
            return default
        return kv.value

    def has_tensor(self, name: str) -> bool:
        return name in self.tensor_infos

    def tensor(self, name: str, *, verify: bool | None = None) -> np.ndarray:
        """Zero-copy view: (rows, row elements) for 2-D tensors, element bits for float types.

        The tensor's CRC is checked on its first access (SPEC.md 2.1: a reader verifies every
        tensor it decodes), unless the file was opened with ``verify_checksums=False`` or
        ``verify=False`` is passed (for looking at shapes only).
        """
        info = self.tensor_infos.get(name)
        if info is None:
            raise CorruptError(f"missing tensor {name!r}", path=self.name)
        if (self.verify_checksums if verify is None else verify) and name not in self._verified:
            self.verify_tensor(name)
        start = self.data_start + info.offset
        raw = np.frombuffer(self._map, dtype=np.uint8, count=info.nbytes, offset=start)
        dt = element_view_dtype(info.ggml_type)
        block_values, block_bytes = GGML_BLOCK_SIZES[info.ggml_type]
        inner = info.shape[0] // block_values * block_bytes // dt.itemsize
        outer = tuple(reversed(info.shape[1:]))
        return raw.view(dt).reshape(outer + (inner,))

    def close(self) -> None:
        buf = getattr(self, "_buf", None)
        if buf is not None:
            buf.release()
            self._buf = None
        m = getattr(self, "_map", None)
        if m is not None:
            try:
                if isinstance(m, mmap.mmap):  # (from_buffer's buffer is its owner's to close)
                    m.close()
            except BufferError:
                pass  # numpy views still alive; the map closes when they go
            self._map = None
        for name in ("_file", "_lock_file"):
            f = getattr(self, name, None)
            if f is not None:
                f.close()
                setattr(self, name, None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---- append ---------------------------------------------------------------------------


def append_container(file: DkvFile, kvs: list[KeyValue], new_tensors: list[TensorData], progress=None, *,
                     growth: int | None = None) -> None:
    """Add tensors and replace the key-values of an existing .dkv, crash-safely (SPEC.md 8).

    ``file`` is the file as :meth:`DkvFile.open_for_append` opened it: locked, its journal
    recovered, its header read once. Costs O(new tensors + header): new data goes after the
    committed end; the new header is made durable in the journal before it overwrites the old one
    in place. If the reserved header region is too small, the file is rewritten (atomic rename),
    with a new reserve sized by ``growth`` as :func:`write_container` sizes it.
    ``file`` still describes the snapshot it was opened on; close it (the lock goes with it).
    """
    if not file.locked:
        raise DeltaKVError(f"append_container({file.path}): expected a file opened with DkvFile.open_for_append "
                           f"(it holds the file's lock), found one opened read-only")
    path = file.path
    old_infos = list(file.header.tensors)
    old_crcs = [file._tensor_crc[t.name] for t in old_infos]
    data_start = file.data_start
    committed_end = file.data_end
    clash = [t.name for t in new_tensors if t.name in file.tensor_infos]
    if clash:
        raise DeltaKVError(f"append would redefine tensors {clash[:3]}")
    new_infos = layout_tensors(new_tensors, committed_end - data_start)
    header = build_header(kvs, old_infos + new_infos, old_crcs + [0] * len(new_infos), data_start)
    if not header:
        old_tensors = [TensorData(t.name, t.ggml_type, t.shape, file._buf[data_start + t.offset:data_start + t.offset + t.nbytes])
                       for t in old_infos]
        write_container(path, kvs, old_tensors + new_tensors, progress, growth=growth)
        return
    # Written through the locked descriptor: the file whose header was read, whatever the path names now.
    f = file._lock_file
    f.truncate(committed_end)  # drop the leftovers of an append that never committed
    f.seek(committed_end)
    new_crcs = _write_tensors(f, new_tensors, new_infos, data_start, progress)
    f.flush()
    os.fsync(f.fileno())
    committed_size = f.tell()
    header = build_header(kvs, old_infos + new_infos, old_crcs + new_crcs, data_start)
    jpath = Path(str(path) + JOURNAL_SUFFIX)
    with open(jpath, "wb") as j:
        j.write(JOURNAL_MAGIC + JOURNAL_HEADER.pack(JOURNAL_VERSION, committed_size, len(header), crc32c(header)))
        j.write(header)
        j.flush()
        os.fsync(j.fileno())
    _fsync_dir(path)
    f.seek(0)
    f.write(header)
    f.flush()
    os.fsync(f.fileno())
    os.unlink(jpath)
    _fsync_dir(path)
