"""A GPU build of llama.cpp end to end: save, resume and extend a live CUDA context through deltakv.

For each model and session length: evaluate the prompt with every layer offloaded (the re-evaluation
time), save it as a .dkv (``raw`` and the default codec; the codecs run on the GPU kernels when
``deltakv_runtime.gpu`` finds a device) and as llama.cpp's own sequence file, then resume each into a
fresh context of the same model and compare the next-token logits and a greedy continuation with
those of the native resume (``llama_state_seq_load_file``). ``raw`` must give the same logits bit for
bit; a lossy codec gives its KL. Then 64 more tokens are evaluated, ``extend`` appends them, and the
extended file is resumed and checked the same way. Finally ``LLAMA_STATE_SEQ_FLAGS_ON_DEVICE`` is
probed: what the flag's state holds (its size next to the host state's) and how long it takes.

Timings are wall-clock seconds, best of ``--repeat`` (the re-evaluation: one run), each after one
untimed warm-up run (Numba compiles on first use); the page cache is warm (the files were just written).
Output: a markdown table (stdout and ``--out``).

    python -m deltakv_tools.measure.bench_gpu_llama --model M.gguf --tokens 4096,32768 --out gpu_llama.md
"""

from __future__ import annotations

import argparse
import cProfile
import ctypes
import datetime
import io
import os
import platform
import pstats
import sys
import tempfile
import time
from pathlib import Path

# llama_cpp (libllama, libggml-cuda) first, before numpy and deltakv_format: on the H200 image loading a model
# crashed in llama.cpp's tokenizer set-up when deltakv_format (numpy, numba) came first (GPU_RESULTS.md);
# the probe's passing steps all load llama_cpp before anything else.
import llama_cpp  # noqa: E402,F401  isort: skip
import numpy as np

CONTINUATION = 16


def _llama_cpp():
    import llama_cpp

    return llama_cpp


