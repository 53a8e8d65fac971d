"""extend through a spare sequence (issue 14): only the new cells leave llama.cpp, and the file is
byte for byte the one the whole-sequence copy writes; contexts that cannot do it take the whole copy.

Real llama.cpp (llama-cpp-python 0.3.36) with SmolLM2 and Gemma 3 (iSWA, a window of 512).
"""

import filecmp
import shutil

import numpy as np
import pytest

from deltakv_format.session import DkvSession

from .llama_helpers import greedy
from .test_extend import eval_into, make, native_restore, seq_state, tokens_of, two_sequence_llama

pytestmark = pytest.mark.llama  # test_extend's helpers skip without llama-cpp-python or the models


def spare_llama(name, n_ctx=2048, **kw):
    from deltakv_runtime import add_spare_sequence

    return add_spare_sequence(make(name, n_ctx=n_ctx, **kw))


def spare_is_empty(llm, spare=1):
    import llama_cpp

    return llama_cpp.llama_memory_seq_pos_max(llama_cpp.llama_get_memory(llm.ctx), spare) == -1


def extend_both(llm, fast, whole, **kw):
    """Extend one copy through the spare sequence, the other through the whole sequence; the two
    files must be the same bytes."""
    from deltakv_runtime import extend

    a = extend(llm, fast, **kw)
    b = extend(llm, whole, whole_sequence=True, **kw)
    assert b["path"] == "whole-sequence" and b["why_whole"] is None
    assert filecmp.cmp(fast, whole, shallow=False), (a, b)
    assert spare_is_empty(llm)
    assert {k: a[k] for k in ("rows_added", "tokens_added", "rewritten")} == \
        {k: b[k] for k in ("rows_added", "tokens_added", "rewritten")}
    return a


def test_llama_ignores_n_seq_max_and_add_spare_sequence_keeps_sequence_0():
    import llama_cpp

    from deltakv_runtime.tail import spare_sequence

    plain = make("smollm2", n_ctx=512, n_seq_max=2)  # llama-cpp-python 0.3.36 drops unknown keywords
    assert llama_cpp.llama_n_seq_max(plain.ctx) == 1 and spare_sequence(plain, 0) is None
    llm = spare_llama("smollm2", n_ctx=512)
    assert llama_cpp.llama_n_seq_max(llm.ctx) == 2 and llm.n_ctx() == 512
    toks = tokens_of(llm, 100)
    llm.eval(toks)
    mem = llama_cpp.llama_get_memory(llm.ctx)
    assert llm.n_tokens == 100 and list(llm.input_ids[:100]) == list(toks)
    assert llama_cpp.llama_memory_seq_pos_max(mem, 0) == 99 and spare_is_empty(llm)
    assert spare_sequence(llm, 0) == 1
    fresh = make("smollm2", n_ctx=512)
    fresh.eval(toks)
    assert greedy(llm, 8) == greedy(fresh, 8)  # sequence 0 evaluates as in a one-sequence context


@pytest.mark.parametrize("codec", ["raw", "dkv-ans"])
def test_the_spare_path_writes_the_whole_paths_bytes_and_loads_back(tmp_path, codec):
    from deltakv_runtime import load, save

    llm = spare_llama("smollm2")
    toks = tokens_of(llm, 900)
    llm.eval(toks[:300])
    fast, whole = tmp_path / "fast.dkv", tmp_path / "whole.dkv"
    save(llm, fast, codec=codec)
    shutil.copyfile(fast, whole)
    for n in (364, 365, 700):
        llm.eval(toks[llm.n_tokens:n])
        result = extend_both(llm, fast, whole)
        assert result["path"] == "spare-sequence" and result["rewritten"] is None
        assert result["tokens_added"] > 0 and set(result["seconds"]) == {"state_copy", "parse", "encode", "write"}
    # after a load llama-cpp-python re-evaluates the last token: no new tokens, one row recomputed
    other = spare_llama("smollm2")
    load(other, fast)
    shutil.copyfile(fast, whole)
    greedy(other, 4)
    assert extend_both(other, fast, whole)["path"] == "spare-sequence"
    if codec == "raw":
        restored = spare_llama("smollm2")
        assert load(restored, fast) == other.n_tokens
        assert seq_state(restored) == seq_state(other)
        assert greedy(restored, 8) == greedy(native_restore(other, "smollm2", tmp_path), 8)
    with DkvSession(fast) as s:
        assert s.file.verify() == []


def test_gemma_past_its_window_through_the_spare(tmp_path):
    """iSWA: the SWA cache writes its window only, in ring order; the spare copy starts below the
    window, so that stream comes whole and the append is the whole copy's, also once the window
    moved. The step to 1100 tokens supersedes more SWA rows than the file would keep live: that is
    a rewrite, which needs the whole sequence, and the result says why."""
    from deltakv_runtime import load, save

    llm = spare_llama("gemma3")
    toks = tokens_of(llm, 1500)
    llm.eval(toks[:300])
    fast, whole = tmp_path / "fast.dkv", tmp_path / "whole.dkv"
    save(llm, fast, codec="raw")
    shutil.copyfile(fast, whole)
    results = []
    for n in (450, 700, 1100, 1110):  # within the window, crossing it, far beyond it, a small step
        llm.eval(toks[llm.n_tokens:n])
        results.append(extend_both(llm, fast, whole))
    assert [r["path"] for r in results] == ["spare-sequence", "spare-sequence", "whole-sequence", "spare-sequence"]
    assert results[2]["rewritten"] is not None and "rewrite" in results[2]["why_whole"]
    with DkvSession(fast) as s:
        assert s.stream_cells[1] < s.stream_cells[0]  # the SWA stream holds its window only
    restored = spare_llama("gemma3")
    assert load(restored, fast) == 1110
    assert seq_state(restored) == seq_state(llm)
    assert greedy(restored, 8) == greedy(native_restore(llm, "gemma3", tmp_path), 8)


