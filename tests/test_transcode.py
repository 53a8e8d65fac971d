"""--transcode of quantized caches (SPEC.md 6.6) on real llama.cpp caches of SmolLM2 (q8_0 and q4_0).

A transcoded session must be smaller, restore to a state with the original's types, row sizes and
cells (llama.cpp loads it and continues), and its blocks must be what ggml's own quantizer makes of
the decoded values; without --transcode nothing changes (raw, byte-exact).
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from deltakv_format.codecs import get_codec
from deltakv_format.codecs.transcode import TRANSCODE_PARAM, TranscodedCodec
from deltakv_format.constants import GGMLType
from deltakv_format.errors import CodecError, CorruptError
from deltakv_format.llama_state import parse_state, write_state
from deltakv_format.session import DkvSession, write_session
from deltakv_format.state_model import Framing

from .ggml_lib import ggml_quantize, load_ggml_base
from .llama_helpers import MODEL, greedy, make_llama, needs_llama, prompt_tokens
from .test_hostile import STR, assemble, parts_of, with_array, write

pytestmark = needs_llama

N_PROMPT = 200
QUANTIZER = {GGMLType.Q8_0: ("quantize_row_q8_0_ref", 34), GGMLType.Q4_0: ("quantize_row_q4_0_ref", 18)}


@pytest.fixture(scope="module", params=["q8_0", "q4_0"])
def cache(request):
    """(type name, ggml type, a live context of that cache type holding the prompt, its sequence state)."""
    from deltakv_runtime.session import seq_state_bytes

    ggml_type = {"q8_0": GGMLType.Q8_0, "q4_0": GGMLType.Q4_0}[request.param]
    llm = make_llama(n_ctx=512, type_k=int(ggml_type), type_v=int(ggml_type))
    llm.eval(prompt_tokens(llm, N_PROMPT))
    blob = bytes(seq_state_bytes(llm, 0))
    yield request.param, ggml_type, llm, blob
    llm.close()


def rope_of(state):
    from deltakv_format.model_info import ModelInfo
    from deltakv_format.session_writer import rope_for_state

    return rope_for_state(ModelInfo.from_gguf(MODEL), state)


def test_without_transcode_a_quantized_cache_stays_raw_and_byte_exact(cache, tmp_path):
    _, _, _, blob = cache
    state = parse_state(memoryview(blob), framing=Framing.SEQ_STATE)
    written = write_session(state, tmp_path / "plain.dkv", rope=rope_of(state))
    assert {t.codec.name for t in written.tracks} == {"raw"}
    with written.open() as s:
        assert write_state(s.to_llama_state()) == blob


def test_transcoded_session_is_smaller_restores_the_layout_and_continues(cache, tmp_path):
    from deltakv_runtime.session import load, save

    name, ggml_type, llm, _ = cache
    raw_size = save(llm, tmp_path / "raw.dkv", codec="raw").stat().st_size
    with DkvSession(tmp_path / "raw.dkv") as s:
        state = s.to_llama_state()  # what save() took from llama.cpp, exactly
    default = save(llm, tmp_path / "default.dkv", transcode=True).stat().st_size
    at_3_bits = save(llm, tmp_path / "bits3.dkv", transcode=True, bits=3).stat().st_size
    print(f"\n{name} cache, {N_PROMPT} tokens: --transcode {default / raw_size:.3f} of the raw .dkv "
          f"({raw_size / default:.2f}x smaller), --transcode --bits 3 {at_3_bits / raw_size:.3f} ({raw_size / at_3_bits:.2f}x)")
    # the default codecs (K ~4.0, V ~4.9 bits per value) halve a q8_0 cache (8.5 bits); on a q4_0
    # cache (4.5 bits) only K gains and V stays raw, so only --bits 3 makes it clearly smaller
    assert default <= raw_size
    if ggml_type == GGMLType.Q8_0:
        assert default < 0.65 * raw_size
    assert at_3_bits < 0.8 * raw_size

    for path in (tmp_path / "default.dkv", tmp_path / "bits3.dkv"):
        with DkvSession(path) as s:
            assert any(isinstance(t.codec, TranscodedCodec) for t in s.tracks)
            rebuilt = s.to_llama_state()
        # the original's byte layout: same types, row sizes, cells and tokens; only values differ
        original_streams = [st for sec in state.kv_sections for st in sec.streams]
        rebuilt_streams = [st for sec in rebuilt.kv_sections for st in sec.streams]
        for a, b in zip(original_streams, rebuilt_streams, strict=True):
            assert bytes(a.cells) == bytes(b.cells)
            for ta, tb in zip(a.k + a.v, b.k + b.v, strict=True):
                assert (tb.ggml_type, tb.row_bytes, tb.cell_count, len(tb.data)) == \
                       (ta.ggml_type, ta.row_bytes, ta.cell_count, len(ta.data))
        assert len(write_state(rebuilt)) == len(write_state(state))

    reference = greedy(llm, 16)
    other = make_llama(n_ctx=512, type_k=int(ggml_type), type_v=int(ggml_type))
    try:
        assert load(other, tmp_path / "default.dkv") == N_PROMPT
        continued = greedy(other, 16)
    finally:
        other.close()
    agreement = sum(a == b for a, b in zip(reference, continued)) / len(reference)
    print(f"{name} --transcode: greedy agreement over 16 tokens {agreement:.0%}")
    assert len(continued) == 16
    assert agreement >= 0.5


def test_requantized_blocks_are_ggml_exact(cache, tmp_path):
    lib = load_ggml_base()
    if lib is None:
        pytest.skip("llama-cpp-python's libggml-base was not found")
    _, ggml_type, _, blob = cache
    state = parse_state(memoryview(blob), framing=Framing.SEQ_STATE)
    written = write_session(state, tmp_path / "t.dkv", rope=rope_of(state), transcode=True, bits=3)
    fn, block_bytes = QUANTIZER[ggml_type]
    checked = 0
    with written.open() as s:
        for t in s.tracks:
            if not isinstance(t.codec, TranscodedCodec):
                continue
            n = s.stream_cells[t.stream]
            parts = s._parts(t, 0)
            context = s.track_context(t, 0) if t.codec.takes_context else None
            values = t.codec.decode_values(parts, t.n_values, 0, n, context)  # f16 bits
            floats = values.view(np.float16).astype(np.float32)
            expected = ggml_quantize(lib, fn, floats.reshape(-1), block_bytes).reshape(n, t.n_values)
            assert np.array_equal(s.rows(t), expected), t.name
            checked += 1
    assert checked == len(written.tracks)


def transcoded_params(path, edit):
    """The file at ``path`` with ``edit(params)`` applied to every transcoded track's params JSON."""
    import json

    kvs, infos, data = parts_of(path)
    params = next(kv for kv in kvs if kv.key == "deltakv.track.params").value
    edited = []
    for text in params:
        p = json.loads(text)
        if TRANSCODE_PARAM in p:
            edit(p)
        edited.append(json.dumps(p, sort_keys=True, separators=(",", ":")))
    return assemble(with_array(kvs, "deltakv.track.params", STR, edited), infos, data)