def _logits(llm) -> np.ndarray:
    lc = _llama_cpp()
    ptr = lc.llama_get_logits_ith(llm.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()


def continuation(llm, n: int = CONTINUATION) -> tuple[np.ndarray, list[int]]:
    """Replay the last token (logits are not part of a state), then ``n`` greedy tokens: the first
    logits and the tokens. Leaves the context ``n`` tokens longer."""
    last = int(llm.input_ids[llm.n_tokens - 1])
    llm.n_tokens -= 1
    llm.eval([last])
    first = _logits(llm)
    out, logits = [], first
    for _ in range(n):
        tok = int(np.argmax(logits))
        out.append(tok)
        llm.eval([tok])
        logits = _logits(llm)
    return first, out


def _kl(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    p = p_logits.astype(np.float64) - p_logits.max()
    q = q_logits.astype(np.float64) - q_logits.max()
    lp = p - np.log(np.exp(p).sum())
    lq = q - np.log(np.exp(q).sum())
    return float((np.exp(lp) * (lp - lq)).sum())


def _prompt(llm, n: int, seed: int) -> list[int]:
    """``n`` tokens: the shipped texts, tokenized and repeated (a synthetic model's tokenizer is real)."""
    from .texts import code, prose

    base = llm.tokenize((prose() + "\n" + code()).encode())
    rng = np.random.default_rng(seed)
    toks: list[int] = []
    while len(toks) < n:
        toks += base[int(rng.integers(0, len(base) // 2)):]
    return toks[:n]


def _best(fn, repeat: int, before=None) -> float:
    out = float("inf")
    for _ in range(repeat):
        if before is not None:
            before()
        t = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t)
    return out


def _step(msg: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def bench_model(model: str, tokens: int, *, repeat: int, flash_attn: bool, codecs: list[str], tmp: Path,
                profile: bool = False) -> dict:
    from llama_cpp import Llama

    import deltakv_runtime as rt

    lc = _llama_cpp()
    n_ctx = tokens + 256
    kw = dict(n_gpu_layers=-1, n_ctx=n_ctx, n_batch=2048, n_ubatch=512, flash_attn=flash_attn,
              # verbose=False sends llama.cpp's stderr (and a crash's report) to /dev/null while contexts are made
              verbose=os.environ.get("DELTAKV_LLAMA_VERBOSE") == "1")
    _step(f"{Path(model).name}: contexts of {n_ctx} cells")
    llm = rt.add_spare_sequence(Llama(model, **kw))  # a spare sequence: extend copies only the new cells
    fresh = Llama(model, **kw)
    row = {"model": Path(model).name, "tokens": tokens}
    toks = _prompt(llm, tokens, seed=tokens)
    _step(f"evaluate {tokens} tokens")
    t = time.perf_counter()
    llm.eval(toks)
    row["re-evaluate s"] = time.perf_counter() - t
    row["state MB"] = lc.llama_state_seq_get_size(llm.ctx, 0) / 1e6

    # native save and the .dkv saves of the same state
    ggsq = tmp / f"s{tokens}.ggsq"
    arr = (lc.llama_token * len(toks))(*toks)
    row["native save s"] = _best(lambda: lc.llama_state_seq_save_file(llm.ctx, str(ggsq).encode(), 0, arr, len(toks)), repeat)
    paths = {}
    _step("saves")
    for codec in codecs:
        paths[codec] = tmp / f"s{tokens}.{codec}.dkv"
        rt.save(llm, paths[codec], codec=codec)  # warm: Numba's compilation and the kernel library, as for loads
        row[f"{codec} save s"] = _best(lambda c=codec: rt.save(llm, paths[c], codec=c), repeat)
        row[f"{codec} MB"] = os.path.getsize(paths[codec]) / 1e6

    mem = lc.llama_get_memory(fresh.ctx)
    buf = (lc.llama_token * n_ctx)()
    n_out = ctypes.c_size_t(0)

    def clear():
        fresh.reset()
        lc.llama_memory_clear(mem, True)

    def native_load():
        n = lc.llama_state_seq_load_file(fresh.ctx, str(ggsq).encode(), 0, buf, n_ctx, ctypes.byref(n_out))
        if n == 0:
            raise RuntimeError("llama_state_seq_load_file failed")
        fresh.input_ids[: n_out.value] = np.ctypeslib.as_array(buf)[: n_out.value]
        fresh.n_tokens = n_out.value

    _step("loads")
    row["native load s"] = _best(native_load, repeat, clear)
    ref_logits, ref_tokens = continuation(fresh)
    top2 = np.sort(ref_logits)[-2:]
    row["top-2 margin"] = float(top2[1] - top2[0])  # a lossy resume's first greedy token flips below about its shift
    for codec in codecs:
        rt.load(fresh, paths[codec])  # warm: the kernel library and Numba's cache
        row[f"{codec} load s"] = _best(lambda c=codec: rt.load(fresh, paths[c]), repeat, clear)
        logits, out = continuation(fresh)
        row[f"{codec} logits equal"] = bool(np.array_equal(logits, ref_logits))
        row[f"{codec} KL"] = _kl(ref_logits, logits)
        row[f"{codec} tokens equal"] = sum(1 for _ in iter_prefix(out, ref_tokens))
        clear()

    if profile:
        for codec in codecs:
            row[f"{codec} load profile"] = load_profile(fresh, paths[codec], clear)
        clear()

    # extend: 64 more tokens evaluated on the live context, appended, resumed
    _step("extend")
    more = _prompt(llm, 64, seed=tokens + 1)
    llm.eval(more)
    ggsq2 = tmp / f"s{tokens}+64.ggsq"
    allt = toks + more
    arr2 = (lc.llama_token * len(allt))(*allt)
    lc.llama_state_seq_save_file(llm.ctx, str(ggsq2).encode(), 0, arr2, len(allt))
    ggsq = ggsq2
    clear()
    native_load()
    ref_logits, ref_tokens = continuation(fresh)
    for codec in codecs:
        t = time.perf_counter()
        result = rt.extend(llm, paths[codec])
        row[f"{codec} extend s"] = time.perf_counter() - t
        row[f"{codec} extend path"] = result.get("path", "whole-sequence")
        clear()
        rt.load(fresh, paths[codec])
        logits, out = continuation(fresh)
        row[f"{codec} extended logits equal"] = bool(np.array_equal(logits, ref_logits))
        row[f"{codec} extended tokens equal"] = sum(1 for _ in iter_prefix(out, ref_tokens))

    _step("ON_DEVICE probe")
    row.update(probe_on_device(llm, repeat))
    llm.close()
    fresh.close()
    return row


def load_profile(llm, path: Path, clear) -> str:
    """Where a load's time goes: ``load``'s own steps, then Python's profiler (by own time) over the
    rebuild with one thread (the load's track threads would hide their work from the profiler)."""
    import deltakv_runtime as rt
    from deltakv_format.operations import opened_session
    from deltakv_format.session_rebuild import rebuild_into
    from deltakv_format.state_model import Framing

    clear()
    steps: dict = {}
    rt.load(llm, path, seconds=steps)
    lines = ["load steps (s): " + ", ".join(f"{k} {v:.3f}" for k, v in steps.items())]
    prof = cProfile.Profile()
    with opened_session(path) as session, rt.session.accelerated():
        prof.runcall(rebuild_into, session, framing=Framing.SEQ_STATE, workers=1)
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(16)
    return "\n".join(lines) + "\n" + text.getvalue()


def iter_prefix(a, b):
    for x, y in zip(a, b):
        if x != y:
            return
        yield x


def probe_on_device(llm, repeat: int) -> dict:
    """What LLAMA_STATE_SEQ_FLAGS_ON_DEVICE gives a caller: the size of the state it hands out next to
    the host state's, and the time of a get with and without it."""
    lc = _llama_cpp()
    on_device = lc.LLAMA_STATE_SEQ_FLAGS_ON_DEVICE
    host_size = lc.llama_state_seq_get_size_ext(llm.ctx, 0, 0)
    dev_size = lc.llama_state_seq_get_size_ext(llm.ctx, 0, on_device)
    host_buf = (ctypes.c_uint8 * host_size)()
    dev_buf = (ctypes.c_uint8 * max(dev_size, 1))()
    t_host = _best(lambda: lc.llama_state_seq_get_data_ext(llm.ctx, host_buf, host_size, 0, 0), repeat)
    t_dev = _best(lambda: lc.llama_state_seq_get_data_ext(llm.ctx, dev_buf, dev_size, 0, on_device), repeat)
    return {"host state MB": host_size / 1e6, "ON_DEVICE state MB": dev_size / 1e6,
            "host get s": t_host, "ON_DEVICE get s": t_dev}


def render(rows: list[dict], codecs: list[str]) -> str:
    lines = []
    head = ["model", "tokens", "state MB", "re-evaluate s", "native load s"]
    for c in codecs:
        head += [f"{c} load s", f"{c} MB"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(h)) for h in head) + " |")
    lines.append("")
    head = ["model", "tokens", "native save s"] + [f"{c} save s" for c in codecs] + [f"{c} extend s" for c in codecs] + \
           [f"{c} extend path" for c in codecs]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(h)) for h in head) + " |")
    lines.append("")
    head = ["model", "tokens", "top-2 margin"]
    for c in codecs:
        head += [f"{c} logits equal", f"{c} KL", f"{c} tokens equal", f"{c} extended logits equal",
                 f"{c} extended tokens equal"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(h)) for h in head) + " |")
    lines.append("")
    head = ["model", "tokens", "host state MB", "ON_DEVICE state MB", "host get s", "ON_DEVICE get s"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|" + "---|" * len(head))
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(h)) for h in head) + " |")
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.2e}" if 0 < abs(v) < 1e-3 else f"{v:.3f}"
    return "-" if v is None else str(v)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", action="append", required=True)
    ap.add_argument("--tokens", default="4096,32768")
    ap.add_argument("--codec", action="append", default=None, help="codecs to save with (default: raw and the default)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--no-flash-attn", action="store_true")
    ap.add_argument("--profile", action="store_true", help="also profile one load per codec (cProfile, by own time)")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    # llama_cpp (libllama, libggml-cuda) before deltakv_format's numba/llvmlite: on the H200 image the
    # other order crashed inside llama_model_load_from_file (init_tokenizer), see gpu_llama_probe's format-first
    _step("import llama_cpp")
    lc = _llama_cpp()
    from deltakv_format.constants import DEFAULT_CODEC

    from deltakv_runtime import gpu

    codecs = args.codec or ["raw", DEFAULT_CODEC]
    tmp = Path(tempfile.mkdtemp(prefix="deltakv-gpu-llama-"))
    _step(f"llama.cpp GPU offload {bool(lc.llama_supports_gpu_offload())}; deltakv kernels")
    kernels = gpu.is_available()
    _step(f"deltakv kernels on the GPU: {kernels}")
    header = [f"bench_gpu_llama, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, "
              f"{os.cpu_count()} CPUs; llama.cpp GPU offload: {bool(lc.llama_supports_gpu_offload())}; "
              f"deltakv kernels on the GPU: {kernels}; flash_attn {not args.no_flash_attn}", ""]
    rows = []
    for model in args.model:
        for n in (int(x) for x in args.tokens.split(",")):
            t = time.perf_counter()
            rows.append(bench_model(model, n, repeat=args.repeat, flash_attn=not args.no_flash_attn, codecs=codecs, tmp=tmp,
                                    profile=args.profile))
            profiles = {k: rows[-1].pop(k) for k in [k for k in rows[-1] if k.endswith("load profile")]}
            print(f"# {Path(model).name} {n} tokens: {time.perf_counter() - t:.1f} s  {rows[-1]}", flush=True)
            for k, v in profiles.items():
                header += [f"{Path(model).name} {n} tokens, {k}:", "```", v.strip(), "```", ""]
    text = "\n".join(header) + render(rows, codecs)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
