#!/usr/bin/env bash
# Make what runtime/kernels/llama_cuda_run.sh needs on the GPU machine (all git-ignored, carried there):
# .gpu/llama.cpp (llama-cpp-python 0.3.36's vendored llama.cpp: only what the libllama build reads),
# .gpu/pylib/llama_cpp (the Python package, no CPU libraries), .gpu/skel (model skeletons), .whl (wheels).
# Run from the repository root with the project's venv active (llama-cpp-python and the models installed).
set -euo pipefail
grep -qx "/.gpu/" .git/info/exclude 2>/dev/null || echo "/.gpu/" >> .git/info/exclude
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || echo "/.whl/" >> .git/info/exclude
tmp=$(mktemp -d)
pip download -q --no-deps --no-binary :all: -d "$tmp" llama-cpp-python==0.3.36
tar xzf "$tmp"/llama_cpp_python-0.3.36.tar.gz -C "$tmp"
S="$tmp/llama_cpp_python-0.3.36/vendor/llama.cpp"
rm -rf .gpu/llama.cpp .gpu/pylib && mkdir -p .gpu/llama.cpp/ggml/src .gpu/pylib/llama_cpp/lib .gpu/skel
cp -r "$S"/CMakeLists.txt "$S"/cmake "$S"/include "$S"/src "$S"/vendor .gpu/llama.cpp/
cp -r "$S"/ggml/CMakeLists.txt "$S"/ggml/cmake "$S"/ggml/include .gpu/llama.cpp/ggml/
(cd "$S"/ggml/src && cp -r ./*.c ./*.cpp ./*.h ./*.in CMakeLists.txt ggml-cpu ggml-cuda "$OLDPWD"/.gpu/llama.cpp/ggml/src/)
cp "$tmp"/llama_cpp_python-0.3.36/llama_cpp/*.py .gpu/pylib/llama_cpp/
python - <<'PY'
from deltakv_tools.measure import synthetic_gguf as sg
from deltakv_tools.models import gemma3_270m, smollm2
sg.save_skeleton(sg.skeleton(smollm2()), ".gpu/skel/smollm2.json.gz")
sg.save_skeleton(sg.skeleton(gemma3_270m()), ".gpu/skel/gemma3.json.gz")
PY
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl crc32c gguf diskcache
du -sh .gpu .whl
