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


def bench_extend(*, small: int = 2048, large: int = 32768, added: int = 64, codec: str = DEFAULT_CODEC,
                 repeat: int = 3) -> str:
    """Time to append ``added`` tokens to a small vs a large snapshot (should not grow with the snapshot).

    Each snapshot is extended ``repeat`` times by ``added`` freshly evaluated tokens; the table gives
    the best and the median time of those appends."""
    import statistics

    from llama_cpp import Llama

    tmp = Path(tempfile.mkdtemp(prefix="deltakv-bench-"))
    rows = []
    _warm_up(tmp, codec)
    for size in (small, large):
        llm = Llama(str(smollm2()), n_ctx=size + added * repeat + 64, n_batch=512, flash_attn=True, verbose=False)
        toks = _tokens(llm, size + added * repeat)
        llm.eval(toks[:size])
        path = tmp / f"s{size}.dkv"
        save(llm, path, codec=codec)
        before = os.path.getsize(path)
        times, appended = [], []
        for i in range(repeat):
            llm.eval(toks[size + i * added:size + (i + 1) * added])
            grown_from = os.path.getsize(path)
            t = time.perf_counter()
            extend(llm, path)
            times.append(time.perf_counter() - t)
            appended.append(os.path.getsize(path) - grown_from)
        rows.append((size, min(times), statistics.median(times), statistics.median(appended), before))
        llm.close()
    lines = _header("extend") + [
        "",
        f"| snapshot tokens | extend +{added} tokens: best, s | median, s | bytes appended (median) | snapshot bytes |",
        "|---|---|---|---|---|",
    ]
    for size, best, median, appended, total in rows:
        lines.append(f"| {size} | {best:.3f} | {median:.3f} | {appended:.0f} | {total} |")
    lines += ["", f"ratio large/small (best): {rows[1][1] / rows[0][1]:.2f}x time for a {large / small:g}x larger snapshot; "
                  f"{repeat} appends each. The time includes llama_state_seq_get_data, which copies the whole "
                  "sequence out of llama.cpp (O(session) memcpy; llama.cpp has no API for a token range)."]
    return "\n".join(lines)
