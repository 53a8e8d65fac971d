"""The .dkv container: GGUF validity, checksums, append, crash-safe commit."""

import os
import struct

import numpy as np
import pytest

from deltakv_format.codecs import CODEC_CLASSES
from deltakv_format.container import DkvFile, HEADER_CRC_VALUE_OFFSET, crc32c
from deltakv_format.errors import BadMagicError, ChecksumError, DeltaKVError, TruncatedError, UnsupportedVersionError
from deltakv_format.session import DkvSession, append_session, write_session

from .synthetic import SyntheticContext, payloads, same_state

CODECS = list(CODEC_CLASSES)


def test_crc32c_known_value():
    assert crc32c(b"123456789") == 0xE3069283


@pytest.mark.parametrize("codec", CODECS)
def test_gguf_reader_opens_every_dkv(tmp_dkv, codec):
    from gguf import GGUFReader

    ctx = SyntheticContext()
    write_session(ctx.state(100), tmp_dkv, codec).close()
    reader = GGUFReader(tmp_dkv)
    assert reader.fields["general.architecture"].contents() == "deltakv"
    with DkvFile(tmp_dkv) as f:
        assert [t.name for t in reader.tensors] == [t.name for t in f.header.tensors]
        for t in reader.tensors:
            ours = f.tensor(t.name)
            assert bytes(np.asarray(t.data).tobytes()) == ours.tobytes(), t.name
        assert f.verify() == []


@pytest.mark.parametrize("codec", CODECS)
def test_write_then_read_rebuilds_state(tmp_dkv, codec):
    ctx = SyntheticContext(v_trans=1)
    state = ctx.state(77)
    with write_session(state, tmp_dkv, codec).open() as s:
        rebuilt = s.to_llama_state()
    assert same_state(state, rebuilt, payload=codec in ("raw", "f16"))
    assert [len(p) for p in payloads(state)] == [len(p) for p in payloads(rebuilt)]


@pytest.mark.parametrize("codec", ["raw", "delta-q4_0", "dkv-q4"])
def test_append_equals_one_shot_conversion(tmp_path, codec):
    ctx = SyntheticContext(n_max=300)
    grown = tmp_path / "grown.dkv"
    write_session(ctx.state(50), grown, codec).close()
    for n in (51, 64, 100, 133, 300):
        append_session(grown, ctx.state(n))
    once = tmp_path / "once.dkv"
    write_session(ctx.state(300), once, codec).close()
    with DkvSession(grown) as a, DkvSession(once) as b:
        assert a.n_segments == 6 and a.n_tokens == 300
        ra, rb = a.to_llama_state(), b.to_llama_state()
        assert same_state(ra, rb)  # appending re-encodes the partial chunk: same bytes as one shot
        assert a.file.verify() == []


def test_append_cost_is_proportional_to_new_rows(tmp_path):
    ctx = SyntheticContext(n_max=2000, n_layer=2)
    path = tmp_path / "s.dkv"
    write_session(ctx.state(1900), path, "dkv-q4").close()
    before = os.path.getsize(path)
    append_session(path, ctx.state(1964))
    added = os.path.getsize(path) - before
    per_row = before / 1900
    assert added < 110 * per_row  # 64 new rows + at most one re-encoded partial chunk (< 32 rows) + alignment


def test_append_refuses_foreign_state(tmp_path):
    path = tmp_path / "s.dkv"
    write_session(SyntheticContext(seed=1).state(40), path, "dkv-q4").close()
    other = SyntheticContext(seed=2, n_values=64)
    with pytest.raises(DeltaKVError):
        append_session(path, other.state(60))


def _corrupt(path, offset, xor=0x01):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ xor]))


def test_every_single_bit_flip_is_detected(tmp_dkv):
    write_session(SyntheticContext(n_layer=1, n_values=32).state(5), tmp_dkv, "dkv-q4").close()
    size = os.path.getsize(tmp_dkv)
    with DkvFile(tmp_dkv) as f:
        data_start = f.data_start
    rng = np.random.default_rng(0)
    # every byte of the tensor data and of the header's first 2 KiB, plus sampled reserve bytes
    offsets = list(range(0, 2048)) + list(rng.integers(2048, data_start, 200)) + list(range(data_start, size))
    for offset in offsets:
        bit = 1 << int(rng.integers(0, 8))
        _corrupt(tmp_dkv, int(offset), bit)
        try:
            with DkvFile(tmp_dkv) as f:
                problems = f.verify()
            assert problems, f"flip at {offset} undetected"
        except DeltaKVError:
            pass
        finally:
            _corrupt(tmp_dkv, int(offset), bit)
    with DkvFile(tmp_dkv) as f:
        assert f.verify() == []


