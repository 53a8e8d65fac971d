#!/usr/bin/env bash
# Build the deltakv GPU kernel library into runtime/build/ (git-ignored).
#
#   runtime/kernels/build.sh            # CUDA (nvcc), sm_80 + sm_90 (+ PTX for newer GPUs)
#   runtime/kernels/build.sh cuda 90    # CUDA, only sm_90 (faster)
#   runtime/kernels/build.sh hip        # AMD (hipcc): gfx906, gfx90a, gfx942
#   runtime/kernels/build.sh emulator   # CPU emulator of the kernels, for tests without a GPU
#   DKV_DEFINES='DKV_DECODE_MIN_BLOCKS(v)=4' DKV_TAG=_minb4 runtime/kernels/build.sh cuda 90   # a variant
#
# The flags that bit-exactness needs are in runtime/gpu.py (NVCC_FLAGS / HIPCC_FLAGS): no FMA
# contraction (-fmad=false / -ffp-contract=off), no flush-to-zero, IEEE division.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
backend="${1:-cuda}"
shift || true
archs="${*:-}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
ln -s "$root/runtime" "$tmp/deltakv_runtime"
PYTHONPATH="$root:$tmp${PYTHONPATH:+:$PYTHONPATH}" python3 - "$backend" $archs <<'EOF'
import os, sys, time
from deltakv_runtime import gpu
backend, archs = sys.argv[1], tuple(sys.argv[2:]) or None
defines = tuple(d for d in os.environ.get("DKV_DEFINES", "").split(";") if d)
t = time.time()
path = gpu.build_library(backend, force=True, archs=archs, verbose=True, defines=defines, tag=os.environ.get("DKV_TAG", ""))
print(f"built {path} in {time.time() - t:.0f} s")
EOF
