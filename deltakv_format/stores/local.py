"""LocalDirectoryStore: entries are the files of one folder, written the way every .dkv is written.

A put goes through :func:`container.replacing_file`, the discipline of SPEC.md section 8: a
temporary file ``.{name}.XXXXXXXX.tmp`` in the same folder, flock-ed by its writer for as long as
the writer lives, fsync, rename over the entry, fsync of the folder; temporary files whose lock is
free (their writer died) are deleted by the next put of the same name. So the folder can be shared
by any number of processes, and by deltakv's own path readers and writers (``deltakv inspect``
reads an entry as it reads any .dkv).
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
import time
from pathlib import Path

from ..container import replacing_file
from .base import EntryInfo, EntryNotFoundError, bytes_view, check_entry_name, is_entry_name

# A FIFO or device named like an entry must not block or hang get(); regular files ignore the flag.
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


class LocalDirectoryStore:
    """A :class:`~deltakv_format.stores.SessionStore` over the folder ``directory`` (created if absent).

    Entries are the regular files whose names pass :func:`check_entry_name`; other files in the
    folder (hidden and temporary files, journals, subfolders, names with other characters) are not
    entries and are never listed, read or deleted. ``get`` maps the file (no copy); the mapping
    keeps its bytes when a later put renames a new file over it or a delete unlinks it. Changing an
    entry's file in place by other means (an editor, ``append_session``) breaks that guarantee.

    Last use is the file's modification time, set from ``time.time_ns()`` by put and touch, so the
    clock is shared by every process on the machine, and its resolution is the file system's
    (nanoseconds on ext4, XFS, btrfs, tmpfs; 2 s on FAT).
    """

    def __init__(self, directory, *, create: bool = True):
        self.directory = Path(directory).expanduser().resolve()
        if create:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
            except FileExistsError:
                pass  # a file in the way: reported below, as for create=False
        if self.directory.exists() and not self.directory.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "a store needs a folder, found a file", str(self.directory))
        if not create and not self.directory.exists():
            raise FileNotFoundError(errno.ENOENT, "no such store folder (pass create=True to make it)", str(self.directory))

    def __repr__(self) -> str:
        return f"LocalDirectoryStore({str(self.directory)!r})"

    def _path(self, name: str) -> Path:
        return self.directory / check_entry_name(name)

    def locate(self, name: str) -> str:
        return str(self._path(name))

    def get(self, name: str) -> memoryview:
        path = self._path(name)
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except FileNotFoundError:
            raise EntryNotFoundError(f"no entry {name!r} in the store", path=str(self.directory)) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file"
                raise EntryNotFoundError(f"{name!r} is {kind}, not an entry", path=str(self.directory))
            if st.st_size == 0:
                return memoryview(b"")  # mmap refuses empty files
            # The map holds its own reference to the file: closing fd below does not end it.
            return memoryview(mmap.mmap(fd, 0, access=mmap.ACCESS_READ))
        finally:
            os.close(fd)

    def put(self, name: str, data) -> None:
        path = self._path(name)
        view = bytes_view(data, f"LocalDirectoryStore.put({name!r})")
        with replacing_file(path) as f:
            f.write(view)
            # Last use is the put, on the precise clock touch() uses (the kernel's file times can
            # lag it by a clock tick); set after the data is written, since writing moves it.
            f.flush()
            _set_mtime(f.fileno(), time.time_ns())

    def delete(self, name: str) -> bool:
        path = self._path(name)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        except IsADirectoryError:
            return False  # a folder of that name is not an entry
        return True

    def list(self) -> list[EntryInfo]:
        try:
            listing = list(os.scandir(self.directory))
        except FileNotFoundError:
            return []
        entries = []
        for dirent in listing:
            if not is_entry_name(dirent.name):
                continue
            try:
                if not dirent.is_file():
                    continue
                st = dirent.stat()
            except FileNotFoundError:
                continue  # deleted since the listing
            entries.append(EntryInfo(dirent.name, st.st_size, st.st_mtime_ns))
        return entries

    def touch(self, name: str) -> None:
        path = self._path(name)
        try:
            if not path.is_file():
                raise FileNotFoundError(path)
            _set_mtime(path, time.time_ns())
        except FileNotFoundError:
            raise EntryNotFoundError(f"no entry {name!r} in the store", path=str(self.directory)) from None


def _set_mtime(file, now_ns: int) -> None:
    if isinstance(file, int) and os.utime not in os.supports_fd:
        return  # the write time stands: the kernel's clock, only coarser
    try:
        os.utime(file, ns=(now_ns, now_ns))
    except PermissionError:
        # Setting a given time needs to own the file; setting "now" needs only write access, which
        # is what a folder shared by several users grants. The kernel's "now" is the same clock, coarser.
        os.utime(file)
