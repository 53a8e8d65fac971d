"""The header reserve is sized to the session (SPEC.md section 2, rule 3; issue 12): a short session
keeps its codec's ratio, and appends past the reserve still work (SPEC.md section 8)."""

import os

import pytest

from deltakv_format.constants import HEADER_RESERVE_APPENDS, HEADER_RESERVE_MIN, HEADER_RESERVE_PAYLOAD_DIVISOR
from deltakv_format.container import KEY_RESERVE, DkvFile, header_reserve
from deltakv_format.llama_state import write_state
from deltakv_format.session import DkvSession, append_session, write_session
from deltakv_format.session_writer import segment_header_growth

from .llama_helpers import make_llama, needs_llama, prompt_tokens
from .synthetic import SyntheticContext

def reserve_of(path):
    """(data_start, reserve length, bare header length, payload bytes) of a .dkv."""
    with DkvFile(path) as f:
        reserve = len(f.kvs[KEY_RESERVE].value)
        return f.data_start, reserve, f.data_start - reserve, f.data_end - f.data_start


def expected_reserve(path):
    """The reserve the rule gives the file at ``path``: that of a file written from scratch with its
    segments (write_session for one segment, the append's full rewrite for more)."""
    _, _, bare, payload = reserve_of(path)
    with DkvSession(path) as s:
        growth = segment_header_growth(s.tracks, len(s.stream_cells), s.token_format, s.n_segments)
    return header_reserve(bare, payload, growth)


@needs_llama
@pytest.mark.llama
def test_a_short_session_keeps_the_codec_ratio_and_takes_20_appends(tmp_path):
    from deltakv_runtime.session import live_state

    llm = make_llama(n_ctx=512)
    toks = prompt_tokens(llm, 60 + 20 * 3)
    llm.eval(toks[:60])

    # the default codec: the header is a small part of the file (it was 18% of the payload with the
    # fixed 64 KiB reserve), and the reserve is the rule's
    short = tmp_path / "short.dkv"
    write_session(live_state(llm), short)
    data_start, reserve, bare, payload = reserve_of(short)
    assert data_start < 0.08 * payload, (data_start, payload)
    assert HEADER_RESERVE_MIN <= reserve <= max(HEADER_RESERVE_MIN, payload // HEADER_RESERVE_PAYLOAD_DIVISOR) + 64
    assert expected_reserve(short) <= reserve < expected_reserve(short) + 64  # alignment slack only

    # raw: 20 appends of 3 tokens; each decodes to the live state, byte for byte
    path = tmp_path / "grown.dkv"
    write_session(live_state(llm), path, "raw")
    renewed, in_place = 0, 0
    for i in range(20):
        llm.eval(toks[llm.n_tokens:llm.n_tokens + 3])
        state = live_state(llm)
        inode, (old_start, _, old_bare, _) = os.stat(path).st_ino, reserve_of(path)
        with DkvSession(path) as s:
            growth = segment_header_growth(s.tracks, len(s.stream_cells), s.token_format, s.n_segments + 1)
        assert append_session(path, state)["rewritten"] is None
        data_start, reserve, bare, _ = reserve_of(path)
        assert bare - old_bare <= growth  # the estimate bounds what an append really adds
        if os.stat(path).st_ino == inode:  # in place: the header grew within the old reserve
            in_place += 1
            assert data_start == old_start
        else:  # the reserve ran out: a new file with a reserve sized by the same rule
            renewed += 1
            assert expected_reserve(path) <= reserve < expected_reserve(path) + 64
        with DkvSession(path) as s:
            assert s.file.verify() == []
            assert s.n_segments == i + 2
            assert write_state(s.to_llama_state()) == write_state(state), i
    # raw SmolLM2: the reserve holds HEADER_RESERVE_APPENDS appends, then is renewed
    assert renewed >= 1 and in_place >= HEADER_RESERVE_APPENDS * renewed, (renewed, in_place)


def test_the_reserve_is_deterministic_and_packed_sessions_get_the_floor(tmp_path):
    ctx = SyntheticContext(n_max=200, n_layer=2)
    a, b = tmp_path / "a.dkv", tmp_path / "b.dkv"
    write_session(ctx.state(150), a)
    write_session(ctx.state(150), b)
    assert a.read_bytes() == b.read_bytes()
    with DkvSession(a) as s:
        assert segment_header_growth(s.tracks, len(s.stream_cells), "packed", 1) == 0
    assert header_reserve(1000, 10**9, 0) == HEADER_RESERVE_MIN
    assert header_reserve(1000, 10**9, 5000) == HEADER_RESERVE_APPENDS * 5000
    assert header_reserve(1000, 64 * 10**4, 5000) == max(HEADER_RESERVE_MIN, 64 * 10**4 // HEADER_RESERVE_PAYLOAD_DIVISOR)
