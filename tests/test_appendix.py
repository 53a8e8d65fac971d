"""Bytes after a sequence file's payload (llama-server's context checkpoints): kept byte-exact (SPEC.md section 4)."""

from __future__ import annotations

import struct

import pytest

from deltakv_format import operations
from deltakv_format.errors import CorruptError
from deltakv_format.llama_state import parse_state, write_state
from deltakv_format.state_model import APPENDIX_ROLE, Framing, KVCacheSection, OpaqueSection

from .conftest import FIXTURES

SEQUENCE_FILES = ["smollm2_v10_fa1.ggsq", "smollm2_v11_fa1.ggsq", "smollm2_v11_q8_0_fa1.ggsq",
                  "gemma3_v10_fa0.ggsq", "gemma3_v11_fa0.ggsq"]
# What PR #26004's servers append: a tagged record (magic, version, count, ...); any bytes would do.
CHECKPOINTS = b"SCKP" + struct.pack("<II", 1, 1) + bytes(range(20))


@pytest.mark.parametrize("name", SEQUENCE_FILES)
def test_an_appendix_is_kept_after_the_whole_body(name):
    raw = (FIXTURES / name).read_bytes()
    plain, with_appendix = parse_state(raw), parse_state(raw + CHECKPOINTS)
    # The iSWA files' sliding-window cache is read as state, not taken for an appendix.
    assert sum(isinstance(s, KVCacheSection) for s in with_appendix.sections) == len(plain.kv_sections)
    last = with_appendix.sections[-1]
    assert isinstance(last, OpaqueSection) and last.role == APPENDIX_ROLE and bytes(last.data) == CHECKPOINTS
    assert write_state(with_appendix) == raw + CHECKPOINTS
    # Not part of the state: an in-memory sequence state ends with its payload.
    assert write_state(with_appendix, framing=Framing.SEQ_STATE) == write_state(plain, framing=Framing.SEQ_STATE)


@pytest.mark.parametrize("codec", ["raw", "dkv-ans"])
@pytest.mark.parametrize("name", ["smollm2_v11_fa1.ggsq", "gemma3_v10_fa0.ggsq"])
def test_convert_and_restore_give_the_appendix_back(tmp_path, name, codec):
    raw = (FIXTURES / name).read_bytes()
    src = tmp_path / "slot.bin"
    src.write_bytes(raw + CHECKPOINTS)
    operations.convert(src, tmp_path / "slot.dkv", codec=codec)
    assert operations.inspect(tmp_path / "slot.dkv")["appendix_bytes"] == len(CHECKPOINTS)
    operations.restore(tmp_path / "slot.dkv", tmp_path / "back.bin")
    back = (tmp_path / "back.bin").read_bytes()
    assert back.endswith(CHECKPOINTS) and len(back) == len(raw) + len(CHECKPOINTS)
    if codec == "raw":
        assert back == raw + CHECKPOINTS
    assert "appendix_bytes" not in operations.inspect(_converted(tmp_path, raw))


def _converted(tmp_path, raw):
    src = tmp_path / "plain.bin"
    src.write_bytes(raw)
    operations.convert(src, tmp_path / "plain.dkv", codec="raw")
    return tmp_path / "plain.dkv"


def test_session_files_have_no_appendix():
    # llama_state_load_file insists on reading the whole rest of a session file.
    raw = (FIXTURES / "smollm2_v10_fa0.ggsn").read_bytes()
    with pytest.raises(CorruptError, match=f"found {len(CHECKPOINTS)} more bytes"):
        parse_state(raw + CHECKPOINTS)
