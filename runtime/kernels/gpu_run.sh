#!/usr/bin/env bash
# The whole GPU run in one go, on a machine with an NVIDIA GPU and nvcc:
#   1. build the kernel library (nvcc, sm_90 by default: ARCHS="80 90" for both),
#   2. parity: tests/test_gpu.py (bit-exact with the Numba codecs: golden vectors, random data, fixtures),
#   3. benchmark: tools/measure/bench_gpu.py (decode/encode GB/s next to a D2D copy, 1 tensor .. a 128k session),
#   4. a Nsight Compute profile of one dkv-q4 decode launch (when ncu works here).
# Everything goes to $OUT (default runtime/build/gpu_run, git-ignored): build.log, test_gpu.log, bench.md, ncu_decode.txt, GPU_RESULTS.md.
#
#   OUT=/tmp/out runtime/kernels/gpu_run.sh
#   TESTS_K=ans SKIP_BENCH=1 SKIP_NCU=1 OUT=/tmp/out runtime/kernels/gpu_run.sh   # dkv-ans tests + its benchmark only
#   (ANS_TOKENS=4096,32768,131072: the dkv-ans token counts)
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
OUT="${OUT:-$root/runtime/build/gpu_run}"
ARCHS="${ARCHS:-90}"
mkdir -p "$OUT"
cd "$root"
export PYTHONUNBUFFERED=1 DELTAKV_GPU_BACKEND=cuda
pp="$(mktemp -d)"
# The import names of the folders, for a machine where deltakv is not pip-installed.
ln -s "$root/runtime" "$pp/deltakv_runtime"
ln -s "$root/tools" "$pp/deltakv_tools"
export PYTHONPATH="$root:$pp${PYTHONPATH:+:$PYTHONPATH}"
t0=$(date +%s)
stamp() { echo "== $(date -u +%H:%M:%S) (+$(( $(date +%s) - t0 )) s) $*"; }

stamp "machine"
{
  date -u +"%Y-%m-%d %H:%M:%S UTC"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,clocks.max.sm --format=csv 2>&1
  nvcc --version 2>&1 | tail -1
  python3 -c "import sys, numpy, numba; print('python', sys.version.split()[0], 'numpy', numpy.__version__, 'numba', numba.__version__)" 2>&1
  git -C "$root" log -1 --format='commit %h %s' 2>/dev/null || true
} | tee "$OUT/machine.txt"

stamp "build (sm_$ARCHS)"
"$here/build.sh" cuda $ARCHS 2>&1 | tee "$OUT/build.log"
build_rc=${PIPESTATUS[0]}
if [ "$build_rc" -ne 0 ]; then stamp "build failed"; exit 1; fi
# A variant for the benchmark: 4 resident blocks per SM for the delta decoders (<= 64 registers).
DKV_DEFINES='DKV_DECODE_MIN_BLOCKS(v)=((v)==8?4:1)' DKV_TAG=_minb4 "$here/build.sh" cuda $ARCHS >> "$OUT/build.log" 2>&1 \
  && alt=(--alt-lib "$root/runtime/build/libdeltakv_kernels_cuda_minb4.so" --alt-label minb4) || alt=()
lib="$root/runtime/build/libdeltakv_kernels_cuda.so"
cuobjdump --dump-resource-usage "$lib" 2>/dev/null | grep -A1 "k_decode_delta" | grep -E "Function|REG" | head -40 > "$OUT/resource_usage.txt" || true

stamp "parity tests"
timeout 400 python3 -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py ${TESTS_K:+-k "$TESTS_K"} 2>&1 | tee "$OUT/test_gpu.log"
test_rc=${PIPESTATUS[0]}

stamp "benchmark"
bench_rc=0
if [ -z "${SKIP_BENCH:-}" ]; then
  timeout 200 python3 -m deltakv_tools.measure.bench_gpu --vpl16 "${alt[@]}" --out "$OUT/bench.md" 2>&1 | tee "$OUT/bench.log"
  bench_rc=${PIPESTATUS[0]}
fi

stamp "benchmark dkv-ans"
timeout 420 python3 -m deltakv_tools.measure.bench_gpu --ans "${ANS_TOKENS:-4096,32768,131072}" --out "$OUT/bench_ans.md" 2>&1 | tee "$OUT/bench_ans.log"
ans_rc=${PIPESTATUS[0]}
cuobjdump --dump-resource-usage "$lib" 2>/dev/null | grep -A1 "k_decode_ans" | grep -E "Function|REG" | head -12 >> "$OUT/resource_usage.txt" || true

stamp "profile (ncu)"
NCU="$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)"
if [ -n "$NCU" ] && [ -z "${SKIP_NCU:-}" ]; then
  timeout 100 "$NCU" --clock-control none --kernel-name regex:k_decode_delta --launch-count 1 \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
    --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats --section InstructionStats \
    python3 -m deltakv_tools.measure.bench_gpu --profile-one > "$OUT/ncu_decode.txt" 2>&1
  echo "ncu rc=$?" >> "$OUT/ncu_decode.txt"
  grep -E "Executed Instructions|Duration|Memory Throughput|DRAM Throughput|Compute \(SM\)|Achieved Occupancy|Registers Per|Issue Slots Busy|Issued Ipc|No Eligible|L1/TEX Hit|L2 Hit|Warp Cycles Per Issued|Theoretical Occupancy|Block Limit Registers|Stall" "$OUT/ncu_decode.txt" | head -40
else
  echo "ncu not found" | tee "$OUT/ncu_decode.txt"
fi

stamp "summary"
{
  echo "# GPU run: build, parity, benchmark"
  echo
  echo "Command: \`OUT=... runtime/kernels/gpu_run.sh\` (ARCHS=$ARCHS)"
  echo
  echo '```'
  cat "$OUT/machine.txt"
  echo '```'
  echo
  echo "## Parity (tests/test_gpu.py, rc=$test_rc)"
  echo
  echo '```'
  tail -n 15 "$OUT/test_gpu.log"
  echo '```'
  echo
  echo "## Benchmark (rc=$bench_rc)"
  echo
  cat "$OUT/bench.md" 2>/dev/null
  echo
  echo "## dkv-ans decode (rc=$ans_rc)"
  echo
  cat "$OUT/bench_ans.md" 2>/dev/null
} > "$OUT/GPU_RESULTS.md"
stamp "done (tests rc=$test_rc, bench rc=$bench_rc, ans rc=$ans_rc)"
cat "$OUT/bench.md" 2>/dev/null
cat "$OUT/bench_ans.md" 2>/dev/null
[ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$ans_rc" -eq 0 ]
