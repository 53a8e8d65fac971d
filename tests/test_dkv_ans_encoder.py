"""The dkv-ans encoder's Numba kernels (codecs/ans_encoder.py) give the bytes of the numpy encoder
they replaced (tests/dkv_ans_numpy_encoder.py), on segments large enough for everything the golden
vectors are too small to reach: finer classes (>= 16384 values), the 256-row search sample, many
streams, escapes and shifts beyond 8 bits."""

import numpy as np
import pytest

from deltakv_format.codecs import ans, ans_encoder, dkv_ans

from . import dkv_ans_numpy_encoder as numpy_encoder


def kv_like(n, width, seed, tail=1.0):
    """Rows like a key cache's: per-channel means and spreads over four octaves, heavy tails."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal(width) * 2
    spread = 2.0 ** rng.uniform(-4, 4, width)
    noise = rng.standard_t(3, (n, width)) if tail else rng.standard_normal((n, width))
    return (means + spread * noise).astype(np.float16).astype(np.float64)


def rope_table(n, width, head_dim, n_rot, seed):
    positions = np.sort(np.random.default_rng(seed).choice(1 << 20, n, replace=False)).astype(np.int64)
    thetas = ans.rope_thetas(n_rot, np.float32(10000.0) ** np.float32(-2.0 / n_rot), np.float32(1.0))
    return ans.rope_table(positions, thetas)


CASES = [
    # rows, width, rope mode, rate (hundredths of a bit), stream_rows
    (5, 64, ans.ROPE_NONE, 400, 32),
    (90, 192, ans.ROPE_NEOX, 400, 32),  # just above 16384 values: three classes per octave
    (300, 192, ans.ROPE_NEOX, 400, 32),  # the search samples 256 of the rows
    (1100, 192, ans.ROPE_NORM, 300, 32),
    (2044, 192, ans.ROPE_NEOX, 400, 32),
    (700, 64, ans.ROPE_NONE, 1600, 7),  # fine steps: shifts beyond 8 bits
    (600, 128, ans.ROPE_NONE, 30, 64),  # coarse steps: few symbols
]


@pytest.mark.parametrize("n,width,mode,rate,stream_rows", CASES)
def test_encode_segment_gives_the_numpy_encoders_bytes(n, width, mode, rate, stream_rows):
    values = kv_like(n, width, seed=n + width)
    table = rope_table(n, width, 64, 64, seed=n) if mode else np.empty((0, 0, 2), np.float32)
    kwargs = dict(bits_per_value=rate / 100, stream_rows=stream_rows, head_dim=64 if mode else 0,
                  n_rot=64 if mode else 0, mode=mode)
    head, words = dkv_ans.encode_segment(values, table, **kwargs)
    old_head, old_words = numpy_encoder.encode_segment(values, table, **kwargs)
    assert head.pack() == old_head.pack()
    assert words.tobytes() == old_words.tobytes()


def test_degenerate_rows_give_the_numpy_encoders_bytes():
    rng = np.random.default_rng(7)
    for values in (np.zeros((40, 64)), np.full((300, 64), 3.5),
                   np.where(rng.random((400, 64)) < 0.01, 1e4, 1e-3 * rng.standard_normal((400, 64)))):
        kwargs = dict(bits_per_value=4.0, stream_rows=32, head_dim=0, n_rot=0, mode=ans.ROPE_NONE)
        head, words = dkv_ans.encode_segment(values, np.empty((0, 0, 2), np.float32), **kwargs)
        old_head, old_words = numpy_encoder.encode_segment(values, np.empty((0, 0, 2), np.float32), **kwargs)
        assert head.pack() == old_head.pack() and words.tobytes() == old_words.tobytes()


def test_bit_estimate_is_numpys_within_rounding():
    z = kv_like(256, 192, seed=3)
    z -= z.mean(0)
    codes = np.empty(z.shape, np.int64)
    column_counts = np.empty((192, ans.N_SYMBOLS), np.int64)
    for step in np.geomspace(1e-4, 10, 40):
        for bins in (1, 3):
            square = ans_encoder.search_codes(z, step, codes)
            assert np.array_equal(codes, np.rint(z / step))
            keys = dkv_ans._octaves_of_spread(np.sqrt(square / z.shape[0]), bins)
            assert np.array_equal(keys, numpy_encoder._octaves(np.rint(z / step), bins))
            bits, classes = ans_encoder.estimate_bits(codes, keys, bins, dkv_ans.SHIFT_OFFSET, column_counts)
            want, want_classes = numpy_encoder._estimate_bits(z, step, bins)
            assert classes == want_classes
            assert abs(bits - want) <= 1e-12 * want


def test_frequency_tables_are_normalize_frequencies():
    rng = np.random.default_rng(1)
    counts = rng.integers(0, 5000, (50, ans.N_SYMBOLS)) * (rng.random((50, ans.N_SYMBOLS)) < 0.6)
    counts[0] = 0
    counts[1, :] = 0
    counts[1, 31] = 1
    want = np.stack([numpy_encoder.normalize_frequencies(c) for c in counts])
    assert np.array_equal(ans_encoder.frequency_tables(counts.astype(np.int64)), want)


def test_stream_coder_gives_the_listing_coders_words():
    """Escapes (|q >> shift| > 15), shifts of 0..12, streams of every length."""
    rng = np.random.default_rng(5)
    width = 48
    shifts = np.arange(13, dtype=np.int64)
    classes = (np.arange(width) % 13).astype(np.uint8)
    q = (rng.standard_t(2, (203, width)) * 2.0 ** shifts[classes] * 4).clip(-30000, 30000).astype(np.int32)
    counts = ans_encoder.class_counts(q, classes.astype(np.int64), shifts[classes], 13, 2)
    freqs = ans_encoder.frequency_tables(counts)
    cum = np.zeros((13, ans.N_SYMBOLS + 1), np.int64)
    cum[:, 1:] = np.cumsum(freqs, axis=1)
    for stream_rows in (1, 3, 16, 50, 203):
        n_streams = -(-203 // stream_rows)
        out, lens = ans_encoder.encode_streams(q, classes, shifts, freqs, cum, stream_rows, 0, n_streams)
        old_out, old_lens = ans.encode_streams(q, classes, shifts, freqs, cum, stream_rows, 0, n_streams)
        assert np.array_equal(lens, old_lens)
        for i in range(n_streams):
            assert np.array_equal(out[i, out.shape[1] - lens[i]:], old_out[i, :lens[i]])


@pytest.mark.parametrize("mode", [ans.ROPE_NONE, ans.ROPE_NORM, ans.ROPE_NEOX])
def test_source_bits_give_the_bytes_of_their_f64_values(mode):
    """The codec hands encode_segment the cache's f16 bits (converted as they are read)."""
    bits = kv_like(400, 192, seed=11).astype(np.float16).view(np.uint16)
    table = rope_table(400, 192, 64, 32, seed=4) if mode else np.empty((0, 0, 2), np.float32)
    kwargs = dict(bits_per_value=4.0, stream_rows=32, head_dim=64 if mode else 0, n_rot=32 if mode else 0, mode=mode)
    head, words = dkv_ans.encode_segment(bits, table, kind=0, **kwargs)
    old_head, old_words = numpy_encoder.encode_segment(ans.to_f64(bits, 0), table, **kwargs)
    assert head.pack() == old_head.pack() and words.tobytes() == old_words.tobytes()
