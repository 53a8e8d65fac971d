"""``deltakv bench resume`` and ``deltakv bench extend``: the runtime's costs as ratios measured in one run."""

from __future__ import annotations

import ctypes
import os
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from deltakv_format.constants import DEFAULT_CODEC

from deltakv_runtime.session import extend, load, save
from deltakv_runtime.tail import add_spare_sequence

from ..models import smollm2
from .texts import code, prose


def _tokens(llm, n: int) -> list[int]:
    toks: list[int] = []
    text = prose() + "\n" + code()
    base = llm.tokenize(text.encode())
    while len(toks) < n:  # long sessions repeat the shipped texts
        toks += base
    return toks[:n]


def _header(what: str) -> list[str]:
    return [f"deltakv bench {what}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
            f"{os.cpu_count()} CPUs, model {smollm2().name}"]


def bench_resume(*, tokens: int = 2048, codec: str = DEFAULT_CODEC, repeat: int = 3) -> str:
    """Load a .dkv vs llama.cpp's own llama_state_seq_load_file of the same session vs re-evaluating."""
    import llama_cpp
    from llama_cpp import Llama

    tmp = Path(tempfile.mkdtemp(prefix="deltakv-bench-"))
    llm = Llama(str(smollm2()), n_ctx=tokens + 64, flash_attn=True, verbose=False)
    toks = _tokens(llm, tokens)
    t = time.perf_counter()
    llm.eval(toks)
    t_eval = time.perf_counter() - t
    dkv, ggsq = tmp / "s.dkv", tmp / "s.ggsq"
    save(llm, dkv, codec=codec)
    arr = (llama_cpp.llama_token * len(toks))(*toks)
    llama_cpp.llama_state_seq_save_file(llm.ctx, str(ggsq).encode(), 0, arr, len(toks))

    def best(fn):
        out = float("inf")
        for _ in range(repeat):
            llm.reset()
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)
            t = time.perf_counter()
            fn()
            out = min(out, time.perf_counter() - t)
        return out

    load(llm, dkv)  # warm: Numba's kernel cache
    t_dkv = best(lambda: load(llm, dkv))
    buf = (llama_cpp.llama_token * (tokens + 64))()
    n = ctypes.c_size_t(0)
    t_ggsq = best(lambda: llama_cpp.llama_state_seq_load_file(llm.ctx, str(ggsq).encode(), 0, buf, tokens + 64, ctypes.byref(n)))
    llm.close()
    lines = _header("resume") + [
        f"session: {tokens} tokens; .dkv ({codec}) {os.path.getsize(dkv) / 1e6:.1f} MB, ggsq {os.path.getsize(ggsq) / 1e6:.1f} MB",
        "",
        "| resume by | seconds | vs llama_state_seq_load_file |",
        "|---|---|---|",
        f"| deltakv load (.dkv, decode + llama_state_seq_set_data) | {t_dkv:.3f} | {t_dkv / t_ggsq:.2f}x |",
        f"| llama_state_seq_load_file (ggsq, f16) | {t_ggsq:.3f} | 1.00x |",
        f"| re-evaluating the prompt | {t_eval:.3f} | {t_eval / t_ggsq:.2f}x |",
        "",
        f"best of {repeat} (re-evaluation: one run); files in {tmp}, page cache warm.",
    ]
    return "\n".join(lines)


def _warm_up(tmp: Path, codec: str) -> None:
    """Load the kernels (Numba's cache) and llama.cpp once, so that neither timed run pays for it."""
    from llama_cpp import Llama

    llm = Llama(str(smollm2()), n_ctx=256, flash_attn=True, verbose=False)
    toks = _tokens(llm, 100)
    llm.eval(toks[:50])
    save(llm, tmp / "warm.dkv", codec=codec)
    llm.eval(toks[50:])
    extend(llm, tmp / "warm.dkv")
    load(llm, tmp / "warm.dkv")
    llm.close()


STEPS = ("state_copy", "parse", "encode", "write")
PATHS = ("spare-sequence", "whole-sequence")