@pytest.mark.parametrize("value, message", [
    (99, "deltakv.track.params transcode names ggml type 99; expected one of Q8_0 (8), Q4_0 (2)"),
    (int(GGMLType.Q4_1), "deltakv.track.params transcode names Q4_1; expected one of Q8_0 (8), Q4_0 (2)"),
])
def test_a_transcode_param_naming_a_type_without_requantizer_is_one_clear_error(cache, tmp_path, value, message):
    _, _, _, blob = cache
    state = parse_state(memoryview(blob), framing=Framing.SEQ_STATE)
    path = tmp_path / "t.dkv"
    write_session(state, path, rope=rope_of(state), transcode=True)
    bad = write(tmp_path, transcoded_params(path, lambda p: p.update({TRANSCODE_PARAM: value})))
    with pytest.raises(CorruptError, match=re.escape("track s0.l0.k: " + message)):
        DkvSession(bad)


def test_a_transcode_param_that_contradicts_the_track_type_is_refused(cache, tmp_path):
    _, ggml_type, _, blob = cache
    other = GGMLType.Q4_0 if ggml_type == GGMLType.Q8_0 else GGMLType.Q8_0
    state = parse_state(memoryview(blob), framing=Framing.SEQ_STATE)
    path = tmp_path / "t.dkv"
    write_session(state, path, rope=rope_of(state), transcode=True)
    bad = write(tmp_path, transcoded_params(path, lambda p: p.update({TRANSCODE_PARAM: int(other)})))
    with pytest.raises(CorruptError, match=f"transcode names {other.name}, deltakv.track.ggml_type {ggml_type.name}; "
                                           "expected the same type"):
        DkvSession(bad)


def test_a_reader_without_transcode_refuses_the_parameter():
    """What a version 2 reader written before SPEC.md 6.6 does with a transcoded track: it builds the
    codec from the params (SPEC.md 3), and the codec does not take ``transcode``: refused, not misread."""
    for codec in ("dkv-ans", "dkv-q4"):
        with pytest.raises(CodecError, match="transcode"):
            get_codec(codec, **{TRANSCODE_PARAM: int(GGMLType.Q8_0)})


