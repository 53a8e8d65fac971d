"""The session schema table drives the writer and the reader; tracks are named by TrackId, not by strings."""

import re

import pytest

from deltakv_format.container import DkvFile
from deltakv_format.errors import CorruptError, DeltaKVError
from deltakv_format.session import DkvSession, write_session
from deltakv_format.session_schema import (
    SESSION_KEYS,
    TrackId,
    decode_metadata,
    encode_metadata,
    is_byte_tensor,
    parse_track_part,
    stream_track_ids,
)

from .conftest import ROOT
from .synthetic import SyntheticContext


def _written(tmp_path, **kw):
    path = tmp_path / "s.dkv"
    write_session(SyntheticContext(n_max=64, n_layer=2, n_values=64, **kw).state(40), path, "dkv-q4").close()
    return path


def test_metadata_decoded_and_encoded_again_is_what_the_file_holds(tmp_path):
    with DkvFile(_written(tmp_path)) as f:
        meta = decode_metadata(f.kvs)
        again = encode_metadata(meta)
        ours = [row.key for row in SESSION_KEYS if not row.container and row.key in f.kvs]
        assert [kv.key for kv in again] == ours  # table order, optional keys only where present
        for kv in again:
            stored = f.kvs[kv.key]
            assert (kv.value_type, kv.element_type) == (stored.value_type, stored.element_type), kv.key
            if kv.element_type is None:
                assert kv.value == stored.value, kv.key
            else:
                assert [str(v) for v in kv.value] == [str(v) for v in stored.value], kv.key


def test_the_writer_refuses_what_the_reader_refuses(tmp_path):
    with DkvFile(_written(tmp_path)) as f:
        meta = decode_metadata(f.kvs)
    meta.stream_cells = meta.stream_cells + [0]
    with pytest.raises(DeltaKVError, match=r"deltakv.stream.cell_count: expected 1 entries \(one per stream\), found 2"):
        encode_metadata(meta)
    meta.stream_cells = meta.stream_cells[:1]
    meta.track_n_values = [0] * len(meta.track_n_values)
    with pytest.raises(DeltaKVError, match=r"deltakv.track.n_values\[0\]: expected 1..4294967295, found 0"):
        encode_metadata(meta)
    meta.track_n_values = [64] * len(meta.track_n_values)
    meta.layout = "v12"
    with pytest.raises(DeltaKVError, match="deltakv.source.layout: expected one of"):
        encode_metadata(meta)


def test_an_unbounded_range_says_at_least(tmp_path):
    from .test_hostile import I32, assemble, parts_of, with_array, write

    kvs, infos, data = parts_of(_written(tmp_path))
    raw = assemble(with_array(kvs, "deltakv.stream.n_layer", I32, [-5]), infos, data)
    with pytest.raises(CorruptError, match=r"deltakv.stream.n_layer\[0\]: expected at least -1, found -5"):
        DkvSession(write(tmp_path, raw))


def test_track_ids_and_tensor_names():
    assert stream_track_ids(1, 2, 1) == [TrackId(1, 0, "k"), TrackId(1, 1, "k"), TrackId(1, 0, "v")]
    with pytest.raises(ValueError, match="track role: expected one of"):
        TrackId(0, 0, "q")
    assert parse_track_part("s12.l3.v.4.mode") == (TrackId(12, 3, "v"), 4, "mode")
    for name in ("s01.l0.k.0.data", "s0.l0.x.0.data", "s0.l0.k.data", "runtime.input_ids", "s0.cells.0"):
        assert parse_track_part(name) is None, name
    assert is_byte_tensor("section.3") and is_byte_tensor("s1.cells.2")
    assert not is_byte_tensor("section.x") and not is_byte_tensor("s0.l0.k.0.data")


def test_tracks_know_their_role(tmp_path):
    with DkvSession(_written(tmp_path)) as s:
        assert [t.id.role for t in s.tracks] == ["k", "k", "v", "v"]
        assert all(s.track_by_name[t.id.name] is t for t in s.tracks)


def test_no_module_tells_k_from_v_by_the_name_string():
    """Is this track K or V, which stream: TrackId says; no code slices or matches track names."""
    patterns = [r'endswith\("\.[kv]"\)', r'endswith\("\." \+ role\)', r"name\[-1\]", r'f"s\{[a-z]+\}\.l\{',
                r'"\.l" in name', r'suffix\[-1\]']
    offenders = []
    for folder in ("deltakv_format", "runtime", "tools", "fuzz"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            offenders += [f"{path.relative_to(ROOT)}: {p}" for p in patterns if re.search(p, text)]
    assert not offenders, offenders