def bench_extend(*, small: int = 2048, large: int = 32768, added: int = 64, codec: str = DEFAULT_CODEC,
                 repeat: int = 3) -> str:
    """Time to append ``added`` tokens to a small vs a large snapshot (should not grow with the snapshot),
    through each of extend's two copies out of llama.cpp.

    One context per snapshot, with a spare sequence (``add_spare_sequence``: n_seq_max = 2, unified
    KV cache); the snapshot is saved once and copied, and after each of ``repeat`` evaluations of
    ``added`` fresh tokens one copy is extended through the spare sequence, the other through the
    whole sequence (``whole_sequence=True``), in alternating order. The table gives the best and
    the median time of those appends and the median of each step (extend's ``seconds``); the two
    files are compared byte for byte after each append."""
    import filecmp
    import shutil
    import statistics

    from llama_cpp import Llama

    tmp = Path(tempfile.mkdtemp(prefix="deltakv-bench-"))
    rows = []
    _warm_up(tmp, codec)
    same = True
    for size in (small, large):
        llm = add_spare_sequence(Llama(str(smollm2()), n_ctx=size + added * repeat + 64, n_batch=512, flash_attn=True,
                                       verbose=False))
        toks = _tokens(llm, size + added * repeat)
        llm.eval(toks[:size])
        files = {kind: tmp / f"s{size}-{kind}.dkv" for kind in PATHS}
        save(llm, files[PATHS[0]], codec=codec)
        shutil.copyfile(files[PATHS[0]], files[PATHS[1]])
        before = os.path.getsize(files[PATHS[0]])
        runs = {kind: [] for kind in PATHS}
        for i in range(repeat):
            llm.eval(toks[size + i * added:size + (i + 1) * added])
            for kind in (PATHS if i % 2 == 0 else PATHS[::-1]):
                grown_from = os.path.getsize(files[kind])
                t = time.perf_counter()
                result = extend(llm, files[kind], whole_sequence=kind == "whole-sequence")
                elapsed = time.perf_counter() - t
                if result["path"] != kind:
                    raise RuntimeError(f"extend took the {result['path']} path ({result['why_whole']}), {kind} expected")
                runs[kind].append((elapsed, os.path.getsize(files[kind]) - grown_from, result["seconds"]))
            same = same and filecmp.cmp(files[PATHS[0]], files[PATHS[1]], shallow=False)
        for kind in PATHS:
            times = [r[0] for r in runs[kind]]
            steps = {step: statistics.median(r[2].get(step, 0.0) for r in runs[kind]) for step in STEPS}
            rows.append((size, kind, min(times), statistics.median(times), statistics.median(r[1] for r in runs[kind]),
                         before, steps))
        llm.close()
    lines = _header("extend") + [
        "",
        f"| snapshot tokens | path | extend +{added} tokens: best, s | median, s | state copy | parse | encode | write "
        "| bytes appended (median) | snapshot bytes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size, kind, best, median, appended, total, steps in rows:
        lines.append(f"| {size} | {kind} | {best:.3f} | {median:.3f} | "
                     + " | ".join(f"{steps[s]:.3f}" for s in STEPS) + f" | {appended:.0f} | {total} |")
    best = {(size, kind): b for size, kind, b, *_ in rows}
    lines += [""]
    for kind in PATHS:
        lines.append(f"ratio large/small (best), {kind}: {best[large, kind] / best[small, kind]:.2f}x time for a "
                     f"{large / small:g}x larger snapshot")
    lines += ["", f"{repeat} appends each; steps are medians, in seconds (extend's result['seconds']). The "
                  "whole-sequence copy is llama_state_seq_get_data of the whole sequence (O(session) memcpy); the "
                  "spare-sequence one copies the cells from the last stored keyframe chunk on into a spare "
                  "sequence and reads only those. "
                  + ("The two files were byte-identical after every append." if same else
                     "THE TWO FILES DIFFERED after an append.")]
    return "\n".join(lines)
