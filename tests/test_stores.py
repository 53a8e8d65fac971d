"""The SessionStore contract, run against every backend, then what only the local folder store promises.

The contract tests are parametrized over ``STORE_FACTORIES``. A new backend (Redis, object
storage) passes when its factory is added there and every test of the first part passes; the
docstring of ``deltakv_format.stores.SessionStore`` is the contract they check. ``MemoryStore``
below is not a backend of the library: it is a second implementation that keeps the contract
tests honest (they must not lean on files) and lets the cache tests run over a store that is not
a folder.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from deltakv_format.container import temp_file_for
from deltakv_format.stores import (
    ENTRY_NAME_MAX,
    EntryInfo,
    EntryNotFoundError,
    InvalidEntryNameError,
    LocalDirectoryStore,
    LruByBytes,
    SessionStore,
    StoreError,
    bytes_view,
    check_entry_name,
    entry_in_use,
)

ROOT = Path(__file__).resolve().parent.parent


class MemoryStore:
    """A SessionStore in a dict (one process only): the contract's second implementation."""

    def __init__(self):
        self._entries: dict[str, tuple[bytes, int]] = {}  # name -> (bytes, last use)
        self._lock = threading.Lock()
        self._clock = 0

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def locate(self, name):
        return f"memory://{id(self):x}/{check_entry_name(name)}"

    def get(self, name):
        check_entry_name(name)
        with self._lock:
            if name not in self._entries:
                raise EntryNotFoundError(f"no entry {name!r} in the store", path=f"memory://{id(self):x}")
            return memoryview(self._entries[name][0])

    def put(self, name, data):
        check_entry_name(name)
        data = bytes(bytes_view(data, f"MemoryStore.put({name!r})"))
        with self._lock:
            self._entries[name] = (data, self._tick())

    def delete(self, name):
        check_entry_name(name)
        with self._lock:
            return self._entries.pop(name, None) is not None

    def list(self):
        with self._lock:
            return [EntryInfo(name, len(data), used) for name, (data, used) in self._entries.items()]

    def touch(self, name):
        check_entry_name(name)
        with self._lock:
            if name not in self._entries:
                raise EntryNotFoundError(f"no entry {name!r} in the store", path=f"memory://{id(self):x}")
            self._entries[name] = (self._entries[name][0], self._tick())


@dataclass(frozen=True)
class StoreFactory:
    """How the contract tests get a backend."""

    open: Callable[[Path], SessionStore]  # a store over storage named by a fresh folder (a key prefix, say)
    shared_across_processes: bool  # a store opened on the same folder in another process sees the same entries
    clock_step_s: float  # a pause after which put and touch are certainly ordered on the store's clock
    # Writers are killed up to this long after they start: some puts of 6 MiB finish, some are cut.
    kill_window_s: float = 0.08


def open_local_store(root: Path) -> SessionStore:
    return LocalDirectoryStore(root / "store")


_MEMORY_STORES: dict[Path, MemoryStore] = {}


def open_memory_store(root: Path) -> SessionStore:
    return _MEMORY_STORES.setdefault(root, MemoryStore())


def key_prefix(root: Path) -> str:
    """A prefix of its own for each test's fresh folder, on a server every test shares."""
    return hashlib.sha256(str(root).encode()).hexdigest()[:16]


def open_redis_store(root: Path) -> SessionStore:
    from deltakv_format.stores import RedisStore

    from .servers import shared_redis_url

    return RedisStore(shared_redis_url(), prefix=f"test/{key_prefix(root)}/")


def open_s3_store(root: Path) -> SessionStore:
    from deltakv_format.stores import FsspecStore

    from .servers import S3_BUCKET, s3_storage_options

    return FsspecStore(f"s3://{S3_BUCKET}/{key_prefix(root)}", **s3_storage_options())


def open_fsspec_memory_store(root: Path) -> SessionStore:
    from deltakv_format.stores import FsspecStore

    return FsspecStore(f"memory://deltakv-test/{key_prefix(root)}")