def test_bad_magic_version_and_truncation(tmp_dkv, tmp_path):
    write_session(SyntheticContext().state(10), tmp_dkv, "dkv-q4").close()
    raw = tmp_dkv.read_bytes()
    bad = tmp_path / "bad.dkv"
    bad.write_bytes(b"GGSN" + raw[4:])
    with pytest.raises(BadMagicError, match="expected magic"):
        DkvFile(bad)
    bad.write_bytes(raw[:4] + struct.pack("<I", 2) + raw[8:])
    with pytest.raises(UnsupportedVersionError, match="version 3, found 2"):
        DkvFile(bad)
    for cut in (0, 10, 23, 100, 5000, len(raw) - 1):
        bad.write_bytes(raw[:cut])
        with pytest.raises(DeltaKVError):
            DkvFile(bad)
    bad.write_bytes(raw[:HEADER_CRC_VALUE_OFFSET] + b"\0\0\0\0" + raw[HEADER_CRC_VALUE_OFFSET + 4:])
    with pytest.raises(ChecksumError, match="header checksum"):
        DkvFile(bad)


def test_journal_recovery_commits_or_discards(tmp_path):
    """Simulate a crash between the journal and the header write: the reader sees the new snapshot."""
    import deltakv_format.container as container

    ctx = SyntheticContext()
    path = tmp_path / "s.dkv"
    write_session(ctx.state(40), path, "dkv-q4").close()
    old_bytes = path.read_bytes()

    real_write_header = {}
    original_open = open

    class Crash(Exception):
        pass

    # Let the journal be written, then crash before the header overwrite.
    original_fsync_dir = container._fsync_dir
    calls = {"n": 0}

    def crash_after_journal(p):
        calls["n"] += 1
        original_fsync_dir(p)
        if os.path.exists(str(path) + "-journal"):
            raise Crash()

    container._fsync_dir = crash_after_journal
    try:
        with pytest.raises(Crash):
            append_session(path, ctx.state(90))
    finally:
        container._fsync_dir = original_fsync_dir
    assert os.path.exists(str(path) + "-journal")
    assert path.read_bytes()[:1000] == old_bytes[:1000]  # header untouched
    os.chmod(path, 0o444)
    try:
        with DkvSession(path, ) as s:  # read-only: uses the journal's header
            assert s.n_tokens == 90
    finally:
        os.chmod(path, 0o644)
    with DkvSession.open_for_append(path) as s:  # a writer: replays and deletes the journal
        assert s.n_tokens == 90
        assert s.file.verify() == []
    assert not os.path.exists(str(path) + "-journal")


def test_incomplete_journal_is_discarded(tmp_path):
    ctx = SyntheticContext()
    path = tmp_path / "s.dkv"
    write_session(ctx.state(40), path, "dkv-q4").close()
    with open(str(path) + "-journal", "wb") as j:
        j.write(b"DKVJ" + b"\x01\x00\x00\x00" + b"\xff" * 30)  # torn journal
    with DkvSession.open_for_append(path) as s:  # a writer deletes it
        assert s.n_tokens == 40
    assert not os.path.exists(str(path) + "-journal")


def _committed_journal(tmp_path):
    """A session whose append crashed after its journal was committed, before the header was written
    in place: the file's header is the 40-token snapshot, the journal's the 90-token one."""
    import deltakv_format.container as container

    ctx = SyntheticContext()
    path = tmp_path / "s.dkv"
    write_session(ctx.state(40), path, "dkv-q4").close()

    class Crash(Exception):
        pass

    original_fsync_dir = container._fsync_dir

    def crash_after_journal(p):
        original_fsync_dir(p)
        if os.path.exists(str(path) + "-journal"):
            raise Crash()

    container._fsync_dir = crash_after_journal
    try:
        with pytest.raises(Crash):
            append_session(path, ctx.state(90))
    finally:
        container._fsync_dir = original_fsync_dir
    return ctx, path


