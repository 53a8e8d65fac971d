"""One set of checks that every codec passes (numcodecs' check_encode_decode / check_config /
check_backwards_compatibility are the model). tests/test_codec_contract.py runs them over every
class in the registry, so a new codec is checked as soon as it is registered: adding one is one
class, one SPEC.md row and its golden vectors in spec/vectors.

- :func:`check_encode_decode`: parts as the codec declares them, round trip (exact where the codec
  is lossless), random access, the numpy reference decoder bit for bit, the error bound holds;
- :func:`check_config`: ``get_config`` / ``from_config`` through JSON give an equal codec;
- :func:`check_backwards_compatibility`: the golden vectors of the codec decode (Numba and numpy)
  and encode to the stored bytes; a codec without vectors fails;
- :func:`check_hostile_parts`: a .dkv whose part tensors have other row counts, row lengths or types
  is refused with CorruptError, and the codec refuses rows it cannot take with CodecError;
- :func:`check_accelerator`: where GPU kernels (or their CPU emulator) run, they give the same bytes.
"""

from __future__ import annotations

import json

import numpy as np

from deltakv_format import reference
from deltakv_format.codecs import BITS_DTYPE, CODEC_CLASSES, Codec, get_codec
from deltakv_format.codecs.bounds import as_float64
from deltakv_format.constants import FLOAT_TYPES, GGMLType, ggml_row_bytes
from deltakv_format.container import TensorInfo
from deltakv_format.errors import CodecError, CorruptError
from deltakv_format.session import DkvSession, write_session

from .conftest import VECTORS
from .synthetic import SyntheticContext
from .test_hostile import assemble, parts_of, write

FLOATS = (GGMLType.F16, GGMLType.BF16, GGMLType.F32)


# ---- data -----------------------------------------------------------------------------------


def as_bits(values: np.ndarray, ggml_type) -> np.ndarray:
    values = np.asarray(values, np.float32)
    if ggml_type == GGMLType.F16:
        return values.astype(np.float16).view(np.uint16)
    if ggml_type == GGMLType.BF16:
        return (values.view(np.uint32) >> 16).astype(np.uint16)
    return values.view(np.uint32).copy()


