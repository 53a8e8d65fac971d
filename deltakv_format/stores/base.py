"""The store protocol: what a backend must do, the names it accepts, the errors it raises."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from ..constants import JOURNAL_SUFFIX
from ..errors import DeltaKVError

ENTRY_NAME_MAX = 200  # characters; leaves room in a 255-byte file name for ".{name}.XXXXXXXX.tmp"
_ENTRY_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


class StoreError(DeltaKVError):
    """A store refused a request: a name it does not allow, an entry it does not have."""


class StoreBackendError(StoreError, OSError):
    """The storage itself failed a request (a server refused it, a client library raised): an
    ``OSError`` too, so ``except (StoreError, OSError)`` covers every failure of every backend."""


class StoreUnavailableError(StoreBackendError):
    """The storage could not be reached (connection refused or lost, a timeout): it may come back,
    and a cache over it treats it as a miss until it does."""


class EntryTooLargeError(StoreError):
    """An entry larger than the backend can hold (a Redis string: 512 MiB), refused before sending."""


class MissingDependencyError(StoreError, ImportError):
    """A backend's client library is not installed; the message names the pip extra that installs it."""


def import_optional(module: str, backend: str, extra: str):
    """``import module`` for ``backend``, or one error saying which extra of deltakv installs it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependencyError(f"{backend} needs the Python package {module!r}, which is not installed "
                                     f"({e}); install it with: pip install 'deltakv[{extra}]'") from e


class InvalidEntryNameError(StoreError):
    """An entry name outside the portable set every backend accepts (see :func:`check_entry_name`)."""


class EntryNotFoundError(StoreError, KeyError):
    """The store has no entry of that name (also a KeyError, as a missing key of a mapping is)."""

    def __str__(self) -> str:
        return Exception.__str__(self)  # KeyError's own __str__ would print the message in quotes


@dataclass(frozen=True)
class EntryInfo:
    """One entry as :meth:`SessionStore.list` reports it."""

    name: str
    size: int  # bytes, as get() would return them
    last_used_ns: int  # when it was last put or touched, in nanoseconds on the store's clock


def check_entry_name(name) -> str:
    """``name`` if every backend can hold it under that name, else :class:`InvalidEntryNameError`.

    Allowed: 1 to 200 characters from ``A-Z a-z 0-9 . _ -``, the first not ``.`` or ``-``, not
    ending in ``-journal``. So a name is never a path (no ``/``, ``\\``, ``..``), never a hidden or
    temporary file of the local store (``.{name}.XXXXXXXX.tmp``), never the redo journal that a
    .dkv reader would take for another entry's (``<name>-journal``, SPEC.md section 8), and the same
    string is a valid Redis key and object-storage key.
    """
    if not isinstance(name, str):
        raise InvalidEntryNameError(f"entry name: expected a str, found {type(name).__name__} {name!r}")
    problem = None
    if not name:
        problem = "an empty name"
    elif len(name) > ENTRY_NAME_MAX:
        problem = f"{len(name)} characters"
    elif not _ENTRY_NAME.fullmatch(name):
        bad = next((i for i, c in enumerate(name) if not (c.isascii() and (c.isalnum() or c in "._-"))), None)
        problem = f"{name[bad]!r} at position {bad}" if bad is not None else f"{name[0]!r} first"
    elif name.endswith(JOURNAL_SUFFIX):
        problem = f"a name ending in {JOURNAL_SUFFIX!r} (a .dkv reader takes that file for another entry's journal)"
    if problem is not None:
        raise InvalidEntryNameError(
            f"entry name {name!r}: expected 1 to {ENTRY_NAME_MAX} characters from A-Z a-z 0-9 . _ -, "
            f"not starting with '.' or '-', found {problem}"
        )
    return name


def is_entry_name(name) -> bool:
    try:
        check_entry_name(name)
    except InvalidEntryNameError:
        return False
    return True


def bytes_view(data, what: str = "put") -> memoryview:
    """``data`` (bytes, bytearray, memoryview, mmap, a contiguous numpy array) as a flat byte view."""
    try:
        view = memoryview(data)
    except TypeError as e:
        raise TypeError(f"{what}: expected a bytes-like object (bytes, bytearray, memoryview, mmap), "
                        f"found {type(data).__name__}") from e
    if not view.c_contiguous:
        raise TypeError(f"{what}: expected a contiguous buffer, found a strided view of shape {view.shape}")
    return view.cast("B")


@runtime_checkable
class SessionStore(Protocol):
    """Named byte strings in some storage: what a prompt cache or a session library keeps .dkv files in.

    What every backend guarantees (``tests/test_stores.py`` checks each one against this):

    - **Names** are checked by :func:`check_entry_name` in every method, before anything else is
      done: an unsafe name (``""``, ``"a/b"``, ``".."``, ``".x"``, a non-str) raises
      :class:`InvalidEntryNameError` and touches nothing.
    - **Atomic put.** A reader sees an entry's complete old bytes or its complete new bytes, never
      a mix nor a prefix, in this process and in every other process or machine sharing the
      storage. A writer that dies mid-put (SIGKILL, a crash) leaves the old entry, or none if
      there was none; its leftovers are invisible to ``get`` and ``list`` and are cleaned up by
      the backend (the local store: by the next put of the same name). Once put has returned, the
      new bytes survive a crash or a power loss. Of two puts of one name at once, one wins whole.
    - **Stable reads.** The buffer ``get`` returns keeps the bytes it had when ``get`` returned,
      for as long as it is held, even if the entry is replaced or deleted meanwhile.
    - **Shared clock.** ``last_used_ns`` is set by ``put`` and ``touch`` from one clock that every
      user of the storage shares (the local store: the files' modification times), so least
      recently used order means the same to every process. After ``touch(name)`` returns, ``name``
      is reported as used later than every entry whose put or touch returned before the touch
      began (to within the backend's clock resolution, which it documents).
    - **Errors.** A missing entry: :class:`EntryNotFoundError` (a ``KeyError`` too). Data that is
      not bytes-like: ``TypeError``. A failure of the storage itself (disk full, permissions,
      network): ``OSError`` or a subclass; a backend whose client raises other exceptions wraps
      them in an ``OSError`` subclass (:class:`StoreBackendError`; :class:`StoreUnavailableError`
      when the storage cannot be reached), so that ``except (StoreError, OSError)`` is enough.
    - **Concurrency.** Every method may be called from several threads and processes at once.
    - Entries are opaque bytes: a backend never parses, rewrites or appends to them in place.
    """

    def get(self, name: str) -> memoryview:
        """The entry's bytes as a read-only memoryview (the local store maps the file: no copy).

        Release it (``with store.get(name) as data:`` or ``data.release()``) when done; what was
        made from it (a DkvFile.from_buffer) keeps the bytes alive on its own. Raises
        EntryNotFoundError if there is no such entry.
        """
        ...

    def put(self, name: str, data) -> None:
        """Make ``data`` (a bytes-like object) the entry's bytes, atomically, creating or
        replacing it; when put returns, the new bytes are durable and visible to every reader."""
        ...

    def delete(self, name: str) -> bool:
        """Remove the entry; True if it existed, False if there was none (not an error). A
        buffer that ``get`` returned earlier stays readable."""
        ...

    def list(self) -> list[EntryInfo]:
        """Every entry: name, size in bytes, last use; in no particular order. What is not an
        entry (a put in progress, the local store's other files) is not listed."""
        ...

    def touch(self, name: str) -> None:
        """Mark the entry as used now (for least-recently-used eviction) without changing its
        bytes. Raises EntryNotFoundError if there is no such entry."""
        ...

    def locate(self, name: str) -> str:
        """Where the entry lives, for messages, and its identity within a process: two store
        objects over the same storage give the same string (the local store: the file's path).
        Does not look whether the entry exists."""
        ...

