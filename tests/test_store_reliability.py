"""Shared stores under stress, against real servers: two processes at once, corrupted entries, a
Redis server that goes away and comes back, hostile URLs and sizes, and a DeltaKVCache shared by two
"machines" (separate processes with separate working folders) through Redis.

A writer killed mid-put (SIGKILL) is in tests/test_stores.py, run against every shared backend.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from deltakv_format.stores import (
    REDIS_STRING_MAX,
    EntryTooLargeError,
    InvalidEntryNameError,
    InvalidStoreURLError,
    RedisStore,
    StoreUnavailableError,
    open_entry,
    open_store,
)

from .llama_helpers import MODEL, TEXT, needs_llama
from .servers import RedisServer, needs_redis_server
from .test_stores import ROOT, SHARED_FACTORIES, STORE_FACTORIES

# ---- two processes on one store ---------------------------------------------------------------

# Each process writes its own entries (sizes that change with every put, bytes that say which put
# they are) and reads the other's, for DURATION seconds; a read must be a whole put of the other.
TWO_WRITERS = r"""
import json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from deltakv_format.stores import EntryNotFoundError
from tests.test_stores import STORE_FACTORIES
store = STORE_FACTORIES[sys.argv[2]].open(Path(sys.argv[3]))
me, other, duration = sys.argv[4], sys.argv[5], float(sys.argv[6])

def value(who, name, i):  # 0.5-1.5 MiB, every byte saying who wrote which put
    return f"{who}:{name}:{i:08d};".encode() * (40000 + 1000 * (i % 40))

