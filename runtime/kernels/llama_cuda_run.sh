#!/usr/bin/env bash
# deltakv on a GPU build of llama.cpp, end to end, in one go on a machine with an NVIDIA GPU and nvcc:
#   1. build libllama + ggml with CUDA (sm_90 by default) from llama-cpp-python 0.3.36's vendored llama.cpp,
#      and deltakv's kernel library, at the same time;
#   2. write the models: GGUFs of SmolLM2-135M's and Gemma 3 270M's shape (their real headers and tokenizers,
#      random weights: tools/measure/synthetic_gguf.py) and one of an 8B model's KV shape;
#   3. tools/measure/bench_gpu_llama.py: save / resume / extend of live CUDA contexts through deltakv vs
#      llama.cpp's own sequence files vs re-evaluation, logits compared, LLAMA_STATE_SEQ_FLAGS_ON_DEVICE probed.
#
# What it needs in the checkout (all git-ignored, carried to the device; tools/measure/gpu_prepare.sh makes them):
#   .gpu/llama.cpp      the sources the library build needs (20 MB of the sdist's vendor/llama.cpp)
#   .gpu/pylib/llama_cpp the llama_cpp Python package without its CPU libraries (the CUDA ones go in its lib/)
#   .gpu/skel/*.json.gz  model skeletons (header + tensor shapes)
#   .whl/                crc32c, gguf, diskcache wheels for the device's Python
#
#   OUT=/tmp/out TOKENS=4096,32768 runtime/kernels/llama_cuda_run.sh
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
OUT="${OUT:-$root/runtime/build/llama_cuda_run}"
ARCHS="${ARCHS:-90}"
TOKENS="${TOKENS:-4096,32768}"
BUILD="${LLAMA_BUILD:-$root/.gpu/build}"
mkdir -p "$OUT"
cd "$root"
export PYTHONUNBUFFERED=1 DELTAKV_GPU_BACKEND=cuda
t0=$(date +%s)
stamp() { echo "== $(date -u +%H:%M:%S) (+$(( $(date +%s) - t0 )) s) $*"; }

stamp "machine"
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; nvcc --version | tail -1
  ls /usr/local/cuda/lib64 2>/dev/null | grep -c cublas; } 2>&1 | tee "$OUT/machine.txt"

stamp "build libllama (CUDA sm_$ARCHS) and the deltakv kernels"
"$here/build.sh" cuda $ARCHS > "$OUT/kernels_build.log" 2>&1 &
kpid=$!
if [ ! -f "$BUILD/bin/libllama.so" ]; then
  cmake -S "$root/.gpu/llama.cpp" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES="$ARCHS" -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=ON -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_COMMON=OFF \
    -DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DGGML_CUDA_NCCL=OFF ${LLAMA_CMAKE_EXTRA:-} \
    > "$OUT/llama_cmake.log" 2>&1 \
    || { tail -30 "$OUT/llama_cmake.log"; stamp "cmake failed"; exit 1; }
fi
timeout "${BUILD_TIMEOUT:-500}" ninja -C "$BUILD" -j "$(nproc)" llama > "$OUT/llama_build.log" 2>&1
build_rc=$?
tail -3 "$OUT/llama_build.log"
wait $kpid; krc=$?
stamp "builds done: llama rc=$build_rc kernels rc=$krc"
[ "$build_rc" -eq 0 ] || { tail -20 "$OUT/llama_build.log"; exit 1; }
[ "$krc" -eq 0 ] || { tail -20 "$OUT/kernels_build.log"; exit 1; }
cp -a "$BUILD"/bin/lib*.so* "$root/.gpu/pylib/llama_cpp/lib/"
[ -z "${ONLY_BUILD:-}" ] || { stamp "ONLY_BUILD: done"; exit 0; }

pp="$(mktemp -d)"
ln -s "$root/runtime" "$pp/deltakv_runtime"
ln -s "$root/tools" "$pp/deltakv_tools"
export PYTHONPATH="$root:$root/.gpu/pylib:$pp${PYTHONPATH:+:$PYTHONPATH}"
python3 -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__, 'gpu offload', llama_cpp.llama_supports_gpu_offload())"

stamp "models"
models=/tmp/deltakv-models
mkdir -p $models
python3 -m deltakv_tools.measure.synthetic_gguf write .gpu/skel/smollm2.json.gz $models/kv8b-shape.gguf --kv-shape-8b &
python3 -m deltakv_tools.measure.synthetic_gguf write .gpu/skel/smollm2.json.gz $models/smollm2-shape.gguf &
python3 -m deltakv_tools.measure.synthetic_gguf write .gpu/skel/gemma3.json.gz $models/gemma3-shape.gguf &
wait