def open_fsspec_file_store(root: Path) -> SessionStore:
    from deltakv_format.stores import FsspecStore

    return FsspecStore(f"file://{root / 'store'}")


STORE_FACTORIES = {
    "local": StoreFactory(open_local_store, shared_across_processes=True, clock_step_s=0.002),
    "memory": StoreFactory(open_memory_store, shared_across_processes=False, clock_step_s=0.0),
    # Last use on the server's clock, strictly increasing: no pause needed.
    "redis": StoreFactory(open_redis_store, shared_across_processes=True, clock_step_s=0.0),
    # Last use on the clients' clock (time.time_ns).
    # A 6 MiB put to moto takes about 0.1 s warm, more in a writer's fresh connection.
    "s3": StoreFactory(open_s3_store, shared_across_processes=True, clock_step_s=0.002, kill_window_s=0.6),
    "fsspec-memory": StoreFactory(open_fsspec_memory_store, shared_across_processes=False, clock_step_s=0.002),
    "fsspec-file": StoreFactory(open_fsspec_file_store, shared_across_processes=True, clock_step_s=0.002),
}
SHARED_FACTORIES = [name for name, f in STORE_FACTORIES.items() if f.shared_across_processes]


@pytest.fixture(params=sorted(STORE_FACTORIES))
def factory(request) -> StoreFactory:
    return STORE_FACTORIES[request.param]


@pytest.fixture
def store(factory, tmp_path) -> SessionStore:
    return factory.open(tmp_path)


def names_and_sizes(store) -> dict[str, int]:
    return {info.name: info.size for info in store.list()}


def by_last_use(store) -> list[str]:
    return [info.name for info in sorted(store.list(), key=lambda info: (info.last_used_ns, info.name))]


# ---- the contract ---------------------------------------------------------------------------------


def test_it_is_a_session_store(store):
    assert isinstance(store, SessionStore)


@pytest.mark.parametrize("data", [b"hello", bytearray(b"\0\1\2" * 1000), memoryview(b"view"), b"",
                                  np.arange(10, dtype="<u4")], ids=["bytes", "bytearray", "memoryview", "empty", "numpy"])
def test_put_then_get_returns_the_same_bytes_read_only(store, data):
    store.put("a.dkv", data)
    with store.get("a.dkv") as got:
        assert isinstance(got, memoryview) and got.readonly
        assert bytes(got) == bytes(memoryview(data).cast("B"))


def test_put_replaces_and_list_reports_sizes(store):
    assert store.list() == []
    store.put("a.dkv", b"x" * 10)
    store.put("b", b"y" * 3)
    store.put("empty", b"")
    assert names_and_sizes(store) == {"a.dkv": 10, "b": 3, "empty": 0}
    store.put("a.dkv", b"z" * 7)
    assert names_and_sizes(store) == {"a.dkv": 7, "b": 3, "empty": 0}
    with store.get("a.dkv") as got:
        assert bytes(got) == b"z" * 7
    assert all(isinstance(info, EntryInfo) and isinstance(info.last_used_ns, int) for info in store.list())


def test_a_buffer_from_get_keeps_its_bytes_when_the_entry_is_replaced_or_deleted(store):
    store.put("a", b"old" * 1000)
    held = store.get("a")
    store.put("a", b"new" * 10)
    assert bytes(held) == b"old" * 1000
    assert store.delete("a")
    assert bytes(held) == b"old" * 1000
    held.release()


def test_delete(store):
    store.put("a", b"1")
    store.put("b", b"2")
    assert store.delete("a") is True
    assert store.delete("a") is False  # gone already: not an error
    assert names_and_sizes(store) == {"b": 1}
    with pytest.raises(EntryNotFoundError):
        store.get("a")


