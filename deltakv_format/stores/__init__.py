"""Where .dkv sessions are kept: the :class:`SessionStore` protocol and its backends.

A store holds named byte strings (whole .dkv files; it never looks inside them). The protocol,
the names every backend accepts and the errors are in ``stores/base.py``; the local folder store
is :class:`LocalDirectoryStore` (``stores/local.py``). A new backend (Redis, an object store) is
one more module here that implements the protocol and passes the contract test
(``tests/test_stores.py``: add its factory to ``STORE_FACTORIES``). :class:`LruByBytes`
(``stores/lru.py``) evicts least recently used entries of any store down to a size in bytes.
Shared backends: :class:`RedisStore` (``stores/redis_store.py``, Redis/Valkey) and
:class:`FsspecStore` (``stores/fsspec_store.py``, S3 and any fsspec URL); :func:`open_store` and
:func:`open_entry` (``stores/urls.py``) turn a path or URL into a store (and an entry's name).
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
from .urls import InvalidStoreURLError, is_store_url, open_entry, open_store

__all__ = [
    "ENTRY_NAME_MAX", "EntryInfo", "EntryNotFoundError", "EntryTooLargeError", "FsspecStore", "InvalidEntryNameError",
    "InvalidStoreURLError", "LocalDirectoryStore", "LruByBytes", "MissingDependencyError", "REDIS_STRING_MAX", "RedisStore", "SessionStore",
    "StoreBackendError", "StoreError", "StoreUnavailableError", "bytes_view", "check_entry_name", "entry_in_use",
    "is_entry_name", "is_store_url", "open_entry", "open_store",
]
