"""The dkv-ans encoder as it was before its step search, histograms and rANS coder moved into Numba
(``codecs/ans_encoder.py``): numpy throughout, symbols listed then coded backwards by
``ans.encode_streams``. Kept verbatim as the reference ``tests/test_dkv_ans_encoder.py`` holds the
fast encoder to, byte for byte (its bytes are pinned by spec/vectors and must not change)."""

import numpy as np

from deltakv_format.codecs import ans
from deltakv_format.errors import CodecError
from deltakv_format.codecs.dkv_ans import (
    CLASS_BINS_PER_OCTAVE,
    MAX_CODE,
    SEARCH_ROWS,
    SHIFT_OFFSET,
    Head,
    bins_per_octave,
)


def _octaves(q: np.ndarray, bins: int) -> np.ndarray:
    """Class key of each column: its RMS code, in 1/bins of an octave."""
    spread = np.sqrt(np.mean(q.astype(np.float64) ** 2, axis=0))
    return np.clip(np.rint(bins * np.log2(np.maximum(spread, 2.0 ** -5))), -5 * bins, 14 * bins).astype(np.int64)


def _shift_of_octave(key: np.ndarray, bins: int) -> np.ndarray:
    """Low bits sent as they are: q >> shift then spreads over about +-4 (within the direct symbols)."""
    return np.clip(np.floor_divide(key, bins) - SHIFT_OFFSET, 0, ans.MAX_SHIFT)


def _class_histograms(q: np.ndarray, octave: np.ndarray, bins: int):
    """(class keys, per-class symbol counts, escape count, raw bits) of codes q by column octave."""
    keys, column_class = np.unique(octave, return_inverse=True)
    shift = _shift_of_octave(octave, bins)
    high = q.astype(np.int64) >> shift[None, :]
    symbol = np.where(np.abs(high) <= ans.DIRECT_MAX, high + ans.DIRECT_MAX, ans.ESCAPE)
    index = column_class[None, :] * ans.N_SYMBOLS + symbol
    counts = np.bincount(index.ravel(), minlength=len(keys) * ans.N_SYMBOLS).reshape(len(keys), ans.N_SYMBOLS)
    raw_bits = int(shift.sum()) * q.shape[0]
    return keys, counts, int(counts[:, ans.ESCAPE].sum()), raw_bits


def _entropy_bits(counts: np.ndarray) -> float:
    total = counts.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        p = np.where(counts > 0, counts / np.maximum(total, 1), 1.0)
        return float(-(counts * np.log2(p)).sum())


def _estimate_bits(z: np.ndarray, step: float, bins: int) -> tuple[float, int]:
    """Estimated bits of the codes of ``z`` at ``step`` (entropy per class, raw low bits, escapes), and
    the number of classes."""
    q = np.rint(z / step)
    octave = _octaves(q, bins)
    keys, counts, escapes, raw_bits = _class_histograms(q.astype(np.int64), octave, bins)
    return _entropy_bits(counts) + raw_bits + 16 * escapes, len(keys)


def normalize_frequencies(counts: np.ndarray) -> np.ndarray:
    """Counts -> frequencies adding up to 4096, every used symbol at least 1."""
    total = int(counts.sum())
    freqs = np.zeros(ans.N_SYMBOLS, np.int64)
    if total == 0:
        freqs[ans.DIRECT_MAX] = ans.PROB_SCALE
        return freqs
    used = counts > 0
    freqs[used] = np.maximum(1, (counts[used] * ans.PROB_SCALE) // total)
    top = int(np.argmax(counts))
    freqs[top] += ans.PROB_SCALE - int(freqs.sum())
    if freqs[top] < 1:  # cannot happen with 32 symbols (the top one has at least 1/32 of the mass)
        raise CodecError("frequency normalization failed")
    return freqs


def choose_step(z: np.ndarray, bits_per_value: float, bins: int = CLASS_BINS_PER_OCTAVE) -> float:
    """Bisection on log(step) so that the coded rows' estimated bits per value meet the budget."""
    rows = z if z.shape[0] <= SEARCH_ROWS else z[np.linspace(0, z.shape[0] - 1, SEARCH_ROWS).astype(np.int64)]
    peak = float(np.abs(z).max()) if z.size else 0.0
    sd = float(np.sqrt(np.mean(rows ** 2))) if rows.size else 0.0
    floor = max(peak / MAX_CODE, 2.0 ** -24)
    if sd == 0.0:
        return max(floor, 1.0) if peak == 0.0 else max(floor, peak)
    lo, hi = np.log(max(sd / 65536, floor)), np.log(max(sd * 64, floor))
    target = bits_per_value * rows.size
    for _ in range(22):
        mid = 0.5 * (lo + hi)
        bits, _ = _estimate_bits(rows, float(np.exp(mid)), bins)
        if bits > target:
            lo = mid
        else:
            hi = mid
    return max(float(np.float32(np.exp(hi))), floor)


def encode_segment(values: np.ndarray, table: np.ndarray, *, bits_per_value: float,
                   stream_rows: int, head_dim: int, n_rot: int, mode: int) -> tuple[Head, np.ndarray]:
    """Code f64 rows ``values`` (their cells' cos/sin in ``table``) at about ``bits_per_value`` bits of
    codes per value: (head, words)."""
    n, width = values.shape
    pre = ans.unrotate_rows(values, table, head_dim, n_rot, mode) if mode != ans.ROPE_NONE else values
    means16 = pre.mean(0).astype(np.float16)
    if not np.isfinite(means16).all():
        means16 = np.where(np.isfinite(means16), means16, 0).astype(np.float16)
    means = means16.astype(np.float32)
    z = pre - means.astype(np.float64)
    budget = max(bits_per_value, 0.05)
    bins = bins_per_octave(z.size)
    step = np.float32(choose_step(z, budget, bins))
    # the decoder computes f32(q) * step + mean: the codes are chosen for that step, from f64 values
    q = ans.quantize(z, float(step))
    if np.abs(q).max(initial=0) >= 1 << 15:
        raise CodecError(f"codes up to {int(np.abs(q).max())} at step {float(step)!r}: beyond 16 bits")
    octave = _octaves(q, bins)
    keys, counts, _, _ = _class_histograms(q.astype(np.int64), octave, bins)
    classes = np.searchsorted(keys, octave).astype(np.uint8)
    shifts = _shift_of_octave(keys, bins).astype(np.uint8)
    freqs = np.stack([normalize_frequencies(c) for c in counts]).astype(np.uint16)
    cum = np.zeros((len(keys), ans.N_SYMBOLS + 1), np.int64)
    cum[:, 1:] = np.cumsum(freqs.astype(np.int64), axis=1)
    n_streams = -(-n // stream_rows)
    pieces, lengths = [], []
    batch = max(1, (1 << 22) // max(stream_rows * width * 5, 1))  # bounded scratch: ~8 MiB of words
    for s0 in range(0, n_streams, batch):
        s1 = min(n_streams, s0 + batch)
        out, lens = ans.encode_streams(q, classes, shifts.astype(np.int64), freqs.astype(np.int64), cum,
                                       stream_rows, s0, s1)
        for i in range(s1 - s0):
            pieces.append(out[i, :lens[i]])
        lengths.extend(int(x) for x in lens)
    starts = np.zeros(n_streams, np.uint32)
    if n_streams > 1:
        starts[1:] = np.cumsum(lengths[:-1])
    words = np.concatenate(pieces) if pieces else np.empty(0, np.uint16)
    return Head(n, step, means, classes, shifts, freqs, starts), words