stamp "probe: the first step at which a CUDA context fails (llama.cpp's log kept)"
probe_model=$models/${PROBE_MODEL:-smollm2-shape}.gguf
python3 -m deltakv_tools.measure.gpu_llama_probe "$probe_model" 2>&1 | tee "$OUT/probe.log" | grep -v "^llama_\|^load\|^print_info\|^\.\|^llm_" | tail -60
probe_rc=${PIPESTATUS[0]}
if [ "$probe_rc" -ne 0 ] && command -v cuda-gdb >/dev/null; then
  failed=$(grep -m1 -o "^step [a-z-]*: rc [1-9-]" "$OUT/probe.log" | cut -d' ' -f2 | tr -d :)
  stamp "probe failed at $failed: its backtrace (cuda-gdb)"
  timeout "${GDB_TIMEOUT:-90}" cuda-gdb -batch -ex run -ex bt -ex "info sharedlibrary" --args python3 -m deltakv_tools.measure.gpu_llama_probe \
    "$probe_model" --step "$failed" > "$OUT/probe_gdb.log" 2>&1
  grep -A40 "signal\|SIG" "$OUT/probe_gdb.log" | grep -v "^llama_\|^load\|^print_info" | head -60
fi
if grep -q "^step kernels-first: rc [1-9-]" "$OUT/probe.log"; then
  # deltakv's kernels loaded before the context broke it: try the kernels linked to the shared CUDA runtime
  # (nvcc links cudart statically by default, so the process held two CUDA runtimes)
  stamp "kernels-first failed: the kernels again with -cudart shared"
  DELTAKV_NVCC_EXTRA="-cudart shared" "$here/build.sh" cuda $ARCHS > "$OUT/kernels_build_shared.log" 2>&1 || tail -5 "$OUT/kernels_build_shared.log"
  shared_ok=1
  for s in kernels-first kernels-after; do
    python3 -X faulthandler -m deltakv_tools.measure.gpu_llama_probe "$probe_model" --step $s > "$OUT/probe_shared_$s.log" 2>&1
    rc=$?; echo "step $s (-cudart shared): rc $rc"; [ "$rc" -eq 0 ] || { grep -v "^llama_\|^load\|^print_info\|^\.\|^llm_" "$OUT/probe_shared_$s.log" | tail -15; shared_ok=0; }
  done
  others_failed=$(grep "^step" "$OUT/probe.log" | grep -v "kernels-first\|kernels-after" | grep -c "rc [1-9-]")
  [ "$shared_ok" -eq 1 ] && [ "$others_failed" -eq 0 ] && probe_rc=0
fi
[ "$probe_rc" -eq 0 ] || [ -n "${BENCH_AFTER_FAILED_PROBE:-}" ] || { stamp "probe failed: no bench"; exit 1; }

stamp "bench (tokens $TOKENS)"
for t in ${TOKENS//,/ }; do
  for m in ${MODELS:-kv8b-shape smollm2-shape gemma3-shape}; do
    timeout "${BENCH_TIMEOUT:-300}" python3 -X faulthandler -m deltakv_tools.measure.bench_gpu_llama --model $models/$m.gguf --tokens $t \
      --repeat "${REPEAT:-3}" ${BENCH_ARGS:-} --out "$OUT/gpu_llama_${m}_$t.md" > "$OUT/bench_${m}_$t.log" 2>&1
    rc=$?; echo "rc=$rc"
    if [ "$rc" -eq 139 ]; then  # a crash: once more with deltakv's kernels off (its CPU codecs, llama.cpp on the GPU)
      DELTAKV_GPU=0 timeout "${BENCH_TIMEOUT:-300}" python3 -X faulthandler -m deltakv_tools.measure.bench_gpu_llama --model $models/$m.gguf \
        --tokens $t --repeat "${REPEAT:-3}" --out "$OUT/gpu_llama_${m}_${t}_cpu_codecs.md" >> "$OUT/bench_${m}_$t.log" 2>&1; echo "rc (DELTAKV_GPU=0) $?"
    fi
    grep -v "^llama_\|^load\|^print_info\|^init\|^\.\|^graph\|^sched\|^llm_\|^set_" "$OUT/bench_${m}_$t.log" | tail -25
    stamp "$m $t done"
  done
done
stamp "all done"
