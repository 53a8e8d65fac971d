"""Crash safety of ``convert``: SIGKILL a process that converts llama.cpp states onto the same
output path over and over, at random moments and at each step of the write protocol. Afterwards
the output is absent (before the first complete write) or the complete old or the complete new
snapshot: it opens, verify() is clean, and it restores byte-identical to one of the two inputs.

Temporary files (``.{name}.XXXXXXXX.tmp``, flock-ed by their writer) that a killed writer leaves
are removed by the next write to the same path; a live writer's temporary file is not touched.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path


from deltakv_format import operations
from deltakv_format.container import temp_file_for
from deltakv_format.llama_state import write_state
from deltakv_format.session import DkvSession

ROOT = Path(__file__).resolve().parent.parent
A = ROOT / "fixtures" / "smollm2_v9_fa0.ggsn"  # 751 KB
B = ROOT / "fixtures" / "smollm2_v10_fa1.ggsn"  # 554 KB

# A fresh interpreter imports deltakv once, then forks one writer per command and SIGKILLs it:
#   random DELAY  the writer converts A, B, A, B, ... onto OUT until killed DELAY s after the fork
#   step NAME     the writer converts B onto OUT and kills itself at the protocol step NAME
ZYGOTE = r"""
import os, signal, sys, time
sys.path.insert(0, sys.argv[1])
import deltakv_format.container as container
from deltakv_format import operations
A, B, OUT = sys.argv[2:5]

def die(*a, **k):
    os.kill(os.getpid(), signal.SIGKILL)

def arm(step):
    if step == "mid-data":  # half of the tensors written to the temporary file
        real = container._write_tensors
        def half(f, tensors, infos, data_start, progress=None):
            real(f, tensors[: len(tensors) // 2], infos[: len(infos) // 2], data_start, progress)
            f.flush(); os.fsync(f.fileno()); die()
        container._write_tensors = half
        # convert writes through a TensorSpool: its copy of the spooled data into the temporary file
        import deltakv_format.container_spool as spool
        real_copy = spool._copy_data
        def half_copy(src_fd, dst_fd, size, dst_offset):
            real_copy(src_fd, dst_fd, size // 2, dst_offset)
            os.fsync(dst_fd); die()
        spool._copy_data = half_copy
    elif step == "before-fsync":  # data and final header written, not yet fsynced
        os.fsync = die
    elif step == "before-rename":  # temporary file complete and durable
        os.replace = die
    elif step == "after-rename":  # renamed, folder not yet fsynced
        container._fsync_dir = die

for line in sys.stdin:
    cmd, arg = line.split()
    pid = os.fork()
    if pid == 0:
        try:
            if cmd == "random":
                i = 0
                while True:
                    operations.convert(A if i % 2 == 0 else B, OUT, codec="raw")
                    i += 1
            arm(arg)
            operations.convert(B, OUT, codec="raw")
        finally:
            os._exit(3)  # only reached if a step did not kill
    if cmd == "random":
        time.sleep(float(arg))
        os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    print("killed" if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL else f"exit {status}", flush=True)
"""

STEPS = ["mid-data", "before-fsync", "before-rename", "after-rename"]


class Zygote:
    def __init__(self, out: Path):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE, str(ROOT), str(A), str(B), str(out)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )

    def run(self, cmd: str, arg) -> str:
        self.proc.stdin.write(f"{cmd} {arg}\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def snapshot_of(out: Path, originals: dict[bytes, str]) -> str | None:
    """Which input the output holds (None if absent); fails if it is anything else."""
    if not out.exists():
        return None
    with DkvSession(out) as s:
        problems = s.file.verify()
        assert problems == [], problems
        rebuilt = write_state(s.to_llama_state())
    assert rebuilt in originals, "the output is neither the old nor the new snapshot"
    return originals[rebuilt]


def temps(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.*.tmp"))


def test_sigkill_during_convert_leaves_old_or_new_snapshot(tmp_path):
    out = tmp_path / "out.dkv"
    originals = {A.read_bytes(): "A", B.read_bytes(): "B"}
    rng = random.Random(1234)
    zygote = Zygote(out)
    try:
        # 1. killed in the middle of the very first write: no output at all
        assert zygote.run("step", "mid-data") == "killed"
        assert snapshot_of(out, originals) is None
        assert len(temps(out)) == 1  # what the killed writer left

        # 2. each step of the protocol, with A on disk: always the complete old (A) or new (B)
        seen_steps = {}
        for step in STEPS:
            operations.convert(A, out, codec="raw")
            assert zygote.run("step", step) == "killed"
            seen_steps[step] = snapshot_of(out, originals)
        assert seen_steps["mid-data"] == "A" and seen_steps["before-fsync"] == "A"
        assert seen_steps["before-rename"] == "A" and seen_steps["after-rename"] == "B"

        # 3. random moments while it rewrites the output again and again
        seen = []
        for _ in range(30):
            assert zygote.run("random", f"{rng.uniform(0.0, 0.4):.4f}") == "killed"
            seen.append(snapshot_of(out, originals))
        assert set(seen) <= {"A", "B"}
        assert zygote.run("step", "before-rename") == "killed"  # leaves a complete, stale temporary file
    finally:
        zygote.close()

    # 4. temporary files: stale ones go with the next write; a live writer's stays
    assert len(temps(out)) >= 1
    fd, live = temp_file_for(out)
    try:
        operations.convert(B, out, codec="raw")
        assert temps(out) == [Path(live)]
    finally:
        os.close(fd)
        os.unlink(live)
    operations.convert(A, out, codec="raw")
    assert temps(out) == []
    assert snapshot_of(out, originals) == "A"


def test_restore_output_is_atomic_too(tmp_path):
    """``restore`` writes through the same temporary-file protocol (operations.atomic_write)."""
    dkv = tmp_path / "a.dkv"
    operations.convert(A, dkv, codec="raw")
    out = tmp_path / "a.ggsn"
    (tmp_path / ".a.ggsn.deadbeef.tmp").write_bytes(b"left by a killed writer")
    operations.restore(dkv, out)
    assert out.read_bytes() == A.read_bytes()
    assert temps(out) == []
