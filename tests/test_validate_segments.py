"""deltakv validate on .dkv files whose segment table or cell records are wrong.

The files are a real converted fixture with its segments rewritten: each segment's tensors are
coded again from the decoded rows it claims, so that only the one rule under test is broken.
A broken rule is a corrupt file: exit 1 and a line naming the stream and segment, with what was
expected and what was found. The segment-table rules of SPEC.md 3.2 are the reader's
(DkvSession refuses such files); validate reports the reader's verdict instead of failing.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from deltakv_format import operations
from deltakv_format.constants import GGMLType, GGUFValueType
from deltakv_format.container import KEY_HEADER_CRC, KEY_RESERVE, KEY_TENSOR_CRC, TensorData, write_container
from deltakv_format.gguf_io import KeyValue
from deltakv_format.llama_state import parse_state
from deltakv_format.session import DkvSession, cell_record_ends, write_session
from deltakv_tools.cli import main

from .conftest import FIXTURES
from .test_llama_state import _with_ext_records

U32, U64, ARR = GGUFValueType.UINT32, GGUFValueType.UINT64, GGUFValueType.ARRAY
SOURCE = FIXTURES / "smollm2_v10_fa1.ggsn"  # one stream of 24 cells (positions 0..23, sequence 0), 30 layers


def validate(path):
    return CliRunner().invoke(main, ["validate", str(path)], catch_exceptions=False)


def problems(result) -> list[str]:
    return [line[len("problem: "):] for line in result.output.splitlines() if line.startswith("problem: ")]


def converted(tmp_path, name="one.dkv", **options) -> Path:
    path = tmp_path / name
    operations.convert(SOURCE, path, **options)
    return path


def _set(kvs, key, value_type, value, element_type=None):
    if element_type is not None:
        value = np.asarray(value, "<u8" if element_type == U64 else "<u4")
    return [kv for kv in kvs if kv.key != key] + [KeyValue(key, value_type, value, element_type)]


def cell_bytes(path) -> tuple[bytes, np.ndarray]:
    """The cell records of stream 0 and the byte offset where each starts (plus the end)."""
    with DkvSession(path) as s:
        cells = s.cells(0)
        ends = cell_record_ends(cells, s.stream_cells[0], s.stream_ext[0])
    return cells, np.concatenate(([0], ends))


def resegmented(src, dst, segments, *, cell_count=None, cells=None, segment_cells=None) -> Path:
    """``src`` (one segment, one stream) rewritten with ``segments`` = [(first_row, rows), ...].

    Each segment's part tensors are coded with the track's codec from the decoded rows
    [first_row, first_row + rows), and its cell tensor cut from ``cells`` (default: the stored
    records). ``cell_count`` replaces deltakv.stream.cell_count; ``segment_cells`` {segment: bytes}
    replaces a segment's cell tensor (None: leave it out)."""
    with DkvSession(src) as s:
        assert s.n_segments == 1 and len(s.stream_cells) == 1
        records = s.cells(0) if cells is None else cells
        starts = np.concatenate(([0], cell_record_ends(records, s.stream_cells[0], s.stream_ext[0])))
        decoded = {t.name: s.rows(t) for t in s.tracks}
        tensors = [TensorData(name, info.ggml_type, info.shape, np.array(s.file.tensor(name)))
                   for name, info in s.file.tensor_infos.items() if not name.startswith("s0.")]
        for k, (first, rows) in enumerate(segments):
            if not rows:
                continue
            piece = records[starts[first]:starts[first + rows]]
            if segment_cells is not None and k in segment_cells:
                piece = segment_cells[k]
            if piece is not None and len(piece):
                tensors.append(TensorData(f"s0.cells.{k}", GGMLType.I8, (len(piece),), np.frombuffer(piece, np.uint8)))
            for t in s.tracks:
                coded = t.codec.encode(decoded[t.name][first:first + rows], t.ggml_type, t.name)
                for part in t.codec.parts(t.ggml_type, t.n_values):
                    array = coded.get(part.role)
                    if array is not None and array.size:
                        tensors.append(TensorData(t.part_name(k, part.role), part.ggml_type,
                                                  (part.n_values, array.shape[0]), np.ascontiguousarray(array)))
        kvs = [kv for key, kv in s.file.kvs.items() if key not in (KEY_HEADER_CRC, KEY_TENSOR_CRC, KEY_RESERVE)]
        n_tokens, n_cells = s.n_tokens, s.stream_cells[0]
    n_seg = len(segments)
    kvs = _set(kvs, "deltakv.segment.count", U32, n_seg)
    kvs = _set(kvs, "deltakv.segment.first_row", ARR, [f for f, _ in segments], U64)
    kvs = _set(kvs, "deltakv.segment.rows", ARR, [r for _, r in segments], U64)
    kvs = _set(kvs, "deltakv.segment.first_token", ARR, [0] + [n_tokens] * (n_seg - 1), U64)
    kvs = _set(kvs, "deltakv.segment.tokens", ARR, [n_tokens] + [0] * (n_seg - 1), U64)
    kvs = _set(kvs, "deltakv.stream.cell_count", ARR, [n_cells if cell_count is None else cell_count], U64)
    write_container(dst, kvs, tensors)
    return Path(dst)


