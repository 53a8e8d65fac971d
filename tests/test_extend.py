"""extend never gives back a wrong session (issue 10), against real llama.cpp on both models.

The reference for a restored session is llama.cpp's own restore of the same final state
(``llama_state_seq_save_file`` / ``llama_state_seq_load_file``), not the live context: a restored
context can differ from the live one on a near-tie for llama.cpp's own files too.
"""

import ctypes

import numpy as np
import pytest

from deltakv_format.errors import DeltaKVError, SessionMismatchError
from deltakv_format.session import DkvSession, write_session
from deltakv_tools.models import gemma3_270m, smollm2

from .llama_helpers import HAVE_LLAMA, TEXT, greedy

pytestmark = [pytest.mark.llama, pytest.mark.skipif(not HAVE_LLAMA, reason="needs llama-cpp-python (bash setup.sh)")]

MODELS = {"smollm2": smollm2, "gemma3": gemma3_270m}  # Gemma 3: iSWA, a sliding window of 512


def model_path(name):
    path = MODELS[name]()
    if path is None:
        pytest.skip(f"needs the {name} model from PyPI (bash setup.sh installs it)")
    return str(path)


def make(name, n_ctx=2048, flash_attn=True, **kw):
    from llama_cpp import Llama

    return Llama(model_path(name), n_ctx=n_ctx, flash_attn=flash_attn, verbose=False, seed=1, **kw)


def tokens_of(llm, n):
    toks = llm.tokenize(TEXT.encode())
    assert len(toks) >= n, f"the test text has {len(toks)} tokens, {n} wanted"
    return toks[:n]


def seq_state(llm, seq_id=0) -> bytes:
    from deltakv_runtime.session import seq_state_bytes

    return bytes(seq_state_bytes(llm, seq_id))


def native_restore(llm, name, tmp_path, **kw):
    """A fresh context holding llama.cpp's own save/restore of ``llm``'s sequence 0."""
    import llama_cpp

    path = str(tmp_path / "native.ggsq").encode()
    n = llm.n_tokens
    toks = (llama_cpp.llama_token * n)(*llm.input_ids[:n])
    assert llama_cpp.llama_state_seq_save_file(llm.ctx, path, 0, toks, n) > 0
    fresh = make(name, **kw)
    out = (llama_cpp.llama_token * fresh.n_ctx())()
    n_out = ctypes.c_size_t()
    assert llama_cpp.llama_state_seq_load_file(fresh.ctx, path, 0, out, fresh.n_ctx(), ctypes.byref(n_out)) > 0
    fresh.input_ids[: n_out.value] = list(out)[: n_out.value]
    fresh.n_tokens = n_out.value
    return fresh


# save at, then evaluate more and extend to each of (issue 10's table): within the window, crossing it,
# far beyond it, several extends; and a plain save with no extend.
PLANS = [(300, [450]), (300, [700]), (600, [1100]), (200, [400, 800, 1500]), (1100, [])]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["gemma3", "smollm2"])
def test_extend_gives_llama_cpps_own_restore_with_raw(tmp_path, name):
    from deltakv_runtime import extend, load, save

    llm = make(name)
    toks = tokens_of(llm, 1500)
    for first, extends in PLANS:
        path = tmp_path / f"{first}-{'-'.join(map(str, extends))}.dkv"
        llm.reset()
        llm.eval(toks[:first])
        save(llm, path, codec="raw")
        for n in extends:
            llm.eval(toks[llm.n_tokens:n])
            extend(llm, path)
        live = seq_state(llm)
        expected = greedy(native_restore(llm, name, tmp_path), 8)
        restored = make(name)
        assert load(restored, path) == llm.n_tokens
        assert seq_state(restored) == live, (first, extends)  # byte-identical to the live state
        assert greedy(restored, 8) == expected, (first, extends)
        with DkvSession(path) as s:
            assert s.file.verify() == []
            assert np.array_equal(s.tokens(), toks[:llm.n_tokens])


