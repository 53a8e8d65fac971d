"""GPU kernels (runtime/kernels) against the Numba reference codecs: bit for bit, encode and decode.

Marked ``gpu``: skipped with the reason when no GPU (or no nvcc) is here. With
``DELTAKV_GPU_BACKEND=emulator`` the same tests run the same kernel source compiled for the CPU with a
warp emulator (small sizes), which checks the kernel logic on machines without a GPU.

Known, documented deviation: NaN payloads. A GPU's arithmetic returns its canonical NaN where x86
propagates the operand's payload and sign, so when a (hostile) stream makes NaN values, the f32
outputs differ in the NaN bits and f16/bf16 outputs may differ in the NaN's sign; the positions of
NaNs agree. Encoders never produce such streams (they reject non-finite input).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from deltakv_format import reference
from deltakv_format.codecs import BITS_DTYPE, Codec, get_codec
from deltakv_format.constants import GGMLType

from .test_vectors import load as load_vector

pytestmark = pytest.mark.gpu

gpu = pytest.importorskip("deltakv_runtime.gpu", reason="deltakv_runtime is not importable")

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "spec" / "vectors"
FIXTURES = ROOT / "fixtures"

_REASON = gpu.unavailable_reason()
if _REASON is not None:
    pytest.skip(f"GPU kernels cannot run here: {_REASON}", allow_module_level=True)

BACKEND = gpu.default_backend()
EMULATED = BACKEND == "emulator"
KERNELS = gpu.load()

FLOATS = [GGMLType.F16, GGMLType.BF16, GGMLType.F32]
F16, BF16, F32 = GGMLType.F16, GGMLType.BF16, GGMLType.F32

# (codec, keyframe_interval, rotation)
CODECS = [
    ("f16", None, None),
    ("q8_0", None, None),
    ("q4_0", None, None),
    ("delta-q4_0", 32, 0),
    ("delta-q4_0", 7, 64),
    ("dkv-q4", 32, 64),
    ("dkv-q4", 16, 16),
    ("dkv-q4", 5, 256),
    ("dkv-q4", 1, 64),
    ("dkv-q4", 9, 0),
]


@pytest.fixture(params=[8, 16], ids=["vpl8", "vpl16"])
def vpl(request):
    """Both decoder layouts (values per thread) must give the same bytes."""
    KERNELS.set_option(b"decode_vpl", request.param)
    yield request.param
    KERNELS.set_option(b"decode_vpl", 8)


def codec_of(name, interval, rotation) -> Codec:
    return get_codec(name, keyframe_interval=interval, rotation=rotation)


def as_bits(values: np.ndarray, ggml_type) -> np.ndarray:
    values = np.asarray(values, np.float32)
    if ggml_type == F16:
        return values.astype(np.float16).view(np.uint16)
    if ggml_type == BF16:
        return (values.view(np.uint32) >> 16).astype(np.uint16)
    return values.view(np.uint32).copy()


def kv_like(rng, n_rows, n_values, ggml_type, edge=False):
    """K/V-like rows: per-channel offsets and outlier channels, a random walk over tokens, noise."""
    base = rng.standard_normal(n_values).astype(np.float32) * 2
    base[rng.random(n_values) < 0.05] *= 20
    walk = np.cumsum(rng.standard_normal((n_rows, n_values)).astype(np.float32) * 0.2, axis=0)
    v = (base + walk + rng.standard_normal((n_rows, n_values)).astype(np.float32) * 0.3).astype(np.float32)
    if edge and n_rows > 4:
        v[1] = 0.0  # all-zero rows: amax == 0 paths
        v[2, : n_values // 2] = v[1, : n_values // 2]  # repeated row halves: zero residuals
        v[3] = rng.choice([6e-8, -6e-8, 1e-5, 60000.0, -60000.0, 65504.0, 0.0], n_values).astype(np.float32)
        v[4] = v[3] * np.float32(-1)
        if ggml_type == F32:
            v[min(5, n_rows - 1)] = rng.standard_normal(n_values).astype(np.float32) * 1e-30  # f32 subnormal range
    return as_bits(v, ggml_type)


def assert_parts_equal(got: dict, want: dict):
    assert set(got) == set(want), (sorted(got), sorted(want))
    for role in want:
        g, w = np.ascontiguousarray(got[role]), np.ascontiguousarray(want[role])
        assert g.shape == w.shape and g.dtype == w.dtype, (role, g.shape, w.shape, g.dtype, w.dtype)
        if not np.array_equal(g, w):
            diff = np.argwhere(g != w)
            pytest.fail(f"part {role}: {len(diff)} of {g.size} elements differ, first at {diff[:4].tolist()}")


def assert_bits_equal(got: np.ndarray, want: np.ndarray):
    assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape, got.dtype, want.dtype)
    if not np.array_equal(got, want):
        diff = np.argwhere(got != want)
        r, c = diff[0]
        pytest.fail(f"{len(diff)} of {got.size} values differ; first at row {r}, value {c}: "
                    f"gpu 0x{int(got[r, c]):x}, reference 0x{int(want[r, c]):x}")


def check_codec(name, interval, rotation, rows, ggml_type, ranges=()):
    codec = codec_of(name, interval, rotation)
    n_rows, n_values = rows.shape
    want = codec.encode(rows, ggml_type)
    got = gpu.encode(codec, rows, ggml_type)
    assert_parts_equal(got, want)
    for lo, hi in [(0, n_rows), *ranges]:
        ref = codec.decode(want, ggml_type, n_values, lo, hi)
        out = gpu.decode(codec, want, ggml_type, n_values, lo, hi)
        assert_bits_equal(out, ref)


# ---- golden vectors -------------------------------------------------------------------------


def _vector_names():
    manifest = VECTORS / "MANIFEST"
    if manifest.exists():
        return manifest.read_text().split()
    return sorted(p.name for p in VECTORS.glob("*.json"))


def _byte_rows(a: np.ndarray) -> np.ndarray:
    """A part's bytes, one row per part row (an empty part, e.g. no sink rows, stays empty)."""
    a = np.ascontiguousarray(a).view(np.uint8)
    return a.reshape(a.shape[0], -1) if a.size else a.reshape(a.shape[0] if a.ndim else 0, 0)


