"""RedisStore: entries are Redis (or Valkey) strings; last use is a sorted set on the server's clock.

Keys, under a prefix (default ``deltakv/``; a URL's path after the database number sets another):

- ``{prefix}entries/{name}``: the entry's bytes, one string (a whole .dkv);
- ``{prefix}last-use``: a sorted set, name -> last use in microseconds on the server's clock;
- ``{prefix}sizes``: a hash, name -> size in bytes (so ``list`` reads no entry).

Entry names never contain ``/`` (``check_entry_name``), so no name's key can be another key of
the store. Every change of an entry changes all three in one MULTI/EXEC transaction, and last use
comes from a Lua script inside that transaction that reads the server's ``TIME``: one clock for
every process and machine using the server, however far their own clocks drift.

Needs a single Redis >= 5 or Valkey server (a script that writes after reading ``TIME`` needs
effects replication); Redis Cluster is not supported (the keys of one put would lie in different
slots). Durability is the server's: a put survives a server crash only with ``appendonly yes``
and ``appendfsync always``; and the server must not evict keys on its own
(``maxmemory-policy noeviction``, the default), or an entry's bytes may vanish while its size and
last use stay (``get`` then reports it missing and removes them).
"""

from __future__ import annotations

import contextlib
from urllib.parse import quote

from .base import (
    EntryInfo,
    EntryNotFoundError,
    EntryTooLargeError,
    StoreBackendError,
    StoreError,
    StoreUnavailableError,
    bytes_view,
    check_entry_name,
    import_optional,
    is_entry_name,
)

# Redis refuses a bulk string longer than proto-max-bulk-len (512 MiB by default); refusing here
# says so before half a gigabyte has crossed the network.
REDIS_STRING_MAX = 512 << 20
DEFAULT_PREFIX = "deltakv/"
PREFIX_MAX = 200  # characters
_PREFIX_CHARACTERS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-:/")

# Sets the entry's last use to the server's TIME in microseconds, or to one more than the latest
# last use in the set if that is not earlier: so a touch is reported later than every use before
# it even within one microsecond. Scores stay below 2^53 (microseconds until the year 2255), so the
# sorted set's doubles hold them exactly; '%.0f' because Lua would print them as 1.76e+15.
# KEYS: entry, last-use set; ARGV: name. Returns the new last use, or nil when there is no entry.
_STAMP_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local latest = redis.call('ZREVRANGE', KEYS[2], 0, 0, 'WITHSCORES')
if latest[2] ~= nil and tonumber(latest[2]) >= now then now = tonumber(latest[2]) + 1 end
now = string.format('%.0f', now)
redis.call('ZADD', KEYS[2], now, ARGV[1])
return now
"""

# Removes the size and last use of an entry whose bytes are gone (evicted by the server, deleted
# by hand), and only then: a put that lands between a failed GET and this script is kept.
# KEYS: entry, last-use set, sizes; ARGV: name.
_FORGET_IF_GONE_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
return 1
"""


def _redis():
    return import_optional("redis", "RedisStore", "redis")


class InvalidPrefixError(StoreError):
    """A key prefix outside the characters a URL path can carry unescaped."""


def check_prefix(prefix) -> str:
    if not isinstance(prefix, str):
        raise InvalidPrefixError(f"Redis key prefix: expected a str, found {type(prefix).__name__}")
    bad = next((c for c in prefix if c not in _PREFIX_CHARACTERS), None)
    if len(prefix) > PREFIX_MAX or bad is not None:
        found = f"{len(prefix)} characters" if len(prefix) > PREFIX_MAX else f"{bad!r}"
        raise InvalidPrefixError(f"Redis key prefix {prefix[:60]!r}: expected at most {PREFIX_MAX} characters "
                                 f"from A-Z a-z 0-9 . _ - : /, found {found}")
    return prefix


