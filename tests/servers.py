"""Real servers for the store tests, on free 127.0.0.1 ports: redis-server, and moto's S3 server.

No mocks: a test of ``RedisStore`` talks to a ``redis-server`` process (Debian's package: ``.ci/run``
installs it), a test of ``FsspecStore`` over ``s3://`` to moto's standalone S3 server (``moto[server]``,
the S3 implementation installable here), through s3fs and botocore as a real bucket would be.

The shared servers start on first use and live for the test session (``atexit``, and the kernel
kills them if the test process dies: PR_SET_PDEATHSIG). Their addresses go into the environment
(``DELTAKV_TEST_REDIS_URL``, ``DELTAKV_TEST_S3_ENDPOINT``), so that a subprocess of a test (a
writer killed mid-put, a second "machine") uses the same server instead of starting its own.
A test that needs a server of its own (one it kills) makes a :class:`RedisServer`.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REDIS_URL_ENV = "DELTAKV_TEST_REDIS_URL"
S3_ENDPOINT_ENV = "DELTAKV_TEST_S3_ENDPOINT"
S3_BUCKET = "deltakv-test"
# moto accepts any credentials; botocore insists on having some.
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
START_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    # Linux: the server gets SIGKILL when the test process that started it dies, however it dies.
    with_libc = ctypes.CDLL(None, use_errno=True)
    with_libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _wait_for_port(port: int, proc: subprocess.Popen, what: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} at start: {log.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{what} did not listen on 127.0.0.1:{port} within {START_TIMEOUT_S:.0f} s")


def redis_binary() -> str | None:
    return shutil.which("redis-server") or shutil.which("valkey-server")


def needs_redis_server() -> str:
    binary = redis_binary()
    if binary is None:
        pytest.skip("needs redis-server (Debian: apt-get install redis-server; .ci/run installs it)")
    return binary


class RedisServer:
    """A redis-server of one test's own, which it may kill and start again on the same port."""

    def __init__(self, folder: Path | None = None):
        self.binary = needs_redis_server()
        self.folder = Path(folder or tempfile.mkdtemp(prefix="deltakv-redis-"))
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def socket(self) -> Path:
        return self.folder / "redis.sock"

    def start(self) -> "RedisServer":
        log = self.folder / "redis.log"
        # No persistence: the tests' data are throwaway, and an RDB save would be a fork of the server.
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.folder), "--protected-mode", "no", "--unixsocket", str(self.socket)],
            stdout=open(log, "ab"), stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        _wait_for_port(self.port, self.proc, "redis-server", log)
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


_SHARED: dict[str, object] = {}


def shared_redis_url() -> str:
    """The URL of the test session's redis-server (started on first use)."""
    if os.environ.get(REDIS_URL_ENV):
        return os.environ[REDIS_URL_ENV]
    server = RedisServer().start()
    atexit.register(server.kill)
    _SHARED["redis"] = server
    os.environ[REDIS_URL_ENV] = server.url
    return server.url


def shared_s3_endpoint() -> str:
    """The endpoint URL of the test session's moto S3 server, with bucket ``S3_BUCKET`` made (on first use)."""
    os.environ.update({k: v for k, v in S3_ENV.items() if k not in os.environ})
    if os.environ.get(S3_ENDPOINT_ENV):
        return os.environ[S3_ENDPOINT_ENV]
    try:
        import boto3
        import moto.server  # noqa: F401 - only to know it is there
        import s3fs  # noqa: F401
    except ImportError as e:
        pytest.skip(f"needs moto[server], boto3 and s3fs (pip install -e '.[test]'): {e}")
    port = free_port()
    folder = Path(tempfile.mkdtemp(prefix="deltakv-moto-"))
    log = folder / "moto.log"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=open(log, "ab"), stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
    atexit.register(lambda: (proc.kill(), proc.wait()))
    _wait_for_port(port, proc, "moto's S3 server", log)
    endpoint = f"http://127.0.0.1:{port}"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=S3_BUCKET)
    os.environ[S3_ENDPOINT_ENV] = endpoint
    return endpoint


def s3_storage_options() -> dict:
    """What s3fs needs to reach the moto server."""
    return {"endpoint_url": shared_s3_endpoint(), "key": S3_ENV["AWS_ACCESS_KEY_ID"],
            "secret": S3_ENV["AWS_SECRET_ACCESS_KEY"]}