seen, puts, names_seen = 0, 0, set()
deadline = time.monotonic() + duration
while time.monotonic() < deadline or not seen:
    for n in range(3):
        store.put(f"{me}-{n}.dkv", value(me, n, puts))
    puts += 1
    for n in range(3):
        try:
            with store.get(f"{other}-{n}.dkv") as got:
                data = bytes(got)
        except EntryNotFoundError:
            continue
        head = data[: data.index(b";") + 1]
        assert head.startswith(f"{other}:{n}:".encode()), head
        assert data == head * (len(data) // len(head)), f"a read of {len(data)} bytes mixes two puts"
        seen += 1
    names_seen |= {info.name for info in store.list()}
    if time.monotonic() > deadline + 30:
        break
print(json.dumps({"puts": puts, "reads": seen, "names": sorted(names_seen)}))
"""


@pytest.mark.parametrize("factory_name", SHARED_FACTORIES)
def test_two_processes_share_a_store_and_never_read_half_an_entry(tmp_path, factory_name):
    STORE_FACTORIES[factory_name].open(tmp_path)  # starts the server here, so that both use it
    procs = [subprocess.Popen([sys.executable, "-c", TWO_WRITERS, str(ROOT), factory_name, str(tmp_path), me, other,
                               "1.5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for me, other in (("a", "b"), ("b", "a"))]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out))
    expected = {f"{who}-{n}.dkv" for who in "ab" for n in range(3)}
    for result in results:
        assert result["reads"] > 0 and set(result["names"]) == expected  # each saw the other's entries
    store = STORE_FACTORIES[factory_name].open(tmp_path)
    assert {info.name for info in store.list()} == expected


# ---- hostile URLs, names and sizes -------------------------------------------------------------

HOSTILE_URLS = [
    ("redis://127.0.0.1:6379/0/../../etc/a.dkv", "'..' in the path"),
    ("redis://127.0.0.1:6379/0/%2e%2e/a.dkv", "'..' in the path"),
    ("s3://bucket/prefix/..%2f..%2fescape.dkv", "escaped slashes"),
    ("s3://bucket/prefix//a.dkv", "an empty segment"),
    ("file:///tmp/../etc/a.dkv", "'..' in the path"),
    ("file://otherhost/etc/a.dkv", "the host 'otherhost'"),
    ("redis://127.0.0.1:6379/a.dkv", "no database number"),
    ("redis://127.0.0.1:6379/x/a.dkv", "DB a number"),
    ("redis://127.0.0.1:6379/99999999999999/a.dkv", "DB a number"),
    ("redis://127.0.0.1:70000/0/a.dkv", "a port from 1 to 65535"),
    ("s3://bucket/prefix/", "no entry name"),
    ("gopher://host/a.dkv", "found gopher://"),
    ("https://example.com/a.dkv", "cannot keep entries"),
    ("s3://bucket/a.dkv::file:///etc/passwd", "'::'"),
    ("s3://bucket/a\x00.dkv", "no control characters"),
    ("redis://h/0/" + "x" * 5000, "at most 4096 characters"),
    ("unix:///run/redis.sock/a.dkv?db=0&ssl_certfile=/etc/shadow", "query parameters db, prefix"),
]


@pytest.mark.parametrize("url, found", HOSTILE_URLS, ids=[u[:40] for u, _ in HOSTILE_URLS])
def test_hostile_entry_urls_are_refused_with_one_line(url, found):
    with pytest.raises(InvalidStoreURLError) as info:
        open_entry(url)
    message = str(info.value)
    assert "expected" in message and found in message and "\n" not in message


@pytest.mark.parametrize("url", ["s3://bucket/.hidden", "redis://h/0/a.dkv-journal", "memory://x/-rf",
                                 "/tmp/folder/.a.dkv.abcd1234.tmp", "redis://h/0/%C3%A9.dkv"])
def test_entry_names_outside_the_portable_set_are_refused(url):
    with pytest.raises(InvalidEntryNameError, match="entry name"):
        open_entry(url)


def test_a_plain_path_is_the_users_own(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    store, name = open_entry("sub/../a.dkv")  # relative paths with '..' are how people type paths
    assert (store.directory, name) == (tmp_path, "a.dkv")
    assert open_store(tmp_path / "s").directory == tmp_path / "s"  # a folder is made for a store, not for an entry
    with pytest.raises(FileNotFoundError, match="no such store folder"):
        open_entry(tmp_path / "missing" / "a.dkv")


def test_a_redis_entry_larger_than_a_redis_string_is_refused_before_sending(tmp_path):
    store = STORE_FACTORIES["redis"].open(tmp_path)
    huge = np.zeros(REDIS_STRING_MAX + 1, np.uint8)  # calloc: pages never touched, nothing sent
    with pytest.raises(EntryTooLargeError, match=f"expected at most {REDIS_STRING_MAX} bytes .* found {REDIS_STRING_MAX + 1}"):
        store.put("huge.dkv", huge)
    small = RedisStore(store.client, prefix=store.prefix, max_entry_bytes=10)
    with pytest.raises(EntryTooLargeError, match="expected at most 10 bytes"):
        small.put("a.dkv", b"x" * 11)
    assert store.list() == []
    with pytest.raises(EntryTooLargeError, match="a Redis string's limit"):
        RedisStore(store.client, max_entry_bytes=REDIS_STRING_MAX + 1)


def test_a_redis_store_by_unix_socket_and_by_url_prefix(tmp_path):
    server = RedisServer(tmp_path).start()
    try:
        by_socket = open_store(f"unix://{server.socket}?db=2&prefix=team/")
        by_socket.put("a.dkv", b"entry")
        by_tcp = open_store(f"redis://127.0.0.1:{server.port}/2/team")
        assert [(i.name, i.size) for i in by_tcp.list()] == [("a.dkv", 5)]
        assert open_store(f"redis://127.0.0.1:{server.port}/2").list() == []  # another prefix: other entries
        store, name = open_entry(f"unix://{server.socket}/a.dkv?db=2&prefix=team/")
        with store.get(name) as data:
            assert bytes(data) == b"entry"
        assert sorted(k.decode() for k in by_tcp.client.keys("*")) == ["team/entries/a.dkv", "team/last-use", "team/sizes"]
    finally:
        server.kill()


@pytest.mark.parametrize("url, extra", [("redis://127.0.0.1:6379/0", "redis"), ("s3://bucket/prefix", "s3")])
def test_a_missing_client_library_is_one_error_naming_the_extra(monkeypatch, url, extra):
    from deltakv_format.stores import MissingDependencyError

    from fsspec.registry import _registry as fsspec_classes

    for module in ("redis", "s3fs"):
        monkeypatch.setitem(sys.modules, module, None)  # `import redis` raises ImportError
    monkeypatch.delitem(fsspec_classes, "s3", raising=False)  # s3fs's class, once imported
    with pytest.raises(MissingDependencyError, match=rf"pip install 'deltakv\[{extra}\]'") as info:
        open_store(url)
    assert isinstance(info.value, ImportError) and "\n" not in str(info.value)


def test_an_unreachable_redis_is_an_os_error_naming_the_server():
    needs_redis_server()
    server = RedisServer()  # a free port nobody listens on
    store = open_store(server.url)
    for call in (store.list, lambda: store.get("a.dkv"), lambda: store.put("a.dkv", b"x"), lambda: store.touch("a")):
        with pytest.raises(StoreUnavailableError, match=f"127.0.0.1:{server.port}.*cannot reach the Redis server") as info:
            call()
        assert isinstance(info.value, OSError)


# ---- DeltaKVCache over Redis, with the real model ------------------------------------------------

def _complete(llm, prompt, cache, max_tokens=4):
    llm.reset()
    llm.set_cache(cache)
    try:
        return llm.create_completion(prompt, max_tokens=max_tokens, temperature=0)["choices"][0]["text"]
    finally:
        llm.set_cache(None)


@pytest.fixture(scope="module")
def smollm2():
    from llama_cpp import Llama

    return Llama(str(MODEL), n_ctx=512, flash_attn=True, verbose=False, seed=1)


def _counting(url, llm, **kw):
    from .test_cache import counting_cache

    return counting_cache(url, llm, **kw)


def _store_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "the cache is off" in str(w.message)]


@needs_llama
@pytest.mark.llama
def test_redis_going_away_mid_run_makes_the_cache_a_no_op_with_one_warning_then_it_works_again(tmp_path, smollm2):
    server = RedisServer(tmp_path).start()
    try:
        prompt = [2] + smollm2.tokenize(TEXT[:400].encode(), add_bos=False)[:24]
        expected = _complete(smollm2, prompt, None)
        cache = _counting(server.url, smollm2, retry_interval_s=0.0)
        assert _complete(smollm2, prompt, cache) == expected and len(cache.store.list()) == 1

        server.kill()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(3):  # misses, states dropped, never an exception
                assert _complete(smollm2, prompt, cache) == expected
            assert cache.cache_size == 0
        [warning] = _store_warnings(caught)
        assert f"127.0.0.1:{server.port}" in warning and "cannot reach" in warning
        assert not cache.store_available

        server.start()  # the same port, empty (no persistence)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert _complete(smollm2, prompt, cache) == expected  # stored again
            hits = cache.hits
            assert _complete(smollm2, prompt, cache) == expected and cache.hits == hits + 1
        assert cache.store_available and len(cache.store.list()) == 1
    finally:
        server.kill()


@needs_llama
@pytest.mark.llama
def test_a_cache_made_while_redis_is_down_warns_once_and_starts_working_when_it_comes_up(tmp_path, smollm2):
    server = RedisServer(tmp_path)
    prompt = [2] + smollm2.tokenize(TEXT[:400].encode(), add_bos=False)[:16]
    expected = _complete(smollm2, prompt, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache = _counting(server.url, smollm2, retry_interval_s=60.0)
        assert _complete(smollm2, prompt, cache) == expected
    assert len(_store_warnings(caught)) == 1
    try:
        server.start()
        assert _complete(smollm2, prompt, cache) == expected
        assert cache.store.list() == []  # not due for another try yet: nothing is asked of the store
        cache.retry_interval_s, cache._next_try = 0.0, 0.0
        assert _complete(smollm2, prompt, cache) == expected and len(cache.store.list()) == 1
    finally:
        server.kill()


@needs_llama
@pytest.mark.llama
def test_a_corrupted_redis_entry_is_dropped_and_recomputed_never_served(tmp_path, smollm2):
    from deltakv_format.container import DkvFile

    store = STORE_FACTORIES["redis"].open(tmp_path)
    prompt = [2] + smollm2.tokenize(TEXT[:400].encode(), add_bos=False)[:24]
    expected = _complete(smollm2, prompt, None)
    cache = _counting(None, smollm2, store=store)
    _complete(smollm2, prompt, cache)
    [info] = store.list()
    with store.get(info.name) as data:
        good = bytes(data)
        with DkvFile.from_buffer(data) as f:  # the middle of the largest payload: only its CRC can tell
            tensor = max(f.tensor_infos.values(), key=lambda t: t.nbytes)
            offset = f.data_start + tensor.offset + tensor.nbytes // 2
    broken = bytearray(good)
    broken[offset] ^= 0xFF
    store.put(info.name, broken)  # the cache indexed the entry already: the read must catch it

    with pytest.warns(RuntimeWarning, match="dropping cached state .*checksum") as caught:
        assert _complete(smollm2, prompt, cache) == expected
    assert len([w for w in caught if "dropping" in str(w.message)]) == 1
    assert (cache.hits, cache.misses) == (0, 2)
    [again] = store.list()
    with store.get(info.name) as data, DkvFile.from_buffer(data) as f:
        assert again.name == info.name and f.verify() == []  # recomputed and stored again, whole
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _complete(smollm2, prompt, cache) == expected and cache.hits == 1


@needs_llama
@pytest.mark.llama
def test_a_state_the_store_refuses_is_not_stored_with_one_warning(tmp_path, smollm2):
    small = RedisStore(STORE_FACTORIES["redis"].open(tmp_path).client, prefix=f"small/{tmp_path.name}/",
                       max_entry_bytes=1000)
    prompt = [2] + smollm2.tokenize(TEXT[:400].encode(), add_bos=False)[:16]
    expected = _complete(smollm2, prompt, None)
    cache = _counting(None, smollm2, store=small)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            assert _complete(smollm2, prompt, cache) == expected
    refused = [str(w.message) for w in caught if "not stored" in str(w.message)]
    assert len(refused) == 1 and "expected at most 1000 bytes" in refused[0]
    assert small.list() == [] and cache.store_available


# One "machine": its own working folder, its own model load, a DeltaKVCache on CACHE (a URL or a
# folder); completes PROMPT (ROUNDS times, from an empty context each time) and prints what it got.
MACHINE = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
from llama_cpp import Llama
from deltakv_runtime import DeltaKVCache
from tests.llama_helpers import MODEL, TEXT
cache_location, rounds, n_prompt = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
llm = Llama(str(MODEL), n_ctx=2048, flash_attn=True, verbose=False, seed=1)
prompt = llm.tokenize(TEXT.encode())[:n_prompt]

class Counting(DeltaKVCache):
    hits = 0
    def __getitem__(self, key):
        state = super().__getitem__(key)
        self.hits += 1
        return state

cache = Counting(cache_location, llm=llm, capacity_bytes=1 << 30)
out = []
for _ in range(rounds):
    llm.reset()
    llm.set_cache(cache)
    hits, t = cache.hits, time.perf_counter()
    text = llm.create_completion(prompt, max_tokens=16, temperature=0)["choices"][0]["text"]
    out.append({"text": text, "hit": cache.hits > hits, "seconds": time.perf_counter() - t, "cwd": os.getcwd()})
    llm.set_cache(None)
print(json.dumps(out))
"""
SHARED_PROMPT_TOKENS = 1200


def _machine(cwd, cache_location, rounds=1):
    proc = subprocess.run([sys.executable, "-c", MACHINE, str(ROOT), cache_location, str(rounds),
                           str(SHARED_PROMPT_TOKENS)], cwd=cwd, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONWARNINGS": "error::RuntimeWarning"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@needs_llama
@pytest.mark.llama
@pytest.mark.slow
def test_two_machines_share_a_redis_cache_and_get_the_tokens_a_local_cache_gives(tmp_path):
    from .test_stores import key_prefix
    from .servers import shared_redis_url

    url = f"{shared_redis_url()}/shared/{key_prefix(tmp_path)}"
    for folder in ("machine-1", "machine-2", "local"):
        (tmp_path / folder).mkdir()
    [first] = _machine(tmp_path / "machine-1", url)
    [second] = _machine(tmp_path / "machine-2", url)
    local_miss, local_hit = _machine(tmp_path / "local", str(tmp_path / "local" / "cache"), rounds=2)

    assert not first["hit"] and second["hit"], (first, second)  # the second machine's first completion
    assert local_hit["hit"] and second["text"] == local_hit["text"]
    assert first["cwd"] != second["cwd"]
    print(f"\n{SHARED_PROMPT_TOKENS}-token prompt, 16 tokens: machine 1 (evaluates) {first['seconds']:.2f} s, "
          f"machine 2 (from Redis) {second['seconds']:.2f} s; local cache: miss {local_miss['seconds']:.2f} s, "
          f"hit {local_hit['seconds']:.2f} s")
