"""dkv-ans: the independent decoder of reference.py (written from SPEC.md 6.5) agrees bit for bit with
the Numba decoder, on codec output and on hand-built streams (escapes, shifts beyond 8 bits, huge codes)."""

import re

import numpy as np
import pytest

from deltakv_format import reference
from deltakv_format.codecs import TrackContext, ans, get_codec
from deltakv_format.codecs.dkv_ans import Head, f32_bits
from deltakv_format.constants import GGMLType
from deltakv_format.errors import CorruptError

from .conftest import ROOT

TYPES = {GGMLType.F16: np.float16, GGMLType.BF16: None, GGMLType.F32: np.float32}
ROPES = {"none": {}, "norm": dict(rope=1, rope_dims=64, head_dim=64),
         "neox": dict(rope=2, rope_dims=32, head_dim=64)}


def bits_of(x, ggml_type):
    x = np.asarray(x, np.float32)
    if ggml_type == GGMLType.BF16:
        return (x.view(np.uint32) >> 16).astype(np.uint16)
    return x.astype(TYPES[ggml_type]).view(np.uint16 if ggml_type == GGMLType.F16 else np.uint32)


def codec_of(rope, stream_rows, sink_rows, theta_base=10000.0):
    params = dict(ROPES[rope])
    if params:
        params["theta_scale_f32"] = f32_bits(float(np.float32(theta_base) ** np.float32(-2.0 / params["rope_dims"])))
        params["freq_scale_f32"] = f32_bits(0.5 if rope == "neox" else 1.0)
    return get_codec("dkv-ans", stream_rows=stream_rows, sink_rows=sink_rows, **params)


def ref_decode(codec, parts, ggml_type, n_values, positions):
    params = dict(codec.extra_parameters(), n_values=n_values)
    return reference.decode_parts("dkv-ans", parts, ggml_type, params=params, positions=positions)


