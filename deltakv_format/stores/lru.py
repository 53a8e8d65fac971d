"""Least-recently-used eviction by bytes over a store, and the entries this process is reading.

The store is the whole state: sizes and last-use times come from its listing each time, so every
process (every machine, for a shared backend) that evicts from the same store sees the same order
and the same total, and none needs to hear of the others' puts.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import Counter
from typing import Callable

from .base import EntryInfo, SessionStore, StoreError

# Entries being read in this process, by SessionStore.locate(): eviction and clean-up leave them
# alone, whichever cache or index over the same storage asks. (Another process may delete an entry
# this one reads; what get() returned keeps its bytes.)
_IN_USE: Counter[str] = Counter()
_IN_USE_LOCK = threading.Lock()


@contextlib.contextmanager
def entry_in_use(location: str | os.PathLike):
    """Mark the entry at ``location`` (what ``store.locate(name)`` says; for the local store, a
    path) as being read by this process for the duration of the ``with`` block."""
    key = str(location)
    with _IN_USE_LOCK:
        _IN_USE[key] += 1
    try:
        yield
    finally:
        with _IN_USE_LOCK:
            _IN_USE[key] -= 1
            if not _IN_USE[key]:
                del _IN_USE[key]


class LruByBytes:
    """Least recently used first, by bytes, over the entries of ``store`` that ``owns`` accepts.

    Entries ``owns`` refuses (other programs' files in a shared folder) are neither counted nor
    deleted. Ties in last use go to the smaller entry, then to the name, so that every process
    evicts in the same order.
    """

    def __init__(self, store: SessionStore, owns: Callable[[str], object] = lambda name: True):
        self.store = store
        self.owns = owns

    def entries(self) -> list[EntryInfo]:
        return [info for info in self.store.list() if self.owns(info.name)]

    def total_bytes(self) -> int:
        return sum(info.size for info in self.entries())

    def info(self, name: str) -> EntryInfo | None:
        """The entry's size and last use, None if it is not there (a scan of the listing)."""
        return next((info for info in self.entries() if info.name == name), None)

    def reading(self, name: str):
        """``with index.reading(name):`` the entry is not evicted nor deleted by this process meanwhile."""
        return entry_in_use(self.store.locate(name))

    def touch(self, name: str) -> bool:
        """Mark ``name`` as just used; False if the store no longer has it or cannot say."""
        try:
            self.store.touch(name)
        except (StoreError, OSError):
            return False
        return True

    def delete_unless_in_use(self, name: str) -> bool:
        """Delete ``name`` unless this process is reading it; True if it is gone (or was already)."""
        location = self.store.locate(name)
        # The lock is held across the delete so that no reader starts on the entry in between.
        with _IN_USE_LOCK:
            if _IN_USE[location]:
                return False
            try:
                self.store.delete(name)
            except (StoreError, OSError):
                return False
        return True

    def evict(self, capacity_bytes: int, keep: str | None = None) -> list[str]:
        """Delete least recently used entries until the owned ones fit in ``capacity_bytes``
        (never ``keep``, the entry just stored, nor one being read); returns the names deleted."""
        entries = self.entries()
        total = sum(info.size for info in entries)
        deleted = []
        for info in sorted(entries, key=lambda info: (info.last_used_ns, info.size, info.name)):
            if total <= capacity_bytes:
                break
            if info.name == keep or not self.delete_unless_in_use(info.name):
                continue
            total -= info.size
            deleted.append(info.name)
        return deleted
