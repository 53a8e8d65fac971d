"""Hostile input: hand-made .dkv files and llama.cpp states with sizes that overflow, point outside
the file, overlap, or claim 2^40 tokens, cells, tensors or array elements.

Each is rejected with a DeltaKVError subclass whose message names what was expected and what
was found (and, where there is one, the offset), before any allocation proportional to the
claimed size: tracemalloc's peak stays under a few MB for inputs of a few KB. The tests marked
"fuzz finding" are the regression tests of what fuzz/ found (fuzz/README.md).
"""

from __future__ import annotations

import struct
import tracemalloc
from contextlib import contextmanager

import numpy as np
import pytest

from deltakv_format.constants import JOURNAL_MAGIC, JOURNAL_SUFFIX, JOURNAL_VERSION, GGMLType, GGUFValueType
from deltakv_format.container import (
    HEADER_CRC_VALUE_OFFSET,
    KEY_HEADER_CRC,
    KEY_RESERVE,
    KEY_TENSOR_CRC,
    DkvFile,
    build_header,
    crc32c,
)
from deltakv_format.errors import (
    BadMagicError,
    ChecksumError,
    CorruptError,
    DeltaKVError,
    LimitExceededError,
    TruncatedError,
    UnsupportedVersionError,
)
from deltakv_format.gguf_io import KeyValue, TensorInfo, parse_header
from deltakv_format.llama_state import _parse_outputs, _Reader, parse_server_tokens, parse_state, write_state
from deltakv_format.model_info import ModelInfo
from deltakv_format.session import DkvSession, append_session, cell_record_ends, write_session

from .synthetic import SyntheticContext

U8, U32, I32, U64, STR, ARR = (GGUFValueType.UINT8, GGUFValueType.UINT32, GGUFValueType.INT32,
                               GGUFValueType.UINT64, GGUFValueType.STRING, GGUFValueType.ARRAY)
U64_MAX = (1 << 64) - 1
PEAK_LIMIT = 8 << 20  # bytes: inputs here are a few KB; a claimed size would need GBs to TBs