@pytest.mark.slow
@pytest.mark.parametrize("codec", ["dkv-q4", "delta-q4_0", "q8_0"])
def test_an_extended_file_decodes_as_a_file_saved_at_once(tmp_path, codec):
    """Every codec: the rows of a session extended past the window equal, to the bit, those of a
    plain save of the final state, so both resume to the same tokens."""
    from deltakv_runtime import extend, load, save

    llm = make("gemma3")
    toks = tokens_of(llm, 1300)
    llm.eval(toks[:200])
    save(llm, tmp_path / "grown.dkv", codec=codec)
    for n in (430, 1300):  # within the window, then far past it (the SWA stream is rewritten)
        llm.eval(toks[llm.n_tokens:n])
        assert extend(llm, tmp_path / "grown.dkv")["rewritten"] is None
    save(llm, tmp_path / "once.dkv", codec=codec)
    with DkvSession(tmp_path / "grown.dkv") as a, DkvSession(tmp_path / "once.dkv") as b:
        assert a.stream_cells == b.stream_cells and a.n_segments == 3
        for g in range(len(a.stream_cells)):
            assert a.cells(g) == b.cells(g)
        for ta, tb in zip(a.tracks, b.tracks):
            assert ta.codec.name == tb.codec.name
            assert np.array_equal(a.rows(ta), b.rows(tb)), ta.name
    outs = []
    for name in ("grown.dkv", "once.dkv"):
        fresh = make("gemma3")
        load(fresh, tmp_path / name)
        outs.append(greedy(fresh, 8))
    assert outs[0] == outs[1]


def test_extend_after_cells_were_removed_and_replaced(tmp_path):
    """llama_memory_seq_rm then other tokens: the stored cells and tokens no longer lead the live
    ones; extend rewrites what changed and the file is the live session again."""
    from deltakv_runtime import extend, load, save

    llm = make("smollm2", n_ctx=1024)
    toks = tokens_of(llm, 400)
    llm.eval(toks[:300])
    path = tmp_path / "s.dkv"
    save(llm, path, codec="raw")
    llm._ctx.kv_cache_seq_rm(0, 250, -1)
    llm.n_tokens = 250
    llm.eval(toks[300:400])  # positions 250.. now hold other tokens
    result = extend(llm, path)
    assert result["rewritten"] is not None
    restored = make("smollm2", n_ctx=1024)
    assert load(restored, path) == 350
    assert seq_state(restored) == seq_state(llm)
    with DkvSession(path) as s:
        assert np.array_equal(s.tokens(), list(toks[:250]) + list(toks[300:400]))


def test_extend_without_new_tokens_after_a_load_keeps_the_session(tmp_path):
    """After load, llama-cpp-python re-evaluates the last token; extend rewrites that row."""
    from deltakv_runtime import extend, load, save

    llm = make("smollm2", n_ctx=1024)
    llm.eval(tokens_of(llm, 100))
    path = tmp_path / "s.dkv"
    save(llm, path, codec="raw")
    other = make("smollm2", n_ctx=1024)
    load(other, path)
    greedy(other, 4)
    extend(other, path)
    fresh = make("smollm2", n_ctx=1024)
    load(fresh, path)
    assert seq_state(fresh) == seq_state(other)


def test_the_prompt_cache_resumes_gemma_past_its_window(tmp_path):
    """DeltaKVCache with an iSWA model whose prompt is longer than the sliding window."""
    from deltakv_runtime import DeltaKVCache

    llm = make("gemma3", n_ctx=1024)
    prompt = llm.detokenize(tokens_of(llm, 700)).decode("utf-8", "ignore")
    expected = llm.create_completion(prompt, max_tokens=6, temperature=0.0)["choices"][0]["text"]
    cached = make("gemma3", n_ctx=1024)
    cached.set_cache(DeltaKVCache(tmp_path / "cache", codec="raw", llm=cached))
    first = cached.create_completion(prompt, max_tokens=6, temperature=0.0)["choices"][0]["text"]
    # What llama.cpp itself gives from that cache entry: the state after the completion (prompt and
    # answer), restored natively; the prompt's last token is then replayed. Past the window, the
    # sliding-window cells that the answer's tokens pushed out are not in any saved state, so a
    # restore can continue differently from the live context (a llama.cpp property, not deltakv's).
    native = make("gemma3", n_ctx=1024)
    native.load_state(cached.save_state())
    restored = native.create_completion(prompt, max_tokens=6, temperature=0.0)["choices"][0]["text"]
    again = make("gemma3", n_ctx=1024)
    cache = DeltaKVCache(tmp_path / "cache", codec="raw", llm=again)
    assert again.tokenize(prompt.encode()) in cache  # served after a restart
    again.set_cache(cache)
    second = again.create_completion(prompt, max_tokens=6, temperature=0.0)["choices"][0]["text"]
    assert first == expected and second == restored
    assert list((tmp_path / "cache").glob("*.dkv"))


