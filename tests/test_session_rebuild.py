"""The rebuild into one buffer and the streamed rebuild give the bytes of the typed path, exactly."""

import numpy as np
import pytest

from deltakv_format import operations
from deltakv_format.llama_state import parse_state, write_state
from deltakv_format.model_info import ModelInfo
from deltakv_format.session import DkvSession, append_session, rope_for_state, write_session
from deltakv_format.session_rebuild import iter_rebuilt_chunks, plan_rebuild, rebuild_into
from deltakv_format.state_model import Framing
from deltakv_tools.models import gemma3_270m, smollm2

from .conftest import FIXTURES
from .synthetic import SyntheticContext

FIXTURE_FILES = sorted(p for p in FIXTURES.iterdir() if p.suffix in (".ggsn", ".ggsq", ".state", ".seqstate"))
OTHER_FRAMING = {Framing.SESSION_FILE: Framing.STATE, Framing.STATE: Framing.SESSION_FILE,
                 Framing.SEQUENCE_FILE: Framing.SEQ_STATE, Framing.SEQ_STATE: Framing.SEQUENCE_FILE}


def _model_of(path):
    found = smollm2() if path.name.startswith("smollm2") else gemma3_270m()
    return None if found is None else ModelInfo.from_gguf(found)


def _typed_bytes(session, framing=None):
    """What restore wrote before the rebuild module: the typed state, joined."""
    return write_state(session.to_llama_state(), framing=framing, tokens=session.tokens())


def _check_all_paths(session):
    framings = [None]
    if session.framing in (Framing.SESSION_FILE, Framing.SEQUENCE_FILE) or session.tokens() is not None:
        framings.append(OTHER_FRAMING[session.framing])
    elif session.framing in (Framing.STATE, Framing.SEQ_STATE):
        framings.append(session.framing)
    for framing in framings:
        want = _typed_bytes(session, framing)
        tokens = session.tokens()
        one = rebuild_into(session, framing=framing, tokens=tokens, workers=3)
        assert one.tobytes() == want, framing
        streamed = b"".join(bytes(c) for c in iter_rebuilt_chunks(session, framing=framing, tokens=tokens, window=2))
        assert streamed == want, framing
        assert plan_rebuild(session, framing=framing, tokens=tokens).size == len(want)
    # the defaults (the session's own framing and tokens), as DeltaKVCache and slot restore ask for them
    want = write_state(session.to_llama_state())
    assert rebuild_into(session).tobytes() == want
    assert b"".join(bytes(c) for c in iter_rebuilt_chunks(session)) == want


@pytest.mark.parametrize("path", FIXTURE_FILES, ids=lambda p: p.name)
@pytest.mark.parametrize("codec", ["dkv-ans", "raw", "dkv-q4"])
def test_rebuild_of_every_fixture_matches_the_typed_path(tmp_path, path, codec):
    raw = path.read_bytes()
    model = _model_of(path)
    try:
        state = parse_state(raw, model=model)
    except Exception:
        state = parse_state(raw)
    out = tmp_path / "s.dkv"
    write_session(state, out, codec, rope=rope_for_state(model, state) if model else None).close()
    with DkvSession(out) as session:
        _check_all_paths(session)
        if codec == "raw":
            assert _typed_bytes(session) == raw


@pytest.mark.parametrize("v_trans", [0, 1])
def test_rebuild_of_a_session_of_several_segments(tmp_path, v_trans):
    ctx = SyntheticContext(n_max=300, v_trans=v_trans)
    path = tmp_path / "grown.dkv"
    write_session(ctx.state(70), path, "dkv-q4").close()
    for n in (130, 300):
        append_session(path, ctx.state(n))
    with DkvSession(path) as session:
        assert session.n_segments == 3
        _check_all_paths(session)


def test_restore_is_streamed_and_byte_identical(tmp_path, monkeypatch):
    """operations.restore writes the typed path's bytes through iter_rebuilt_chunks, a payload at a
    time: no chunk it writes is larger than one layer of the state."""
    raw = (FIXTURES / "gemma3_v10_fa0.ggsq").read_bytes()  # iSWA, V transposed
    state = parse_state(raw)
    dkv = tmp_path / "s.dkv"
    write_session(state, dkv, "raw").close()
    largest = max(len(t.data) for sec in state.kv_sections for st in sec.streams for t in st.k + st.v)
    sizes = []
    real_write = operations.atomic_write

    def recording(path, chunks):
        def seen():
            for c in chunks:
                sizes.append(len(c))
                yield c
        return real_write(path, seen())

    monkeypatch.setattr(operations, "atomic_write", recording)
    operations.restore(dkv, tmp_path / "out.ggsq")
    assert (tmp_path / "out.ggsq").read_bytes() == raw
    assert max(sizes) <= largest < len(raw) / 10


def test_rebuild_into_refuses_a_buffer_of_another_size(tmp_path):
    write_session(SyntheticContext().state(40), tmp_path / "s.dkv", "raw").close()
    with DkvSession(tmp_path / "s.dkv") as session:
        size = plan_rebuild(session).size
        with pytest.raises(Exception, match=f"{size} bytes"):
            rebuild_into(session, np.empty(size - 1, np.uint8))