@contextmanager
def small_peak(limit: int = PEAK_LIMIT):
    """Fails if the block allocates more than ``limit`` bytes at its peak (Python and numpy)."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    try:
        yield
    finally:
        peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
    assert peak < limit, f"peak allocation {peak} bytes"


def rejects(cls, fn, *fragments, offset=None):
    """``fn()`` raises exactly ``cls`` (not a subclass of it) with all ``fragments`` in its message,
    at ``offset`` if given, without a large allocation."""
    with small_peak():
        with pytest.raises(DeltaKVError) as info:
            fn()
    e = info.value
    assert type(e) is cls, f"expected {cls.__name__}, got {type(e).__name__}: {e}"
    for frag in fragments:
        assert frag in str(e), f"{frag!r} not in {str(e)!r}"
    if offset is not None:
        assert e.offset == offset, f"offset {e.offset}, expected {offset}: {e}"
    return e


# ---- .dkv builders ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_dkv(tmp_path_factory):
    """A small valid .dkv (raw codec, 40 tokens, 2 layers) and its parts."""
    path = tmp_path_factory.mktemp("hostile") / "base.dkv"
    write_session(SyntheticContext(n_max=64, n_layer=2, n_values=64, seed=7).state(40), path, "raw").close()
    return path


def parts_of(path):
    with DkvFile(path) as f:
        kvs = [kv for kv in f.kvs.values() if kv.key not in (KEY_HEADER_CRC, KEY_TENSOR_CRC, KEY_RESERVE)]
        infos = list(f.header.tensors)
        data = bytes(f._buf[f.data_start:])
    return kvs, infos, data


def assemble(kvs, infos, data, *, fix_crcs=True) -> bytes:
    """A .dkv with the given key-values and tensor infos over ``data`` (the data section), with a
    correct header CRC and (where the tensors lie inside ``data``) correct tensor CRCs."""
    crcs = [crc32c(data[t.offset:t.offset + t.nbytes]) if fix_crcs and t.offset + t.nbytes <= len(data) else 0
            for t in infos]
    return build_header(kvs, infos, crcs, None) + data


def with_kv(kvs, key, value_type, value, element_type=None):
    out = [kv for kv in kvs if kv.key != key]
    if value is not None:
        if element_type is not None and element_type != STR:
            value = np.asarray(value, dtype={U8: "<u1", U32: "<u4", I32: "<i4", U64: "<u8"}[element_type])
        out.append(KeyValue(key, value_type, value, element_type))
    return out


def with_array(kvs, key, element_type, values):
    return with_kv(kvs, key, ARR, values, element_type)


def write(tmp_path, raw: bytes, name="hostile.dkv"):
    p = tmp_path / name
    p.write_bytes(raw)
    return p


def patch(raw: bytes, offset: int, fmt: str, value) -> bytes:
    buf = bytearray(raw)
    struct.pack_into(fmt, buf, offset, value)
    return bytes(buf)


def open_all(path):
    """What a reader does: open, verify, decode, rebuild and serialise the llama.cpp state."""
    with DkvSession(path) as s:
        s.file.verify()
        s.tokens()
        write_state(s.to_llama_state())


def tensor_info_offsets(raw: bytes, names=None) -> dict[str, int]:
    """File offset of each tensor info (its name length field); the infos end the header."""
    if names is None:
        names = [t.name for t in parse_header(raw).tensors]
    out = {}
    for name in names:
        key = struct.pack("<Q", len(name)) + name.encode()
        out[name] = raw.rfind(key)
    return out


# ---- GGUF level: counts and sizes -----------------------------------------------------------------


def test_tensor_count_2_40(base_dkv, tmp_path):
    raw = patch(base_dkv.read_bytes(), 8, "<Q", 1 << 40)
    rejects(LimitExceededError, lambda: DkvFile(write(tmp_path, raw)), "tensor count is 1099511627776",
            "remaining bytes can hold", offset=8)


def test_key_value_count_near_2_64(base_dkv, tmp_path):
    raw = patch(base_dkv.read_bytes(), 16, "<Q", U64_MAX)
    rejects(LimitExceededError, lambda: DkvFile(write(tmp_path, raw)), f"key-value count is {U64_MAX}", offset=16)


def test_key_length_near_2_64(base_dkv, tmp_path):
    raw = patch(base_dkv.read_bytes(), 24, "<Q", U64_MAX - 7)
    rejects(LimitExceededError, lambda: DkvFile(write(tmp_path, raw)), "length of key", offset=24)


def test_string_value_length_overflows(base_dkv, tmp_path):
    raw = base_dkv.read_bytes()
    at = parse_header(raw).kvs["general.architecture"].value_offset
    rejects(LimitExceededError, lambda: DkvFile(write(tmp_path, patch(raw, at, "<Q", 1 << 63))),
            "length of string value of 'general.architecture' is 9223372036854775808", offset=at)


def test_array_of_2_40_elements(base_dkv, tmp_path):
    raw = base_dkv.read_bytes()
    at = parse_header(raw).kvs[KEY_TENSOR_CRC].value_offset + 4  # u32 element type, then u64 count
    rejects(LimitExceededError, lambda: DkvFile(write(tmp_path, patch(raw, at, "<Q", 1 << 40))),
            "array length of 'deltakv.tensor_crc32c' is 1099511627776", offset=at)


def test_string_array_count_near_2_64(base_dkv, tmp_path):
    raw = base_dkv.read_bytes()
    at = parse_header(raw).kvs["deltakv.track.name"].value_offset + 4
    rejects(LimitExceededError, lambda: DkvFile(write(tmp_path, patch(raw, at, "<Q", U64_MAX))),
            f"array length of 'deltakv.track.name' is {U64_MAX}", offset=at)


def test_tensor_dimensions_above_4(base_dkv, tmp_path):
    raw = base_dkv.read_bytes()
    name, at = next(iter(tensor_info_offsets(raw).items()))
    at += 8 + len(name)
    rejects(CorruptError, lambda: DkvFile(write(tmp_path, patch(raw, at, "<I", 5))),
            "has 5 dimensions; expected 1..4", offset=at)


def test_tensor_shape_product_overflows(base_dkv, tmp_path):
    kvs, infos, data = parts_of(base_dkv)
    infos[0] = TensorInfo(infos[0].name, (1 << 40, 1 << 40, 1 << 40), infos[0].ggml_type, infos[0].offset)
    raw = assemble(kvs, infos, data)
    rejects(LimitExceededError, lambda: DkvFile(write(tmp_path, raw)), "overflows",
            offset=tensor_info_offsets(raw, [infos[0].name])[infos[0].name])


def test_tensor_of_2_40_elements_points_outside_the_file(base_dkv, tmp_path):
    kvs, infos, data = parts_of(base_dkv)
    t = infos[-1]
    infos[-1] = TensorInfo(t.name, (1 << 40,), t.ggml_type, t.offset)
    raw = assemble(kvs, infos, data)
    e = rejects(TruncatedError, lambda: DkvFile(write(tmp_path, raw)), f"tensor {t.name!r} ends at file offset",
                f"the file has {len(raw)} bytes")
    assert e.offset == parse_header(raw).data_start + t.offset


def test_tensor_offset_near_2_64(base_dkv, tmp_path):
    kvs, infos, data = parts_of(base_dkv)
    t = infos[-1]
    infos[-1] = TensorInfo(t.name, t.shape, t.ggml_type, (U64_MAX // 64) * 64)
    raw = assemble(kvs, infos, data)
    rejects(TruncatedError, lambda: DkvFile(write(tmp_path, raw)), "ends at file offset", f"the file has {len(raw)} bytes")


def test_tensor_offset_not_aligned(base_dkv, tmp_path):
    kvs, infos, data = parts_of(base_dkv)
    t = infos[1]
    infos[1] = TensorInfo(t.name, t.shape, t.ggml_type, t.offset + 8)
    raw = assemble(kvs, infos, data)
    rejects(CorruptError, lambda: DkvFile(write(tmp_path, raw)), f"offset {t.offset + 8} is not a multiple of the alignment 64",
            offset=tensor_info_offsets(raw, [t.name])[t.name])


def test_overlapping_tensors(base_dkv, tmp_path):
    kvs, infos, data = parts_of(base_dkv)
    infos[1] = TensorInfo(infos[1].name, infos[1].shape, infos[1].ggml_type, infos[0].offset)
    rejects(CorruptError, lambda: DkvFile(write(tmp_path, assemble(kvs, infos, data))),
            f"tensor {infos[1].name!r} at data offset {infos[0].offset} overlaps the previous tensor")


def test_unknown_tensor_type(base_dkv, tmp_path):
    raw = base_dkv.read_bytes()
    name, at = next(iter(tensor_info_offsets(raw).items()))
    h = parse_header(raw)
    at_type = at + 8 + len(name) + 4 + 8 * len(h.tensors[0].shape)
    rejects(CorruptError, lambda: DkvFile(write(tmp_path, patch(raw, at_type, "<I", 99))),
            "has ggml type 99, unknown to this reader", offset=at_type)


def test_header_region_ends_outside_the_file(base_dkv, tmp_path):
    kvs, infos, data = parts_of(base_dkv)
    raw = assemble(with_kv(kvs, "general.alignment", U32, 1 << 30), infos[:1], data)
    rejects(TruncatedError, lambda: DkvFile(write(tmp_path, raw)), f"header region ends at {1 << 30}",
            f"the file has {len(raw)} bytes")


def test_wrong_magic_and_versions(base_dkv, tmp_path):
    raw = base_dkv.read_bytes()
    rejects(BadMagicError, lambda: DkvFile(write(tmp_path, b"GGSN" + raw[4:])), "expected magic b'GGUF'",
            "found b'GGSN'", offset=0)
    rejects(UnsupportedVersionError, lambda: DkvFile(write(tmp_path, patch(raw, 4, "<I", 4))),
            "expected GGUF version 3, found 4", offset=4)
    kvs, infos, data = parts_of(base_dkv)
    raw2 = assemble(with_kv(kvs, "deltakv.version", U32, 3), infos, data)
    rejects(UnsupportedVersionError, lambda: DkvFile(write(tmp_path, raw2)), "format version 3",
            "implements versions 1, 2")


def test_architecture_of_another_type(base_dkv, tmp_path):
    """review finding: an array-valued general.architecture raised numpy's ValueError (truth value of an array)."""
    kvs, infos, data = parts_of(base_dkv)
    raw = assemble(with_array(kvs, "general.architecture", U32, [1, 2, 3]), infos, data)
    rejects(BadMagicError, lambda: DkvFile(write(tmp_path, raw)), "expected architecture 'deltakv'",
            "found 'a ARRAY value'")


