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


def evaluated_context(n_tokens: int):
    """A SmolLM2 context that has evaluated ``n_tokens`` of the shipped texts: (llm, tokens, seconds)."""
    from llama_cpp import Llama

    llm = Llama(str(smollm2()), n_ctx=n_tokens + 64, n_batch=512, flash_attn=True, verbose=False)
    toks = _tokens(llm, n_tokens)
    t = time.perf_counter()
    llm.eval(toks)
    return llm, toks, time.perf_counter() - t


def _header(what: str) -> list[str]:
    return [f"deltakv bench {what}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
            f"{os.cpu_count()} CPUs, model {smollm2().name}"]


def drop_from_page_cache(path) -> None:
    """Evict ``path``'s pages from the page cache (posix_fadvise DONTNEED after an fsync: clean
    pages only can be dropped), so that the next read comes from the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _read_seconds(path) -> float:
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.read(8 << 20):
            pass
    return time.perf_counter() - t


RESUME_STEPS = ("open", "read", "decode", "set_data")


def bench_resume(*, tokens: int | list[int] = (2048, 16384), codec: str = DEFAULT_CODEC, repeat: int = 3,
                 cold: bool = True, workdir=None) -> str:
    """Load a .dkv vs llama.cpp's own llama_state_seq_load_file of the same session vs re-evaluating,
    per session size, with the page cache warm and cold.

    One context per size (SmolLM2, flash attention, n_ctx = tokens + 64): the prompt is evaluated
    once (that time is the re-evaluation row), saved as .dkv and as a ggsq (llama_state_seq_save_file).
    Then ``repeat`` rounds, each timing, in an order that alternates from round to round, a warm
    deltakv load, a warm native load, and (``cold``) the same two after posix_fadvise(DONTNEED) of
    the file read; the sequence is cleared before each. deltakv's time is split into load's steps
    (``seconds``: open, read through the mapping, decode into the state buffer, set_data)."""
    import statistics

    import llama_cpp

    sizes = [tokens] if isinstance(tokens, int) else list(tokens)
    tmp = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="deltakv-bench-"))
    tmp.mkdir(parents=True, exist_ok=True)
    _warm_up(tmp, codec)
    rows, notes = [], []
    for size in sizes:
        llm, toks, t_eval = evaluated_context(size)
        dkv, ggsq = tmp / f"s{size}.dkv", tmp / f"s{size}.ggsq"
        save(llm, dkv, codec=codec)
        arr = (llama_cpp.llama_token * len(toks))(*toks)
        llama_cpp.llama_state_seq_save_file(llm.ctx, str(ggsq).encode(), 0, arr, len(toks))
        buf = (llama_cpp.llama_token * (size + 64))()
        n_read = ctypes.c_size_t(0)

        def clear():
            llm.reset()
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)

        def run_dkv(steps):
            load(llm, dkv, seconds=steps)

        def run_native(steps):
            got = llama_cpp.llama_state_seq_load_file(llm.ctx, str(ggsq).encode(), 0, buf, size + 64,
                                                      ctypes.byref(n_read))
            if got == 0 or n_read.value != size:
                raise RuntimeError(f"llama_state_seq_load_file of {ggsq} failed ({got}, {n_read.value} tokens)")

        kinds = [("deltakv", "warm"), ("native", "warm")] + ([("deltakv", "cold"), ("native", "cold")] if cold else [])
        times = {k: [] for k in kinds}
        steps = {k: [] for k in kinds}
        cold_reads = {"dkv": [], "ggsq": []}
        for i in range(repeat):
            order = kinds if i % 2 == 0 else kinds[::-1]
            for who, cache in order:
                path = dkv if who == "deltakv" else ggsq
                clear()
                if cache == "cold":
                    drop_from_page_cache(path)
                else:
                    _read_seconds(path)  # in the page cache for sure
                step = {}
                t = time.perf_counter()
                (run_dkv if who == "deltakv" else run_native)(step)
                times[who, cache].append(time.perf_counter() - t)
                steps[who, cache].append(step)
            for name, path in (("dkv", dkv), ("ggsq", ggsq)):
                drop_from_page_cache(path)
                cold_reads[name].append(_read_seconds(path))
        llm.close()
        for cache in ("warm", "cold") if cold else ("warm",):
            d, nat = times["deltakv", cache], times["native", cache]
            med = {s: statistics.median(x.get(s, 0.0) for x in steps["deltakv", cache]) for s in RESUME_STEPS}
            rows.append((size, cache, min(d), statistics.median(d), min(nat), statistics.median(nat), t_eval, med,
                         os.path.getsize(dkv), os.path.getsize(ggsq)))
        notes.append(f"{size} tokens: reading the whole file with the page cache dropped (plain read, median of "
                     f"{repeat}): .dkv {statistics.median(cold_reads['dkv']):.3f} s, ggsq "
                     f"{statistics.median(cold_reads['ggsq']):.3f} s")
    lines = _header("resume") + [
        "",
        "| tokens | page cache | .dkv MB | ggsq MB | deltakv load: best, s | median, s | llama_state_seq_load_file: "
        "best, s | median, s | deltakv / native (median) | re-evaluation, s | open | read | decode | set_data |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size, cache, d_best, d_med, n_best, n_med, t_eval, med, dkv_bytes, ggsq_bytes in rows:
        lines.append(f"| {size} | {cache} | {dkv_bytes / 1e6:.1f} | {ggsq_bytes / 1e6:.1f} | {d_best:.3f} | {d_med:.3f} "
                     f"| {n_best:.3f} | {n_med:.3f} | {d_med / n_med:.2f}x | {t_eval:.1f} | "
                     + " | ".join(f"{med[s]:.3f}" for s in RESUME_STEPS) + " |")
    lines += ["", f"codec {codec}; {repeat} rounds, orders alternating; re-evaluation: one run (llm.eval of the "
                  "prompt, n_batch 512). Steps: medians of deltakv load's seconds (open: header and checks against "
                  "the context; read: the tensors through the mapping, read-ahead and checksums; decode: every "
                  "track into the state buffer; set_data: llama_state_seq_set_data). cold: posix_fadvise(DONTNEED) "
                  "of the file just before the run.", *notes, f"files in {tmp}"]
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
