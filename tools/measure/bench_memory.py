"""``deltakv bench memory``: peak RSS of ``deltakv restore`` and ``deltakv convert`` at growing session sizes.

Each command runs as a child process of its own under ``/usr/bin/time`` (its "Maximum resident set
size", the kernel's ``ru_maxrss`` of that child; without /usr/bin/time, ``os.posix_spawn`` + ``os.wait4``). A child that only imports the command and exits gives the fixed part (Python,
numpy, Numba, the CLI), so that what grows with the session reads off as the difference.

Sessions: two real SmolLM2 sessions (``small`` and ``large`` tokens, default 2048 and 8192) from one
evaluation (the prompt evaluated to ``large`` tokens and saved with llama_state_seq_save_file; then
``llama_memory_seq_rm`` of the positions from ``small`` on and saved again), and a synthetic one of at
least ``synthetic_bytes`` (default 1.5 GB) made by tiling the larger real state's cells: its K/V rows
repeated and each copy's cell positions shifted past the previous copy's (so that no (sequence,
position) pair repeats and the rotary coding sees real, distinct positions), written as a ggsq.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from deltakv_format.constants import DEFAULT_CODEC
from deltakv_format.llama_state import parse_state, write_state_to
from deltakv_format.state_model import KVCacheSection, KVStream, KVTensor, LlamaState

from ..models import smollm2
from .bench_runtime import _header, _tokens

OLD_RESTORE = (
    "import sys\n"
    "from deltakv_format.llama_state import write_state\n"
    "from deltakv_format.session import DkvSession\n"
    "with DkvSession(sys.argv[1]) as s:\n"
    "    data = write_state(s.to_llama_state(), tokens=s.tokens())\n"
    "open(sys.argv[2], 'wb').write(data)\n"
)
"""What ``deltakv restore`` did before it streamed (the whole typed state, then joined), for reference."""


TIME = "/usr/bin/time"


def peak_rss(argv: list[str]) -> tuple[int, float]:
    """Run ``argv``; its peak RSS in bytes and wall seconds (raises if it fails).

    Through ``/usr/bin/time`` where there is one, else ``os.posix_spawn`` (vfork: no copy of this
    process): a child forked from this process and then exec-ing would report this process's own
    resident set as its peak (Linux keeps the larger of the pre-exec and the new peak)."""
    t = time.perf_counter()
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as report:
        if os.path.exists(TIME):
            proc = subprocess.run([TIME, "-f", "%M", "-o", report.name, *argv], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE)
            seconds = time.perf_counter() - t
            if proc.returncode != 0:
                raise RuntimeError(f"{shlex.join(argv)} exited {proc.returncode}: "
                                   f"{proc.stderr.decode(errors='replace').strip()[-400:]}")
            return int(report.read().strip().splitlines()[-1]) * 1024, seconds  # KiB
        pid = os.posix_spawn(argv[0], argv, os.environ)
        _, status, usage = os.wait4(pid, 0)
        seconds = time.perf_counter() - t
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(f"{shlex.join(argv)} exited {os.waitstatus_to_exitcode(status)}")
        return usage.ru_maxrss * 1024, seconds  # Linux: KiB


def real_sessions(tmp: Path, small: int, large: int) -> dict[str, Path]:
    """ggsq files of a ``large``- and a ``small``-token SmolLM2 session, from one evaluation."""
    import ctypes

    import llama_cpp
    from llama_cpp import Llama

    llm = Llama(str(smollm2()), n_ctx=large + 64, n_batch=512, flash_attn=True, verbose=False)
    toks = _tokens(llm, large)
    llm.eval(toks)
    out = {}
    for n in (large, small):
        if n != large:
            llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(llm.ctx), 0, n, -1)
        path = tmp / f"smollm2-{n}.ggsq"
        arr = (llama_cpp.llama_token * n)(*toks[:n])
        if not llama_cpp.llama_state_seq_save_file(llm.ctx, str(path).encode(), 0, arr, ctypes.c_size_t(n)):
            raise RuntimeError(f"llama_state_seq_save_file of {n} tokens failed")
        out[str(n)] = path
    llm.close()
    return out


def _tiled_stream(st: KVStream, copies: int) -> KVStream:
    rec = len(st.cells) // st.cell_count
    cells = np.frombuffer(st.cells, np.uint8).reshape(st.cell_count, rec)
    if rec < 12 or np.any(cells[:, 4:8].copy().view("<u4") != 1):
        raise ValueError("tiling needs cells of one sequence id each (a sequence state)")
    pos = cells[:, :4].copy().view("<i4").reshape(-1)
    span = int(pos.max()) + 1
    tiled = np.tile(cells, (copies, 1))
    tiled[:, :4] = (np.tile(pos, copies) + np.repeat(np.arange(copies) * span, st.cell_count)).astype("<i4") \
        .reshape(-1, 1).view(np.uint8)
    n = st.cell_count * copies

    def tile(t: KVTensor) -> KVTensor:
        rows = np.tile(t.rows(), (copies, 1))
        return KVTensor(t.ggml_type, n, t.n_values, t.transposed, KVTensor.payload_from_rows(rows, t.transposed))

    return replace(st, cell_count=n, cells=memoryview(tiled.reshape(-1)), k=[tile(t) for t in st.k],
                   v=[tile(t) for t in st.v])


def synthetic_session(source: Path, out: Path, at_least: int) -> Path:
    """A ggsq of at least ``at_least`` bytes: ``source``'s cells tiled (module docstring)."""
    state = parse_state(source.read_bytes())
    copies = -(-at_least // source.stat().st_size)
    tokens = np.frombuffer(state.token_words, "<i4")
    big = LlamaState(
        framing=state.framing, layout=state.layout, file_version=state.file_version,
        token_words=memoryview(np.tile(tokens, copies).astype("<i4").tobytes()),
        seq_prefix_id=state.seq_prefix_id, arch=state.arch, arch_bytes=state.arch_bytes,
        sections=[KVCacheSection(sec.has_n_stream, [_tiled_stream(st, copies) for st in sec.streams])
                  if isinstance(sec, KVCacheSection) else sec for sec in state.sections],
    )
    with open(out, "wb") as f:
        write_state_to(f, big)
    return out


def bench_memory(*, small: int = 2048, large: int = 8192, synthetic_bytes: int = 1_500_000_000,
                 codec: str = DEFAULT_CODEC, old_restore: bool = True, workdir=None) -> str:
    """Peak RSS of convert and restore (and of the old, whole-state restore) per session size, and of a
    process loading the real sessions into a live context (deltakv vs native vs the context alone)."""
    tmp = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="deltakv-mem-"))
    tmp.mkdir(parents=True, exist_ok=True)
    sessions = real_sessions(tmp, small, large)
    sessions["synthetic"] = synthetic_session(sessions[str(large)], tmp / "synthetic.ggsq", synthetic_bytes)
    cli = [sys.executable, "-m", "deltakv_tools.cli"]
    model = str(smollm2())
    rows = []
    for name in (str(small), str(large), "synthetic"):
        ggsq = sessions[name]
        dkv, restored, old = tmp / f"{ggsq.stem}.dkv", tmp / f"{ggsq.stem}.restored", tmp / f"{ggsq.stem}.old"
        conv = peak_rss(cli + ["convert", str(ggsq), "-o", str(dkv), "--model", model, "--codec", codec,
                               "--force", "--quiet"])
        rest = peak_rss(cli + ["restore", str(dkv), "-o", str(restored), "--force", "--quiet"])
        same = restored.read_bytes() == ggsq.read_bytes() if codec == "raw" else None
        old_run = peak_rss([sys.executable, "-c", OLD_RESTORE, str(dkv), str(old)]) if old_restore else None
        identical = old_run is None or _same_file(old, restored)
        rows.append((name, ggsq.stat().st_size, dkv.stat().st_size, conv, rest, old_run, identical, same))
        for p in (restored, old):
            p.unlink(missing_ok=True)
    loads = [load_rss(tmp / f"smollm2-{n}.dkv", sessions[str(n)], n) for n in (small, large)]
    mb = 1e6
    lines = _header("memory") + [
        "",
        "| session | state MB | .dkv MB | convert: peak RSS MB | s | restore (streamed): peak RSS MB | s "
        "| restore, whole state (before): peak RSS MB | s | restore's growth per state byte over the smallest session: "
        "streamed | whole |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    src0, rest0, old0 = rows[0][1], rows[0][4][0], rows[0][5][0] if rows[0][5] else None

    def growth(peak, ref, src):
        return "-" if src == src0 or ref is None else f"{(peak - ref) / (src - src0):.3f}"

    for name, src, dkv_bytes, conv, rest, old_run, identical, _ in rows:
        label = f"SmolLM2 {name} tokens" if name != "synthetic" else "synthetic (tiled SmolLM2 cells)"
        old_cells = f"{old_run[0] / mb:.0f} | {old_run[1]:.1f}" if old_run else "- | -"
        old_ratio = growth(old_run[0], old0, src) if old_run else "-"
        lines.append(f"| {label} | {src / mb:.0f} | {dkv_bytes / mb:.1f} | {conv[0] / mb:.0f} | {conv[1]:.1f} | "
                     f"{rest[0] / mb:.0f} | {rest[1]:.1f} | {old_cells} | {growth(rest[0], rest0, src)} | {old_ratio} |"
                     + ("" if identical else " RESTORED BYTES DIFFER FROM THE WHOLE-STATE PATH |"))
    lines += ["", f"codec {codec}, convert with --model (SmolLM2's rotary parameters). Peak RSS: the child's "
                  "maximum resident set size (/usr/bin/time). "
                  + ("The streamed and the whole-state restore wrote identical bytes for every session."
                     if all(r[6] for r in rows) else "The streamed and whole-state restores DIFFERED somewhere."),
              "", *("\n\n".join(loads).split("\n")), "", f"files in {tmp}"]
    return "\n".join(lines)


def _same_file(a: Path, b: Path) -> bool:
    import filecmp

    return filecmp.cmp(a, b, shallow=False)


LOAD_CHILD = (
    "import ctypes, sys\n"
    "import llama_cpp\n"
    "from llama_cpp import Llama\n"
    "from deltakv_runtime import load\n"
    "path, n, how = sys.argv[1], int(sys.argv[2]), sys.argv[3]\n"
    "llm = Llama(sys.argv[4], n_ctx=n + 64, n_batch=512, flash_attn=True, verbose=False)\n"
    "if how == 'deltakv':\n"
    "    load(llm, path)\n"
    "elif how == 'native':\n"
    "    buf = (llama_cpp.llama_token * (n + 64))(); got = ctypes.c_size_t(0)\n"
    "    assert llama_cpp.llama_state_seq_load_file(llm.ctx, path.encode(), 0, buf, n + 64, ctypes.byref(got))\n"
)
"""A child that makes a context and loads a session into it (``how``: deltakv, native, or none)."""


def load_rss(dkv: Path, ggsq: Path, n_tokens: int) -> str:
    """Peak RSS of a fresh process loading a session into a live context: deltakv's load vs
    llama_state_seq_load_file vs the context alone (what the load adds is the difference)."""
    model = str(smollm2())
    rows = []
    for how, path in (("none", dkv), ("deltakv", dkv), ("native", ggsq)):
        peak, seconds = peak_rss([sys.executable, "-c", LOAD_CHILD, str(path), str(n_tokens), how, model])
        rows.append(f"| {how} | {peak / 1e6:.0f} | {seconds:.1f} |")
    return "\n".join([f"load of a {n_tokens}-token session ({ggsq.stat().st_size / 1e6:.0f} MB of state) into a "
                      "fresh context, peak RSS of the process:", "", "| load | peak RSS MB | s |", "|---|---|---|",
                      *rows])