def test_header_checksum_checked_after_bounded_parse(base_dkv, tmp_path):
    raw = bytearray(base_dkv.read_bytes())
    raw[200] ^= 0x10  # inside a key or value: parses, fails the CRC
    e = rejects(ChecksumError, lambda: DkvFile(write(tmp_path, bytes(raw))), "header checksum mismatch",
                offset=HEADER_CRC_VALUE_OFFSET)
    assert "stored 0x" in str(e) and "computed 0x" in str(e)


# ---- session metadata ----------------------------------------------------------------------------


def test_segment_row_near_2_64(base_dkv, tmp_path):
    """fuzz finding (fuzz_dkv): a u64 above 2^63 in deltakv.segment.first_row raised OverflowError (np.int64)."""
    kvs, infos, data = parts_of(base_dkv)
    raw = assemble(with_array(kvs, "deltakv.segment.first_row", U64, [U64_MAX]), infos, data)
    rejects(CorruptError, lambda: DkvSession(write(tmp_path, raw)), "deltakv.segment.first_row[0]",
            "expected 0..4294967295", f"found {U64_MAX}")


def test_cell_count_2_40(base_dkv, tmp_path):
    kvs, infos, data = parts_of(base_dkv)
    kvs = with_array(kvs, "deltakv.stream.cell_count", U64, [1 << 40])
    kvs = with_array(kvs, "deltakv.segment.rows", U64, [1 << 40])
    rejects(CorruptError, lambda: DkvSession(write(tmp_path, assemble(kvs, infos, data))),
            "deltakv.stream.cell_count[0]", "expected 0..4294967295", "found 1099511627776")


