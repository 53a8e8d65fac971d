"""Error bounds the codecs prove from what they stored (SPEC.md 6.4), in plain numpy float64.

A bound says how far a decoded value may lie from the value the reference encoder was given,
using only the stored parts (scales, codes, keyframes) and the decoded rows, never the original:
``deltakv validate --against`` then checks the real error against it, so a payload that decodes
to something the stored scales cannot explain is reported even when its checksums are right.

Every codec quantizes in some domain (the values themselves, a residual against the decoder's
state, Walsh-Hadamard rotated values). A bound is stated per value in that domain and carried to
the source domain:

- per value, where the codec does not rotate: ``|decoded - original| <= limit``;
- over each group of ``n`` values, where it rotates with the orthonormal ``H_n``: the L2 norm of
  the error of the group ``<= limit`` (``H_n`` preserves L2 norms, so a per-value bound ``b_j`` in
  the rotated domain gives ``sqrt(sum b_j^2)`` in the original one, plus the rounding of the
  transforms).

The rounding terms are deliberately generous (2^-20 where the arithmetic needs about 2^-24): they
are there so that the bound is a proof, not a tight estimate; the quantization terms dominate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..constants import GGML_BLOCK_SIZES, GGMLType
from ..reference import from_source_bits, hadamard

# (mantissa bits, smallest normal exponent) of the float types a decoder emits or stores.
_FLOAT_FORMAT = {GGMLType.F16: (10, -14), GGMLType.BF16: (7, -126), GGMLType.F32: (23, -126)}

# Allowance for the f32 rounding of the decoder's state updates and of the encoder's residuals,
# relative to the magnitudes involved (each such operation rounds by at most 2^-24 of them).
STATE_ROUNDING = 2.0 ** -20
# Absolute allowance for f32 subnormal rounding (at most 2^-150 per operation).
TINY = 2.0 ** -128
# The largest finite f16 value: the range every lossy codec's source values lie in (SPEC.md 6.3).
F16_MAX = 65504.0


@dataclass(frozen=True)
class ErrorBound:
    """What a codec proves about the decoded rows of one segment.

    ``limit[r, g]`` bounds the error of group ``g`` of row ``r``: for ``group == 1`` the absolute
    error of value ``g``, else the L2 norm of the errors of values ``[g * group, (g + 1) * group)``.
    A limit of 0 means the row decodes exactly (raw data, keyframes, f16 of an f16 cache).
    """

    group: int
    limit: np.ndarray

    def errors(self, original: np.ndarray, decoded: np.ndarray) -> np.ndarray:
        """The measured error of each group (same shape as ``limit``), from float64 values."""
        err = np.abs(decoded - original)
        if self.group == 1:
            return err
        return np.sqrt((err.reshape(err.shape[0], err.shape[1] // self.group, self.group) ** 2).sum(axis=2))


def as_float64(bits: np.ndarray, ggml_type: int) -> np.ndarray:
    """Element bits (uint16 f16/bf16, uint32 f32) -> exact float64 values."""
    return from_source_bits(np.ascontiguousarray(bits), ggml_type).astype(np.float64)


def half_ulp(values: np.ndarray, ggml_type: int) -> np.ndarray:
    """Half the spacing of ``ggml_type`` just above ``|values|``: the most that rounding a real
    number to nearest can move it, when the result is ``values`` (the spacing below a power of
    two is smaller than the one above it, so the one above bounds both sides)."""
    mantissa_bits, min_exponent = _FLOAT_FORMAT[GGMLType(ggml_type)]
    magnitude = np.abs(np.asarray(values, np.float64))
    _, exponent = np.frexp(magnitude)  # magnitude = m * 2^exponent, m in [0.5, 1)
    floor_log2 = np.where(magnitude > 0, exponent - 1, min_exponent)
    return np.ldexp(1.0, np.maximum(floor_log2, min_exponent) - mantissa_bits - 1)


def output_rounding(decoded: np.ndarray, ggml_type: int) -> np.ndarray:
    """Error of the decoder's last step, emitting an f32 value as ``ggml_type`` (SPEC.md 5):
    nothing for f32, one rounding for f16 and bf16 (saturation only moves a value towards the
    original, which lies within +-65504, so it never adds to the error)."""
    if ggml_type == GGMLType.F32:
        return np.zeros_like(decoded)
    return half_ulp(decoded, ggml_type)


def q4_0_blocks(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_0 rows -> (scales as float64, rows x blocks; codes 0..15, rows x blocks x 32 in value order)."""
    _, block_bytes = GGML_BLOCK_SIZES[GGMLType.Q4_0]
    blocks = np.ascontiguousarray(rows, np.uint8).reshape(rows.shape[0], rows.shape[1] // block_bytes, block_bytes)
    scales = blocks[:, :, :2].copy().view(np.float16)[:, :, 0].astype(np.float64)
    packed = blocks[:, :, 2:]
    codes = np.concatenate([packed & 0x0F, packed >> 4], axis=2)  # value j in the low nibble of qs[j], j+16 high
    return scales, codes.astype(np.int64)


def q8_0_blocks(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q8_0 rows -> (scales as float64, rows x blocks; signed codes, rows x blocks x 32)."""
    _, block_bytes = GGML_BLOCK_SIZES[GGMLType.Q8_0]
    blocks = np.ascontiguousarray(rows, np.uint8).reshape(rows.shape[0], rows.shape[1] // block_bytes, block_bytes)
    scales = blocks[:, :, :2].copy().view(np.float16)[:, :, 0].astype(np.float64)
    return scales, blocks[:, :, 2:].view(np.int8).astype(np.int64)


def per_value(block_bound: np.ndarray) -> np.ndarray:
    """rows x blocks x 32 -> rows x values."""
    return block_bound.reshape(block_bound.shape[0], block_bound.shape[1] * block_bound.shape[2])


# ---- the ggml quantizers: the scale is rounded to f16 after the codes were chosen ---------------

# Q8_0: roundf(x * (1 / d)) is within half a step, plus the f32 rounding of x * (1 / d) (|x / d| <= 127).
GGML_Q8_0_STEP = 0.5 + 2.0 ** -15
# Q4_0: trunc(x * (1 / d) + 8.5) is within half a step plus f32 rounding (|x / d| <= 8) ...
GGML_Q4_0_STEP = 0.5 + 2.0 ** -18
# ... except at code 15: the block's largest magnitude maps to code 0 (-8 steps), so the opposite end,
# up to +8 steps, is clamped to +7 steps and may be off by a whole step.
GGML_Q4_0_CLAMPED_STEP = 1.0 + 2.0 ** -18


def ggml_q4_0_step_error(codes: np.ndarray) -> np.ndarray:
    """Most that ggml's Q4_0 rule can put between x / d and the code's step, per value."""
    return np.where(codes == 15, GGML_Q4_0_CLAMPED_STEP, GGML_Q4_0_STEP)


def ggml_block_bound(scales: np.ndarray, steps: np.ndarray, step_error: np.ndarray) -> np.ndarray:
    """|x - f16(d) * k| for ggml's rule, which picks codes ``k`` with the f32 scale ``d`` and stores
    ``f16(d)``: ``|x - d k| <= |d| * step_error`` and ``|d - f16(d)| <= half_ulp(f16(d))``, so
    ``|x - f16(d) k| <= (|f16(d)| + h) * step_error + |k| * h``. This holds for a scale rounded to 0
    as well: then ``|d| <= 2^-25 = h`` and the stored block decodes to zeros."""
    h = half_ulp(scales, GGMLType.F16)[:, :, None]
    d = np.abs(scales)[:, :, None]
    return (d + h) * step_error + np.abs(steps) * h


def ggml_residual_block_bound(scales: np.ndarray, codes: np.ndarray, rounding: np.ndarray, source_limit: np.ndarray):
    """delta-q4_0: ggml's Q4_0 rule on the residual against the decoder's state. Returns (per value
    bound, L2 bound of each block or None); ``rounding`` is added by the caller, and the rule needs
    no range: a scale that overflowed f16 is stored as infinity, which proves nothing."""
    return ggml_block_bound(scales, codes - 8, ggml_q4_0_step_error(codes)), None


# ---- the dkv-q4 scale search: the f16 scale itself picks the codes ---------------------------

# Half a step plus the f32 rounding of x * (1 / d), for codes 1..14 (not clamped).
SEARCH_ROUNDING_STEP = 0.5 + 2.0 ** -19
# A searched scale can clamp (codes 0 and 15: a least-squares refit may shrink the scale below
# vmax / 8), and then a value's error does not show in its code. But the search keeps the candidate
# of least squared error, and one candidate it always tries is f16(vmax / -7.5), under which every
# value is within half a step, at most M/15 (1 + 2^-7) + 2^-21 (M: the block's largest magnitude).
# So the L2 error of the block is at most SEARCH_ALPHA * M + beta, beta covering the f32 rounding of
# the compared sums; and M is at most |d| * max|k| plus that error:
# M <= (|d| max|k| + beta) / (1 - SEARCH_ALPHA).
SEARCH_ALPHA = 0.384  # sqrt(32) / 15 * (1 + 2^-6) = 0.38301, rounded up
# That candidate is finite while M < 7.5 * 65520. Every scale the search can keep is at least
# |f16(vmax / 8)| (a level candidate) or half the scale it refits (a least-squares fit over codes
# within half a step, or clamped, of x / d), so M <= 16.02 |d| + 2^-20: below this scale it was finite.
SEARCH_SMALL_SCALE = 30649.0
# Above it only f16(vmax / -8) may be finite, whose values are within a whole step (the clamped end).
SEARCH_ALPHA_LARGE_SCALE = 0.719  # sqrt(32) / 8 * (1 + 2^-6) = 0.71816, rounded up
# Scale 0 means a zero block, or every candidate underflowed f16 (M < 2^-22), or, where the block's
# values may reach 8 * 65520 (only rotated rows of extreme values can), that every one overflowed.
SEARCH_OVERFLOW_SOURCE = 491000.0


def searched_block_bound(scales: np.ndarray, codes: np.ndarray, rounding: np.ndarray, source_limit: np.ndarray):
    """|x - d k| for the reference dkv-q4 encoder (SPEC.md 6.2, 6.4): (per value bound, L2 bound of
    each block).

    ``rounding``: per value allowance for the f32 rounding of residuals and state updates;
    ``source_limit``: a bound on the block's quantized values known before decoding (65504 per
    source value, sqrt(n) times that rotated, plus the state they are a residual against).
    Not clamped (codes 1..14, scale not 0): ``|d| (1/2 + 2^-19)`` per value. Clamped codes (0, 15),
    and blocks whose scale is 0, get the least-squares argument:
    ``alpha (|d| max|k| + beta) / (1 - alpha) + beta`` with ``beta = sqrt(32) (2^-20 + max rounding)``,
    which bounds the L2 error of the whole block, so of each of its values too. A zero scale that
    may stand for an overflow proves nothing (infinite bound: the caller's range bound applies).
    """
    d = np.abs(scales)[:, :, None]
    max_step = np.abs(codes - 8).max(axis=2, keepdims=True)
    beta = np.sqrt(32.0) * (2.0 ** -20 + rounding.max(axis=2, keepdims=True))
    alpha = np.where(d < SEARCH_SMALL_SCALE, SEARCH_ALPHA, SEARCH_ALPHA_LARGE_SCALE)
    block_l2 = alpha * (d * max_step + beta) / (1.0 - alpha) + beta
    block_l2 = np.where((d == 0) & (source_limit >= SEARCH_OVERFLOW_SOURCE), np.inf, block_l2)
    may_clamp = (codes == 0) | (codes == 15) | (d == 0)
    return np.where(may_clamp, block_l2, d * SEARCH_ROUNDING_STEP), block_l2[:, :, 0]


# ---- the Walsh-Hadamard rotation ----------------------------------------------------------------


def rotate_f32(values: np.ndarray, size: int) -> np.ndarray:
    """H_size of every row (float64 in, float64 out), computed in f32 as the decoder does."""
    rows = values.shape[0]
    return hadamard(values.astype(np.float32).reshape(-1), size).astype(np.float64).reshape(rows, values.shape[1])


def group_norm(values: np.ndarray, size: int) -> np.ndarray:
    """L2 norm of each group of ``size`` consecutive values of each row."""
    return np.sqrt((values.reshape(values.shape[0], values.shape[1] // size, size) ** 2).sum(axis=2))


def transform_rounding(size: int) -> float:
    """Bound on ||fl(H v) - H v|| / ||v|| for SPEC.md's H_size: each of the log2(size) butterfly
    stages rounds by at most 2^-24 of its (sqrt 2 growing) norm, and the final 1/sqrt(size) scale is
    exact; 2^-22 per stage leaves room for the second-order terms."""
    return int(size).bit_length() * 2.0 ** -22


# ---- the delta codecs ---------------------------------------------------------------------------


def delta_bound(q4: np.ndarray, decoded: np.ndarray, first_row: int, ggml_type: int, keyframe_interval: int,
                rotation: int, block_bound) -> ErrorBound:
    """The bound of the closed-loop delta codecs for the segment's rows ``first_row ..
    first_row + decoded.shape[0]`` (``first_row`` a keyframe, so the rows carry their own state).

    Keyframes decode to their stored bits: limit 0. A delta row's state S is the previous row's
    state plus this row's quantized residual, and the encoder computed that residual against the
    very state the decoder has (closed loop): the error of S is the error of this row's
    quantization alone, ``block_bound`` per value in the quantized domain, plus the f32 rounding of
    the residual and of the update. Unrotated codecs emit S: per value, plus the output rounding.
    Rotating codecs emit H(S): per group of ``rotation`` values, the L2 norm of the per-value
    bounds (H is orthonormal), plus the output rounding and the rounding of the two transforms
    (the encoder's H(x) and the decoder's H(S)).

    The magnitudes of S that the rounding terms need come from the decoded rows: S = y (unrotated)
    or H(y) (rotated), within the output and transform rounding.
    """
    n_rows, n_values = decoded.shape
    y = as_float64(decoded, ggml_type)
    emit = output_rounding(y, ggml_type)
    group = rotation or 1
    if first_row % keyframe_interval:
        raise ValueError(f"the rows of a delta bound start on a keyframe (a multiple of {keyframe_interval}), "
                         f"found first row {first_row}")
    local = np.arange(n_rows)
    delta_rows = local[(first_row + local) % keyframe_interval != 0]
    limit = np.zeros((n_rows, n_values // group))
    if delta_rows.size == 0:
        return ErrorBound(group, limit)
    if rotation:
        y_norm = group_norm(y, rotation)
        emit_norm = group_norm(emit, rotation)
        state = np.abs(rotate_f32(y, rotation)) + np.repeat(2.0 ** -18 * y_norm + emit_norm, rotation, axis=1) + TINY
    else:
        state = np.abs(y) + emit
    segment_rows = first_row + delta_rows
    scales, codes = q4_0_blocks(q4[segment_rows - segment_rows // keyframe_interval - 1])
    scale_size = (np.abs(scales) + half_ulp(scales, GGMLType.F16))[:, :, None]
    magnitudes = (state[delta_rows - 1] + state[delta_rows]).reshape(codes.shape)
    rounding = STATE_ROUNDING * (magnitudes + 64.0 * scale_size) + TINY
    # what the quantized values can reach at all: the source is within +-65504 (encoders refuse
    # more), rotated values within sqrt(n) times that, and a residual adds the previous state
    source_limit = (F16_MAX * np.sqrt(group) + state[delta_rows - 1]).reshape(codes.shape).max(axis=2, keepdims=True)
    per_value_bound, block_l2 = block_bound(scales, codes, rounding, source_limit)
    if not rotation:
        limit[delta_rows] = per_value(per_value_bound + rounding) + emit[delta_rows]
    else:
        quantized_norm = _rotated_domain_norm(per_value_bound, block_l2, rounding, rotation)
        emit_norm = group_norm(emit[delta_rows], rotation)
        transforms = 2.0 * transform_rounding(rotation) * (group_norm(y[delta_rows], rotation) + quantized_norm + emit_norm)
        limit[delta_rows] = quantized_norm + emit_norm + transforms + TINY
    # Whatever was stored, the decoded value lies within |y| + 65504 of a source value within
    # +-65504: where the stored parts prove nothing better (a scale that overflowed), that bound stands.
    by_range = np.abs(y) + F16_MAX if not rotation else group_norm(y, rotation) + F16_MAX * np.sqrt(rotation)
    limit = np.where(np.isnan(limit), np.inf, limit)
    limit[delta_rows] = np.minimum(limit[delta_rows], by_range[delta_rows])
    return ErrorBound(group, limit)


def _rotated_domain_norm(per_value_bound: np.ndarray, block_l2: np.ndarray | None, rounding: np.ndarray,
                         rotation: int) -> np.ndarray:
    """L2 bound of the rotated-domain error over each group of ``rotation`` values (rows x groups).

    A group holds whole blocks (rotation >= 32) or lies in one (rotation 16). The error of each
    piece where a group and a block meet is bounded by the L2 norm of its per-value bounds and, where
    the codec proves one, by the L2 bound of its whole block; then the rounding, and the pieces
    of a group add up in squares."""
    n_rows, n_blocks, block_values = per_value_bound.shape
    piece = min(rotation, block_values)
    pieces_per_block = block_values // piece
    shape = (n_rows, n_blocks, pieces_per_block, piece)
    quantization = np.sqrt((per_value_bound.reshape(shape) ** 2).sum(axis=3))
    if block_l2 is not None:
        quantization = np.minimum(quantization, block_l2[:, :, None])
    pieces = quantization + np.sqrt((rounding.reshape(shape) ** 2).sum(axis=3))
    pieces = pieces.reshape(n_rows, n_blocks * pieces_per_block)
    per_group = rotation // piece
    return np.sqrt((pieces.reshape(n_rows, pieces.shape[1] // per_group, per_group) ** 2).sum(axis=2))