def kv_like_rows(rng, n_rows: int, n_values: int, ggml_type, edge: bool = True) -> np.ndarray:
    """K/V-like rows: per-channel offsets, outlier channels, a random walk over tokens, noise; with
    ``edge``, also an all-zero row, repeated halves, tiny and huge values."""
    base = rng.standard_normal(n_values).astype(np.float32) * 2
    base[rng.random(n_values) < 0.05] *= 20
    walk = np.cumsum(rng.standard_normal((n_rows, n_values)).astype(np.float32) * 0.2, axis=0)
    v = (base + walk + rng.standard_normal((n_rows, n_values)).astype(np.float32) * 0.3).astype(np.float32)
    if edge and n_rows > 5:
        v[1] = 0.0
        v[2, : n_values // 2] = v[1, : n_values // 2]
        v[3] = rng.choice([6e-8, -6e-8, 1e-5, 60000.0, -60000.0, 65504.0, 0.0], n_values).astype(np.float32)
        v[4] = v[3] * np.float32(-1)
        v[5] = rng.standard_normal(n_values).astype(np.float32) * 1e-6
    return as_bits(v, ggml_type)


# ---- the variants of each codec -------------------------------------------------------------


def vector_names(codec_id: str | None = None) -> list[str]:
    names = (VECTORS / "MANIFEST").read_text().split()
    if codec_id is None:
        return names
    return [n for n in names if json.loads((VECTORS / n).read_text())["codec"]["codec"] == codec_id]


def codec_variants(codec_class: type[Codec]) -> list[Codec]:
    """The codec with its defaults, and with the parameters of each of its golden vectors."""
    variants = [codec_class()]
    for name in vector_names(codec_class.name):
        v = json.loads((VECTORS / name).read_text())
        if v.get("positions") is not None:
            continue  # codes through cell positions: the checks here give none (tests/test_vectors.py does)
        codec = Codec.from_config(v["codec"])
        if codec not in variants:
            variants.append(codec)
    return variants


def all_variants() -> list[Codec]:
    return [codec for cls in CODEC_CLASSES.values() for codec in codec_variants(cls)]


# ---- checks ---------------------------------------------------------------------------------


def _bytes(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).tobytes()


def check_bound_holds(codec: Codec, parts: dict, ggml_type, rows: np.ndarray, decoded: np.ndarray) -> None:
    """The error bound the codec proves from ``parts`` covers the real error of ``decoded``."""
    bound = codec.error_bound(parts, ggml_type, decoded)
    errors = bound.errors(as_float64(rows, ggml_type), as_float64(decoded, ggml_type))
    assert errors.shape == bound.limit.shape, (errors.shape, bound.limit.shape)
    over = np.argwhere(~(errors <= bound.limit))
    assert over.size == 0, (f"{codec}: {len(over)} errors exceed the bound; first at row {over[0][0]}, group "
                            f"{over[0][1]}: error {errors[tuple(over[0])]!r}, bound {bound.limit[tuple(over[0])]!r}")


def check_encode_decode(codec: Codec, rows: np.ndarray, ggml_type) -> dict:
    """Encode ``rows`` (element bits) and check everything the codec declares about the result."""
    n_rows, n_values = rows.shape
    parts = codec.encode(rows, ggml_type)
    declared = {p.role: p for p in codec.parts(ggml_type, n_values)}
    assert set(parts) == set(declared), (codec, sorted(parts), sorted(declared))
    expected_rows = codec.expected_part_rows(n_rows)
    assert set(expected_rows) <= set(parts)
    for role, array in parts.items():
        part = declared[role]
        assert array.shape[0] == expected_rows.get(role, array.shape[0]), (codec, role, array.shape)
        if part.n_values == 0:  # bytes of one dimension (format v2)
            assert array.ndim == 1 and array.dtype == np.uint8, (codec, role, array.shape, array.dtype)
            continue
        row_bytes = ggml_row_bytes(part.ggml_type, part.n_values) if part.ggml_type != GGMLType.I8 else part.n_values
        assert array.ndim == 2 and array.shape[1] * array.itemsize == row_bytes, (codec, role, array.shape, array.dtype)
    assert codec.rows_of_parts(parts) == n_rows

    decoded = codec.decode(parts, ggml_type, n_values, 0, n_rows)
    assert decoded.shape == rows.shape and decoded.dtype == BITS_DTYPE[ggml_type]
    ref = reference.decode_parts(codec.name, parts, ggml_type, codec.keyframe_interval, codec.rotation,
                                 params=dict(codec.extra_parameters(), n_values=n_values))
    assert _bytes(ref) == _bytes(decoded), f"{codec}: Numba and the numpy reference decoder differ"
    for lo, hi in [(0, 1), (1, n_rows), (n_rows // 2, n_rows), (n_rows - 1, n_rows), (3, 3)]:
        assert _bytes(codec.decode(parts, ggml_type, n_values, lo, hi)) == _bytes(decoded[lo:hi]), (codec, lo, hi)
    out = np.zeros((n_rows, n_values), BITS_DTYPE[ggml_type])
    assert codec.decode(parts, ggml_type, n_values, 0, n_rows, out=out) is out and _bytes(out) == _bytes(decoded)

    if codec.error_bound(parts, ggml_type, decoded).limit.max(initial=0.0) == 0.0:
        assert _bytes(decoded) == _bytes(rows), f"{codec}: a bound of 0 promises an exact round trip"
    check_bound_holds(codec, parts, ggml_type, rows, decoded)
    # a prefix of the segment (what a reader decodes when later segments own the rest) is bounded too
    check_bound_holds(codec, parts, ggml_type, rows[: n_rows // 2], decoded[: n_rows // 2])
    # and rows from a keyframe on get the bound they get in the whole segment (validate works in pieces)
    whole = codec.error_bound(parts, ggml_type, decoded).limit
    for start in range(0, n_rows, codec.keyframe_interval):
        piece = codec.error_bound(parts, ggml_type, decoded[start:], first_row=start).limit
        assert np.array_equal(piece, whole[start:]), (codec, start)
    return parts


def check_config(codec: Codec) -> None:
    config = codec.get_config()
    assert config["codec"] == codec.name
    again = Codec.from_config(json.loads(json.dumps(config)))
    assert again == codec and type(again) is type(codec) and again.get_config() == config
    assert type(codec).from_config(config) == codec
    assert get_codec(config.pop("codec"), **config) == codec
    assert hash(again) == hash(codec)
    # the parameters a codec declares are the ones it takes; it refuses others
    for key, default in type(codec).parameters.items():
        assert getattr(type(codec)(), key) == default
    try:
        get_codec(codec.name, no_such_parameter=3)
    except CodecError:
        pass
    else:
        raise AssertionError(f"{codec.name} took an unknown parameter")


def load_vector(name: str):
    path = VECTORS / name
    assert path.exists(), f"golden vector {path} is missing (vectors are never regenerated by tests)"
    v = json.loads(path.read_text())
    ggml_type = GGMLType[v["source_type"]]
    bits = BITS_DTYPE[ggml_type]
    rows = np.frombuffer(bytes.fromhex(v["input_hex"]), bits).reshape(v["rows"], v["values_per_row"])
    parts = {}
    for role, p in v["parts"].items():
        dtype = BITS_DTYPE[GGMLType[p["ggml_type"]]] if p["ggml_type"] in ("F16", "BF16", "F32") else np.uint8
        raw = np.frombuffer(bytes.fromhex(p["hex"]), dtype)
        if p["values_per_row"] == 0:  # a part of one dimension (SPEC.md 3.1)
            parts[role] = raw
        else:
            parts[role] = raw.reshape(p["rows"], -1) if p["rows"] else raw.reshape(0, p["values_per_row"])
    decoded = np.frombuffer(bytes.fromhex(v["decoded_hex"]), bits).reshape(v["rows"], -1)
    return v, ggml_type, rows, parts, decoded


def check_backwards_compatibility(codec_id: str) -> None:
    """Files written before decode the same: the codec's golden vectors, decoded by the Numba and
    the numpy decoders, and re-encoded by the reference encoder, bit for bit; the bound holds."""
    names = vector_names(codec_id)
    assert names, f"codec {codec_id!r} has no golden vectors in {VECTORS} (MANIFEST)"
    for name in names:
        v, ggml_type, rows, parts, decoded = load_vector(name)
        codec = Codec.from_config(v["codec"])
        n_rows, n_values = rows.shape
        context = None
        if "first_row" in v:  # codecs that take a context (SPEC.md 6.5): the vector's positions
            from deltakv_format.codecs import TrackContext

            positions = None if v["positions"] is None else np.array(v["positions"], np.int32)
            context = TrackContext(positions=positions, first_row=v["first_row"])
        assert _bytes(codec.decode(parts, ggml_type, n_values, 0, n_rows, context=context)) == _bytes(decoded), name
        ref = reference.decode_parts(codec.name, parts, ggml_type, codec.keyframe_interval, codec.rotation,
                                     params=dict(codec.extra_parameters(), n_values=n_values),
                                     positions=None if context is None else context.positions)
        assert _bytes(ref) == _bytes(decoded), name
        encoded = codec.encode(rows, ggml_type, context=context)
        assert set(encoded) == set(parts), name
        for role in parts:
            assert _bytes(encoded[role]) == _bytes(parts[role]), f"{name}: part {role} differs"
        check_bound_holds(codec, parts, ggml_type, rows, decoded)


def check_hostile_parts(codec: Codec, tmp_path) -> None:
    """Part tensors that do not fit the codec's declaration are refused before any kernel sees them."""
    n_values = max(256, codec.rotation)
    for ggml_type in (GGMLType.F16, GGMLType.F32):
        # a row length the codec cannot take: CodecError, not garbage
        if not codec.accepts(ggml_type, n_values + 8):
            for call in (lambda: codec.encode(np.zeros((3, n_values + 8), BITS_DTYPE[ggml_type]), ggml_type),
                         lambda: codec.decode({}, ggml_type, n_values + 8, 0, 1)):
                try:
                    call()
                except CodecError:
                    pass
                else:
                    raise AssertionError(f"{codec} took rows of {n_values + 8} values")

    source = tmp_path / f"{codec.name}.dkv"
    state = SyntheticContext(n_max=48, n_layer=1, n_values=n_values).state(45)
    write_session(state, source, codec).close()
    kvs, infos, data = parts_of(source)
    with DkvSession(source) as s:
        track = s.tracks[0]
        assert track.codec == codec, (track.codec, codec)
        roles = [p.role for p in codec.parts(track.ggml_type, track.n_values)]
    names = {info.name: info for info in infos}

    def refused(changed_infos, what):
        path = write(tmp_path, assemble(kvs, changed_infos, data))
        try:
            with DkvSession(path) as s:
                s.to_llama_state()
        except CorruptError:
            return
        raise AssertionError(f"{codec}: a .dkv with {what} was read")

    for role in roles:
        name = f"{track.name}.0.{role}"
        if name not in names:
            continue  # a part with no rows is not stored (SPEC.md 3.1)
        info = names[name]

        def replaced(shape=None, ggml_type=None):
            return [TensorInfo(t.name, shape or t.shape, t.ggml_type if ggml_type is None else ggml_type, t.offset)
                    if t.name == name else t for t in infos]

        if len(info.shape) == 1:  # bytes of one dimension: a byte short, or a second dimension
            refused(replaced(shape=(info.shape[0] - 1,)), f"part {role} one byte short")
            refused(replaced(shape=(1, info.shape[0])), f"part {role} of two dimensions")
        else:
            ne0, ne1 = info.shape
            refused(replaced(shape=(ne0, ne1 - 1)), f"part {role} one row short")
            block = 32 if info.ggml_type in (GGMLType.Q4_0, GGMLType.Q8_0) else 1
            refused(replaced(shape=(ne0 - block, ne1)), f"part {role} rows of {ne0 - block} values")
        other_type = GGMLType.I8 if info.ggml_type != GGMLType.I8 else GGMLType.F16
        refused(replaced(ggml_type=other_type), f"part {role} of type {other_type.name}")
        refused([t for t in infos if t.name != name], f"part {role} missing")


def gpu_or_reason():
    """deltakv_runtime.gpu when its kernels run here (a GPU, or DELTAKV_GPU_BACKEND=emulator), else why not."""
    try:
        from deltakv_runtime import gpu
    except Exception as e:  # noqa: BLE001 - the runtime is another package's business
        return None, f"deltakv_runtime.gpu is not importable: {e}"
    reason = gpu.unavailable_reason()
    return (gpu, None) if reason is None else (None, reason)


def check_accelerator(gpu, codec: Codec, rows: np.ndarray, ggml_type) -> None:
    """The GPU kernels registered for the codec's class give the CPU's bytes (codecs without
    kernels run on the CPU, through the same call)."""
    n_rows, n_values = rows.shape
    want = codec.encode(rows, ggml_type)
    got = gpu.encode(codec, rows, ggml_type)
    assert set(got) == set(want)
    for role in want:
        assert _bytes(got[role]) == _bytes(want[role]), f"{codec}: part {role} differs on the GPU"
    for lo, hi in [(0, n_rows), (1, n_rows), (n_rows - 3, n_rows - 1)]:
        assert _bytes(gpu.decode(codec, want, ggml_type, n_values, lo, hi)) == \
            _bytes(codec.decode(want, ggml_type, n_values, lo, hi)), (codec, lo, hi)


def float_types_for(codec: Codec, n_values: int) -> list:
    return [t for t in FLOATS if codec.accepts(t, n_values) and t in FLOAT_TYPES]