def test_cells_claimed_beyond_the_cell_records(base_dkv, tmp_path):
    """review finding: a stream without K/V tracks and 2^32-1 cells made cells() allocate 32 GiB
    (np.empty per claimed cell) before looking at the 40 cell records there are."""
    kvs, infos, data = parts_of(base_dkv)
    n = (1 << 32) - 1
    for key, etype, value in (("deltakv.stream.cell_count", U64, [n]), ("deltakv.segment.rows", U64, [n]),
                              ("deltakv.stream.n_k", U32, [0]), ("deltakv.stream.n_v", U32, [0]),
                              ("deltakv.track.name", STR, []), ("deltakv.track.ggml_type", U32, []),
                              ("deltakv.track.n_values", U64, []), ("deltakv.track.transposed", U8, []),
                              ("deltakv.track.codec", STR, []), ("deltakv.track.keyframe_interval", U32, []),
                              ("deltakv.track.rotation", U32, []), ("deltakv.track.params", STR, [])):
        kvs = with_array(kvs, key, etype, value)
    p = write(tmp_path, assemble(kvs, infos, data))
    rejects(CorruptError, lambda: open_all(p), f"{n} cell records need at least {8 * n} bytes", "found")
    with small_peak():
        with pytest.raises(CorruptError, match="cell records need"):
            cell_record_ends(b"\0" * 16, 1 << 40, 0)


def test_segment_claims_2_40_tokens(base_dkv, tmp_path):
    kvs, infos, data = parts_of(base_dkv)
    raw = assemble(with_array(kvs, "deltakv.segment.tokens", U64, [1 << 40]), infos, data)
    rejects(CorruptError, lambda: DkvSession(write(tmp_path, raw)), "tensor 'tokens.0': expected I32 [1099511627776]",
            "found I32 [40]")


def test_token_ranges_with_a_gap(tmp_path):
    """review finding: tokens() filled an np.empty array, so a gap between segments' token ranges
    handed uninitialised memory out as token ids."""
    ctx = SyntheticContext(n_max=100, n_layer=1, n_values=64)
    p = tmp_path / "grown.dkv"
    write_session(ctx.state(40), p, "raw").close()
    append_session(p, ctx.state(70))
    kvs, infos, data = parts_of(p)
    raw = assemble(with_array(kvs, "deltakv.segment.first_token", U64, [0, 45]), infos, data)
    rejects(CorruptError, lambda: DkvSession(write(tmp_path, raw)), "deltakv.segment.first_token[1]",
            "expected 40", "found 45")


def test_layer_count_2_31_does_not_build_a_list(base_dkv, tmp_path):
    """review finding: deltakv.stream.n_k = 2^31 made the reader build a list of 2^31 expected track names."""
    kvs, infos, data = parts_of(base_dkv)
    raw = assemble(with_array(kvs, "deltakv.stream.n_k", U32, [1 << 31]), infos, data)
    rejects(CorruptError, lambda: DkvSession(write(tmp_path, raw)), "expected them to add up to the 4 tracks",
            f"found {(1 << 31) + 2}")


def test_metadata_of_the_wrong_type(base_dkv, tmp_path):
    """review finding: key types were not checked: an i32 key stored as u64 reached struct.pack in
    write_state (struct.error), a u32 arch reached str methods (AttributeError)."""
    kvs, infos, data = parts_of(base_dkv)
    raw = assemble(with_array(kvs, "deltakv.stream.n_layer", U64, [1 << 40]), infos, data)
    e = rejects(CorruptError, lambda: DkvSession(write(tmp_path, raw)), "deltakv.stream.n_layer: expected an array of INT32",
                "found an array of UINT64")
    assert e.offset == parse_header(raw).kvs["deltakv.stream.n_layer"].value_offset
    raw = assemble(with_kv(kvs, "deltakv.source.seq_prefix_id", U64, 1 << 40), infos, data)
    rejects(CorruptError, lambda: DkvSession(write(tmp_path, raw)), "seq_prefix_id: expected INT32", "found UINT64")
    raw = assemble(with_kv(kvs, "deltakv.source.arch", U32, 7), infos, data)
    rejects(CorruptError, lambda: DkvSession(write(tmp_path, raw)), "deltakv.source.arch: expected STRING", "found UINT32")