def test_touch_makes_an_entry_the_most_recently_used(store, factory):
    for name in ("a", "b", "c"):
        store.put(name, name.encode())
        time.sleep(factory.clock_step_s)
    assert by_last_use(store) == ["a", "b", "c"]
    store.touch("a")
    assert by_last_use(store) == ["b", "c", "a"]
    time.sleep(factory.clock_step_s)
    store.put("b", b"again")  # a put is a use too
    assert by_last_use(store) == ["c", "a", "b"]
    with store.get("c"):  # reading is not a use: the cache decides what counts
        pass
    assert by_last_use(store)[0] == "c"
    with store.get("c") as got:
        assert bytes(got) == b"c"  # touch changes no bytes


def test_missing_entries_raise_entry_not_found(store):
    for call in (lambda: store.get("nothing.dkv"), lambda: store.touch("nothing.dkv")):
        with pytest.raises(EntryNotFoundError, match="no entry 'nothing.dkv'") as info:
            call()
        assert isinstance(info.value, KeyError) and isinstance(info.value, StoreError)
        assert str(info.value).count("'nothing.dkv'") == 1  # not KeyError's quoting of the whole message


@pytest.mark.parametrize("data", ["text", 42, [1, 2], None], ids=["str", "int", "list", "None"])
def test_put_of_something_not_bytes_like_is_a_type_error(store, data):
    with pytest.raises(TypeError, match="expected a bytes-like object"):
        store.put("a", data)
    assert store.list() == []


def test_put_of_a_strided_buffer_is_a_type_error(store):
    with pytest.raises(TypeError, match="expected a contiguous buffer"):
        store.put("a", np.arange(10, dtype=np.uint8)[::2])


UNSAFE_NAMES = ["", "/", "a/b", "/etc/passwd", "..", ".", "../escape", "..\\escape", "a\\b", ".hidden",
                ".a.dkv.abcd1234.tmp", "-rf", "a b", "a\0b", "a\nb", "é.dkv", "a:b", "a.dkv-journal",
                "x" * (ENTRY_NAME_MAX + 1), b"a.dkv", None, 7]


@pytest.mark.parametrize("name", UNSAFE_NAMES, ids=[repr(n)[:24] for n in UNSAFE_NAMES])
def test_unsafe_names_are_refused_by_every_method_and_touch_nothing(store, tmp_path, name):
    calls = {
        "get": lambda: store.get(name), "put": lambda: store.put(name, b"data"), "delete": lambda: store.delete(name),
        "touch": lambda: store.touch(name), "locate": lambda: store.locate(name),
    }
    for method, call in calls.items():
        with pytest.raises(InvalidEntryNameError, match="entry name") as info:
            call()
        assert "expected" in str(info.value) and "found" in str(info.value), method
    assert store.list() == []
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["store"])  # nothing beside the store's folder


@pytest.mark.parametrize("name", ["a", "0", "_", "A.b-c_d.dkv", "x" * ENTRY_NAME_MAX, "0123456789abcdef" * 2 + ".dkv"])
def test_portable_names_are_accepted(store, name):
    store.put(name, b"ok")
    assert names_and_sizes(store) == {name: 2}
    assert store.locate(name).endswith(name)


def test_a_reader_never_sees_a_half_written_entry(store):
    old, new = b"O" * (3 << 20), b"N" * (2 << 20) + b"!"
    store.put("e", old)
    stop = threading.Event()
    errors = []

    def writer():
        try:
            i = 0
            while not stop.is_set():
                store.put("e", new if i % 2 == 0 else old)
                i += 1
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        seen = set()
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline or len(seen) < 2:
            with store.get("e") as got:
                data = bytes(got)
            assert data in (old, new), f"a read of {len(data)} bytes is neither the old nor the new entry"
            seen.add(data)
            assert time.monotonic() < deadline + 10, "the writer never replaced the entry"
    finally:
        stop.set()
        thread.join()
    assert not errors, errors