def test_validate_and_the_reader_accept_what_extend_wrote(tmp_path):
    from deltakv_format.operations import validate
    from deltakv_runtime import extend, save

    llm = make("gemma3", n_ctx=1024)
    toks = tokens_of(llm, 900)
    llm.eval(toks[:400])
    path = tmp_path / "s.dkv"
    save(llm, path)
    llm.eval(toks[400:900])
    extend(llm, path)
    report = validate(path)
    assert report.ok and not report.problems, report.problems


# -- sequences other than 0 ------------------------------------------------------------------


def two_sequence_llama(unified: bool, n_ctx=1024):
    """A real llama.cpp context with two sequences (llama-cpp-python's Llama makes one)."""
    from llama_cpp import _internals

    llm = make("smollm2", n_ctx=n_ctx)
    params = llm.context_params
    params.n_seq_max = 2
    params.kv_unified = unified
    llm._ctx = _internals.LlamaContext(model=llm._model, params=params, verbose=False)
    return llm


def eval_into(llm, tokens, seq_id, pos0=0):
    from llama_cpp import _internals

    batch = _internals.LlamaBatch(n_tokens=len(tokens), embd=0, n_seq_max=1)
    b = batch.batch
    b.n_tokens = len(tokens)
    for i, t in enumerate(tokens):
        b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, pos0 + i, 1, i == len(tokens) - 1
        b.seq_id[i][0] = seq_id
    llm._ctx.decode(batch)


@pytest.mark.parametrize("unified", [False, True])
def test_save_load_extend_of_sequence_1(tmp_path, unified):
    from deltakv_runtime import extend, load, save

    llm = two_sequence_llama(unified)
    toks = tokens_of(llm, 400)
    llm.eval(toks[:150])  # sequence 0, the one the Llama object tracks
    other = toks[200:400]
    eval_into(llm, other[:80], 1)
    path = tmp_path / "s1.dkv"
    with pytest.raises(DeltaKVError, match="tokens of sequence 1 are not known"):
        save(llm, path, seq_id=1)
    save(llm, path, seq_id=1, tokens=other[:80], codec="raw")
    with DkvSession(path) as s:
        assert np.array_equal(s.tokens(), other[:80]) and max(s.stream_cells) == 80
    eval_into(llm, other[80:110], 1, pos0=80)
    assert extend(llm, path, seq_id=1, tokens=other[:110])["tokens_added"] == 30
    with pytest.raises(SessionMismatchError, match="saved from sequence 1"):
        extend(llm, path, seq_id=0)

    fresh = two_sequence_llama(unified)
    fresh.eval(toks[:20])
    assert load(fresh, path, seq_id=1) == 110
    assert fresh.n_tokens == 20 and list(fresh.input_ids[:20]) == list(toks[:20])  # sequence 0's list untouched
    assert seq_state(fresh, 1) == seq_state(llm, 1)
    with pytest.raises(SessionMismatchError, match="sequences 0..1"):
        save(llm, tmp_path / "x.dkv", seq_id=5)