def test_rotation_words_must_pair(tmp_path):
    """review finding (seen in a sample of the fuzz mutator): n_rot_k >= 0 with n_rot_v = -1 in a v11
    session reached struct.pack("<I", -1) in write_state (struct.error)."""
    state = SyntheticContext(n_max=64, n_layer=1, n_values=64).state(20)
    from dataclasses import replace

    from deltakv_format.state_model import BodyLayout

    st = state.kv_sections[0].streams[0]
    state = replace(state, layout=BodyLayout.V11, file_version=11,
                    sections=[type(state.sections[0])(True, [replace(st, rot=(0, 0))])])
    p = tmp_path / "v11.dkv"
    write_session(state, p, "raw").close()
    kvs, infos, data = parts_of(p)
    raw = assemble(with_array(kvs, "deltakv.stream.n_rot_v", I32, [-1]), infos, data)
    rejects(CorruptError, lambda: DkvSession(write(tmp_path, raw)), "expected n_rot_k and n_rot_v both -1 or both >= 0",
            "found 0 and -1")


def test_array_lengths_that_disagree(base_dkv, tmp_path):
    kvs, infos, data = parts_of(base_dkv)
    raw = assemble(with_array(kvs, "deltakv.track.n_values", U64, [64, 64, 64]), infos, data)
    rejects(CorruptError, lambda: DkvSession(write(tmp_path, raw)), "deltakv.track.n_values: expected 4 entries",
            "found 3")


def test_track_type_the_codec_cannot_hold(base_dkv, tmp_path):
    """review finding: a delta-coded track claiming a quantized cache type raised KeyError while decoding."""
    kvs, infos, data = parts_of(base_dkv)
    kvs = with_array(kvs, "deltakv.track.codec", STR, ["delta-q4_0"] * 4)
    kvs = with_array(kvs, "deltakv.track.keyframe_interval", U32, [32] * 4)
    kvs = with_array(kvs, "deltakv.track.ggml_type", U32, [int(GGMLType.Q8_0)] * 4)
    rejects(CorruptError, lambda: DkvSession(write(tmp_path, assemble(kvs, infos, data))),
            "codec delta-q4_0 cannot hold Q8_0 rows of 64 values")


def test_delta_parts_that_do_not_match_the_row_count(tmp_path):
    """review finding: the delta decoders index key/q4/mode rows without bounds checks; a file whose
    part tensors split the rows differently (here: the mode part dropped) must not reach them."""
    p = tmp_path / "q4.dkv"
    write_session(SyntheticContext(n_max=64, n_layer=1, n_values=64).state(40), p, "dkv-q4").close()
    kvs, infos, data = parts_of(p)
    keep = [t for t in infos if t.name != "s0.l0.k.0.mode"]
    rejects(CorruptError, lambda: DkvSession(write(tmp_path, assemble(kvs, keep, data))),
            "tensor 's0.l0.k.0.mode': expected 38 rows for 40 rows with keyframe interval 32", "found 0")
    # one keyframe row moved into the q4 part: same total, wrong split
    kq = {t.name: t for t in infos}
    key, q4 = kq["s0.l0.v.0.key"], kq["s0.l0.v.0.q4"]
    moved = [TensorInfo(t.name, (t.shape[0], 1), t.ggml_type, t.offset) if t is key else
             TensorInfo(t.name, (t.shape[0], t.shape[1] + 1), t.ggml_type, t.offset) if t is q4 else t for t in infos]
    rejects(CorruptError, lambda: DkvSession(write(tmp_path, assemble(kvs, moved, data))),
            "tensor 's0.l0.v.0.key': expected 2 rows", "found 1")


def test_streams_out_of_section_order(tmp_path):
    """review finding: streams listed out of section order were silently dropped from the rebuilt state."""
    state = SyntheticContext(n_max=64, n_layer=1, n_values=64).state(20)
    state.sections.append(state.sections[0])  # two KV sections (like iSWA)
    p = tmp_path / "two.dkv"
    write_session(state, p, "raw").close()
    kvs, infos, data = parts_of(p)
    raw = assemble(with_array(kvs, "deltakv.stream.section", U32, [1, 0]), infos, data)
    rejects(CorruptError, lambda: DkvSession(write(tmp_path, raw)), "expected streams in section order")


def test_later_segment_owns_every_row_from_its_first_on(base_dkv):
    """SPEC.md 3.2: row t belongs to the last segment whose first row is <= t. A segment starting
    before an earlier one's start must cut every earlier span, not only the last one."""
    with DkvSession(base_dkv) as s:
        s.n_segments = 3
        s.seg_first_row = np.array([[0], [64], [0]])
        s.seg_rows = np.array([[100], [64], [10]])
        assert s._owned(0) == [(2, 0, 10)]
        s.seg_first_row = np.array([[0], [64], [96]])
        s.seg_rows = np.array([[100], [64], [10]])
        assert s._owned(0) == [(0, 0, 64), (1, 64, 96), (2, 96, 106)]


# ---- checksums on decode --------------------------------------------------------------------------