def with_pos(cells: bytes, starts, row: int, pos: int) -> bytes:
    out = bytearray(cells)
    struct.pack_into("<i", out, int(starts[row]), pos)
    return bytes(out)


# ---- the crafted files are right when the rules are kept ---------------------------------------


def test_two_segment_file_restores_the_original_and_validates(tmp_path):
    one = converted(tmp_path, codec="raw")
    two = resegmented(one, tmp_path / "two.dkv", [(0, 24), (16, 8)])
    r = validate(two)
    assert r.exit_code == 0, r.output
    assert operations.restore(two, tmp_path / "back.ggsn") and (tmp_path / "back.ggsn").read_bytes() == SOURCE.read_bytes()
    # a later segment that starts inside the rows held so far, on every track's keyframe
    mixed = converted(tmp_path, "mixed.dkv", codec="dkv-q4", k_codec="q8_0", keyframe_interval=8)
    assert validate(resegmented(mixed, tmp_path / "mixed2.dkv", [(0, 20), (8, 16)])).exit_code == 0


# ---- the segment table (SPEC.md 3.2): refused by the reader, reported by validate ---------------


@pytest.mark.parametrize("cell_count", [20, 28])
def test_segments_that_give_a_stream_more_or_fewer_cells_than_recorded(tmp_path, cell_count):
    bad = resegmented(converted(tmp_path, codec="raw"), tmp_path / "bad.dkv", [(0, 16), (16, 8)], cell_count=cell_count)
    r = validate(bad)
    assert r.exit_code == 1, r.output
    assert problems(r) == [f"stream 0: segments hold 24 rows, deltakv.stream.cell_count says {cell_count}"]
    assert r.output.rstrip().endswith("1 problem(s)")


@pytest.mark.parametrize("segments, message", [
    ([(0, 16), (20, 4)], "segment 1 of stream 0 starts at row 20, after the previous end 16"),
    ([(8, 16)], "segment 0 of stream 0 starts at row 8, after the previous end 0"),
])
def test_segment_that_starts_past_the_rows_held_so_far(tmp_path, segments, message):
    bad = resegmented(converted(tmp_path, codec="raw"), tmp_path / "bad.dkv", segments, cell_count=24)
    r = validate(bad)
    assert r.exit_code == 1 and problems(r) == [message], r.output


def test_segment_off_the_keyframe_of_one_track(tmp_path):
    # K is q8_0 (keyframe interval 1), V dkv-q4 with interval 8: row 12 suits K only
    mixed = converted(tmp_path, codec="dkv-q4", k_codec="q8_0", keyframe_interval=8)
    r = validate(resegmented(mixed, tmp_path / "bad.dkv", [(0, 24), (12, 12)]))
    assert r.exit_code == 1 and problems(r) == ["segment 1 of s0.l0.v does not start on a keyframe"], r.output


# ---- cell records (validate's own checks) ---------------------------------------------------------


def test_same_sequence_and_position_twice_in_one_segment(tmp_path):
    one = converted(tmp_path, codec="raw")
    cells, starts = cell_bytes(one)
    bad = resegmented(one, tmp_path / "bad.dkv", [(0, 24)], cells=with_pos(cells, starts, 5, 3))
    r = validate(bad)
    assert r.exit_code == 1, r.output
    assert problems(r) == ["stream 0 segment 0: expected each (sequence id, position) pair once per stream, "
                           "found sequence 0 at position 3 in row 3 (segment 0) and row 5"]


def test_later_segment_repeating_the_positions_of_an_earlier_one(tmp_path):
    """Segment 1 holds rows 16..23 with the cell records of rows 0..7 (positions 0..7 again)."""
    one = converted(tmp_path, codec="raw")
    cells, starts = cell_bytes(one)
    bad = resegmented(one, tmp_path / "bad.dkv", [(0, 24), (16, 8)], segment_cells={1: cells[:starts[8]]})
    r = validate(bad)
    assert r.exit_code == 1, r.output
    assert problems(r) == ["stream 0 segment 1: expected each (sequence id, position) pair once per stream, "
                           "found sequence 0 at position 0 in row 0 (segment 0) and row 16, and 7 more repeated pairs"]


