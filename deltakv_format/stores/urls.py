"""One string names where sessions live: a folder, a Redis database, an object-storage prefix.

=========================================  ==========================================================
``/var/cache/dkv``, ``file:///var/cache/dkv``  :class:`LocalDirectoryStore` over that folder
``redis://host:6379/0[/PREFIX...]``           :class:`RedisStore`, database 0, keys under ``PREFIX/``
                                              (default ``deltakv/``); ``rediss://`` is TLS,
                                              ``valkey://`` / ``valkeys://`` the same for Valkey
``unix:///run/redis.sock?db=0&prefix=P``      :class:`RedisStore` over a Unix socket
``s3://bucket/prefix``, ``memory://x``, ...   :class:`FsspecStore` (any writable fsspec protocol)
=========================================  ==========================================================

:func:`open_entry` takes the same strings with one more path component, the entry's name:
``/tmp/x/a.dkv``, ``redis://host:6379/0/a.dkv``, ``s3://bucket/prefix/a.dkv``,
``unix:///run/redis.sock/a.dkv?db=0``.

What is refused, with one line saying what was expected and found (:class:`InvalidStoreURLError`):
URLs longer than 4096 characters or holding control characters, ``.`` / ``..`` / empty path
segments and escaped slashes (``%2F``) in a URL (a name must not walk out of its store), names
outside :func:`check_entry_name`'s set, a host in a ``file://`` URL, fsspec URL chains (``a::b``),
read-only or unknown schemes, database numbers and ports out of range. A plain path is the
user's own path and is taken as it is (``../x.dkv`` is fine); only its last component, the
entry's name, is checked.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

from .base import SessionStore, StoreError, check_entry_name, import_optional
from .local import LocalDirectoryStore

URL_MAX = 4096  # characters
REDIS_SCHEMES = {"redis": "redis", "rediss": "rediss", "valkey": "redis", "valkeys": "rediss"}
REDIS_DB_MAX = 1 << 20  # Redis takes any `databases` count; a larger number is a typo or an attack
# fsspec protocols that cannot hold a store: read-only ones, archives, and wrappers of other URLs.
NOT_STORES = frozenset({"http", "https", "zip", "tar", "libarchive", "github", "git", "reference", "data",
                        "jupyter", "jlab", "cached", "blockcache", "filecache", "simplecache", "dir", "arrow_hdfs"})
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


class InvalidStoreURLError(StoreError):
    """A store URL (or entry URL) that is malformed, unsafe or names no known kind of store."""


def is_store_url(s) -> bool:
    """True for ``scheme://...`` (``file://`` too), False for a plain path (``a/b.dkv``, ``C:\\x``)."""
    return isinstance(s, str) and _SCHEME.match(s) is not None


def _refuse(url: str, expected: str, found: str):
    shown = url if len(url) <= 120 else url[:117] + "..."
    raise InvalidStoreURLError(f"store URL {shown!r}: expected {expected}, found {found}")


def _checked(url) -> str:
    if isinstance(url, os.PathLike):
        url = os.fspath(url)
    if not isinstance(url, str):
        raise InvalidStoreURLError(f"store: expected a path or a URL (str), found {type(url).__name__}")
    if not url:
        _refuse(url, "a path or a URL", "an empty string")
    if len(url) > URL_MAX:
        _refuse(url, f"at most {URL_MAX} characters", f"{len(url)}")
    bad = next((c for c in url if ord(c) < 32 or ord(c) == 127), None)
    if bad is not None:
        _refuse(url, "no control characters", f"{bad!r} at position {url.index(bad)}")
    return url


def _segments(url: str, path: str) -> list[str]:
    """The URL's path split at '/', unescaped, each one safe to join under a store's root."""
    # One leading slash begins the path and one trailing slash may end a folder's URL; any other
    # empty segment ('a//b') is refused, as a file system would read it as something else.
    path = path[1:] if path.startswith("/") else path
    path = path[:-1] if path.endswith("/") else path
    if not path:
        return []
    raw = path.split("/")
    out = []
    for segment in raw:
        plain = unquote(segment)
        if plain in ("", ".", ".."):
            _refuse(url, "path segments that are names", f"{plain or 'an empty segment'!r} in the path")
        if "/" in plain or "\\" in plain:
            _refuse(url, "path segments without escaped slashes", f"{segment!r}")
        if any(ord(c) < 32 or ord(c) == 127 for c in plain):
            _refuse(url, "no control characters", f"an escaped one in {segment!r}")
        out.append(plain)
    return out


def _split_name(url: str, segments: list[str], shape: str) -> tuple[list[str], str]:
    if not segments:
        _refuse(url, f"{shape} (the last path component is the entry's name)", "no entry name")
    return segments[:-1], check_entry_name(segments[-1])