def test_sequence_checks(tmp_path):
    from deltakv_runtime import load, save

    one = make("smollm2", n_ctx=1024)
    one.eval(tokens_of(one, 50))
    with pytest.raises(SessionMismatchError, match="sequences 0..0"):
        save(one, tmp_path / "x.dkv", seq_id=1)
    two = two_sequence_llama(unified=False)
    two.eval(tokens_of(two, 60))
    with pytest.raises(DeltaKVError, match="holds no cells"):
        save(two, tmp_path / "x.dkv", seq_id=1, tokens=[1, 2, 3])
    save(two, tmp_path / "two.dkv", codec="raw")
    before = seq_state(one)
    with pytest.raises(SessionMismatchError, match=r"streams.*n_seq_max = 1"):
        load(one, tmp_path / "two.dkv")
    with pytest.raises(SessionMismatchError, match="sequences 0..0"):
        load(one, tmp_path / "two.dkv", seq_id=1)
    assert seq_state(one) == before and one.n_tokens == 50
    assert not (tmp_path / "x.dkv").exists()


# -- refusals that name the cause, before llama.cpp is asked ---------------------------------


def test_refusals_name_the_cause_and_leave_the_context_as_it_was(tmp_path):
    from deltakv_runtime import load, save

    fa_off = make("smollm2", n_ctx=1024, flash_attn=False)
    fa_off.eval(tokens_of(fa_off, 40))
    save(fa_off, tmp_path / "fa0.dkv")
    live = make("smollm2", n_ctx=1024)
    live.eval(tokens_of(live, 30))
    before = seq_state(live)
    with pytest.raises(SessionMismatchError, match="flash attention off.*flash_attn=False"):
        load(live, tmp_path / "fa0.dkv")
    assert seq_state(live) == before and live.n_tokens == 30

    gemma = make("gemma3", n_ctx=1024)
    gemma.eval(tokens_of(gemma, 40))
    save(gemma, tmp_path / "gemma.dkv")
    with pytest.raises(SessionMismatchError, match="saved with model"):
        load(live, tmp_path / "gemma.dkv")
    # A file converted from llama.cpp's own bytes carries no model name: the layers decide.
    from .conftest import FIXTURES
    from deltakv_format.llama_state import parse_state

    state = parse_state((FIXTURES / "gemma3_v10_fa1.ggsq").read_bytes())
    write_session(state, tmp_path / "converted.dkv", "raw").close()
    with pytest.raises(SessionMismatchError, match="KV caches"):
        load(live, tmp_path / "converted.dkv")
    assert seq_state(live) == before and live.n_tokens == 30

    small = make("smollm2", n_ctx=8, flash_attn=False)  # llama.cpp pads its cache to 256 cells; the Llama holds 8 tokens
    with pytest.raises(SessionMismatchError, match="40 tokens; this context has n_ctx = 8"):
        load(small, tmp_path / "fa0.dkv")


def test_codec_none_means_the_default(tmp_path):
    from deltakv_format.constants import DEFAULT_CODEC
    from deltakv_runtime import save

    llm = make("smollm2", n_ctx=1024)
    llm.eval(tokens_of(llm, 40))
    save(llm, tmp_path / "s.dkv", codec=None)
    with DkvSession(tmp_path / "s.dkv") as s:
        assert s.codec_name == DEFAULT_CODEC
    with pytest.raises(TypeError, match="expected a codec name"):
        save(llm, tmp_path / "t.dkv", codec=3)


def test_extend_after_a_context_shift(tmp_path):
    """Cells removed from the middle and the later ones moved down (what a context shift does):
    the restored session is llama.cpp's live one, byte for byte."""
    from deltakv_runtime import extend, load, save

    llm = make("smollm2", n_ctx=1024)
    toks = tokens_of(llm, 400)
    llm.eval(toks[:300])
    path = tmp_path / "s.dkv"
    save(llm, path, codec="raw")
    llm._ctx.kv_cache_seq_rm(0, 50, 100)
    llm._ctx.kv_cache_seq_shift(0, 100, -1, -50)
    kept = list(toks[:50]) + list(toks[100:300])
    llm.input_ids[:250] = kept
    llm.n_tokens = 250
    llm.eval(toks[300:340])  # the shift is applied to K on this decode
    assert extend(llm, path)["rewritten"] is not None
    restored = make("smollm2", n_ctx=1024)
    assert load(restored, path) == 290
    assert seq_state(restored) == seq_state(llm)