def test_a_reader_never_writes(tmp_path):
    """SPEC.md 8: a reader uses a committed journal's header and leaves the file and the journal alone,
    even where it could write them; a torn journal it ignores."""
    ctx, path = _committed_journal(tmp_path)
    journal = tmp_path / ("s.dkv" + "-journal")
    before, journal_before = path.read_bytes(), journal.read_bytes()
    with DkvSession(path) as s:
        assert s.n_tokens == 90
        assert same_state(s.to_llama_state(), ctx.state(90), payload=False)
    assert path.read_bytes() == before and journal.read_bytes() == journal_before
    journal.write_bytes(b"DKVJ" + b"\x01\x00\x00\x00" + b"\xff" * 30)  # torn
    with DkvSession(path) as s:
        assert s.n_tokens == 40
    assert path.read_bytes() == before and journal.exists()


def test_a_new_file_over_a_crashed_append_recovers_the_journal_first(tmp_path):
    """Left behind, the old file's committed journal would be read as the header of the new file."""
    _, path = _committed_journal(tmp_path)
    write_session(SyntheticContext(seed=3).state(20), path, "raw").close()
    assert not os.path.exists(str(path) + "-journal")
    with DkvSession(path) as s:
        assert s.n_tokens == 20 and s.file.verify() == []


def test_write_session_does_not_read_back_what_it_wrote(tmp_path, monkeypatch):
    import deltakv_format.container as container

    opened = []
    real_init = container.DkvFile.__init__
    monkeypatch.setattr(container.DkvFile, "__init__", lambda self, *a, **k: opened.append(a) or real_init(self, *a, **k))
    path = tmp_path / "s.dkv"
    written = write_session(SyntheticContext().state(50), path, "dkv-q4", k_codec="q8_0")
    assert opened == []
    with written.open() as s:
        assert written.stats() == s.stats()
        assert [(t.id, t.codec.name) for t in written.tracks] == [(t.id, t.codec.name) for t in s.tracks]
        assert written.file_size == os.path.getsize(path) == s.file.file_size


def test_an_append_reads_the_header_once(tmp_path, monkeypatch):
    import deltakv_format.container as container

    ctx = SyntheticContext()
    path = tmp_path / "s.dkv"
    write_session(ctx.state(40), path, "dkv-q4").close()
    parses = []
    real_parse = container.parse_header
    monkeypatch.setattr(container, "parse_header", lambda *a, **k: parses.append(1) or real_parse(*a, **k))
    assert append_session(path, ctx.state(60))["rows_added"] == 60 - 32
    assert len(parses) == 1
    with DkvSession.open_for_append(path) as s:  # the caller's own checks read the same parse
        assert s.n_tokens == 60
        append_session(s, ctx.state(70))
    assert len(parses) == 2
    with DkvSession(path) as s:
        assert s.n_tokens == 70 and s.file.verify() == []


def test_an_append_needs_the_session_opened_for_it(tmp_path):
    import fcntl

    ctx = SyntheticContext()
    path = tmp_path / "s.dkv"
    write_session(ctx.state(40), path, "dkv-q4").close()
    with DkvSession(path) as s, pytest.raises(DeltaKVError, match="expected a session opened with DkvSession.open_for_append"):
        append_session(s, ctx.state(60))
    with DkvSession.open_for_append(path) as s, open(path, "rb") as other:
        with pytest.raises(BlockingIOError):  # another writer waits for the lock
            fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(path, "rb") as other:
        fcntl.flock(other.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # released with the session


def test_an_append_of_nothing_new_leaves_the_file_as_it_was(tmp_path):
    """Found while moving the append: with no new rows and no new tokens (extend twice in a row) the
    append committed a header with no session keys, and the file no longer opened."""
    ctx = SyntheticContext()
    path = tmp_path / "s.dkv"
    write_session(ctx.state(40), path, "dkv-q4").close()
    append_session(path, ctx.state(70))
    before = path.read_bytes()
    assert append_session(path, ctx.state(70)) == {"rows_added": 0, "tokens_added": 0, "rewritten": None}
    assert path.read_bytes() == before
    with DkvSession(path) as s:
        assert s.n_tokens == 70 and same_state(s.to_llama_state(), ctx.state(70), payload=False)
