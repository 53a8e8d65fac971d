"""``deltakv bench save``: ``deltakv_runtime.save`` vs ``llama_state_seq_save_file`` of the same live
context, measured in one run, interleaved, the best of the repeats; with where save's time goes.

The steps of a save (``runtime/session.py: save``) are timed by doing them one by one as save does:
``get_data`` (llama_state_seq_get_data: the sequence's bytes copied out of llama.cpp), ``parse``
(those bytes as typed sections), ``encode`` (write_session until its last track is coded) and
``write+fsync`` (the header and tensors written to a temp file, fsync, rename, fsync of the folder).
llama_state_seq_save_file writes its file without fsync: the ratio is what a caller of each waits.

Filling a context with 16k tokens takes minutes on a small machine (15 minutes on 2 shared cores), so
the context of each size is filled once by evaluating the prompt, saved with llama.cpp's own
``llama_state_seq_save_file``, and later runs load that file into a fresh context (the same cells,
bytes for bytes) instead of evaluating again; ``--fresh`` evaluates anyway.
"""

from __future__ import annotations

import ctypes
import os
import tempfile
import time
from pathlib import Path

from deltakv_format.constants import DEFAULT_CODEC
from deltakv_format.session import write_session

from deltakv_runtime.session import _runtime_kvs, accelerated, live_state, model_rope, save, seq_state_bytes

from ..models import smollm2
from .bench_runtime import _header, _tokens

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "deltakv" / "bench-save"


def _filled_context(tokens: int, fresh: bool):
    """A SmolLM2 context holding ``tokens`` evaluated tokens, and how it was filled."""
    import llama_cpp
    from llama_cpp import Llama

    llm = Llama(str(smollm2()), n_ctx=tokens + 64, flash_attn=True, n_batch=512, verbose=False)
    toks = _tokens(llm, tokens)
    state = CACHE / f"{smollm2().stem}-{tokens}.ggsq"
    if not fresh and state.exists():
        buf = (llama_cpp.llama_token * (tokens + 64))()
        n = ctypes.c_size_t(0)
        if llama_cpp.llama_state_seq_load_file(llm.ctx, str(state).encode(), 0, buf, tokens + 64, ctypes.byref(n)) \
                and n.value == tokens and list(buf[:tokens]) == toks:
            llm.input_ids[:tokens] = toks
            llm.n_tokens = tokens
            return llm, f"loaded from {state} (saved after evaluating the prompt)"
        llm.reset()
    t = time.perf_counter()
    llm.eval(toks)
    how = f"prompt evaluated ({time.perf_counter() - t:.0f} s)"
    CACHE.mkdir(parents=True, exist_ok=True)
    arr = (llama_cpp.llama_token * tokens)(*toks)
    llama_cpp.llama_state_seq_save_file(llm.ctx, str(state).encode(), 0, arr, tokens)
    return llm, how


def _steps(llm, path: Path, codec: str) -> dict[str, float]:
    """One save done step by step (as ``save`` does them), each step timed."""
    seconds = {}
    t = time.perf_counter()
    blob = seq_state_bytes(llm, 0)
    seconds["get_data"] = time.perf_counter() - t
    t = time.perf_counter()
    state = live_state(llm, 0, blob=blob)
    seconds["parse"] = time.perf_counter() - t
    coded = []
    t = time.perf_counter()
    with accelerated():
        write_session(state, path, codec, extra_kvs=_runtime_kvs(llm, 0), rope=model_rope(llm, state),
                      progress=lambda _name: coded.append(time.perf_counter()))
    end = time.perf_counter()
    seconds["encode"] = coded[-1] - t
    seconds["write+fsync"] = end - coded[-1]
    return seconds


def bench_save(*, tokens_list=(2048, 16384), codec: str = DEFAULT_CODEC, repeat: int = 3, fresh: bool = False) -> str:
    import llama_cpp

    tmp = Path(tempfile.mkdtemp(prefix="deltakv-bench-save-"))
    rows, notes = [], []
    for tokens in tokens_list:
        llm, how = _filled_context(tokens, fresh)
        notes.append(f"{tokens} tokens: {how}")
        dkv, ggsq, steps_dkv = tmp / f"s{tokens}.dkv", tmp / f"s{tokens}.ggsq", tmp / f"steps{tokens}.dkv"
        toks = (llama_cpp.llama_token * tokens)(*llm.input_ids[:tokens].tolist())
        save(llm, dkv, codec=codec)  # warm: Numba's kernel cache, the model's rotary parameters
        best = {"save": float("inf"), "llama": float("inf")}
        steps = {}
        for _ in range(repeat):  # interleaved: the machine's load falls on both alike
            t = time.perf_counter()
            save(llm, dkv, codec=codec)
            best["save"] = min(best["save"], time.perf_counter() - t)
            t = time.perf_counter()
            llama_cpp.llama_state_seq_save_file(llm.ctx, str(ggsq).encode(), 0, toks, tokens)
            best["llama"] = min(best["llama"], time.perf_counter() - t)
            for step, s in _steps(llm, steps_dkv, codec).items():
                steps[step] = min(steps.get(step, float("inf")), s)
        rows.append((tokens, best, steps, dkv.stat().st_size, ggsq.stat().st_size))
        llm.close()
    lines = _header("save") + [
        f"codec {codec}; best of {repeat}, interleaved; steps: the best of each step over the repeats of a save done "
        "step by step.",
        "",
        "| tokens | deltakv save (s) | llama_state_seq_save_file (s) | ratio | get_data | parse | encode | write+fsync "
        "| .dkv MB | ggsq MB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for tokens, best, steps, dkv_bytes, ggsq_bytes in rows:
        lines.append(f"| {tokens} | {best['save']:.3f} | {best['llama']:.3f} | {best['save'] / best['llama']:.2f}x | "
                     + " | ".join(f"{steps[s]:.3f}" for s in ("get_data", "parse", "encode", "write+fsync"))
                     + f" | {dkv_bytes / 1e6:.1f} | {ggsq_bytes / 1e6:.1f} |")
    lines += ["", "llama_state_seq_save_file does not fsync; deltakv save fsyncs the file and its folder once.",
              *notes, f"files in {tmp}"]
    return "\n".join(lines)
