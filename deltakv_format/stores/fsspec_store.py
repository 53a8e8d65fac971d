"""FsspecStore: entries are the objects (or files) under one fsspec URL: ``s3://bucket/prefix``, ``memory://``...

Layout under the URL's path:

- ``{name}``: the entry's bytes (a whole .dkv; so ``deltakv inspect s3://bucket/prefix/name`` and
  any S3 tool see a plain object);
- ``.deltakv-last-use/{name}@{nanoseconds}``: empty marker objects whose names carry the last use,
  so that ``list`` is two listings and reads no object. A put or touch writes a new marker, then
  deletes the name's older ones; the latest marker wins where several remain (two touches at once,
  a writer killed in between).

Last use is the writing client's clock (``time.time_ns()``), not the storage's: object stores
report modification times to the second at best, and not at all for some fsspec file systems.
Processes on one machine share that clock; machines sharing a bucket share it to within their
clocks' skew (NTP keeps it to milliseconds), which is the resolution of least-recently-used order
across them. An entry without a marker (its writer died between the object and the marker) is
reported as last used at 0: the first to be evicted.

Atomic put: an object store's PUT (S3, GCS, Azure, ``memory://``) makes the new object visible
whole or not at all, so entries are written in place; s3fs sends entries of 50 MiB and more as a
multipart upload, which also appears only once complete (a killed writer leaves an incomplete
upload, invisible, that the bucket's lifecycle rule for incomplete uploads removes). Other file
systems get a temporary name beside the entry and a rename; the local one (``file://``) goes
through the same temporary file, fsync and rename as every .dkv written here.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import posixpath
import secrets
import time
from pathlib import Path

from .base import (
    EntryInfo,
    EntryNotFoundError,
    MissingDependencyError,
    StoreBackendError,
    StoreError,
    StoreUnavailableError,
    bytes_view,
    check_entry_name,
    import_optional,
    is_entry_name,
)

MARKERS = ".deltakv-last-use"
_MARKER_SEPARATOR = "@"  # never in an entry name
# File systems whose single write is atomic, so that an entry can be written in place.
OBJECT_STORE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "memory"})


def _fsspec():
    return import_optional("fsspec", "FsspecStore", "s3")


class FsspecStore:
    """A :class:`~deltakv_format.stores.SessionStore` over the folder or object prefix of an fsspec URL.

    ``FsspecStore("s3://bucket/prefix")`` needs s3fs (``pip install 'deltakv[s3]'``); its
    endpoint and credentials come from ``storage_options`` (``endpoint_url=``, ``key=``,
    ``secret=``) or from the usual AWS settings (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``...).
    ``FsspecStore(url, fs=...)`` takes a file system already made. ``get`` returns a copy of the
    object's bytes. See the module's docstring for the layout, the clock and how puts are atomic.
    """

    def __init__(self, url: str, *, fs=None, **storage_options):
        fsspec = _fsspec()
        if fs is None:
            try:
                fs, path = fsspec.core.url_to_fs(url, **storage_options)
            except ImportError as e:
                scheme = url.split("://", 1)[0]
                raise MissingDependencyError(f"store URL {url!r}: fsspec needs another package for {scheme}:// "
                                             f"({e}); for s3://: pip install 'deltakv[s3]'") from e
            except (ValueError, TypeError) as e:
                raise StoreBackendError(f"store URL {url!r}: fsspec cannot open it ({e})") from e
        else:
            path = fs._strip_protocol(url)
        self._fs, self._pid = fs, os.getpid()
        self.root = path.rstrip("/") or "/"
        self.url = fs.unstrip_protocol(self.root)
        protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
        self._local = "file" in protocols
        self._object_store = bool(protocols & OBJECT_STORE_PROTOCOLS)
        self._markers = posixpath.join(self.root, MARKERS)

    def __repr__(self) -> str:
        return f"FsspecStore({self.url!r})"

    @property
    def fs(self):
        """The file system, made anew in a child process: fsspec's async ones (s3fs) refuse to be
        used across a fork, and a store must work in every process that has it."""
        if os.getpid() != self._pid:
            self._fs = type(self._fs)(*self._fs.storage_args, **self._fs.storage_options)
            self._pid = os.getpid()
        return self._fs

    def _path(self, name: str) -> str:
        return posixpath.join(self.root, check_entry_name(name))

    def locate(self, name: str) -> str:
        return self.fs.unstrip_protocol(self._path(name))

    @contextlib.contextmanager
    def _talking(self, what: str):
        """Let OSErrors through (the contract's storage errors); wrap what the client raises besides."""
        try:
            yield
        except (StoreError, TypeError):
            raise
        except OSError as e:
            if isinstance(e, (ConnectionError, TimeoutError)):
                raise StoreUnavailableError(f"{what}: cannot reach the storage ({type(e).__name__}: {e})",
                                            path=self.url) from e
            raise
        except Exception as e:  # noqa: BLE001 - botocore, aiohttp, ... raise their own classes
            unreachable = any(word in type(e).__name__ for word in ("Connect", "Timeout", "Endpoint"))
            cls = StoreUnavailableError if unreachable else StoreBackendError
            raise cls(f"{what}: {type(e).__name__}: {e}", path=self.url) from e

    def _listing(self, path: str) -> list[dict]:
        self.fs.invalidate_cache(path)  # s3fs caches listings; other processes change them
        try:
            return self.fs.ls(path, detail=True)
        except FileNotFoundError:
            return []

    def get(self, name: str) -> memoryview:
        path = self._path(name)
        with self._talking(f"get {name!r}"):
            try:
                data = self.fs.cat_file(path)
            except (FileNotFoundError, IsADirectoryError):
                data = None
        if data is None:
            raise EntryNotFoundError(f"no entry {name!r} in the store", path=self.url)
        return memoryview(bytes(data))

    def put(self, name: str, data) -> None:
        path = self._path(name)
        view = bytes_view(data, f"FsspecStore.put({name!r})")
        with self._talking(f"put {name!r} ({view.nbytes} bytes)"):
            if self._local:
                from ..container import replacing_file

                Path(self.root).mkdir(parents=True, exist_ok=True)
                with replacing_file(Path(path)) as f:
                    f.write(view)
            elif self._object_store:
                self.fs.pipe_file(path, bytes(view))
            else:
                temporary = posixpath.join(self.root, f".{name}.{secrets.token_hex(4)}.tmp")
                self.fs.makedirs(self.root, exist_ok=True)
                self.fs.pipe_file(temporary, bytes(view))
                self.fs.mv(temporary, path)
            self._mark_used(name)

    def _marker_listing(self, name: str | None) -> list:
        if name is not None and self._object_store and "prefix" in inspect.signature(self.fs.find).parameters:
            # s3fs and gcsfs list by key prefix: one name's markers without listing every entry's
            # (a put or touch would otherwise cost a listing of the whole store).
            self.fs.invalidate_cache(self._markers)
            return list(self.fs.find(self._markers, prefix=f"{name}{_MARKER_SEPARATOR}", detail=True).values())
        return self._listing(self._markers)

    def _marker_names(self, name: str | None = None) -> dict[str, list[int]]:
        """Marker times by entry name (of one name, or of all)."""
        found: dict[str, list[int]] = {}
        for info in self._marker_listing(name):
            entry, sep, stamp = posixpath.basename(info["name"].rstrip("/")).rpartition(_MARKER_SEPARATOR)
            if sep and stamp.isdigit() and (name is None or entry == name):
                found.setdefault(entry, []).append(int(stamp))
        return found

    def _mark_used(self, name: str) -> None:
        now = time.time_ns()
        if not self._object_store:
            self.fs.makedirs(self._markers, exist_ok=True)
        self.fs.pipe_file(posixpath.join(self._markers, f"{name}{_MARKER_SEPARATOR}{now:020d}"), b"")
        self._remove_markers(name, before=now)

    def _remove_markers(self, name: str, before: int | None = None) -> None:
        for stamp in self._marker_names(name).get(name, []):
            if before is None or stamp < before:
                with contextlib.suppress(FileNotFoundError):  # another process removed it first
                    self.fs.rm_file(posixpath.join(self._markers, f"{name}{_MARKER_SEPARATOR}{stamp:020d}"))

    def delete(self, name: str) -> bool:
        path = self._path(name)
        with self._talking(f"delete {name!r}"):
            try:
                existed = self.fs.isfile(path)
                if existed:
                    self.fs.rm_file(path)
            except FileNotFoundError:
                existed = False  # deleted by another process in between
            self._remove_markers(name)
        return existed

    def list(self) -> list[EntryInfo]:
        with self._talking("list"):
            objects = self._listing(self.root)
            markers = self._marker_names()
        entries = []
        for info in objects:
            name = posixpath.basename(info["name"].rstrip("/"))
            if info.get("type") == "file" and is_entry_name(name):
                entries.append(EntryInfo(name, int(info["size"]), max(markers.get(name, [0]))))
        return entries

    def touch(self, name: str) -> None:
        path = self._path(name)
        with self._talking(f"touch {name!r}"):
            self.fs.invalidate_cache(path)
            if not self.fs.isfile(path):
                raise EntryNotFoundError(f"no entry {name!r} in the store", path=self.url)
            self._mark_used(name)

