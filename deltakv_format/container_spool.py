"""Writing a new .dkv whose tensors are made one after another, in memory that does not grow with the file.

:func:`container.write_container` takes every tensor at once: the header (tensor infos, tensor
CRCs, and a reserve sized by the payload, :func:`container.header_reserve`) comes before the data
and depends on all of it, so a writer that codes a session track by track would hold every coded
tensor until the end. A :class:`TensorSpool` writes each tensor, as it is added, to an unnamed
temporary file in the output's folder, at the offset it will have in the data section, and keeps
only its info and CRC. :meth:`TensorSpool.write_container` then builds the header exactly as
write_container does, writes it to the output's temporary file and has the kernel copy the spooled
data after it (copy_file_range: no pass through this process's memory), fsync, rename
(:func:`container.replacing_file`). The bytes are write_container's, byte for byte.

The cost: the data is written twice (spool, then output) and the folder holds both until the copy
ends. So a spool holds its tensors in memory (references, no copies) while the data section fits
``MEMORY_BUDGET`` and goes to disk only past it: the everyday session (a few thousand tokens, tens
of MB coded) is written once, as write_container writes it, and memory stays within that fixed
budget plus one track at any size. The spool is unlinked from the start (O_TMPFILE where the platform has it), so a killed
writer leaves no spool behind; the output's own temporary file is cleaned as before.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

from . import container
from .container import TensorData, _as_bytes, build_header, crc32c, recover_journal, replacing_file
from .constants import ALIGNMENT
from .errors import DeltaKVError
from .gguf_io import KeyValue, TensorInfo, align_up

COPY_CHUNK = 8 << 20
"""Bytes per read/write where copy_file_range cannot be used (another filesystem, an old kernel):
the fixed buffer of the fallback copy."""

MEMORY_BUDGET = 64 << 20
"""Bytes of coded data a spool keeps in memory before it moves them to its file (a fixed budget)."""

_COPY_FALLBACK_ERRNOS = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF, errno.EPERM}


class TensorSpool:
    """The data section of a .dkv being written, on disk as it is made.

    ``add`` tensors in file order; ``write_container`` writes the .dkv at ``path``. Use it as a
    context manager: the spool file is closed (and so deleted) however the block ends.
    ``largest_add``: the most bytes one ``add`` was given (what a caller holds at a time, for tests)."""

    def __init__(self, path, *, memory_budget: int | None = None):
        self.path = Path(path)
        self.memory_budget = MEMORY_BUDGET if memory_budget is None else memory_budget
        self._file = None  # the spool file, made once the data outgrows memory_budget
        self._held: list[TensorData] = []  # the tensors added while it fits (written from here if it never does)
        self.infos: list[TensorInfo] = []
        self.crcs: list[int] = []
        self.size = 0  # bytes of the data section so far (relative to its start)
        self.largest_add = 0

    @property
    def on_disk(self) -> bool:
        return self._file is not None

    def add(self, tensor: TensorData) -> None:
        """Append ``tensor`` at the next aligned offset (write_container's layout, layout_tensors)."""
        raw = _as_bytes(tensor.data)
        offset = align_up(self.size, ALIGNMENT)
        info = TensorInfo(tensor.name, tuple(tensor.shape), tensor.ggml_type, offset)
        if len(raw) != info.nbytes:
            raise DeltaKVError(f"tensor {tensor.name!r}: {len(raw)} bytes given, its shape and type need {info.nbytes}")
        if self._file is None and offset + info.nbytes > self.memory_budget:
            self._move_to_disk()
        if self._file is None:
            self._held.append(tensor)
        else:
            self._write_at_end(raw, offset)
        self.infos.append(info)
        self.crcs.append(crc32c(raw))
        self.size = offset + info.nbytes
        self.largest_add = max(self.largest_add, info.nbytes)

    def _write_at_end(self, raw, offset: int) -> None:
        end = self._file.tell()
        if offset > end:
            self._file.write(b"\0" * (offset - end))
        self._file.write(raw)

    def _move_to_disk(self) -> None:
        self._file = tempfile.TemporaryFile(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".spool")
        for tensor, info in zip(self._held, self.infos):
            self._write_at_end(_as_bytes(tensor.data), info.offset)
        self._held = []

    def tensor_bytes(self) -> dict[str, int]:
        return {info.name: info.nbytes for info in self.infos}

    def write_container(self, kvs: list[KeyValue], *, growth: int | None = None) -> int:
        """Write the .dkv (header of ``kvs`` and the spooled tensors) at ``path`` atomically, as
        :func:`container.write_container` would; returns its size."""
        recover_journal(self.path)  # as write_container: an old append's journal must not outlive the file
        # The header's size does not depend on the CRCs' values; building it twice, as write_container
        # does (provisional, then with the CRCs at that data_start), keeps the bytes its bytes.
        data_start = len(build_header(kvs, self.infos, [0] * len(self.infos), None, growth))
        header = build_header(kvs, self.infos, self.crcs, data_start)
        with replacing_file(self.path) as f:
            f.write(header)
            if self._file is None:  # it all fitted in memory: written once, as write_container writes it
                container._write_tensors(f, self._held, self.infos, data_start)
            else:
                self._file.flush()
                f.flush()
                _copy_data(self._file.fileno(), f.fileno(), self.size, data_start)
                f.seek(data_start + self.size)  # the copy does not move f's position; replacing_file fsyncs f
        return data_start + self.size

    def close(self) -> None:
        self._held = []
        if self._file is not None:
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _copy_data(src_fd: int, dst_fd: int, size: int, dst_offset: int) -> None:
    """Copy ``size`` bytes from the start of ``src_fd`` to ``dst_offset`` of ``dst_fd``: in the kernel
    where it can (copy_file_range), else through a fixed COPY_CHUNK buffer."""
    copied = 0
    copy_range = getattr(os, "copy_file_range", None)
    while copy_range is not None and copied < size:
        try:
            n = copy_range(src_fd, dst_fd, size - copied, copied, dst_offset + copied)
        except OSError as e:
            if e.errno not in _COPY_FALLBACK_ERRNOS:
                raise
            break
        if n == 0:
            break  # nothing more from the kernel: the fallback finishes (or finds the spool short)
        copied += n
    while copied < size:
        chunk = os.pread(src_fd, min(COPY_CHUNK, size - copied), copied)
        if not chunk:
            raise DeltaKVError(f"spool of {size} bytes ended after {copied}: the temporary file was changed")
        view = memoryview(chunk)
        while view:
            n = os.pwrite(dst_fd, view, dst_offset + copied)
            view = view[n:]
            copied += n