def test_contexts_without_a_spare_take_the_whole_sequence(tmp_path):
    from deltakv_runtime import extend, save

    one = make("smollm2", n_ctx=1024)  # llama-cpp-python's default: n_seq_max = 1
    toks = tokens_of(one, 200)
    one.eval(toks[:100])
    save(one, tmp_path / "one.dkv", codec="raw")
    one.eval(toks[100:164])
    result = extend(one, tmp_path / "one.dkv")
    assert result["path"] == "whole-sequence" and "n_seq_max = 1" in result["why_whole"]

    streams = two_sequence_llama(unified=False)  # one stream per sequence: seq_cp of a range would abort
    streams.eval(toks[:100])
    save(streams, tmp_path / "streams.dkv", codec="raw")
    streams.eval(toks[100:164])
    result = extend(streams, tmp_path / "streams.dkv")
    assert result["path"] == "whole-sequence" and "kv_unified = False" in result["why_whole"]

    busy = two_sequence_llama(unified=True)  # the only other sequence holds cells: no spare
    busy.eval(toks[:100])
    eval_into(busy, toks[150:160], 1)
    save(busy, tmp_path / "busy.dkv", codec="raw")
    busy.eval(toks[100:164])
    before = seq_state(busy, 1)
    assert extend(busy, tmp_path / "busy.dkv")["path"] == "whole-sequence"
    assert seq_state(busy, 1) == before  # the other sequence was not touched


def test_changes_before_the_new_cells_fall_back(tmp_path):
    """Cells removed and replaced by other tokens, and a context shift: the spare path cannot see
    them in its tail (or they need a rewrite); the whole sequence decides, and the file is right."""
    from deltakv_runtime import extend, load

    llm = spare_llama("smollm2", n_ctx=1024)
    toks = tokens_of(llm, 400)
    llm.eval(toks[:300])
    fast, whole = tmp_path / "fast.dkv", tmp_path / "whole.dkv"
    from deltakv_runtime import save

    save(llm, fast, codec="raw")
    shutil.copyfile(fast, whole)
    llm._ctx.kv_cache_seq_rm(0, 250, -1)
    llm.n_tokens = 250
    llm.eval(toks[300:400])  # positions 250.. hold other tokens now
    result = extend_both(llm, fast, whole)
    assert result["path"] == "whole-sequence" and result["rewritten"] is not None and result["why_whole"]

    llm._ctx.kv_cache_seq_rm(0, 50, 100)  # a context shift: positions move down
    llm._ctx.kv_cache_seq_shift(0, 100, -1, -50)
    kept = list(llm.input_ids[:50]) + list(llm.input_ids[100:350])
    llm.input_ids[:300] = kept
    llm.n_tokens = 300
    llm.eval(toks[:20])
    result = extend(llm, fast)
    assert result["path"] == "whole-sequence" and result["rewritten"] is not None
    restored = spare_llama("smollm2", n_ctx=1024)
    assert load(restored, fast) == 320
    assert seq_state(restored) == seq_state(llm)


def test_sequence_1_through_the_spare(tmp_path):
    """Another sequence than 0, given its tokens: sequence 0 (the Llama's) is left as it was."""
    from deltakv_runtime import extend, load, save

    llm = two_sequence_llama(unified=True)
    toks = tokens_of(llm, 400)
    # three sequences: 0 the Llama's, 1 saved and extended, 2 the spare
    from llama_cpp import _internals

    params = llm.context_params
    params.n_seq_max = 3
    llm._ctx = _internals.LlamaContext(model=llm._model, params=params, verbose=False)
    llm.eval(toks[:50])
    other = toks[200:400]
    eval_into(llm, other[:80], 1)
    fast, whole = tmp_path / "fast.dkv", tmp_path / "whole.dkv"
    save(llm, fast, seq_id=1, tokens=other[:80], codec="raw")
    shutil.copyfile(fast, whole)
    eval_into(llm, other[80:150], 1, pos0=80)
    before = seq_state(llm, 0)
    a = extend(llm, fast, seq_id=1, tokens=other[:150])
    b = extend(llm, whole, seq_id=1, tokens=other[:150], whole_sequence=True)
    assert a["path"] == "spare-sequence" and a["tokens_added"] == 70 == b["tokens_added"]
    assert filecmp.cmp(fast, whole, shallow=False)
    assert seq_state(llm, 0) == before and spare_is_empty(llm, 2)
    with DkvSession(fast) as s:
        assert np.array_equal(s.tokens(), other[:150])
    fresh = two_sequence_llama(unified=True)
    params = fresh.context_params
    params.n_seq_max = 3
    fresh._ctx = _internals.LlamaContext(model=fresh._model, params=params, verbose=False)
    assert load(fresh, fast, seq_id=1) == 150
    assert seq_state(fresh, 1) == seq_state(llm, 1)
