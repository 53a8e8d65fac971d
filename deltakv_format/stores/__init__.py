"""Where .dkv sessions are kept: the :class:`SessionStore` protocol and its backends.

A store holds named byte strings (whole .dkv files; it never looks inside them). The protocol,
the names every backend accepts and the errors are in ``stores/base.py``; the local folder store
is :class:`LocalDirectoryStore` (``stores/local.py``). A new backend (Redis, an object store) is
one more module here that implements the protocol and passes the contract test
(``tests/test_stores.py``: add its factory to ``STORE_FACTORIES``). :class:`LruByBytes`
(``stores/lru.py``) evicts least recently used entries of any store down to a size in bytes.
"""

from .base import (
    ENTRY_NAME_MAX,
    EntryInfo,
    EntryNotFoundError,
    EntryTooLargeError,
    InvalidEntryNameError,
    MissingDependencyError,
    SessionStore,
    StoreBackendError,
    StoreError,
    StoreUnavailableError,
    bytes_view,
    check_entry_name,
    is_entry_name,
)
from .fsspec_store import FsspecStore
from .local import LocalDirectoryStore
from .lru import LruByBytes, entry_in_use
from .redis_store import REDIS_STRING_MAX, RedisStore

__all__ = [
    "ENTRY_NAME_MAX", "EntryInfo", "EntryNotFoundError", "EntryTooLargeError", "FsspecStore", "InvalidEntryNameError",
    "LocalDirectoryStore", "LruByBytes", "MissingDependencyError", "REDIS_STRING_MAX", "RedisStore", "SessionStore",
    "StoreBackendError", "StoreError", "StoreUnavailableError", "bytes_view", "check_entry_name", "entry_in_use",
    "is_entry_name",
]