def test_decoding_a_corrupted_tensor_raises(base_dkv, tmp_path):
    """A flipped payload bit: the header is intact, so the file opens; decoding the damaged tensor
    (what restore and the runtime's load do) must raise, not return garbage."""
    raw = bytearray(base_dkv.read_bytes())
    with DkvFile(base_dkv) as f:
        info = f.tensor_infos["s0.l1.v.0.data"]
        at = f.data_start + info.offset + 17
    raw[at] ^= 0x04
    p = write(tmp_path, bytes(raw))
    with DkvSession(p) as s:
        assert any("s0.l1.v.0.data" in problem for problem in s.file.verify())
        with pytest.raises(ChecksumError, match="tensor 's0.l1.v.0.data': checksum mismatch") as info:
            s.to_llama_state()
        assert info.value.offset == at - 17
    with DkvSession(p, verify_checksums=False) as s:
        s.to_llama_state()  # asked for explicitly: no check


# ---- journal --------------------------------------------------------------------------------------


def test_journal_pointing_past_the_end_of_the_file_is_not_replayed(base_dkv, tmp_path):
    """review finding: a journal with a valid CRC was replayed whatever its committed size: truncate()
    then extended the file to it (2^62: OSError), and the journal was read whole into memory."""
    p = write(tmp_path, base_dkv.read_bytes(), "j.dkv")
    before = p.read_bytes()
    header = before[:4096]
    journal = JOURNAL_MAGIC + struct.pack("<IQQI", JOURNAL_VERSION, 1 << 62, len(header), crc32c(header)) + header
    (tmp_path / ("j.dkv" + JOURNAL_SUFFIX)).write_bytes(journal)
    with small_peak():
        with DkvSession.open_for_append(p) as s:  # a writer recovers journals (readers never write)
            assert s.n_tokens == 40
    assert p.read_bytes() == before  # not truncated to (extended to) 2^62 bytes
    assert not (tmp_path / ("j.dkv" + JOURNAL_SUFFIX)).exists()


# ---- llama.cpp states -----------------------------------------------------------------------------


def ggsn(*, n_tokens=None, arch_len=None, n_stream=1, cell_count=2, n_seq_id=1, n_layer=1, k_type=1,
         k_row=128, v_trans=0, v_row=128, v_el=2, v_n=64, version=10):
    """A small valid ggsn v10 file (2 cells, 1 layer, F16 rows of 64 values) with fields overridable."""
    tokens = [11, 22]
    out = struct.pack("<III", 0x6767736E, version, len(tokens) if n_tokens is None else n_tokens)
    out += struct.pack(f"<{len(tokens)}i", *tokens)
    out += struct.pack("<I", 5 if arch_len is None else arch_len) + b"llama"
    out += struct.pack("<I", n_stream) + struct.pack("<I", cell_count)
    for i in range(2):
        out += struct.pack("<iIi", i, n_seq_id, 0)
    out += struct.pack("<II", v_trans, n_layer)
    out += struct.pack("<iQ", k_type, k_row) + bytes(range(256))
    if v_trans:
        out += struct.pack("<iII", 1, v_el, v_n) + bytes(256)
    else:
        out += struct.pack("<iQ", 1, v_row) + bytes(256)
    return out


CELLS_AT = 12 + 8 + 4 + 5 + 4  # offset of cell_count
# A one-layer model with 64 K/V values per cell: pins the layout, so that each hostile field is
# reported by the one candidate that reads it (without a model the parser tries every layout and
# reports the one that read furthest; those tests check the class only).
MODEL = ModelInfo.from_metadata({"general.architecture": "llama", "llama.block_count": 1, "llama.embedding_length": 64,
                                 "llama.attention.head_count": 1, "llama.attention.head_count_kv": 1})


def rejects_state(cls, raw, *fragments, offset=None):
    rejects(cls, lambda: parse_state(raw, model=MODEL), *fragments, offset=offset)
    with small_peak():
        with pytest.raises(DeltaKVError):
            parse_state(raw)
LAYER_AT = CELLS_AT + 4 + 24  # offset of v_trans


def test_valid_small_state_parses():
    for v_trans in (0, 1):
        raw = ggsn(v_trans=v_trans)
        assert write_state(parse_state(raw)) == raw


def test_state_n_tokens_near_2_32():
    rejects(LimitExceededError, lambda: parse_state(ggsn(n_tokens=0xFFFFFFFF)), "n_tokens = 4294967295",
            "expected at least 17179869180 more bytes", "found", offset=8)


def test_state_arch_length_near_2_32():
    rejects(CorruptError, lambda: parse_state(ggsn(arch_len=0xFFFFFFFF)), "arch string length: expected 1..256",
            "found 4294967295", offset=20)


def test_state_n_stream_near_2_32():
    rejects_state(LimitExceededError, ggsn(n_stream=0xFFFFFFFF), "n_stream = 4294967295",
            "expected at least", offset=CELLS_AT - 4)


