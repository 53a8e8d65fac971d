"""The runtime shim against real llama.cpp: save, load in another process, extend, the prompt cache, crashes."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from deltakv_format.constants import DEFAULT_V_CODEC
from deltakv_format.errors import SessionMismatchError
from deltakv_format.session import DkvSession

from .llama_helpers import MODEL, TEXT, greedy, make_llama, needs_llama, prompt_tokens

pytestmark = [needs_llama, pytest.mark.llama]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_py(code, *args, timeout=300):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


def test_save_in_one_process_load_and_continue_in_another(tmp_path):
    path = tmp_path / "chat.dkv"
    saved = run_py("""
        import sys
        from tests.llama_helpers import make_llama, prompt_tokens, greedy
        from deltakv_runtime import save
        llm = make_llama()
        llm.eval(prompt_tokens(llm, 300))
        save(llm, sys.argv[1], codec="raw")
        print(" ".join(map(str, greedy(llm))))
    """, path)
    assert saved.returncode == 0, saved.stderr[-2000:]
    expected = [int(t) for t in saved.stdout.split()]
    loaded = run_py("""
        import sys
        from tests.llama_helpers import make_llama, greedy
        from deltakv_runtime import load
        llm = make_llama()
        n = load(llm, sys.argv[1])
        assert n == 300, n
        print(" ".join(map(str, greedy(llm))))
    """, path)
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    assert [int(t) for t in loaded.stdout.split()] == expected  # raw: bit-identical cache, same greedy tokens


def test_default_codec_continues_close_to_the_original(tmp_path):
    """Teacher-forced: the next 48 tokens of the text fed to the original and to the restored context;
    their next-token distributions stay close (KL, the measure of eval/EVAL.md) and agree on the top
    token almost everywhere. (Greedy continuations would cascade from one near-tie flip.)"""
    from deltakv_runtime import load, save

    toks = prompt_tokens(make_llama(), 448)
    head, tail = toks[:400], toks[400:]
    llm = make_llama(logits_all=True)
    llm.eval(head)
    save(llm, tmp_path / "s.dkv")
    llm.eval(tail)
    ref = np.array(llm.scores[400:448], np.float64)
    llm2 = make_llama(logits_all=True)
    load(llm2, tmp_path / "s.dkv")
    assert llm2.n_tokens == 400
    llm2.eval(tail)
    got = np.array(llm2.scores[400:448], np.float64)

    def log_softmax(x):
        x = x - x.max(axis=1, keepdims=True)
        return x - np.log(np.exp(x).sum(axis=1, keepdims=True))

    p, q = log_softmax(ref), log_softmax(got)
    kl = float(np.mean(np.sum(np.exp(p) * (p - q), axis=1)))
    top1 = float(np.mean(ref.argmax(1) == got.argmax(1)))
    assert kl < 0.05 and top1 >= 0.9, (kl, top1)
    assert os.path.getsize(tmp_path / "s.dkv") < 0.45 * 400 * 23040  # f16 K+V of 30 layers x 192 values


def test_extend_twice_then_load(tmp_path):
    from deltakv_runtime import extend, load, save

    path = tmp_path / "s.dkv"
    llm = make_llama()
    toks = prompt_tokens(llm, 260)
    llm.eval(toks[:100])
    save(llm, path, codec="raw")
    llm.eval(toks[100:170])
    r1 = extend(llm, path)
    llm.eval(toks[170:260])
    r2 = extend(llm, path)
    assert r1["tokens_added"] == 70 and r2["tokens_added"] == 90
    expected = greedy(llm, 12)
    with DkvSession(path) as s:
        assert s.n_segments == 3 and np.array_equal(s.tokens(), toks)
        assert s.file.verify() == []
    llm2 = make_llama()
    assert load(llm2, path) == 260
    assert greedy(llm2, 12) == expected


def test_per_role_codecs_survive_extend_and_load(tmp_path):
    from deltakv_runtime import extend, load, save

    path = tmp_path / "s.dkv"
    llm = make_llama()
    toks = prompt_tokens(llm, 150)
    llm.eval(toks[:100])
    save(llm, path, k_codec="q8_0", v_codec="raw")
    llm.eval(toks[100:])
    extend(llm, path)
    with DkvSession(path) as s:
        assert {t.codec.name for t in s.tracks if t.name.endswith(".k")} == {"q8_0"}
        assert {t.codec.name for t in s.tracks if t.name.endswith(".v")} == {"raw"}
        live = llm.input_ids[: llm.n_tokens]
        assert np.array_equal(s.tokens(), live)
    llm2 = make_llama()
    assert load(llm2, path) == 150
    assert len(greedy(llm2, 4)) == 4


def test_extend_of_a_diverged_context_rewrites_the_file(tmp_path):
    from deltakv_runtime import extend, load, save

    llm = make_llama()
    toks = prompt_tokens(llm, 120)
    llm.eval(toks[:60])
    save(llm, tmp_path / "s.dkv", codec="raw")
    llm.reset()
    llm.eval(toks[1:90])
    result = extend(llm, tmp_path / "s.dkv")
    assert result["rewritten"] == "the stored tokens are not a prefix of the live ones"
    with DkvSession(tmp_path / "s.dkv") as s:
        assert s.n_segments == 1 and np.array_equal(s.tokens(), toks[1:90])
        assert {t.codec.name for t in s.tracks} == {"raw"}  # a rewrite keeps the codecs
    llm2 = make_llama()
    assert load(llm2, tmp_path / "s.dkv") == 89


def test_load_mismatches_give_clear_errors_and_leave_the_context_usable(tmp_path):
    from deltakv_runtime import load, save

    llm = make_llama(n_ctx=1024)
    llm.eval(prompt_tokens(llm, 300))
    save(llm, tmp_path / "s.dkv")
    small = make_llama(n_ctx=256)
    small.eval(prompt_tokens(small, 10))
    with pytest.raises(SessionMismatchError, match="n_ctx"):
        load(small, tmp_path / "s.dkv")
    assert small.n_tokens == 10
    assert len(greedy(small, 3)) == 3  # still usable
    import llama_cpp

    other_type = make_llama(type_k=llama_cpp.GGML_TYPE_Q8_0, type_v=llama_cpp.GGML_TYPE_Q8_0)
    with pytest.raises(SessionMismatchError, match="type_k"):
        load(other_type, tmp_path / "s.dkv")


def test_prompt_cache_survives_a_restart(tmp_path):
    code = """
        import sys, time
        from tests.llama_helpers import make_llama, TEXT
        from deltakv_runtime import DeltaKVCache
        llm = make_llama()
        cache = DeltaKVCache(sys.argv[1], capacity_bytes=64 << 20, llm=llm)
        prompt = llm.tokenize(TEXT[:1500].encode())
        print("hit" if prompt in cache else "miss")
        llm.set_cache(cache)
        out = llm.create_completion(TEXT[:1500], max_tokens=8, temperature=0)
        print(repr(out["choices"][0]["text"]))
    """
    first = run_py(code, tmp_path / "cache")
    assert first.returncode == 0, first.stderr[-2000:]
    files = list((tmp_path / "cache").glob("*.dkv"))
    assert len(files) == 1
    second = run_py(code, tmp_path / "cache")
    assert second.returncode == 0, second.stderr[-2000:]
    assert first.stdout.split("\n")[0] == "miss" and second.stdout.split("\n")[0] == "hit"
    assert second.stdout.split("\n")[1] == first.stdout.split("\n")[1]


def test_prompt_cache_evicts_least_recently_used(tmp_path):
    from deltakv_runtime import DeltaKVCache

    llm = make_llama()
    cache = DeltaKVCache(tmp_path, capacity_bytes=1, k_codec="q8_0")  # keeps only the newest entry
    for n in (50, 80, 120):
        llm.reset()
        llm.eval(prompt_tokens(llm, n))
        cache[prompt_tokens(llm, n)] = llm.save_state()
    files = list(tmp_path.glob("*.dkv"))
    assert len(files) == 1
    with DkvSession(files[0]) as s:
        assert {t.codec.name for t in s.tracks if t.name.endswith(".k")} == {"q8_0"}
        assert {t.codec.name for t in s.tracks if t.name.endswith(".v")} == {DEFAULT_V_CODEC}
    state = cache[prompt_tokens(llm, 130)]
    assert state.n_tokens == 120
    assert state.scores.shape[0] >= 1


@pytest.mark.parametrize("operation", ["save", "extend"])
def test_kill_during_write_leaves_old_or_new_snapshot(tmp_path, operation):
    """SIGKILL a process that writes the same session over and over at many moments."""
    path = tmp_path / "s.dkv"
    writer = """
        import sys
        from tests.llama_helpers import make_llama, prompt_tokens
        from deltakv_runtime import save, extend
        path, op = sys.argv[1], sys.argv[2]
        llm = make_llama()
        toks = prompt_tokens(llm, 600)
        llm.eval(toks[:200])
        save(llm, path)
        print("ready", flush=True)
        n = 200
        while True:
            if op == "save":
                save(llm, path)
            else:
                n = n + 20 if n < 580 else 200
                if n == 200:
                    llm.reset(); llm.eval(toks[:200]); save(llm, path)
                else:
                    llm.eval(toks[n - 20:n]); extend(llm, path)
    """
    env = dict(os.environ, PYTHONPATH=ROOT)
    rng = np.random.default_rng(0)
    seen = set()
    for attempt in range(6):
        proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(writer), str(path), operation],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()[-2000:]
        time.sleep(float(rng.uniform(0.05, 1.5)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with DkvSession(path) as s:  # reads a committed journal's header; a torn one is ignored
            assert s.file.verify() == [] or all("after the last tensor" in p for p in s.file.verify())
            n = s.n_tokens
            s.to_llama_state()
        assert n % 20 == 0 and 200 <= n <= 600
        seen.add(n)
        leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
        for name in leftovers:  # a killed writer's temp file is never the session itself
            (tmp_path / name).unlink()


def test_eval_writes_the_table_and_merges_added_rows(tmp_path):
    import json

    from click.testing import CliRunner

    from deltakv_tools.cli import main

    common = ["eval", "--model", "smollm2", "--text", "prose", "--prefix", "64", "--continuation", "16",
              "--chunks", "2", "--out", str(tmp_path)]
    rows = ["raw", "q4_0", "llama.cpp cache q8_0", "f16 noise floor"]
    r = CliRunner().invoke(main, common + [a for row in rows for a in ("--row", row)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    results = json.loads((tmp_path / "results.json").read_text())
    assert sorted({x["row"] for x in results}) == sorted(rows) and len(results) == 2 * len(rows)
    assert all(x["kl"] == 0 and x["top1"] == 1 for x in results if x["row"] == "raw")
    assert all(x["kl"] > 0 for x in results if x["row"] == "q4_0")
    r = CliRunner().invoke(main, common + ["--add", "--row", "K q8_0 + V dkv-q4"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results) == 2 * (len(rows) + 1)
    per_role = [x for x in results if x["row"] == "K q8_0 + V dkv-q4"]
    assert all(6 < x["bits_per_value"] < 7 for x in per_role)
    table = (tmp_path / "EVAL.md").read_text()
    assert "| K q8_0 + V dkv-q4 | 6." in table and "paired by run (smollm2)" in table
    assert table.count("deltakv eval") == 2  # both commands are listed
    assert (tmp_path / "rate_distortion.png").stat().st_size > 10_000
