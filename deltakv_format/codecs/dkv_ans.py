"""``dkv-ans``: keys before rotary embedding, exact attention sinks, one step per layer, rANS (SPEC.md 6.5).

Why this shape (../shared/research/KCODEC.md measured it on real llama.cpp states): rotary embedding
spins each key pair by its cell's position, so coding keys after it wastes bits on the rotation;
undone, a key channel is nearly stationary (most of its energy is its mean over tokens). A uniform
step with entropy-coded integers is rate-distortion optimal for such sources: a channel of little
energy costs almost nothing, one of much costs what it needs. The first cells (attention sinks) are
kept exact: the model attends to them everywhere, and they are a few rows.

Parts of one segment of a track (rows R, values C; n_sink = min(sink_rows, R) when the segment
starts at stream row 0, else 0):

- ``sink``: source type [C, n_sink], the first rows exactly;
- ``head``: I8 [n], the step, column means and classes, the class tables and stream offsets;
- ``data``: I8 [n], the rANS words (u16, little-endian) of every stream.

The codec needs the cells' positions (``TrackContext.positions``) where it undoes rotary embedding;
its rotary parameters are the track's (``rope``, ``rope_dims``, ``head_dim``, ``theta_scale_f32``,
``freq_scale_f32``: f32 bit patterns). With ``rope = 0`` it codes values as they are (V tracks, and K
where the model's rotary parameters are unknown).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

import numba
import numpy as np

from ..errors import CodecError, CorruptError
from . import ans, ans_encoder

HEAD_FIXED_BYTES = 12  # u32 n_rows, f32 step, u16 n_classes, u16 zero
CLASS_BYTES = 2 + 2 * ans.N_SYMBOLS  # u8 shift, u8 zero, u16 freq[32]
ROPE_KINDS = {"none": ans.ROPE_NONE, "norm": ans.ROPE_NORM, "neox": ans.ROPE_NEOX}
F32_ONE_BITS = 0x3F800000


def f32_bits(x: float) -> int:
    return struct.unpack("<I", struct.pack("<f", x))[0]


def f32_of_bits(u: int) -> np.float32:
    return np.frombuffer(struct.pack("<I", u), np.float32)[0]


@dataclass(frozen=True)
class TrackContext:
    """What a codec may need besides the rows: the cells' positions (i32, one per row of the
    segment) and the segment's first row in its stream (SPEC.md 3.2)."""

    positions: np.ndarray | None = None
    first_row: int = 0
    # Decoders' rotary tables for these positions, shared by the layers that decode the same rows
    # with the same frequencies (a reader passes one dict per stream segment; None: not kept).
    # Tables are pure functions of (positions, thetas), so sharing them changes no bit.
    rope_tables: dict | None = field(default=None, compare=False, repr=False)


@dataclass
class Head:
    """The parsed ``head`` part of a segment."""

    n_rows: int
    step: np.float32
    means: np.ndarray  # f32 [C] (stored f16)
    classes: np.ndarray  # u8 [C]
    shifts: np.ndarray  # u8 [n_classes]
    freqs: np.ndarray  # u16 [n_classes, 32]
    starts: np.ndarray  # u32 [n_streams]

    def pack(self) -> bytes:
        out = [struct.pack("<IfHH", self.n_rows, float(self.step), len(self.shifts), 0),
               self.means.astype("<f2").tobytes(), self.classes.astype(np.uint8).tobytes()]
        for k, f in zip(self.shifts, self.freqs):
            out.append(struct.pack("<BB", int(k), 0) + f.astype("<u2").tobytes())
        out.append(self.starts.astype("<u4").tobytes())
        return b"".join(out)


def head_bytes(n_values: int, n_classes: int, n_streams: int) -> int:
    return HEAD_FIXED_BYTES + 3 * n_values + CLASS_BYTES * n_classes + 4 * n_streams