def test_state_cell_count_near_2_32():
    rejects_state(LimitExceededError, ggsn(cell_count=0xFFFFFFFF), "cell_count = 4294967295",
            "expected at least", "found", offset=CELLS_AT)


def test_state_seq_ids_per_cell_near_2_32():
    rejects_state(LimitExceededError, ggsn(n_seq_id=0xFFFFFFFF), "n_seq_id of cell 0 = 4294967295",
            "expected at least 17179869180 more bytes", offset=CELLS_AT + 8)


def test_state_layer_count_near_2_32():
    rejects_state(LimitExceededError, ggsn(n_layer=0xFFFFFFFF), "n_layer = 4294967295",
            "expected at least", offset=LAYER_AT + 4)


def test_state_row_size_near_2_64():
    rejects_state(LimitExceededError, ggsn(k_row=U64_MAX - 1),
            "cell_count x K row size of layer 0 = 2", "expected at least", offset=LAYER_AT + 12)


def test_state_transposed_v_size_overflows_u32():
    # n_embd_v_gqa x cells x element size does not fit 32 bits (llama.cpp computes it in size_t)
    rejects_state(LimitExceededError, ggsn(v_trans=1, v_n=0xFFFFFFFF), "n_embd_v_gqa of layer 0 x cells",
            "expected at least", offset=LAYER_AT + 8 + 12 + 256 + 8)


def test_state_unknown_tensor_type():
    rejects_state(CorruptError, ggsn(k_type=99), "K type of layer 0: expected a ggml type id, found 99",
            offset=LAYER_AT + 8)


def test_state_row_size_not_a_multiple_of_the_type():
    rejects_state(CorruptError, ggsn(k_row=127),
            "K row size of layer 0: expected a positive multiple of 2 bytes, found 127", offset=LAYER_AT + 12)


def test_state_truncated_everywhere():
    raw = ggsn()
    for cut in range(len(raw) - 1, 0, -7):
        with pytest.raises(DeltaKVError) as info:
            parse_state(raw[:cut])
        assert isinstance(info.value, (TruncatedError, CorruptError)), f"cut {cut}: {info.value!r}"


def test_state_unknown_version():
    rejects(UnsupportedVersionError, lambda: parse_state(ggsn(version=12)), "expected one of [9, 10, 11]", "found 12",
            offset=4)


def test_legacy_outputs_with_2_31_outputs_or_2_64_logits():
    head = struct.pack("<III", 0x6767736E, 9, 0) + struct.pack("<I", 5) + b"llama"
    raw = head + struct.pack("<i", 0x7FFFFFFF) + bytes(64)
    # every v9 reading fails at this word (as n_outputs, as n_stream, or as bytes after a body
    # without KV cache): the parser reports the first of those it tried
    rejects(CorruptError, lambda: parse_state(raw), "end of state: expected the body to end here, found 68 more bytes",
            offset=len(head))
    rejects(LimitExceededError, lambda: _parse_outputs(_Reader(memoryview(raw), len(head)), None),
            "n_outputs = 2147483647: expected at least 8589934588 more bytes", "found 64", offset=len(head))
    outputs = struct.pack("<i", 2) + struct.pack("<ii", 0, 1) + struct.pack("<Q", U64_MAX) + bytes(64)
    rejects(CorruptError, lambda: _parse_outputs(_Reader(memoryview(outputs)), None),
            "n_logits: expected a multiple of n_outputs = 2", f"found {U64_MAX}", offset=12)
    outputs = struct.pack("<i", 1) + struct.pack("<i", 0) + struct.pack("<Q", U64_MAX) + bytes(64)
    rejects(LimitExceededError, lambda: _parse_outputs(_Reader(memoryview(outputs)), None),
            f"n_logits = {U64_MAX}", "expected at least", offset=8)


def test_server_tokens_counts_near_2_32():
    words = struct.pack("<iII", -1, 1, 0xFFFFFFFF)
    rejects(LimitExceededError, lambda: parse_server_tokens(words), "server tokens count = 4294967295", offset=8)
    words = struct.pack("<iII", -1, 1, 0) + struct.pack("<I", 0xFFFFFFFF)
    rejects(LimitExceededError, lambda: parse_server_tokens(words), "media count = 4294967295", offset=12)


def test_state_parser_rejects_non_bytes():
    rejects(DeltaKVError, lambda: parse_state(12345), "expected bytes", "found int")


# ---- the runtime refuses a corrupted file before llama.cpp sees it ------------------------------