def test_validate_against_the_original_checks_transcoded_tracks_within_their_bound(cache, tmp_path):
    from deltakv_format.operations import validate

    _, ggml_type, _, blob = cache
    source = tmp_path / "cache.seq"
    source.write_bytes(blob)
    state = parse_state(memoryview(blob), framing=Framing.SEQ_STATE)
    write_session(state, tmp_path / "t.dkv", rope=rope_of(state), transcode=True, bits=3)
    report = validate(tmp_path / "t.dkv", against=source)
    assert report.ok, report.problems
    transcoded = [layer for layer in report.layers if layer.get("transcoded") == ggml_type.name]
    assert len(transcoded) == len(report.layers) and all(layer["within_bound"] for layer in transcoded)
    assert 0 < max(layer["bound_used"] for layer in transcoded) <= 1


def test_a_transcoded_session_extends_and_loads(cache, tmp_path):
    """An append codes the new rows of a transcoded track through its values too (SPEC.md 6.6)."""
    from deltakv_runtime.session import extend, load, save

    _, ggml_type, llm, _ = cache
    llm.reset()
    tokens = prompt_tokens(llm, N_PROMPT + 40)
    llm.eval(tokens[:N_PROMPT])
    path = save(llm, tmp_path / "t.dkv", transcode=True, bits=3)
    llm.eval(tokens[N_PROMPT:])
    extend(llm, path)
    with DkvSession(path) as s:
        assert s.n_segments == 2 and s.n_tokens == N_PROMPT + 40
        assert all(isinstance(t.codec, TranscodedCodec) for t in s.tracks)
    other = make_llama(n_ctx=512, type_k=int(ggml_type), type_v=int(ggml_type))
    try:
        assert load(other, path) == N_PROMPT + 40
        assert len(greedy(other, 4)) == 4
    finally:
        other.close()


def test_eval_measures_a_transcode_row_against_its_cache_and_f16(tmp_path):
    import json

    from click.testing import CliRunner

    from deltakv_tools.cli import main
    from deltakv_tools.measure.eval_rows import TRANSCODE_VS_CACHE

    row = "q8_0 cache --transcode (default codecs)"
    r = CliRunner().invoke(main, ["eval", "--model", "smollm2", "--text", "prose", "--prefix", "64", "--continuation",
                                  "16", "--chunks", "1", "--out", str(tmp_path), "--row", row], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    results = {x["row"]: x for x in json.loads((tmp_path / "results.json").read_text())}
    assert sorted(results) == sorted([row, row + TRANSCODE_VS_CACHE])
    for x in results.values():
        assert 0 < x["kl"] and 2 < x["bits_per_value"] < 8.5  # smaller than the q8_0 cache's 8.5 bits
    assert f"| {row}{TRANSCODE_VS_CACHE} |" in (tmp_path / "EVAL.md").read_text()


def test_the_reference_requantizers_are_ggml_exact():
    """reference.quantize_q8_0 / quantize_q4_0 (numpy, from SPEC.md 6.1) against ggml's own functions, on
    values with zero blocks, ties, f16 subnormal scales and sign changes of the largest value."""
    from deltakv_format import reference

    lib = load_ggml_base()
    if lib is None:
        pytest.skip("llama-cpp-python's libggml-base was not found")
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((64, 256)) * rng.choice([1e-6, 0.01, 1.0, 300.0], size=(64, 1))).astype(np.float32)
    x[0, :32] = 0.0
    x[1, :32] = np.arange(32) * 0.5 - 8  # many ties
    x[2, :32] = -x[2, :32]
    x[3, :32] = np.float32(1e-7) * np.arange(32)
    for ggml_type, quantize in reference.QUANTIZE.items():
        fn, block_bytes = QUANTIZER[ggml_type]
        expected = ggml_quantize(lib, fn, x.reshape(-1), block_bytes).reshape(len(x), -1)
        assert np.array_equal(quantize(x), expected), ggml_type.name