def test_sequence_id_twice_in_one_cell_record(tmp_path):
    one = converted(tmp_path, codec="raw")
    cells, starts = cell_bytes(one)
    at = int(starts[3])
    pos, n_seq, seq = struct.unpack_from("<iIi", cells, at)
    assert n_seq == 1
    doubled = cells[:at] + struct.pack("<iIii", pos, 2, seq, seq) + cells[at + 12:]
    r = validate(resegmented(one, tmp_path / "bad.dkv", [(0, 24)], cells=doubled))
    assert r.exit_code == 1, r.output
    assert problems(r) == ["stream 0 segment 0: expected each (sequence id, position) pair once per stream, "
                           "found sequence 0 at position 3 twice in the record of row 3"]


def test_cell_records_that_do_not_parse(tmp_path):
    one = converted(tmp_path, codec="raw")
    cells, starts = cell_bytes(one)
    tail = cells[starts[16]:]
    claims = bytearray(tail)
    struct.pack_into("<I", claims, int(starts[18] - starts[16]) + 4, 1000)  # row 18 claims 1000 sequence ids
    cases = [
        (bytes(claims), f"expected 8 cell records in tensor 's0.cells.1' ({len(tail)} bytes), found that "
                        "cell 2 claims 1000 sequence ids, past the end of the cell records"),
        (tail + bytes(12), f"expected 8 cell records filling tensor 's0.cells.1' ({len(tail) + 12} bytes), "
                           "found 12 bytes after them"),
        (None, "expected 8 cell records in tensor 's0.cells.1' (0 bytes), found that 8 cell records need at "
               "least 64 bytes, found 0"),
    ]
    for piece, message in cases:
        bad = resegmented(one, tmp_path / "bad.dkv", [(0, 24), (16, 8)], segment_cells={1: piece})
        r = validate(bad)
        assert r.exit_code == 1, r.output
        assert problems(r) == [f"stream 0 segment 1: {message}"], r.output


def test_records_of_a_segment_a_later_one_overrides_are_checked_too(tmp_path):
    one = converted(tmp_path, codec="raw")
    cells, _ = cell_bytes(one)
    bad = resegmented(one, tmp_path / "bad.dkv", [(0, 24), (0, 24)], segment_cells={0: cells + bytes(4)})
    with DkvSession(bad) as s:  # the reader decodes it: segment 1 owns every row
        assert s.cells(0) == cells
    r = validate(bad)
    assert r.exit_code == 1 and problems(r) == [
        f"stream 0 segment 0: expected 24 cell records filling tensor 's0.cells.0' ({len(cells) + 4} bytes), "
        "found 4 bytes after them"], r.output


# ---- what is not a problem ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["smollm2_v10_sharedseq_fa0.state", "smollm2_v9_fa1.ggsq", "smollm2_v10_2streams_fa1.state",
                                  "gemma3_v10_fa0.ggsq"])
def test_real_caches_have_no_repeated_pairs(tmp_path, name):
    """Cells shared by two sequences, cells without sequence ids (old sequence files), two streams
    holding the same positions, two KV caches: none repeats a pair within a stream."""
    path = tmp_path / "x.dkv"
    operations.convert(FIXTURES / name, path, codec="raw")
    r = validate(path)
    assert r.exit_code == 0 and not problems(r), r.output


def test_cells_with_ext_records_may_share_a_position(tmp_path):
    """M-RoPE embedding inputs share positions (their ext records differ): not a problem."""
    state = _with_ext_records(parse_state((FIXTURES / "smollm2_v10_fa1.ggsq").read_bytes()))
    path = tmp_path / "ext.dkv"
    write_session(state, path, "raw").close()
    cells, starts = cell_bytes(path)
    shared = resegmented(path, tmp_path / "shared.dkv", [(0, 24)], cells=with_pos(cells, starts, 5, 3))
    r = validate(shared)
    assert r.exit_code == 0, r.output


def test_unreadable_container_is_still_exit_2(tmp_path):
    one = converted(tmp_path, codec="raw")
    data = bytearray(one.read_bytes())
    data[200] ^= 1  # inside the header: its checksum fails, nothing in it can be trusted
    (tmp_path / "bad.dkv").write_bytes(bytes(data))
    r = validate(tmp_path / "bad.dkv")
    assert r.exit_code == 2 and "header checksum mismatch" in r.output, r.output
