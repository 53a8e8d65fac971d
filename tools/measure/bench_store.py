"""``deltakv bench store``: resume a session from each store vs re-evaluating vs llama.cpp's native load.

Per session size (SmolLM2, f16 cache, flash attention) and per store, three ways to get a fresh
context to where the session stopped, best of ``repeat``:

- deltakv: ``deltakv_runtime.load(llm, URL)`` of the .dkv in the store (get, decode,
  ``llama_state_seq_set_data``);
- native: llama.cpp's own state from the same place: for a folder ``llama_state_seq_load_file``
  of the sequence file next to the .dkv; for a remote store the raw sequence state is fetched
  from it (``get``) and handed to ``llama_state_seq_set_data``;
- re-evaluating the prompt (one run).

Bytes moved are what leaves the store for each (the .dkv, the raw state).
"""

from __future__ import annotations

import ctypes
import os
import platform
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from deltakv_format.constants import DEFAULT_CODEC
from deltakv_format.stores import LocalDirectoryStore, open_store

from ..models import smollm2
from .bench_runtime import evaluated_context


def _best(fn, repeat: int, before) -> float:
    out = float("inf")
    for _ in range(repeat):
        before()
        t = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t)
    return out


def _entry_url(store_url: str, name: str) -> str:
    return f"{store_url.rstrip('/')}/{name}"


def bench_store(*, tokens_list=(2048, 16384), stores=(), repeat: int = 3, codec: str = DEFAULT_CODEC) -> str:
    import llama_cpp

    from deltakv_runtime.session import load, save, seq_state_bytes, set_seq_state_bytes

    tmp = Path(tempfile.mkdtemp(prefix="deltakv-bench-store-"))
    local = str(tmp / "local-store")
    urls = [local, *stores]
    lines = [f"deltakv bench store, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
             f"{os.cpu_count()} CPUs, model {smollm2().name}, codec {codec}", "",
             "| tokens | store | resume by | seconds | vs native | bytes moved |", "|---|---|---|---|---|---|"]
    for n_tokens in tokens_list:
        llm, toks, t_eval = evaluated_context(n_tokens)
        made = tmp / f"s{n_tokens}.dkv"
        save(llm, made, codec=codec)
        dkv = made.read_bytes()
        raw = bytes(seq_state_bytes(llm))
        arr = (llama_cpp.llama_token * len(toks))(*toks)

        def clear():
            llm.reset()
            llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(llm.ctx), True)

        load(llm, made)  # warm: Numba's kernel cache, not part of any store's figure
        for url in urls:
            store = open_store(url)
            dkv_name, raw_name = f"bench-{n_tokens}.dkv", f"bench-{n_tokens}.seqstate"
            store.put(dkv_name, dkv)
            store.put(raw_name, raw)
            t_dkv = _best(lambda: load(llm, _entry_url(url, dkv_name)), repeat, clear)
            if isinstance(store, LocalDirectoryStore):
                ggsq = store.directory / f"bench-{n_tokens}.ggsq"
                llama_cpp.llama_state_seq_save_file(llm.ctx, str(ggsq).encode(), 0, arr, len(toks))
                buf = (llama_cpp.llama_token * (n_tokens + 64))()
                count = ctypes.c_size_t(0)
                native_how, native_bytes = "llama_state_seq_load_file", ggsq.stat().st_size
                t_native = _best(lambda: llama_cpp.llama_state_seq_load_file(
                    llm.ctx, str(ggsq).encode(), 0, buf, n_tokens + 64, ctypes.byref(count)), repeat, clear)
            else:
                def native():
                    with store.get(raw_name) as data:
                        set_seq_state_bytes(llm, bytes(data))
                native_how, native_bytes = "get + llama_state_seq_set_data", len(raw)
                t_native = _best(native, repeat, clear)
            shown = "local folder" if url == local else url
            lines.append(f"| {n_tokens} | {shown} | deltakv load (.dkv) | {t_dkv:.3f} | {t_dkv / t_native:.2f}x | {len(dkv)} |")
            lines.append(f"| {n_tokens} | {shown} | native: {native_how} (raw) | {t_native:.3f} | 1.00x | {native_bytes} |")
            store.delete(dkv_name)
            store.delete(raw_name)
        lines.append(f"| {n_tokens} | - | re-evaluating the prompt | {t_eval:.3f} | - | 0 |")
        llm.close()
    lines += ["", f"best of {repeat} (re-evaluation: one run); warm page cache and warm Numba cache; "
                  f"every store on this machine (loopback)."]
    return "\n".join(lines)
