"""A few seconds of the fuzz targets of fuzz/ (fixed seeds, fixed number of inputs) so that CI runs
the same contract the long atheris runs check: nothing but a DeltaKVError escapes the .dkv reader
or the llama.cpp state parser, allocation stays within fuzz.common.alloc_bound, and whatever
parses writes back byte-identical. Uses fuzz/common.py's own mutators (atheris is not needed)."""

from __future__ import annotations

import random

import numpy as np

import pytest

from deltakv_format.llama_state import parse_state, write_state
from fuzz.common import (
    STATE_SEEDS,
    ContractViolation,
    DkvTarget,
    StateTarget,
    _write_small_reserve,
    mutate_dkv,
    mutate_state,
    shrink_state,
    synthetic_states,
)

N_INPUTS = 250


def _fixture_states():
    names = ("smollm2_v10_2streams_fa1.state", "gemma3_v11_fa0.ggsq", "smollm2_v9_fa0.ggsn", "smollm2_v10_fa0.ggsq")
    return {p.name: shrink_state(parse_state(p.read_bytes()), 6, 2) for p in STATE_SEEDS if p.name in names}


def _run(target, corpus, mutate, seed):
    rnd = random.Random(seed)
    for data in corpus:
        target(data)  # the seeds themselves satisfy the contract
    pool = list(corpus)
    max_size = 2 * max(len(d) for d in corpus)
    for i in range(N_INPUTS):
        data = rnd.choice(pool)
        for _ in range(rnd.choice((1, 1, 2, 3))):
            data = mutate(data, max_size, rnd.getrandbits(32))
        try:
            target(data)
        except ContractViolation as v:
            pytest.fail(f"input {i} (seed {seed}): {v} [{v.key()}]")
        if rnd.random() < 0.2:
            pool.append(data)  # mutations of mutations reach deeper


def test_dkv_reader_contract(tmp_path):
    corpus = []
    states = {**synthetic_states(), **_fixture_states()}
    for i, (name, state) in enumerate(states.items()):
        p = tmp_path / f"{i}.dkv"
        _write_small_reserve(state, p, ("raw", "f16")[i % 2] if state.kv_sections[0].streams[0].k[0].ggml_type == 1 else "raw")
        corpus.append(p.read_bytes())
        p.unlink()
    target = DkvTarget(tmp_path)
    try:
        _run(target, corpus, mutate_dkv, seed=20261129)
    finally:
        target.cleanup()


def test_state_parser_contract(tmp_path):
    states = {**synthetic_states(), **_fixture_states()}
    corpus = [write_state(s) for s in states.values()]
    target = StateTarget(tmp_path)
    try:
        _run(target, corpus, mutate_state, seed=11434)
    finally:
        target.cleanup()


def test_dkv_ans_reader_contract(tmp_path):
    """Format v2: dkv-ans sessions (K with and without rotary parameters, appended segments) under
    the mutators, including hostile heads and deltakv.track.params (mutate_dkv_ans_parts)."""
    from deltakv_format.model_info import RopeParams
    from deltakv_format.session import append_session, write_session

    from .synthetic import SyntheticContext

    corpus = []
    for i, (name, state) in enumerate(_fixture_states().items()):
        if state.kv_sections[0].streams[0].k[0].ggml_type != 1:
            continue
        rope = [[RopeParams("norm", 64, 64, float(np.float32(1e5) ** np.float32(-2 / 64)), 1.0)] * 2] * 2
        p = tmp_path / f"{i}.dkv"
        write_session(state, p, "dkv-ans", rope=rope if i % 2 else None)
        corpus.append(p.read_bytes())
    ctx = SyntheticContext(n_max=60, n_layer=1, n_values=64, seed=5)
    p = tmp_path / "append.dkv"
    write_session(ctx.state(20), p, "dkv-ans")
    append_session(p, ctx.state(45))
    corpus.append(p.read_bytes())
    target = DkvTarget(tmp_path)
    try:
        _run(target, corpus, mutate_dkv, seed=20261202)
    finally:
        target.cleanup()