# A fresh interpreter opens the store once, then forks one writer per command and SIGKILLs it:
#   random DELAY  the writer puts A, B, A, B, ... under one name until killed DELAY s after the fork
#   step NAME     (local store only) the writer puts B and kills itself at that step of the protocol
ZYGOTE = r"""
import os, signal, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from tests.test_stores import STORE_FACTORIES, KILL_A, KILL_B, KILL_NAME
store = STORE_FACTORIES[sys.argv[2]].open(Path(sys.argv[3]))

def die(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)

def arm(step):
    import deltakv_format.container as container
    if step == "mid-write":  # half of the bytes in the temporary file
        real_fdopen = os.fdopen
        class HalfThenDie:
            def __init__(self, f): self.f = f
            def write(self, data):
                view = memoryview(data).cast("B")
                self.f.write(view[: len(view) // 2]); self.f.flush(); os.fsync(self.f.fileno()); die()
            def __getattr__(self, name): return getattr(self.f, name)
            def __enter__(self): return self
            def __exit__(self, *exc): return self.f.__exit__(*exc)
        os.fdopen = lambda fd, *a, **k: HalfThenDie(real_fdopen(fd, *a, **k))
    elif step == "before-fsync":  # every byte written, not yet durable
        os.fsync = die
    elif step == "before-rename":  # the temporary file complete and durable
        os.replace = die
    elif step == "after-rename":  # renamed, the folder not yet fsynced
        container._fsync_dir = die

for line in sys.stdin:
    cmd, arg = line.split()
    pid = os.fork()
    if pid == 0:
        try:
            if cmd == "random":
                i = 0
                while True:
                    store.put(KILL_NAME, KILL_A if i % 2 == 0 else KILL_B)
                    i += 1
            arm(arg)
            store.put(KILL_NAME, KILL_B)
        finally:
            os._exit(3)  # only reached if a step did not kill
    if cmd == "random":
        time.sleep(float(arg))
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    print("killed" if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL else f"exit {status}", flush=True)
"""
KILL_NAME = "killed.dkv"
KILL_A = b"A" * (6 << 20)
KILL_B = b"B" * (5 << 20) + b"b"
LOCAL_STEPS = ["mid-write", "before-fsync", "before-rename", "after-rename"]