class RedisStore:
    """A :class:`~deltakv_format.stores.SessionStore` over a Redis or Valkey server.

    ``RedisStore("redis://host:6379/0")`` (also ``rediss://`` for TLS, ``unix:///path.sock?db=0``),
    or ``RedisStore(client)`` with a ``redis.Redis`` made with ``decode_responses=False``. Keys
    live under ``prefix``. The client connects on first use: a server that cannot be reached
    raises :class:`StoreUnavailableError` (an ``OSError``) from the call that needed it, and
    the next call tries again.

    Guarantees beyond the protocol's: a put, a touch and a delete are each one MULTI/EXEC
    transaction, so a reader sees an entry's bytes, size and last use change together, and a
    writer killed mid-put leaves nothing (the server applies a transaction only once it has all
    of it; one whose whole transaction had been sent when it died may still be applied just
    after its death, as the server reads what the closed connection holds). ``get`` returns a
    copy of the bytes (stable however the entry changes). Last use has the server clock's
    resolution, one microsecond, and strictly increases from one put or touch to the next.
    ``timeout_s`` bounds each wait for the server (one socket read or write, not a whole
    transfer), so a server that stops answering fails a call instead of hanging it. Entries
    larger than ``max_entry_bytes`` (default and most: 512 MiB, a Redis string's limit) raise
    :class:`EntryTooLargeError` before anything is sent.
    """

    def __init__(self, url_or_client="redis://127.0.0.1:6379/0", *, prefix: str = DEFAULT_PREFIX,
                 max_entry_bytes: int = REDIS_STRING_MAX, connect_timeout_s: float = 5.0,
                 timeout_s: float | None = 10.0):
        redis = _redis()
        self.prefix = check_prefix(prefix)
        if not 0 <= int(max_entry_bytes) <= REDIS_STRING_MAX:
            raise EntryTooLargeError(f"max_entry_bytes: expected 0 to {REDIS_STRING_MAX} (a Redis string's limit), "
                                     f"found {max_entry_bytes}")
        self.max_entry_bytes = int(max_entry_bytes)
        if isinstance(url_or_client, str):
            url = url_or_client
            try:
                # socket_timeout bounds every wait on the socket: a stopped server must not hang a
                # completion that asked the cache.
                self.client = redis.Redis.from_url(url, socket_connect_timeout=connect_timeout_s,
                                                   socket_timeout=timeout_s)
            except ValueError as e:  # the client's own URL checks (scheme, port, query values)
                raise StoreError(f"Redis URL {url!r}: {e}") from e
        else:
            self.client = url_or_client
            if not isinstance(self.client, redis.Redis):
                raise TypeError(f"RedisStore: expected a redis URL or a redis.Redis client, "
                                f"found {type(url_or_client).__name__}")
        kwargs = self.client.connection_pool.connection_kwargs
        if kwargs.get("decode_responses"):
            raise TypeError("RedisStore: the client decodes replies to str (decode_responses=True); entries are "
                            "bytes: pass a client made with decode_responses=False")
        db = int(kwargs.get("db") or 0)
        if kwargs.get("path"):
            self.server = f"unix://{kwargs['path']}?db={db}"
        else:
            self.server = f"redis://{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{db}"
        self._last_use_key = f"{self.prefix}last-use"
        self._sizes_key = f"{self.prefix}sizes"
        self._stamp = self.client.register_script(_STAMP_SCRIPT)
        self._forget_if_gone = self.client.register_script(_FORGET_IF_GONE_SCRIPT)

    def __repr__(self) -> str:
        return f"RedisStore({self.server!r}, prefix={self.prefix!r})"

    def _entry_key(self, name: str) -> str:
        return f"{self.prefix}entries/{check_entry_name(name)}"

    def locate(self, name: str) -> str:
        return f"{self.server}/{quote(self._entry_key(name), safe='/:')}"

    @contextlib.contextmanager
    def _talking(self, what: str):
        """Turn the client's exceptions into OSErrors naming the server and the request."""
        redis = _redis()
        try:
            yield
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
            raise StoreUnavailableError(f"{what}: cannot reach the Redis server ({type(e).__name__}: {e})",
                                        path=self.server) from e
        except redis.exceptions.RedisError as e:
            raise StoreBackendError(f"{what}: the Redis server refused it ({type(e).__name__}: {e})",
                                    path=self.server) from e

    def get(self, name: str) -> memoryview:
        key = self._entry_key(name)
        with self._talking(f"get {name!r}"):
            data = self.client.get(key)
            if data is None:
                self._forget_if_gone(keys=[key, self._last_use_key, self._sizes_key], args=[name])
        if data is None:
            raise EntryNotFoundError(f"no entry {name!r} in the store", path=f"{self.server} {self.prefix}")
        return memoryview(data)  # bytes: read-only, and the client's own copy

    def put(self, name: str, data) -> None:
        key = self._entry_key(name)
        view = bytes_view(data, f"RedisStore.put({name!r})")
        if view.nbytes > self.max_entry_bytes:
            raise EntryTooLargeError(f"entry {name!r}: expected at most {self.max_entry_bytes} bytes "
                                     f"(a Redis string holds at most {REDIS_STRING_MAX}), found {view.nbytes}",
                                     path=self.server)
        with self._talking(f"put {name!r} ({view.nbytes} bytes)"):
            with self.client.pipeline(transaction=True) as pipe:
                pipe.set(key, view)
                pipe.hset(self._sizes_key, name, view.nbytes)
                self._stamp(keys=[key, self._last_use_key], args=[name], client=pipe)
                pipe.execute()

    def delete(self, name: str) -> bool:
        key = self._entry_key(name)
        with self._talking(f"delete {name!r}"), self.client.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            pipe.zrem(self._last_use_key, name)
            pipe.hdel(self._sizes_key, name)
            deleted, _, _ = pipe.execute()
        return bool(deleted)

    def list(self) -> list[EntryInfo]:
        with self._talking("list"), self.client.pipeline(transaction=True) as pipe:
            pipe.hgetall(self._sizes_key)
            pipe.zrange(self._last_use_key, 0, -1, withscores=True)
            sizes, last_use = pipe.execute()
        entries = []
        sizes = {name.decode("ascii", "replace"): size for name, size in sizes.items()}
        for raw_name, used_us in last_use:
            name = raw_name.decode("ascii", "replace")
            if name in sizes and is_entry_name(name):  # what another program wrote under the prefix is not an entry
                entries.append(EntryInfo(name, int(sizes[name]), int(used_us) * 1000))
        return entries

    def touch(self, name: str) -> None:
        key = self._entry_key(name)
        with self._talking(f"touch {name!r}"):
            stamped = self._stamp(keys=[key, self._last_use_key], args=[name])
        if stamped is None:
            raise EntryNotFoundError(f"no entry {name!r} in the store", path=f"{self.server} {self.prefix}")
