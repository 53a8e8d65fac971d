"""The one kernel source (runtime/kernels/deltakv_kernels.cu) compiles for every target, no GPU needed.

- nvcc for sm_80 and sm_90 (object files, ``-c``), with the flags of the real build;
- hipcc for AMD gfx906 (MI50), gfx90a (MI200) and gfx942 (MI300) with ``HIP_PLATFORM=amd``
  (CI: ``apt-get install -y hipcc``);
- the C++ CPU emulator build (``DELTAKV_GPU_BACKEND=emulator`` runs tests/test_gpu.py on it).

Each check skips, with the reason, when its compiler is not installed, or when the installed hipcc's
clang does not know the target (Debian's hipcc 5.2 uses clang 15, which predates gfx942).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

gpu = pytest.importorskip("deltakv_runtime.gpu", reason="deltakv_runtime is not importable")

pytestmark = pytest.mark.slow


def _run(cmd, env=None):
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=1800)


def _nvcc_missing() -> str | None:
    nvcc = gpu._nvcc()
    if not (shutil.which(nvcc) or os.path.exists(nvcc)):
        return "nvcc is not installed (CUDA toolkit)"
    return None


@pytest.mark.parametrize("arch", ["80", "90"])
def test_nvcc_compiles(arch, tmp_path):
    reason = _nvcc_missing()
    if reason:
        pytest.skip(reason)
    out = tmp_path / f"deltakv_sm{arch}.o"
    cmd = gpu.compile_command("cuda", out, archs=(arch,), shared=False)
    proc = _run(cmd)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-6000:]}"
    assert out.stat().st_size > 0
    assert "warning" not in proc.stderr.lower(), proc.stderr[-4000:]


@pytest.mark.parametrize("arch", ["gfx906", "gfx90a", "gfx942"])
def test_hipcc_compiles(arch, tmp_path):
    if not shutil.which("hipcc"):
        pytest.skip("hipcc is not installed (apt-get install -y hipcc)")
    out = tmp_path / f"deltakv_{arch}.o"
    cmd = gpu.compile_command("hip", out, archs=(arch,), shared=False)
    proc = _run(cmd, env={"HIP_PLATFORM": "amd"})
    if proc.returncode != 0 and re.search(r"invalid target ID '?%s|unsupported .*%s|unknown target CPU '?%s" % (arch, arch, arch),
                                          proc.stderr):
        version = _run(["hipcc", "--version"], env={"HIP_PLATFORM": "amd"}).stdout.strip().splitlines()
        pytest.skip(f"this hipcc's clang does not know {arch} ({'; '.join(version[:2])}); "
                    "it needs ROCm >= 5.7 / clang >= 17")
    assert proc.returncode == 0, f"HIP_PLATFORM=amd {' '.join(cmd)}\n{proc.stderr[-6000:]}"
    assert out.stat().st_size > 0
    assert "warning:" not in proc.stderr, proc.stderr[-4000:]


def test_emulator_compiles(tmp_path):
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        pytest.skip("no C++ compiler")
    out = tmp_path / "deltakv_emu.o"
    cmd = gpu.compile_command("emulator", out, shared=False)
    proc = _run(cmd)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-6000:]}"
    assert out.stat().st_size > 0


def test_flags_forbid_contraction_and_ftz():
    """The bit-exact arithmetic needs these flags; a build without them must not happen silently."""
    assert "-fmad=false" in gpu.NVCC_FLAGS and "-ftz=false" in gpu.NVCC_FLAGS and "-prec-div=true" in gpu.NVCC_FLAGS
    assert "-ffp-contract=off" in gpu.HIPCC_FLAGS
    assert "-ffp-contract=off" in gpu.EMU_FLAGS
    assert not any("fast-math" in f or "fast_math" in f for f in gpu.NVCC_FLAGS + gpu.HIPCC_FLAGS + gpu.EMU_FLAGS)