@pytest.mark.llama
def test_runtime_load_refuses_a_flipped_payload_bit(tmp_path, monkeypatch):
    from .llama_helpers import make_llama, needs_llama, prompt_tokens

    if needs_llama.args[0]:
        pytest.skip(needs_llama.kwargs["reason"])
    import llama_cpp

    from deltakv_runtime import load, save

    llm = make_llama(n_ctx=256)
    llm.eval(prompt_tokens(llm, 64))
    path = tmp_path / "chat.dkv"
    save(llm, path, codec="raw")
    with DkvFile(path) as f:
        info = f.tensor_infos["s0.l7.k.0.data"]
        at = f.data_start + info.offset + info.nbytes // 2
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0x20
    path.write_bytes(bytes(raw))

    calls = []
    real = llama_cpp.llama_state_seq_set_data
    monkeypatch.setattr(llama_cpp, "llama_state_seq_set_data", lambda *a: calls.append(a) or real(*a))
    fresh = make_llama(n_ctx=256)
    with pytest.raises(ChecksumError, match="tensor 's0.l7.k.0.data': checksum mismatch") as e:
        load(fresh, path)
    assert e.value.offset == at - info.nbytes // 2
    assert calls == [] and fresh.n_tokens == 0  # llama.cpp never saw the bytes
    raw[at] ^= 0x20  # repaired: loads
    path.write_bytes(bytes(raw))
    assert load(fresh, path) == 64 and len(calls) == 1


def test_convert_of_a_state_whose_arch_is_not_utf8(tmp_path):
    """fuzz finding (fuzz_state): parse_state keeps a non-UTF-8 arch string as bytes; converting the
    state raised UnicodeDecodeError from write_session instead of a DeltaKVError."""
    raw = ggsn()
    raw = raw[:24] + b"\xe1lama" + raw[29:]
    state = parse_state(raw)
    assert state.arch is None and state.arch_bytes == b"\xe1lama"
    rejects(CorruptError, lambda: write_session(state, tmp_path / "x.dkv", "raw"), "arch string: expected UTF-8 text",
            "found b'\\xe1lama'")
    assert not list(tmp_path.iterdir())  # nothing written


def test_token_format_that_does_not_fit_the_framing(base_dkv, tmp_path):
    """fuzz finding (offline sample of the fuzz_dkv mutator): a ggsn session with token_format
    'none' raised KeyError('token_blob') from source_bytes() (deltakv inspect)."""
    kvs, infos, data = parts_of(base_dkv)
    raw = assemble(with_kv(kvs, "deltakv.source.token_format", STR, "none"), infos, data)
    rejects(CorruptError, lambda: DkvSession(write(tmp_path, raw)),
            "token_format: expected plain or packed for framing 'ggsn'", "found 'none'")


# ---- model GGUF headers (model_info reads them with gguf_io's parser) -----------------------------


def _model_gguf(kvs, version=2, n_tensors=0) -> bytes:
    from deltakv_format.gguf_io import pack_kv

    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, len(kvs)) + b"".join(pack_kv(kv) for kv in kvs)


def test_model_metadata_skips_string_arrays_and_reads_v2(tmp_path):
    from deltakv_format.model_info import SkippedStrings, read_gguf_metadata

    kvs = [KeyValue("general.architecture", STR, "llama"), KeyValue("llama.block_count", U32, 2),
           KeyValue("tokenizer.ggml.tokens", ARR, ["a", "bc", "\u00e9"], STR),
           KeyValue("llama.attention.sliding_window_pattern", ARR, np.array([1, 0], np.uint8), GGUFValueType.BOOL)]
    path = write(tmp_path, _model_gguf(kvs) + b"tensor infos of types this reader need not know", "m.gguf")
    values = read_gguf_metadata(path)
    assert values == {"general.architecture": "llama", "llama.block_count": 2, "tokenizer.ggml.tokens": SkippedStrings(3),
                      "llama.attention.sliding_window_pattern": [True, False]}


def test_model_metadata_string_past_the_end(tmp_path):
    """A skipped string is still bounds-checked: a vocabulary entry claiming 2^40 bytes is refused."""
    from deltakv_format.model_info import read_gguf_metadata

    kvs = [KeyValue("general.architecture", STR, "llama"), KeyValue("tokenizer.ggml.tokens", ARR, ["abcdefghij", "bc"], STR)]
    raw = _model_gguf(kvs)
    at = raw.rfind(struct.pack("<Q", 2) + b"bc")
    path = write(tmp_path, patch(raw, at, "<Q", 1 << 40), "m.gguf")
    e = rejects(LimitExceededError, lambda: read_gguf_metadata(path), "length of element of 'tokenizer.ggml.tokens' is 1099511627776",
                offset=at)
    assert e.path == str(path)
    path = write(tmp_path, raw[:at + 4], "m.gguf")
    rejects(TruncatedError, lambda: read_gguf_metadata(path), "ends inside length of element of 'tokenizer.ggml.tokens'")
    path = write(tmp_path, patch(raw, 4, "<I", 1), "m.gguf")
    rejects(UnsupportedVersionError, lambda: read_gguf_metadata(path), "expected GGUF version 2 or 3, found 1", offset=4)