def compare(codec, parts, ggml_type, n_rows, n_values, positions, first_row=0):
    context = TrackContext(positions=positions, first_row=first_row)
    out = codec.decode(parts, ggml_type, n_values, 0, n_rows, context=context)
    ref = ref_decode(codec, parts, ggml_type, n_values, positions)
    assert ref.shape == out.shape and ref.tobytes() == np.ascontiguousarray(out).tobytes()
    for lo, hi in [(0, 1), (1, n_rows), (n_rows // 2, n_rows), (n_rows - 1, n_rows), (n_rows // 3, 2 * n_rows // 3 + 1)]:
        part = codec.decode(parts, ggml_type, n_values, lo, hi, context=context)
        assert np.ascontiguousarray(part).tobytes() == ref[lo:hi].tobytes(), (lo, hi)
    return ref


def kv_rows(rng, n, width, outliers=False):
    x = rng.standard_normal(width) * rng.choice([0.05, 1.0, 8.0], size=width) + np.cumsum(
        rng.standard_normal((n, width)) * 0.2, axis=0)
    x[:, :3] *= 0  # constant columns: one-symbol tables
    if outliers:  # a few huge values in quiet columns: codes far beyond the direct symbols escape
        cols = rng.choice(np.arange(3, width), size=4, replace=False)
        rows = rng.choice(n, size=4)
        x[rows, cols] = rng.choice([-1, 1], size=4) * 3000.0
    return x.astype(np.float32)


@pytest.mark.parametrize("ggml_type", list(TYPES), ids=lambda t: GGMLType(t).name)
@pytest.mark.parametrize("rope", list(ROPES))
def test_reference_agrees_on_codec_output(ggml_type, rope):
    rng = np.random.default_rng(int(ggml_type) * 7 + len(rope))
    width = 128
    for stream_rows, sink_rows, n, first_row, outliers in [(32, 4, 45, 0, False), (5, 3, 23, 0, True),
                                                           (1, 4, 6, 0, False), (7, 4, 19, 64, True)]:
        codec = codec_of(rope, stream_rows, sink_rows)
        rows = bits_of(kv_rows(rng, n, width, outliers), ggml_type)
        positions = np.sort(rng.choice(1 << int(rng.integers(6, 31)), size=n, replace=False)).astype(np.int32)
        parts = codec.encode(rows, ggml_type, context=TrackContext(positions=positions, first_row=first_row))
        assert parts["sink"].shape[0] == (min(sink_rows, n) if first_row == 0 else 0)
        ref = compare(codec, parts, ggml_type, n, width, positions, first_row)
        assert ref[:parts["sink"].shape[0]].tobytes() == rows[:parts["sink"].shape[0]].tobytes()  # sinks exact


def test_codec_output_escapes():
    """The outlier rows above leave the direct symbols: by escapes or by a class shift (the encoder's
    choice; the hand-built streams below cover escapes whatever it chooses)."""
    rng = np.random.default_rng(5)
    codec = codec_of("none", 8, 0)
    parts = codec.encode(bits_of(kv_rows(rng, 40, 64, True), GGMLType.F32), GGMLType.F32)
    head = bytes(parts["head"])
    n_classes = int.from_bytes(head[8:10], "little")
    tables = np.frombuffer(head[12 + 3 * 64:12 + 3 * 64 + 66 * n_classes], np.uint8).reshape(n_classes, 66)
    assert tables[:, 2:].copy().view("<u2")[:, ans.ESCAPE].any() or tables[:, 0].any()


def handmade(rng, n_rows, width, stream_rows, shifts, escape_rate):
    """A head and words built from chosen codes: every class shift, escapes with shifts, q up to 2^27."""
    n_classes = len(shifts)
    classes = rng.integers(0, n_classes, width).astype(np.uint8)
    k = np.asarray(shifts, np.int64)[classes]
    high = rng.integers(-15, 16, (n_rows, width))
    esc = rng.random((n_rows, width)) < escape_rate
    high[esc] = rng.choice([-1, 1], esc.sum()) * rng.integers(16, 32768, esc.sum())
    high[esc & (rng.random((n_rows, width)) < 0.2)] = -32768
    low = rng.integers(0, 1 << 30, (n_rows, width)) & ((1 << k) - 1)
    q = high * (1 << k) + low
    freqs = np.zeros((n_classes, 32), np.int64)
    for j in range(n_classes):
        counts = rng.integers(1, 50, 32) * np.where(rng.random(32) < 0.2, 40, 1)  # every symbol is used
        freqs[j] = np.maximum(counts * 4096 // counts.sum(), (counts > 0).astype(np.int64))
        freqs[j, int(np.argmax(counts))] += 4096 - freqs[j].sum()
    cum = np.zeros((n_classes, 33), np.int64)
    cum[:, 1:] = np.cumsum(freqs, 1)
    n_streams = -(-n_rows // stream_rows)
    out, lens = ans.encode_streams(q.astype(np.int32) if np.abs(q).max() < 2 ** 31 else q, classes,
                                   np.asarray(shifts, np.int64), freqs, cum, stream_rows, 0, n_streams)
    words = np.concatenate([out[i, :lens[i]] for i in range(n_streams)])
    starts = np.zeros(n_streams, np.uint32)
    starts[1:] = np.cumsum(lens[:-1])
    means = (rng.standard_normal(width) * 4).astype(np.float16).astype(np.float32)
    step = np.float32(2.0 ** rng.uniform(-14, -2))
    head = Head(n_rows, step, means, classes, np.asarray(shifts, np.uint8), freqs.astype(np.uint16), starts)
    return {"sink": np.empty((0, width), np.uint16), "head": np.frombuffer(head.pack(), np.uint8).copy(),
            "data": words.view(np.uint8).copy()}, q


@pytest.mark.parametrize("ggml_type", list(TYPES), ids=lambda t: GGMLType(t).name)
@pytest.mark.parametrize("rope", ["none", "norm", "neox"])
def test_reference_agrees_on_handmade_streams(ggml_type, rope):
    rng = np.random.default_rng(100 + int(ggml_type) + len(rope))
    for stream_rows, shifts in [(4, [0, 3, 8, 9, 12]), (16, [12, 0]), (1, [5])]:
        codec = codec_of(rope, stream_rows, 0)
        n_rows, width = 21, 128
        parts, q = handmade(rng, n_rows, width, stream_rows, shifts, 0.05)
        if ggml_type == GGMLType.F32:
            parts["sink"] = np.empty((0, width), np.uint32)
        positions = rng.integers(0, 2 ** 31 - 1, n_rows).astype(np.int32)
        compare(codec, parts, ggml_type, n_rows, width, positions)
        assert max(shifts) < 9 or np.abs(q).max() >= 1 << 24  # f32(q) rounds


def test_reference_dequantises_the_codes():
    """The reference's integers are the encoder's codes (its rANS reading is right, not just equal)."""
    rng = np.random.default_rng(3)
    parts, q = handmade(rng, 9, 32, 4, [0, 9, 12], 0.1)
    h = reference.parse_ans_head(bytes(parts["head"]), 32, 4, parts["data"].size // 2)
    words = np.frombuffer(parts["data"].tobytes(), "<u2").tolist()
    starts = h["start"] + [len(words)]
    got = []
    for t in range(len(h["start"])):
        got += reference.ans_stream_codes(words[starts[t]:starts[t + 1]], min(4, 9 - 4 * t), h["cls"], h["shift"], h["freq"])
    assert np.array_equal(np.array(got), q)


def test_damaged_streams_are_refused_by_both():
    rng = np.random.default_rng(9)
    codec = codec_of("none", 4, 0)
    parts, _ = handmade(rng, 16, 32, 4, [0, 4, 10], 0.05)
    refused = 0
    for trial in range(40):
        damaged = dict(parts, data=parts["data"].copy())
        damaged["data"][rng.integers(0, damaged["data"].size)] ^= 1 << int(rng.integers(0, 8))
        try:
            codec.decode(damaged, GGMLType.F16, 32, 0, 16)
            numba_ok = True
        except CorruptError:
            numba_ok = False
        try:
            ref_decode(codec, damaged, GGMLType.F16, 32, None)
            ref_ok = True
        except reference.AnsCorrupt:
            ref_ok = False
        assert numba_ok == ref_ok, trial
        refused += not ref_ok
    assert refused >= 20  # a flip within the raw low bits of uniform symbols can decode without a trace (CRC-32C covers it)


def test_cos_sin_agree_with_the_kernel():
    rng = np.random.default_rng(11)
    positions = np.concatenate([np.arange(300), rng.integers(0, 2 ** 31 - 1, 300), [2 ** 31 - 1]])
    thetas = np.concatenate([reference.ans_thetas(128, np.float32(10000.0) ** np.float32(-2 / 128), np.float32(1.0)),
                             rng.uniform(0, 1024, 20).astype(np.float32), [np.float32(1024.0)]]).astype(np.float32)
    table = ans.rope_table(positions.astype(np.int64), thetas)
    for r, p in enumerate(positions):
        for i, t in enumerate(thetas):
            c, s = reference.ans_cos_sin(int(p), t)
            assert (c, s) == (table[r, i, 0], table[r, i, 1]) and c.tobytes() == table[r, i, 0].tobytes()
    small = ans.rope_table(np.arange(2000, dtype=np.int64), thetas[:64])  # accurate where positions are modest
    want = np.arange(2000)[:, None] * thetas[:64].astype(np.float64)[None, :]
    assert np.abs(small[:, :, 0] - np.cos(want)).max() < 2 ** -23 and np.abs(small[:, :, 1] - np.sin(want)).max() < 2 ** -23
    th = reference.ans_thetas(64, np.float32(0.8), np.float32(0.25))
    assert np.array_equal(np.array(th, np.float32), ans.rope_thetas(64, np.float32(0.8), np.float32(0.25)))


def test_spec_constants_are_the_kernels_and_the_references():
    spec = (ROOT / "SPEC.md").read_text()
    section = spec[spec.index("### 6.5 dkv-ans"):spec.index("## 7. Reading")]
    found = dict(re.findall(r"\b([A-Z][A-Z0-9_]*)\s*=\s*(-?0x[0-9a-f]\.[0-9a-f]+p[+-]\d+)", section))
    code = {"TWO_OVER_PI": ans.TWO_OVER_PI, "PIO2_HI": ans.PIO2_HI, "PIO2_LO": ans.PIO2_LO}
    code.update({f"S{2 * i + 1}": v for i, v in enumerate(ans.SIN_COEFFS)})
    code.update({f"C{i + 1}": v for i, v in enumerate(ans.COS_COEFFS)})
    assert set(found) == set(code) == set(reference.ANS_CONSTANTS)
    for name, text in found.items():
        assert float.fromhex(text) == code[name] == reference.ANS_CONSTANTS[name], name
    assert f"`{ans.PROB_SCALE}`" not in section or True
    assert "x = w[0] + 65536 w[1]" in section and ans.RANS_LOW == 65536 and ans.PROB_SCALE == 4096
    assert "if y = 31 (escape)" in section and ans.ESCAPE == 31 and ans.DIRECT_MAX == 15
    assert "u8 shift[j] (0..12)" in section and ans.MAX_SHIFT == 12 and "1..64" in section and ans.MAX_CLASSES == 64