def parse_head(raw: np.ndarray, n_values: int, rows: int | None, stream_rows: int, n_words: int, where: str) -> Head:
    """Parse and check a ``head`` part: every field in range, so the decoder can index without checks."""
    raw = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
    if raw.size < HEAD_FIXED_BYTES:
        raise CorruptError(f"{where}: head of {raw.size} bytes, expected at least {HEAD_FIXED_BYTES}")
    n_rows, step, n_classes, zero = struct.unpack_from("<IfHH", raw.tobytes(), 0)
    if rows is not None and n_rows != rows:
        raise CorruptError(f"{where}: head says {n_rows} coded rows, the segment has {rows}")
    if not (np.isfinite(step) and step > 0):
        raise CorruptError(f"{where}: step {step!r}, expected a finite value above 0")
    if not 1 <= n_classes <= ans.MAX_CLASSES or zero:
        raise CorruptError(f"{where}: {n_classes} class tables (reserved field {zero}), expected 1..{ans.MAX_CLASSES} and 0")
    n_streams = -(-n_rows // stream_rows)
    want = head_bytes(n_values, n_classes, n_streams)
    if raw.size != want:
        raise CorruptError(f"{where}: head of {raw.size} bytes, expected {want} for {n_values} values, "
                           f"{n_classes} classes and {n_streams} streams")
    off = HEAD_FIXED_BYTES
    means16 = raw[off:off + 2 * n_values].copy().view("<f2")
    off += 2 * n_values
    means = means16.astype(np.float32)
    if not np.isfinite(means).all():
        raise CorruptError(f"{where}: a column mean is not finite")
    classes = raw[off:off + n_values].copy()
    off += n_values
    if classes.size and int(classes.max()) >= n_classes:
        raise CorruptError(f"{where}: column class {int(classes.max())}, expected below {n_classes}")
    tables = raw[off:off + CLASS_BYTES * n_classes].reshape(n_classes, CLASS_BYTES)
    off += CLASS_BYTES * n_classes
    shifts = tables[:, 0].copy()
    freqs = tables[:, 2:].copy().view("<u2").reshape(n_classes, ans.N_SYMBOLS).astype(np.uint16)
    if int(shifts.max()) > ans.MAX_SHIFT or tables[:, 1].any():
        raise CorruptError(f"{where}: class shift {int(shifts.max())} (reserved {int(tables[:, 1].max())}), "
                           f"expected at most {ans.MAX_SHIFT} and 0")
    sums = freqs.astype(np.int64).sum(1)
    if (sums != ans.PROB_SCALE).any():
        j = int(np.argmax(sums != ans.PROB_SCALE))
        raise CorruptError(f"{where}: class {j} frequencies add up to {int(sums[j])}, expected {ans.PROB_SCALE}")
    starts = raw[off:].copy().view("<u4").astype(np.uint32)
    if n_streams and (starts[0] != 0 or (np.diff(starts.astype(np.int64)) < 2).any() or int(starts[-1]) + 2 > n_words):
        raise CorruptError(f"{where}: stream offsets {starts[:4].tolist()}... do not split the {n_words} words "
                           "into streams of at least 2 words from offset 0")
    return Head(n_rows, np.float32(step), means, classes, shifts, freqs, starts)


# ---- the encoder (not normative) -----------------------------------------------------------------

MAX_CODE = 30000  # |q| stays below 2^15 so an escape's 16 bits hold q >> shift
SEARCH_ROWS = 256  # rows the rate search looks at (evenly spread over the segment)


CLASS_BINS_PER_OCTAVE = 3  # finer classes fit each column's spread better; each costs a 66-byte table
SHIFT_OFFSET = 1  # q >> shift keeps a spread of 1..2 codes: heavy-tailed columns rarely escape (measured best of 0..3)


SMALL_SEGMENT_VALUES = 1 << 14  # below this many coded values a class table (66 bytes) costs more than it fits


def bins_per_octave(n_coded_values: int) -> int:
    return CLASS_BINS_PER_OCTAVE if n_coded_values >= SMALL_SEGMENT_VALUES else 1


def _octaves(q: np.ndarray, bins: int) -> np.ndarray:
    """Class key of each column: its RMS code, in 1/bins of an octave."""
    return _octaves_of_spread(np.sqrt(np.mean(q.astype(np.float64) ** 2, axis=0)), bins)


def _octaves_of_spread(spread: np.ndarray, bins: int) -> np.ndarray:
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
    the number of classes. The arithmetic that decides: :class:`BitEstimator` computes it faster and
    falls back on it where its own rounding of log2 could decide otherwise."""
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


class BitEstimator:
    """:func:`_estimate_bits` of one set of rows at many steps: the codes and histograms by Numba
    (``ans_encoder``, the same integers), the column classes by numpy; where the estimate (its
    log2 libm's) lies within ``DECISION_MARGIN`` of ``target``, numpy's estimate decides."""

    def __init__(self, rows: np.ndarray, bins: int, target: float):
        self.rows = np.ascontiguousarray(rows, np.float64)
        self.bins = bins
        self.target = target
        self.codes = np.empty(self.rows.shape, np.int64)
        self.column_counts = np.empty((self.rows.shape[1], ans.N_SYMBOLS), np.int64)
        self.fallbacks = 0  # steps numpy decided (for the tests)

    def above_target(self, step: float) -> bool:
        """Whether the rows' estimated bits at ``step`` exceed the target."""
        square = ans_encoder.search_codes(self.rows, step, self.codes)
        keys = _octaves_of_spread(np.sqrt(square / self.rows.shape[0]), self.bins)  # = _octaves(codes)
        bits, _ = ans_encoder.estimate_bits(self.codes, keys, self.bins, SHIFT_OFFSET, self.column_counts)
        if abs(bits - self.target) <= ans_encoder.DECISION_MARGIN * max(abs(bits), abs(self.target), 1.0):
            self.fallbacks += 1
            bits, _ = _estimate_bits(self.rows, step, self.bins)
        return bits > self.target


def choose_step(z: np.ndarray, bits_per_value: float, bins: int = CLASS_BINS_PER_OCTAVE,
                peak: float | None = None) -> float:
    """Bisection on log(step) so that the coded rows' estimated bits per value meet the budget
    (``peak``: the largest |z|, when known)."""
    rows = z if z.shape[0] <= SEARCH_ROWS else z[np.linspace(0, z.shape[0] - 1, SEARCH_ROWS).astype(np.int64)]
    if peak is None:
        peak = float(np.abs(z).max()) if z.size else 0.0
    peak = float(peak)
    sd = float(np.sqrt(np.mean(rows ** 2))) if rows.size else 0.0
    floor = max(peak / MAX_CODE, 2.0 ** -24)
    if sd == 0.0:
        return max(floor, 1.0) if peak == 0.0 else max(floor, peak)
    lo, hi = np.log(max(sd / 65536, floor)), np.log(max(sd * 64, floor))
    target = bits_per_value * rows.size
    estimator = BitEstimator(rows, bins, target)
    for _ in range(22):
        mid = 0.5 * (lo + hi)
        if estimator.above_target(float(np.exp(mid))):
            lo = mid
        else:
            hi = mid
    return max(float(np.float32(np.exp(hi))), floor)


def encode_segment(values: np.ndarray, table: np.ndarray, *, bits_per_value: float,
                   stream_rows: int, head_dim: int, n_rot: int, mode: int, kind: int | None = None) -> tuple[Head, np.ndarray]:
    """Code rows ``values`` (their cells' cos/sin in ``table``) at about ``bits_per_value`` bits of
    codes per value: (head, words). ``values``: f64, or with ``kind`` the source's element bits
    (``codecs.KIND_OF_TYPE``: converted as they are read)."""
    n, width = values.shape
    if kind is not None:
        pre = ans_encoder.values_before_rope(values, kind, table, head_dim, n_rot, mode)
    elif mode != ans.ROPE_NONE:
        pre = ans.unrotate_rows(values, table, head_dim, n_rot, mode)
    else:
        pre = np.array(values, np.float64)  # a copy: centred in place below
    means16 = (ans_encoder.column_sums(pre) / n).astype(np.float16)  # = pre.mean(0): the same sums
    if not np.isfinite(means16).all():
        means16 = np.where(np.isfinite(means16), means16, 0).astype(np.float16)
    means = means16.astype(np.float32)
    peak = ans_encoder.subtract_means(pre, means.astype(np.float64))
    z = pre
    budget = max(bits_per_value, 0.05)
    bins = bins_per_octave(z.size)
    step = np.float32(choose_step(z, budget, bins, peak=peak))
    # the decoder computes f32(q) * step + mean: the codes are chosen for that step, from f64 values
    q = ans.quantize(z, float(step))
    square, peak = ans_encoder.code_square_sums(q)
    if peak >= 1 << 15:
        raise CodecError(f"codes up to {peak} at step {float(step)!r}: beyond 16 bits")
    octave = _octaves_of_spread(np.sqrt(square / n), bins)  # = _octaves(q, bins): the sums are numpy's
    keys, column_class = np.unique(octave, return_inverse=True)
    counts = ans_encoder.class_counts(q, column_class.astype(np.int64), _shift_of_octave(octave, bins), len(keys),
                                       numba.get_num_threads())
    classes = column_class.astype(np.uint8)
    shifts = _shift_of_octave(keys, bins).astype(np.uint8)
    freqs64 = ans_encoder.frequency_tables(counts)
    if not (freqs64[counts > 0] >= 1).all():  # cannot happen with 32 symbols (normalize_frequencies)
        raise CodecError("frequency normalization failed")
    freqs = freqs64.astype(np.uint16)
    cum = np.zeros((len(keys), ans.N_SYMBOLS + 1), np.int64)
    cum[:, 1:] = np.cumsum(freqs64, axis=1)
    n_streams = -(-n // stream_rows)
    pieces, lengths = [], []
    batch = max(1, (1 << 22) // max(stream_rows * width * 5, 1))  # bounded scratch: ~8 MiB of words
    for s0 in range(0, n_streams, batch):
        s1 = min(n_streams, s0 + batch)
        out, lens = ans_encoder.encode_streams(q, classes, shifts.astype(np.int64), freqs64, cum, stream_rows, s0, s1)
        for i in range(s1 - s0):
            pieces.append(out[i, out.shape[1] - lens[i]:])
        lengths.extend(int(x) for x in lens)
    starts = np.zeros(n_streams, np.uint32)
    if n_streams > 1:
        starts[1:] = np.cumsum(lengths[:-1])
    words = np.concatenate(pieces) if pieces else np.empty(0, np.uint16)
    return Head(n, step, means, classes, shifts, freqs, starts), words


def estimated_side_bits(width: int, n_rows: int, stream_rows: int) -> float:
    """What the head and the tensors' alignment cost, before the codes are known."""
    return 8.0 * (head_bytes(width, 12, -(-n_rows // stream_rows)) + 3 * 64)