def test_convert_transcode_on_the_command_line(tmp_path):
    """`deltakv convert --transcode` of a real q8_0 session file (fixtures/): transcoded tracks, named
    in the summary; restore gives a file of the original's size; session_bytes writes the same bytes."""
    from click.testing import CliRunner

    from deltakv_format.operations import MappedFile, parse_state_file
    from deltakv_format.session import session_bytes
    from deltakv_tools.cli import main

    from .conftest import FIXTURES

    source = FIXTURES / "smollm2_v10_q8_0_fa1.ggsn"
    out = tmp_path / "t.dkv"
    r = CliRunner().invoke(main, ["convert", str(source), "-o", str(out), "--transcode", "--model", str(MODEL)],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert "30 x dkv-ans (transcoded Q8_0), 30 x dkv-q4 (transcoded Q8_0)" in r.output
    r = CliRunner().invoke(main, ["restore", str(out), "-o", str(tmp_path / "back.ggsn")], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "back.ggsn").stat().st_size == source.stat().st_size
    plain = tmp_path / "plain.dkv"
    assert CliRunner().invoke(main, ["convert", str(source), "-o", str(plain)]).exit_code == 0
    with DkvSession(plain) as s:
        assert {t.codec.name for t in s.tracks} == {"raw"}
    with MappedFile(source) as mapped:
        state = parse_state_file(mapped)
        assert session_bytes(state, transcode=True, rope=rope_of(state)) == out.read_bytes()


def test_a_q8_0_llama_server_slot_saved_with_transcode_restores_and_continues(tmp_path):
    """`deltakv slot save --transcode` against a real llama-server with a q8_0 cache: smaller than the
    raw slot file, restored into a restarted server, which continues from it (greedy agreement reported)."""
    from deltakv_format import operations
    from deltakv_tools import llama_server

    from .test_llama_server import (ANSWER_TOKENS, CONTINUATION_TOKENS, FOLLOW_UP, PROMPT_TOKENS, SERVER, TEXT as
                                    SERVER_TEXT, agreement, deltakv)

    if SERVER is None:
        pytest.skip(llama_server.why_missing())
    args = ["-fa", "on", "-ctk", "q8_0", "-ctv", "q8_0"]
    slot_dir = tmp_path / "slots"
    slot_dir.mkdir()
    dkv = tmp_path / "chat.dkv"
    with llama_server.running_server(MODEL, *args, slot_dir=slot_dir, log_dir=tmp_path) as server:
        prompt = server.tokenize(SERVER_TEXT)[:PROMPT_TOKENS]
        first = server.complete(prompt, ANSWER_TOKENS)
        saved = deltakv("slot", "save", "--server", server.url, "--slot-dir", slot_dir, "--transcode", dkv)
        follow_up = prompt + first["tokens"] + server.tokenize(FOLLOW_UP)
        reference = server.complete(follow_up, CONTINUATION_TOKENS)
    print("\n" + saved.stdout.strip())
    ratio = float(saved.stdout.rsplit(", ", 1)[1].split("x")[0])
    assert ratio > 1.5
    assert any("transcoded" in t for t in operations.inspect(dkv)["tracks"])
    with llama_server.running_server(MODEL, *args, slot_dir=slot_dir, log_dir=tmp_path) as server:
        deltakv("slot", "restore", "--server", server.url, "--slot-dir", slot_dir, dkv)
        resumed = server.complete(follow_up, CONTINUATION_TOKENS)
    assert resumed["timings"]["prompt_n"] < len(follow_up) - PROMPT_TOKENS  # the restored slot was reused
    share = agreement(reference["tokens"], resumed["tokens"])
    print(f"q8_0 slot --transcode: greedy agreement {share:.2f} over {CONTINUATION_TOKENS} tokens")


def test_a_prompt_cache_over_a_q8_0_context_stores_transcoded_entries(cache, tmp_path):
    """DeltaKVCache(transcode=True): the entries of a q8_0 context are transcoded, smaller than raw ones,
    and a hit is served back into the context (llama-cpp-python's load_state)."""
    from deltakv_runtime import DeltaKVCache

    name, ggml_type, llm, _ = cache
    llm.reset()
    prompt = prompt_tokens(llm, N_PROMPT)
    llm.eval(prompt)
    sizes = {}
    for transcode in (False, True):
        folder = tmp_path / f"transcode-{transcode}"
        # a q4_0 cache gains only at a lower rate (the default codecs keep its V raw, eval/transcode/)
        bits = 3 if ggml_type == GGMLType.Q4_0 and transcode else None
        prompt_cache = DeltaKVCache(folder, llm=llm, transcode=transcode, bits=bits)
        prompt_cache[prompt] = llm.save_state()
        (entry,) = folder.glob("*.dkv")
        sizes[transcode] = entry.stat().st_size
        with DkvSession(entry) as s:
            assert any(isinstance(t.codec, TranscodedCodec) for t in s.tracks) == transcode
        served = prompt_cache[prompt]
        llm.load_state(served)
        assert llm.n_tokens == N_PROMPT
    print(f"\n{name} prompt cache entry: raw {sizes[False]} bytes, --transcode {sizes[True]} bytes")
    assert sizes[True] < sizes[False]