@pytest.mark.parametrize("name", _vector_names() or ["(no vectors)"])
def test_golden_vector(name, vpl):
    if not (VECTORS / name).exists():
        pytest.skip("spec/vectors holds no vectors")
    v, ggml_type, rows, parts, decoded = load_vector(name)
    cfg = v["codec"]
    if cfg["codec"] == "raw":
        pytest.skip("raw is a byte copy; no kernel")
    codec = Codec.from_config(cfg)
    context = None
    if codec.takes_context:  # format v2 vectors record their cells' positions and first row
        context = TrackContext(positions=np.asarray(v.get("positions") or np.arange(v["rows"]), np.int32),
                               first_row=int(v.get("first_row", 0)))
    got = gpu.encode(codec, rows, ggml_type, context=context)
    assert_parts_equal({k: _byte_rows(a) for k, a in got.items()}, {k: _byte_rows(a) for k, a in parts.items()})
    n = v["rows"]
    for lo, hi in [(0, n), (0, 1), (1, n), (n // 2, n), (n - 1, n)]:
        out = gpu.decode(codec, parts, ggml_type, v["values_per_row"], lo, hi, context=context)
        assert out.tobytes() == decoded[lo:hi].tobytes(), (lo, hi)


# ---- random data ----------------------------------------------------------------------------


@pytest.mark.parametrize("ggml_type", FLOATS, ids=lambda t: GGMLType(t).name)
@pytest.mark.parametrize("name,interval,rotation", CODECS, ids=lambda x: str(x))
def test_random_parity(name, interval, rotation, ggml_type, vpl):
    rng = np.random.default_rng(hash((name, interval, rotation, int(ggml_type))) % 2**32)
    n_values = 256 if rotation == 256 else 192  # 192: SmolLM2's 3 KV heads x 64, not a multiple of 256
    n_rows = 41 if EMULATED else 301
    rows = kv_like(rng, n_rows, n_values, ggml_type, edge=True)
    check_codec(name, interval, rotation, rows, ggml_type, ranges=[(0, 1), (3, 17), (n_rows - 5, n_rows), (13, 14)])


@pytest.mark.parametrize("ggml_type", [F16, F32], ids=lambda t: GGMLType(t).name)
@pytest.mark.parametrize("rotation", [0, 64])
def test_scale_search_every_path(rotation, ggml_type):
    """dkv-q4's encoder skips scale candidates that provably cannot win and clamps that no code can
    reach, and falls back to the plain 7-candidate search when a block's scales are f16-subnormal
    or saturated: blocks of magnitudes 1e-9 .. 6e4 (and slowly drifting rows, so that residuals are
    tiny too) drive every path; the bytes must still be the reference's."""
    rng = np.random.default_rng(1234 + rotation + int(ggml_type))
    n_rows, n_values = 24, 512
    mags = np.float32(10.0) ** rng.uniform(-9, 4.5, n_values // 32).astype(np.float32)
    if ggml_type == F16:
        mags = np.maximum(mags, np.float32(3e-6))
    cols = np.repeat(mags, 32)
    drift = np.cumsum(rng.standard_normal((n_rows, n_values)).astype(np.float32), axis=0)
    drift *= np.float32(1e-4) ** rng.integers(0, 3, (n_rows, 1)).astype(np.float32)
    v = (rng.standard_normal(n_values).astype(np.float32) + drift) * cols
    v = np.clip(v, -65504, 65504).astype(np.float32)
    v[:, :32] *= np.float32(0.0)  # an all-zero block
    rows = as_bits(v, ggml_type)
    for interval in (1, 8):
        check_codec("dkv-q4", interval, rotation, rows, ggml_type, ranges=[(0, n_rows)])


SHAPES = [(1, 32), (2, 64), (33, 96), (64, 128), (70, 512), (129, 1024)]


@pytest.mark.parametrize("n_rows,n_values", SHAPES, ids=lambda x: str(x))
@pytest.mark.parametrize("name,interval,rotation", [
    ("delta-q4_0", 4, 0), ("delta-q4_0", 32, 16), ("dkv-q4", 32, 64), ("dkv-q4", 3, 16), ("dkv-q4", 64, 0),
    ("dkv-q4", 8, 256), ("q4_0", None, None), ("q8_0", None, None), ("f16", None, None)])
def test_shapes(name, interval, rotation, n_rows, n_values, vpl):
    if rotation and n_values % rotation:
        pytest.skip("rotation does not divide the row")
    if EMULATED and n_rows * n_values > 40000:
        pytest.skip("too large for the emulator")
    rng = np.random.default_rng(n_rows * 7919 + n_values)
    for ggml_type in (F16, F32):
        rows = kv_like(rng, n_rows, n_values, ggml_type)
        lo = int(rng.integers(0, n_rows))
        hi = int(rng.integers(lo, n_rows + 1))
        check_codec(name, interval, rotation, rows, ggml_type, ranges=[(lo, hi)])


@pytest.mark.skipif(EMULATED, reason="large problem: real GPU only")
@pytest.mark.parametrize("name,interval,rotation", [("dkv-q4", 32, 64), ("delta-q4_0", 32, 0), ("dkv-q4", 128, 256)])
def test_large_multi_block_grids(name, interval, rotation, vpl):
    """Many thread blocks and chunks (one layer of a 4k-token 8B-model cache, K)."""
    rng = np.random.default_rng(123)
    rows = kv_like(rng, 4096 + 17, 1024, F16)
    check_codec(name, interval, rotation, rows, F16, ranges=[(1000, 3001), (4096, 4113)])


def test_matches_numpy_reference_decoder(vpl):
    """The independent numpy decoder (reference.py) agrees too."""
    rng = np.random.default_rng(5)
    for name, interval, rotation in [("delta-q4_0", 8, 0), ("dkv-q4", 8, 64), ("q4_0", None, None), ("q8_0", None, None)]:
        for ggml_type in FLOATS:
            rows = kv_like(rng, 37, 128, ggml_type)
            codec = codec_of(name, interval, rotation)
            parts = codec.encode(rows, ggml_type)
            ref = reference.decode_parts(name, parts, ggml_type, interval or 1, rotation or 0)
            out = gpu.decode(codec, parts, ggml_type, 128, 0, 37)
            assert_bits_equal(out, np.ascontiguousarray(ref))


# ---- hostile streams: any bytes decode like the reference (NaN payloads aside) -------------------


def _nan_mask(bits, ggml_type):
    if ggml_type == F32:
        return np.isnan(bits.view(np.float32))
    if ggml_type == F16:
        return ((bits & 0x7C00) == 0x7C00) & ((bits & 0x03FF) != 0)
    return ((bits & 0x7F80) == 0x7F80) & ((bits & 0x007F) != 0)


@pytest.mark.parametrize("ggml_type", FLOATS, ids=lambda t: GGMLType(t).name)
@pytest.mark.parametrize("name,interval,rotation", [("q4_0", None, None), ("q8_0", None, None), ("f16", None, None),
                                                     ("delta-q4_0", 8, 0), ("dkv-q4", 8, 64), ("dkv-q4", 5, 16)])
def test_random_bytes_decode(name, interval, rotation, ggml_type, vpl):
    rng = np.random.default_rng(99)
    n_rows, n_values = 23, 128
    codec = codec_of(name, interval, rotation)
    template = codec.encode(kv_like(rng, n_rows, n_values, ggml_type), ggml_type)
    parts = {}
    for role, a in template.items():
        raw = rng.integers(0, 256, a.view(np.uint8).size, dtype=np.uint8)  # any scale: huge, inf, NaN
        parts[role] = raw.view(a.dtype).reshape(a.shape)
    ref = codec.decode(parts, ggml_type, n_values, 0, n_rows)
    out = gpu.decode(codec, parts, ggml_type, n_values, 0, n_rows)
    nan_ref, nan_out = _nan_mask(ref, ggml_type), _nan_mask(out, ggml_type)
    assert np.array_equal(nan_ref, nan_out), "NaN positions differ"
    assert_bits_equal(np.where(nan_ref, 0, out).astype(out.dtype), np.where(nan_ref, 0, ref).astype(ref.dtype))


# ---- real K/V from the fixtures ---------------------------------------------------------------


def _fixture_tracks():
    try:
        from deltakv_format.llama_state import parse_state
    except Exception as e:  # noqa: BLE001 - the parser is another module's business
        return [], f"deltakv_format.llama_state is not importable: {e}"
    files = sorted(p for p in FIXTURES.glob("*") if p.suffix in (".bin", ".state", ".seqstate", ".ggsn", ".ggsq"))
    if not files:
        return [], "no llama.cpp state fixtures in fixtures/"
    tracks = []
    for path in files:
        try:
            state = parse_state(path.read_bytes())
        except Exception:  # noqa: BLE001
            continue
        for si, sec in enumerate(state.kv_sections):
            for st in sec.streams:
                for role, tensors in (("k", st.k), ("v", st.v)):
                    for li, t in enumerate(tensors):
                        if t.is_float and t.cell_count > 0 and t.n_values % 32 == 0:
                            tracks.append((f"{path.name}:{si}:{role}{li}", t.ggml_type, np.ascontiguousarray(t.rows())))
    if not tracks:
        return [], "no float K/V tensors in the fixtures"
    return tracks, None


@pytest.mark.parametrize("name,interval,rotation", [("f16", None, None), ("q8_0", None, None), ("q4_0", None, None),
                                                     ("delta-q4_0", 8, 0), ("dkv-q4", 32, 64), ("dkv-q4", 4, 16)])
def test_real_kv_fixtures(name, interval, rotation, vpl):
    tracks, reason = _fixture_tracks()
    if not tracks:
        pytest.skip(reason)
    checked = 0
    for label, ggml_type, rows in tracks[: (6 if EMULATED else None)]:
        codec = codec_of(name, interval, rotation)
        if not codec.accepts(ggml_type, rows.shape[1]):
            continue
        try:
            check_codec(name, interval, rotation, rows, ggml_type, ranges=[(1, rows.shape[0])])
        except AssertionError as e:
            raise AssertionError(f"{label}: {e}") from e
        checked += 1
    assert checked > 0


# ---- ABI behaviour ------------------------------------------------------------------------------


def test_errors_are_reported_not_aborted():
    k = KERNELS
    with pytest.raises(gpu.GPUError, match="multiple of 32"):
        k.decode_q4_0(None, 1, 33, 0, None, None)
    with pytest.raises(gpu.GPUError, match="rotation"):
        k.decode_delta(None, None, None, 0, 4, 64, 2, 48, 0, 0, 4, None, None)
    with pytest.raises(gpu.GPUError, match="row_lo"):
        k.decode_delta(None, None, None, 0, 4, 64, 2, 0, 0, 3, 2, None, None)
    p = k.malloc(1024)
    try:
        with pytest.raises(gpu.GPUError, match="aligned"):
            k.decode_q4_0(p, 1, 32, 0, p + 2, None)
    finally:
        k.free(p)


def test_find_nonfinite():
    import ctypes

    rows = kv_like(np.random.default_rng(1), 8, 64, F16)
    rows[5, 7] = 0x7C00
    k = KERNELS
    p = k.malloc(rows.nbytes)
    try:
        k.memcpy_h2d(p, rows.ctypes.data, rows.nbytes)
        first = ctypes.c_int64()
        k.find_nonfinite(p, 0, rows.size, ctypes.byref(first))
        assert first.value == 5 * 64 + 7
    finally:
        k.free(p)


def test_accelerated_session_write_and_read_give_the_cpu_bytes(tmp_path):
    """The runtime routes codecs to the GPU when one is present: the .dkv bytes and the decoded
    state must be those of the CPU path."""
    reason = gpu.unavailable_reason()
    if reason is not None:
        pytest.skip(f"GPU kernels unavailable: {reason}")
    from deltakv_format.codecs import use_accelerator
    from deltakv_format.session import DkvSession, write_session

    from .synthetic import SyntheticContext, payloads

    state = SyntheticContext(n_max=300, n_layer=2, n_values=256).state(300)
    write_session(state, tmp_path / "cpu.dkv", "dkv-q4").close()
    previous = use_accelerator(gpu)
    try:
        write_session(state, tmp_path / "gpu.dkv", "dkv-q4").close()
        with DkvSession(tmp_path / "gpu.dkv") as s:
            on_gpu = payloads(s.to_llama_state())
    finally:
        use_accelerator(previous)
    assert (tmp_path / "gpu.dkv").read_bytes() == (tmp_path / "cpu.dkv").read_bytes()
    with DkvSession(tmp_path / "cpu.dkv") as s:
        assert payloads(s.to_llama_state()) == on_gpu


# ---- dkv-ans: decode on the GPU (one thread per rANS stream), bit for bit with ans.decode_streams ----

from deltakv_format.codecs.dkv_ans import TrackContext, parse_head  # noqa: E402
from deltakv_format.codecs.dkv_ans_codec import DkvAnsCodec  # noqa: E402
from deltakv_format.errors import CorruptError  # noqa: E402

ANS_ROPES = [("none", 0, 0, 0.0), ("norm", 64, 64, 100000.0), ("neox", 64, 128, 500000.0), ("neox", 32, 64, 10000.0)]


def ans_codec(kind, n_rot, head_dim, base, stream_rows, **kw) -> DkvAnsCodec:
    codec = get_codec("dkv-ans", stream_rows=stream_rows, **kw)
    if kind == "none":
        return codec
    theta = float(np.float32(base) ** np.float32(-2.0 / n_rot))
    return DkvAnsCodec.with_rope(codec, kind, n_rot, head_dim, theta)


def k_like(rng, n_rows, n_values, ggml_type, positions, head_dim, n_rot, base, outliers=False):
    """Key-like rows: per-channel means and spreads (some channels wide), rotated by the positions."""
    mean = rng.standard_normal(n_values) * 2
    spread = np.exp(rng.standard_normal(n_values)) * 0.3
    spread[rng.random(n_values) < 0.05] *= 30  # wide channels: class shifts > 0
    v = mean + rng.standard_normal((n_rows, n_values)) * spread
    if outliers:  # a narrow column with rare large outliers: escapes
        c = n_values // 3
        v[:, c] = mean[c] + rng.standard_normal(n_rows) * 0.01
        hit = rng.choice(np.arange(4, n_rows), max(1, n_rows // 40), replace=False)
        v[hit, c] += rng.choice([-1000.0, 1000.0], hit.size)
    if n_rot:
        inv = np.float64(base) ** (-np.arange(0, n_rot, 2) / n_rot)
        ang = positions[:, None].astype(np.float64) * inv[None, :]
        for h in range(n_values // head_dim):
            a = v[:, h * head_dim: h * head_dim + n_rot // 2].copy()
            b = v[:, h * head_dim + n_rot // 2: h * head_dim + n_rot].copy()
            v[:, h * head_dim: h * head_dim + n_rot // 2] = a * np.cos(ang) - b * np.sin(ang)
            v[:, h * head_dim + n_rot // 2: h * head_dim + n_rot] = a * np.sin(ang) + b * np.cos(ang)
    return as_bits(np.clip(v, -60000, 60000).astype(np.float32), ggml_type)


def check_ans(codec, rows, ggml_type, positions, ranges=(), first_row=0):
    n_rows, n_values = rows.shape
    ctx = TrackContext(positions=positions, first_row=first_row)
    parts = codec.encode(rows, ggml_type, "test", ctx)
    assert_parts_equal(gpu.encode(codec, rows, ggml_type, context=ctx), parts)  # CPU encoder behind the registry
    for lo, hi in [(0, n_rows), *ranges]:
        ref = codec.decode(parts, ggml_type, n_values, lo, hi, None, ctx)
        out = gpu.decode(codec, parts, ggml_type, n_values, lo, hi, context=ctx)
        try:
            assert_bits_equal(out, ref)
        except BaseException as e:
            raise AssertionError(f"rows [{lo}, {hi}): {e}") from e
    return parts


@pytest.mark.parametrize("stream_rows", [1, 7, 32])
@pytest.mark.parametrize("rope", ANS_ROPES, ids=lambda r: f"{r[0]}{r[1]}")
@pytest.mark.parametrize("ggml_type", FLOATS, ids=lambda t: GGMLType(t).name)
def test_ans_random_parity(ggml_type, rope, stream_rows):
    kind, n_rot, head_dim, base = rope
    rng = np.random.default_rng(hash((kind, n_rot, stream_rows, int(ggml_type))) % 2**32)
    n_rows = 75 if EMULATED else 1000
    n_values = 256
    positions = (np.arange(n_rows) * 2 + int(rng.integers(0, 50000))).astype(np.int32)
    rows = k_like(rng, n_rows, n_values, ggml_type, positions, head_dim, n_rot, base, outliers=True)
    codec = ans_codec(kind, n_rot, head_dim, base, stream_rows)
    parts = check_ans(codec, rows, ggml_type, positions,
                      ranges=[(0, 1), (0, 4), (3, 17), (4, 5), (n_rows - 5, n_rows), (13, 14), (n_rows // 2, n_rows)])
    head = parse_head(parts["head"], n_values, None, stream_rows, parts["data"].size // 2, "test")
    assert parts["sink"].shape[0] == 4 and int(head.shifts.max()) > 0, "expected sinks and classes with shifts"


def test_ans_escapes_are_exercised():
    """The outlier column makes escape symbols (31): decoded values far beyond the direct range."""
    rng = np.random.default_rng(7)
    n_rows, n_values = 64, 96
    positions = np.arange(n_rows, dtype=np.int32)
    rows = k_like(rng, n_rows, n_values, F32, positions, 0, 0, 0.0, outliers=True)
    codec = ans_codec("none", 0, 0, 0.0, 16)
    parts = check_ans(codec, rows, F32, positions, ranges=[(5, 40)])
    head = parse_head(parts["head"], n_values, None, 16, parts["data"].size // 2, "test")
    c = n_values // 3
    j = int(head.classes[c])
    # the outlier column leaves the 31 direct symbols: by escapes, or by low bits sent as they are
    assert head.freqs[j, 31] > 0 or head.shifts[j] > 0, "the outlier column's class has neither escapes nor a shift"


@pytest.mark.parametrize("ggml_type", [F16, BF16], ids=lambda t: GGMLType(t).name)
def test_ans_large_positions_and_odd_widths(ggml_type):
    """Positions up to 2^31 - 1 (range reduction of large angles), widths not multiples of 32, a
    segment that does not start at stream row 0 (no sinks), stream_rows 5, freq_scale != 1."""
    rng = np.random.default_rng(11)
    n_rows = 50 if EMULATED else 600
    for kind, n_rot, head_dim, n_values in (("norm", 6, 10, 30), ("neox", 4, 6, 42), ("none", 0, 0, 37)):
        positions = np.sort(rng.integers(0, 2**31 - 1, n_rows)).astype(np.int32)
        positions[-1] = 2**31 - 1
        rows = k_like(rng, n_rows, n_values, ggml_type, positions, head_dim or 1, n_rot, 10000.0)
        codec = get_codec("dkv-ans", stream_rows=5)
        if kind != "none":
            theta = float(np.float32(10000.0) ** np.float32(-2.0 / n_rot))
            codec = DkvAnsCodec.with_rope(codec, kind, n_rot, head_dim, theta, freq_scale=0.25)
        check_ans(codec, rows, ggml_type, positions, ranges=[(7, 23), (n_rows - 1, n_rows)], first_row=100)


def test_ans_corrupt_streams_raise_like_the_cpu():
    rng = np.random.default_rng(3)
    n_rows, n_values = 40, 64
    positions = np.arange(n_rows, dtype=np.int32)
    rows = k_like(rng, n_rows, n_values, F16, positions, 64, 64, 10000.0)
    codec = ans_codec("norm", 64, 64, 10000.0, 8)
    ctx = TrackContext(positions=positions)
    parts = codec.encode(rows, F16, "test", ctx)
    head = parse_head(parts["head"], n_values, None, 8, parts["data"].size // 2, "test")
    words = parts["data"].view("<u2")
    cases = []
    for s in (1, 3):  # flip a word in the middle of stream s
        w = words.copy()
        mid = (int(head.starts[s]) + int(head.starts[s + 1])) // 2
        w[mid] ^= 0x5A5A
        cases.append(w)
    w = words.copy()
    w[-1] ^= 0x0001  # the last stream's final state
    cases.append(w)
    rng2 = np.random.default_rng(4)
    cases.append(rng2.integers(0, 2**16, words.size, dtype=np.uint16))  # random words
    raised = 0
    for w in cases:
        damaged = dict(parts, data=w.view(np.uint8).copy())
        for lo, hi in ((0, n_rows), (10, 30), (0, 9)):
            try:
                ref = codec.decode(damaged, F16, n_values, lo, hi, None, ctx)
            except CorruptError as cpu_err:
                raised += 1
                with pytest.raises(CorruptError) as gpu_err:
                    gpu.decode(codec, damaged, F16, n_values, lo, hi, context=ctx)
                assert str(gpu_err.value) == str(cpu_err), (lo, hi)
            else:  # damage that the streams read here cannot see: the same rows
                assert_bits_equal(gpu.decode(codec, damaged, F16, n_values, lo, hi, context=ctx), ref)
    assert raised >= 4


def _fixture_kv_with_positions():
    from deltakv_format.llama_state import parse_state
    from deltakv_format.session_cells import cell_positions

    out = []
    for path in sorted(FIXTURES.glob("*.ggsq")):
        try:
            state = parse_state(path.read_bytes())
        except Exception:  # noqa: BLE001
            continue
        rope = ("norm", 64, 64, 100000.0) if path.name.startswith("smollm2") else ("neox", 256, 256, 1e6)
        for si, sec in enumerate(state.kv_sections):
            for st in sec.streams:
                if st.cell_count == 0:
                    continue
                positions = cell_positions(st.cells, st.cell_count, st.cell_ext_bytes)
                for role, tensors in (("k", st.k), ("v", st.v)):
                    for li, t in enumerate(tensors):
                        if t.is_float and t.cell_count > 0:
                            out.append((f"{path.name}:{si}:{role}{li}", role, rope, t.ggml_type,
                                        np.ascontiguousarray(t.rows()), positions[:t.cell_count]))
    return out


@pytest.mark.parametrize("stream_rows", [7, 32])
def test_ans_real_kv_fixtures(stream_rows):
    """Real K (rotary undone with the model's parameters) and V of the fixtures' states."""
    tracks = _fixture_kv_with_positions()
    if not tracks:
        pytest.skip("no float K/V tensors with cells in fixtures/*.ggsq")
    checked = 0
    for label, role, rope, ggml_type, rows, positions in tracks[: (8 if EMULATED else None)]:
        kind, n_rot, head_dim, base = rope if role == "k" else ("none", 0, 0, 0.0)
        codec = ans_codec(kind, n_rot, head_dim, base, stream_rows)
        if not codec.accepts(ggml_type, rows.shape[1]):
            continue
        try:
            check_ans(codec, rows, ggml_type, positions, ranges=[(1, rows.shape[0]), (5, min(rows.shape[0], 40))])
        except AssertionError as e:
            raise AssertionError(f"{label}: {e}") from e
        checked += 1
    assert checked > 0


def test_ans_routes_through_codec_decode_with_the_accelerator():
    """Codec.decode with the accelerator on goes to the GPU kernels (context passed positionally)."""
    from deltakv_format.codecs import use_accelerator

    rng = np.random.default_rng(21)
    positions = np.arange(30, dtype=np.int32) + 1000
    rows = k_like(rng, 30, 128, F16, positions, 128, 128, 500000.0)
    codec = ans_codec("norm", 128, 128, 500000.0, 4)
    ctx = TrackContext(positions=positions)
    parts = codec.encode(rows, F16, "t", ctx)
    want = codec.decode(parts, F16, 128, 2, 30, None, ctx)
    calls = []
    real = gpu.CODEC_KERNELS.kernels_for(codec).decode

    class Spy:
        def kernels_for(self, c):
            k = gpu.kernels_for(c)
            if k is None or type(c) is not DkvAnsCodec:
                return k

            class K:
                encode = k.encode

                @staticmethod
                def decode(*a, **kw):
                    calls.append(a[-1])
                    return real(*a, **kw)

            return K

    previous = use_accelerator(Spy())
    try:
        got = codec.decode(parts, F16, 128, 2, 30, None, ctx)
    finally:
        use_accelerator(previous)
    assert calls and calls[0] is ctx
    assert_bits_equal(got, want)


@pytest.mark.parametrize("name", ["f16", "q8_0", "q4_0", "dkv-q4", "dkv-ans"])
def test_accelerated_decode_into_a_destination(name):
    """Codec.decode(out=...) with the GPU on: the rows land in the caller's array (copied back straight
    into a C-contiguous one, through a scratch array into a strided one), bit for bit the CPU's, and
    nothing around them is touched."""
    from deltakv_format.codecs import use_accelerator

    rng = np.random.default_rng(5)
    n_rows, n_values = 40, 128
    positions = np.arange(n_rows, dtype=np.int32) + 7
    if name == "dkv-ans":
        codec, ctx = ans_codec("neox", 64, 128, 10000.0, 8), TrackContext(positions=positions)
        rows = k_like(rng, n_rows, n_values, F16, positions, 128, 64, 10000.0)
    else:
        codec, ctx = get_codec(name), None
        rows = kv_like(rng, n_rows, n_values, F16)
    extra = (ctx,) if codec.takes_context else ()
    parts = codec.encode(rows, F16, "t", *extra)
    lo, hi = 3, 37
    want = codec.decode(parts, F16, n_values, lo, hi, None, *extra)
    previous = use_accelerator(gpu)
    try:
        whole = np.full((hi - lo + 4, n_values), 0xABCD, np.uint16)
        got = codec.decode(parts, F16, n_values, lo, hi, whole[2:-2], *extra)
        strided = np.full((2 * (hi - lo), n_values), 0xABCD, np.uint16)
        codec.decode(parts, F16, n_values, lo, hi, strided[::2], *extra)
    finally:
        use_accelerator(previous)
    assert np.shares_memory(got, whole)
    assert_bits_equal(whole[2:-2], want)
    assert (whole[:2] == 0xABCD).all() and (whole[-2:] == 0xABCD).all()
    assert_bits_equal(strided[::2], want)
    assert (strided[1::2] == 0xABCD).all()