class Zygote:
    def __init__(self, factory_name: str, root: Path):
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE, str(ROOT), factory_name, str(root)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(self, cmd: str, arg) -> str:
        self.proc.stdin.write(f"{cmd} {arg}\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def held_value(store) -> str | None:
    """Which value the killed writer's entry holds (None: no entry); fails on anything else.

    A server may still apply a put that the writer had sent whole before it was killed (Redis
    runs the MULTI/EXEC it finds in a closed connection's buffer), between this get and list: so
    they are read again until they agree, and every read must hold a whole value."""
    deadline = time.monotonic() + 5.0
    while True:
        try:
            with store.get(KILL_NAME) as got:
                data = bytes(got)
        except EntryNotFoundError:
            data = None
        assert data in (None, KILL_A, KILL_B), f"the entry holds {len(data)} bytes, neither the old nor the new value"
        listed = names_and_sizes(store)
        # What the killed writer left is not listed.
        if listed == ({} if data is None else {KILL_NAME: len(data)}) or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert listed == ({} if data is None else {KILL_NAME: len(data)})
    return None if data is None else "A" if data == KILL_A else "B"


@pytest.mark.parametrize("factory_name", SHARED_FACTORIES)
def test_sigkill_mid_put_leaves_the_old_entry_or_the_new(tmp_path, factory_name):
    store = STORE_FACTORIES[factory_name].open(tmp_path)
    rng = random.Random(4321)
    zygote = Zygote(factory_name, tmp_path)
    try:
        seen = []
        for _ in range(25):
            delay = rng.uniform(0.0, STORE_FACTORIES[factory_name].kill_window_s)
            assert zygote.run("random", f"{delay:.4f}") == "killed"
            seen.append(held_value(store))
        assert set(seen) <= {None, "A", "B"} and seen[-1] is not None
        first = next(i for i, value in enumerate(seen) if value is not None)
        assert None not in seen[first:]  # once there, an entry is never lost to a killed put
    finally:
        zygote.close()


def test_sigkill_at_each_step_of_a_local_put(tmp_path):
    store = STORE_FACTORIES["local"].open(tmp_path)
    folder = Path(store.locate(KILL_NAME)).parent

    def temps():
        return sorted(folder.glob(f".{KILL_NAME}.*.tmp"))

    zygote = Zygote("local", tmp_path)
    try:
        assert zygote.run("step", "mid-write") == "killed"  # the very first put: no entry at all
        assert held_value(store) is None and len(temps()) == 1
        outcome = {}
        for step in LOCAL_STEPS:
            store.put(KILL_NAME, KILL_A)
            assert temps() == []  # the put removed what the killed writer left
            assert zygote.run("step", step) == "killed"
            outcome[step] = held_value(store)
        assert outcome == {"mid-write": "A", "before-fsync": "A", "before-rename": "A", "after-rename": "B"}
        assert zygote.run("step", "before-rename") == "killed"  # leaves a complete, stale temporary file
    finally:
        zygote.close()
    # Stale temporary files go with the next put of the same name; a live writer's stays.
    assert len(temps()) == 1
    fd, live = temp_file_for(folder / KILL_NAME)
    try:
        store.put(KILL_NAME, KILL_B)
        assert temps() == [Path(live)]
        assert names_and_sizes(store) == {KILL_NAME: len(KILL_B)}
    finally:
        os.close(fd)
        os.unlink(live)


# ---- least recently used, by bytes -------------------------------------------------------------------


def fill(store, factory, sizes: dict[str, int]):
    for name, size in sizes.items():
        store.put(name, b"x" * size)
        time.sleep(factory.clock_step_s)


def test_eviction_deletes_the_least_recently_used_until_the_entries_fit(store, factory):
    fill(store, factory, {"a": 100, "b": 100, "c": 100, "d": 100})
    store.touch("a")
    lru = LruByBytes(store)
    assert lru.total_bytes() == 400
    assert lru.evict(250) == ["b", "c"]
    assert sorted(names_and_sizes(store)) == ["a", "d"] and lru.total_bytes() == 200
    assert lru.evict(1000) == []


def test_eviction_spares_the_kept_entry_entries_being_read_and_entries_it_does_not_own(store, factory):
    fill(store, factory, {"old.dkv": 100, "read.dkv": 100, "foreign": 1000, "new.dkv": 100})
    lru = LruByBytes(store, owns=lambda name: name.endswith(".dkv"))
    assert lru.total_bytes() == 300  # the foreign entry does not count
    with lru.reading("read.dkv"):
        assert lru.evict(0, keep="new.dkv") == ["old.dkv"]
        assert not lru.delete_unless_in_use("read.dkv")
    assert sorted(names_and_sizes(store)) == ["foreign", "new.dkv", "read.dkv"]
    with entry_in_use(store.locate("new.dkv")):  # marked by location: any index over this storage sees it
        assert LruByBytes(store).evict(0) == ["read.dkv", "foreign"]
    assert lru.delete_unless_in_use("new.dkv") and lru.delete_unless_in_use("new.dkv")  # gone is gone
    assert store.list() == []


def test_touch_through_the_index_reports_gone_entries(store):
    lru = LruByBytes(store)
    store.put("a", b"1")
    assert lru.touch("a") is True
    store.delete("a")
    assert lru.touch("a") is False
    assert lru.info("a") is None


# ---- the local folder store ----------------------------------------------------------------------------


def test_local_entries_are_plain_files_written_with_the_umask(tmp_path):
    store = LocalDirectoryStore(tmp_path / "a" / "b")  # parents are created
    store.put("s.dkv", b"payload")
    path = tmp_path / "a" / "b" / "s.dkv"
    assert store.locate("s.dkv") == str(path.resolve())
    assert path.read_bytes() == b"payload"
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask  # not mkstemp's private 0600
    assert [p.name for p in path.parent.iterdir()] == ["s.dkv"]  # no temporary file left


def test_two_local_stores_over_one_folder_agree(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    one, two = LocalDirectoryStore("real"), LocalDirectoryStore(tmp_path / "link")
    one.put("a", b"1")
    assert one.locate("a") == two.locate("a")  # the identity entries in use are known by
    assert names_and_sizes(two) == {"a": 1}
    with entry_in_use(one.locate("a")):
        assert not LruByBytes(two).delete_unless_in_use("a")


def test_local_files_that_are_not_entries_are_not_listed_read_or_deleted(tmp_path):
    store = LocalDirectoryStore(tmp_path)
    # A temporary file of b.dkv, not of a.dkv: a put of a.dkv removes a.dkv's stale ones.
    for name in (".hidden", ".b.dkv.abcd1234.tmp", "a.dkv-journal", "with space.dkv"):
        (tmp_path / name).write_bytes(b"not an entry")
    (tmp_path / "sub.dkv").mkdir()
    fifo = tmp_path / "fifo.dkv"
    os.mkfifo(fifo)
    try:
        store.put("a.dkv", b"entry")
        assert names_and_sizes(store) == {"a.dkv": 5}
        with pytest.raises(EntryNotFoundError, match="is a folder"):
            store.get("sub.dkv")
        with pytest.raises(EntryNotFoundError, match="not a regular file"):
            store.get("fifo.dkv")  # and opening it did not block
        assert store.delete("sub.dkv") is False and (tmp_path / "sub.dkv").is_dir()
        with pytest.raises(EntryNotFoundError):
            store.touch("sub.dkv")
        assert LruByBytes(store).evict(0) == ["a.dkv"]
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [".hidden", ".b.dkv.abcd1234.tmp", "a.dkv-journal", "with space.dkv", "sub.dkv", "fifo.dkv"])
    finally:
        fifo.unlink()  # conftest opens every *.dkv left behind, and opening a FIFO waits for a writer


def test_local_store_errors_name_the_folder(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match="a store needs a folder, found a file"):
        LocalDirectoryStore(tmp_path / "file")
    with pytest.raises(FileNotFoundError, match="no such store folder"):
        LocalDirectoryStore(tmp_path / "missing", create=False)
    store = LocalDirectoryStore(tmp_path / "s")
    with pytest.raises(EntryNotFoundError) as info:
        store.get("a.dkv")
    assert str(tmp_path / "s") in str(info.value)
    (tmp_path / "s").rmdir()
    assert store.list() == []  # the folder went: the store is empty
    with pytest.raises(OSError):
        store.put("a.dkv", b"x")  # a storage failure is an OSError


def test_local_entries_are_read_by_the_path_readers(tmp_path):
    from deltakv_format.session import DkvSession, session_bytes, write_session

    from .synthetic import SyntheticContext, same_state

    state = SyntheticContext(v_trans=1).state(50)
    store = LocalDirectoryStore(tmp_path / "store")
    store.put("s.dkv", session_bytes(state, "dkv-q4"))
    write_session(state, tmp_path / "direct.dkv", "dkv-q4").close()
    assert Path(store.locate("s.dkv")).read_bytes() == (tmp_path / "direct.dkv").read_bytes()
    with (DkvSession(store.locate("s.dkv")) as by_path, store.get("s.dkv") as data,
          DkvSession.from_buffer(data, name=store.locate("s.dkv")) as by_buffer):
        assert same_state(by_path.to_llama_state(), by_buffer.to_llama_state())


def test_check_entry_name_explains_the_rule():
    assert check_entry_name("a.dkv") == "a.dkv"
    with pytest.raises(InvalidEntryNameError, match=r"entry name 'a/b': expected 1 to 200 characters from "
                                                    r"A-Z a-z 0-9 \. _ -, not starting with '\.' or '-', "
                                                    r"found '/' at position 1"):
        check_entry_name("a/b")
    with pytest.raises(InvalidEntryNameError, match="found '.' first"):
        check_entry_name(".x")
    with pytest.raises(InvalidEntryNameError, match="found 201 characters"):
        check_entry_name("x" * 201)
    with pytest.raises(InvalidEntryNameError, match="expected a str, found bytes"):
        check_entry_name(b"x")
    with pytest.raises(InvalidEntryNameError, match="journal"):
        check_entry_name("x.dkv-journal")
    assert issubclass(InvalidEntryNameError, ValueError)