def _redis_store(url: str, parts, segments: list[str]) -> SessionStore:
    from .redis_store import DEFAULT_PREFIX, RedisStore

    import_optional("redis", "a redis:// store", "redis")
    scheme = REDIS_SCHEMES[parts.scheme.lower()]
    if not parts.hostname:
        _refuse(url, f"{parts.scheme}://HOST[:PORT]/DB", "no host")
    try:
        parts.port  # urlsplit checks the port only when asked
    except ValueError:
        _refuse(url, "a port from 1 to 65535", repr(parts.netloc.rsplit(":", 1)[-1]))
    db = 0
    if segments:
        if not segments[0].isdigit() or int(segments[0]) > REDIS_DB_MAX:
            _refuse(url, f"{parts.scheme}://HOST[:PORT]/DB[/PREFIX...] with DB a number from 0 to {REDIS_DB_MAX}",
                    f"{segments[0][:40]!r}")
        db, segments = int(segments[0]), segments[1:]
    prefix = "".join(f"{s}/" for s in segments) or DEFAULT_PREFIX
    query = f"?{parts.query}" if parts.query else ""
    return RedisStore(f"{scheme}://{parts.netloc}/{db}{query}", prefix=prefix)


def _unix_store(url: str, parts, socket_path: str) -> SessionStore:
    from .redis_store import DEFAULT_PREFIX, RedisStore

    import_optional("redis", "a unix:// Redis store", "redis")
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - {"db", "prefix", "password", "username"})
    if unknown:
        _refuse(url, "query parameters db, prefix, username, password", ", ".join(unknown))
    db = query.get("db", ["0"])[-1]
    if not db.isdigit() or int(db) > REDIS_DB_MAX:
        _refuse(url, f"db= a number from 0 to {REDIS_DB_MAX}", repr(db[:40]))
    prefix = query.get("prefix", [DEFAULT_PREFIX])[-1]
    rest = "&".join(f"{k}={v[-1]}" for k, v in query.items() if k in ("username", "password"))
    return RedisStore(f"unix://{socket_path}?db={db}" + (f"&{rest}" if rest else ""), prefix=prefix)


def _fsspec_store(url: str, scheme: str, parts, segments: list[str]) -> SessionStore:
    from .fsspec_store import FsspecStore

    fsspec = import_optional("fsspec", f"a {scheme}:// store", "s3")
    if scheme in NOT_STORES:
        _refuse(url, "a writable store (a folder, redis://, s3://, another writable fsspec protocol)",
                f"{scheme}://, which fsspec reads but cannot keep entries in")
    if scheme not in fsspec.available_protocols():
        _refuse(url, "a path, file://, redis://, rediss://, valkey://, unix:// or a protocol fsspec knows "
                "(s3://, gs://, memory://, ...)", f"{scheme}://")
    location = "/".join([parts.netloc, *segments]) if parts.netloc else "/".join(segments)
    return FsspecStore(f"{scheme}://{location}")


def _open(url: str, *, entry: bool, create: bool):
    """The store a URL or path names, and with ``entry`` the entry's name (its last component)."""
    url = _checked(url)
    if not is_store_url(url):
        path = Path(url).expanduser()
        if not entry:
            return LocalDirectoryStore(path, create=create), None
        if not path.name:
            _refuse(url, "a path to a .dkv file", "no file name")
        name = check_entry_name(path.name)  # before the folder is looked at
        return LocalDirectoryStore(path.parent, create=create), name
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    shape = {"file": "file:///FOLDER/NAME", "unix": "unix:///SOCKET/NAME?db=N"}.get(
        scheme, f"{scheme}://HOST[:PORT]/DB/[PREFIX/]NAME" if scheme in REDIS_SCHEMES else f"{scheme}://.../NAME")
    if parts.fragment:
        _refuse(url, "no fragment", f"'#{parts.fragment[:40]}'")
    if "::" in url and scheme not in REDIS_SCHEMES and scheme != "unix":
        _refuse(url, "one URL (fsspec chains of URLs are not stores)", "'::'")
    segments = _segments(url, parts.path)
    name = None
    if entry:
        if parts.path.endswith("/"):
            segments = []  # a folder's URL: no entry named
        segments, name = _split_name(url, segments, shape)
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            _refuse(url, "file:///PATH (a folder on this machine)", f"the host {parts.netloc!r}")
        if parts.query:
            _refuse(url, "no query in a file:// URL", f"'?{parts.query[:40]}'")
        return LocalDirectoryStore("/" + "/".join(segments), create=create), name
    if scheme in REDIS_SCHEMES:
        if entry and not segments:
            _refuse(url, shape, "no database number before the entry name")
        return _redis_store(url, parts, segments), name
    if scheme == "unix":
        if parts.netloc:
            _refuse(url, "unix:///SOCKET (three slashes)", f"the host {parts.netloc!r}")
        if not segments:
            _refuse(url, shape, "no socket path")
        return _unix_store(url, parts, "/" + "/".join(segments)), name
    return _fsspec_store(url, scheme, parts, segments), name


def open_store(url_or_path, *, create: bool = True) -> SessionStore:
    """The store a path or URL names (the table in this module's docstring). A local folder is
    made if absent unless ``create=False``. Nothing is contacted yet: a server that cannot be
    reached shows at the first call that needs it (``StoreUnavailableError``, an ``OSError``)."""
    return _open(url_or_path, entry=False, create=create)[0]


def open_entry(url_or_path, *, create: bool = False) -> tuple[SessionStore, str]:
    """``(store, name)`` for one entry named by a path or URL: the last component is the name
    (``/tmp/x/a.dkv`` -> the folder /tmp/x and ``a.dkv``; ``redis://h:6379/0/a.dkv`` -> database 0
    and ``a.dkv``; ``s3://bucket/prefix/a.dkv``). A local folder is not made unless ``create``."""
    return _open(url_or_path, entry=True, create=create)
