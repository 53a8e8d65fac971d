"""convert writes track by track (container_spool.TensorSpool): the same bytes as the writer that
holds the whole session, in memory that does not grow with the number of tracks.

The reference is ``session_bytes`` (write_container_to: every tensor in memory, header first),
whose bytes are write_container's (test_container). The states are real: the fixtures (SmolLM2,
Gemma 3) and one SmolLM2 state saved by llama-cpp-python here.
"""

from __future__ import annotations

import ctypes
import tracemalloc
from dataclasses import replace
from pathlib import Path

import pytest

from deltakv_format import container_spool, operations
from deltakv_format.llama_state import parse_state
from deltakv_format.model_info import ModelInfo
from deltakv_format.session_writer import rope_for_state, session_bytes, write_session
from deltakv_format.state_model import KVCacheSection
from deltakv_tools import models

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
STATES = ["smollm2_v10_fa1.ggsq", "smollm2_v9_fa0.ggsn", "smollm2_v11_q8_0_fa1.ggsq", "smollm2_v10_2streams_fa1.state",
          "gemma3_v10_fa0.ggsq", "gemma3_v11_fa0.ggsq", "gemma3_v10_fa1.state"]
VARIANTS = [dict(codec="raw"), dict(codec="q8_0"), dict(codec="delta-q4_0", keyframe_interval=16),
            dict(codec="dkv-ans", model=True), dict(codec="dkv-ans", model=True, transcode=True),
            dict(codec="dkv-ans", k_codec="q8_0", bits=3)]


def model_of(name: str) -> Path:
    return models.smollm2() if "smollm2" in name else models.gemma3_270m()


def in_memory_bytes(state_path: Path, variant: dict) -> bytes:
    """What the writer that holds every tensor writes for ``convert(state_path, **variant)``."""
    v = dict(variant)
    model = ModelInfo.from_gguf(model_of(state_path.name)) if v.pop("model", False) else None
    codec = v.pop("codec")
    keyframe_interval = v.pop("keyframe_interval", None)
    if keyframe_interval:
        from deltakv_format.codecs import get_codec

        codec = get_codec(codec, keyframe_interval=keyframe_interval)
    state = parse_state(state_path.read_bytes(), model=model)
    return session_bytes(state, codec, rope=rope_for_state(model, state), **v)


def streamed_bytes(state_path: Path, variant: dict, out: Path) -> bytes:
    v = dict(variant)
    if v.pop("model", False):
        v["model_path"] = model_of(state_path.name)
    operations.convert(state_path, out, **v)
    return out.read_bytes()


@pytest.fixture(params=["in memory", "on disk"])
def spool_mode(request, monkeypatch):
    """Both ways a spool writes: its data kept in memory (within the budget: the everyday session)
    and moved to its file (past it: budget 0 here, so that the fixtures take that path too)."""
    if request.param == "on disk":
        monkeypatch.setattr(container_spool, "MEMORY_BUDGET", 0)
    return request.param


@pytest.mark.parametrize("name", STATES)
def test_convert_is_byte_identical_to_the_in_memory_writer(name, tmp_path, spool_mode):
    for i, variant in enumerate(VARIANTS):
        got = streamed_bytes(FIXTURES / name, variant, tmp_path / f"{i}.dkv")
        assert got == in_memory_bytes(FIXTURES / name, variant), f"{name} {variant}"


@pytest.fixture(scope="module")
def fresh_smollm2_state(tmp_path_factory) -> Path:
    """A SmolLM2 sequence state of 300 tokens, saved here by llama.cpp."""
    import llama_cpp
    from llama_cpp import Llama

    path = tmp_path_factory.mktemp("state") / "smollm2-300.ggsq"
    llm = Llama(str(models.smollm2()), n_ctx=384, n_batch=128, flash_attn=True, verbose=False)
    try:
        toks = (llm.tokenize((ROOT / "README.md").read_bytes()) * 2)[:300]
        llm.eval(toks)
        arr = (llama_cpp.llama_token * len(toks))(*toks)
        assert llama_cpp.llama_state_seq_save_file(llm.ctx, str(path).encode(), 0, arr, ctypes.c_size_t(len(toks)))
    finally:
        llm.close()
    return path


def test_convert_of_a_fresh_llama_state_is_byte_identical(fresh_smollm2_state, tmp_path, spool_mode):
    for i, variant in enumerate(VARIANTS):
        got = streamed_bytes(fresh_smollm2_state, variant, tmp_path / f"{i}.dkv")
        assert got == in_memory_bytes(fresh_smollm2_state, variant), variant


def _first_layers(state, n: int):
    """``state`` with only the first ``n`` layers of each stream (a smaller session of the same rows)."""
    def cut(sec):
        if not isinstance(sec, KVCacheSection):
            return sec
        return KVCacheSection(sec.has_n_stream, [replace(st, k=st.k[:n], v=st.v[:n], n_layer=None if st.n_layer is None else min(st.n_layer, n))
                                                 for st in sec.streams])
    return replace(state, sections=[cut(s) for s in state.sections])


def _peak_traced(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("codec", ["q8_0", "dkv-ans", "delta-q4_0"])
def test_write_session_holds_one_track_at_a_time(fresh_smollm2_state, tmp_path, codec, monkeypatch):
    """Past the spool's memory budget (0 here), the peak of memory allocated while writing a file does not grow with the number of tracks
    (30 layers vs 3: the same); the in-memory writer's does (it holds every coded tensor), which
    shows that the measure sees coded data."""
    monkeypatch.setattr(container_spool, "MEMORY_BUDGET", 0)
    state = parse_state(fresh_smollm2_state.read_bytes())
    small = _first_layers(state, 3)
    assert len(state.kv_sections[0].streams[0].k) >= 30
    out = tmp_path / "s.dkv"
    streamed_small = _peak_traced(lambda: write_session(small, out, codec))
    streamed_full = _peak_traced(lambda: write_session(state, out, codec))
    held_small = _peak_traced(lambda: session_bytes(small, codec))
    held_full = _peak_traced(lambda: session_bytes(state, codec))
    assert streamed_full < 1.5 * streamed_small + 256 * 1024, (streamed_small, streamed_full)
    assert held_full > 3 * held_small, (held_small, held_full)
    spools = []
    write_session(state, out, codec, spool_seen=spools.append)
    layer = max(t.data.nbytes for sec in state.kv_sections for st in sec.streams for t in st.k + st.v)
    assert spools[0].largest_add <= 2 * layer  # what one add is given: one track's part at most


def test_a_spool_moves_to_disk_past_its_budget_and_writes_the_same_bytes(fresh_smollm2_state, tmp_path, monkeypatch):
    state = parse_state(fresh_smollm2_state.read_bytes())
    reference = session_bytes(state, "q8_0")
    seen = []
    monkeypatch.setattr(container_spool, "MEMORY_BUDGET", len(reference) // 3)  # moves part way through
    write_session(state, tmp_path / "a.dkv", "q8_0", spool_seen=seen.append)
    assert seen[0].on_disk and (tmp_path / "a.dkv").read_bytes() == reference
    monkeypatch.setattr(container_spool, "MEMORY_BUDGET", 1 << 40)
    write_session(state, tmp_path / "b.dkv", "q8_0", spool_seen=seen.append)
    assert not seen[1].on_disk and (tmp_path / "b.dkv").read_bytes() == reference
