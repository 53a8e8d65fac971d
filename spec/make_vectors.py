"""Write the golden test vectors of SPEC.md into spec/vectors/ (run by hand, never by the tests).

    python spec/make_vectors.py            # writes missing vectors only; refuses to overwrite
    python spec/make_vectors.py --force    # only when the format version changes
    python spec/make_vectors.py --session  # rewrites the current-version session files only

Codec vectors of version 1 (``"spec_version": 1``) stay as written in version 1: version 2 readers
decode them unchanged. ``v1/`` holds a whole session file written by version 1 (never rewritten).

Each vector is a JSON file: the codec and its parameters, the source type, the input rows
(element bits, hex, little-endian), every stored part (hex bytes, with its GGUF type and shape) and
the decoded rows (element bits, hex); parts of one dimension have ``values_per_row`` 0 and ``rows`` =
their byte count; codecs that take a context also record the cells' ``positions`` and the segment's
``first_row``. The inputs mix smooth and noisy rows, zeros, subnormals,
values near the f16 limit and rounding ties, so that every branch of the decode arithmetic is hit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from deltakv_format.codecs import TrackContext, get_codec
from deltakv_format.constants import GGMLType

HERE = Path(__file__).parent / "vectors"


def _inputs(rng: np.random.Generator, rows: int, cols: int, dtype) -> np.ndarray:
    smooth = np.cumsum(rng.standard_normal((rows, cols)) * 0.3, axis=0) + rng.standard_normal(cols) * 2
    noisy = rng.standard_normal((rows, cols)) * rng.choice([0.01, 1.0, 40.0], size=cols)
    x = np.where(rng.random(cols) < 0.5, smooth, noisy).astype(np.float32)
    x[0, :4] = [0.0, -0.0, 6.0e-8, -3.0e-6]  # zero, negative zero, f16 subnormals
    if rows > 2:
        x[2, :32] = 0.0  # an all-zero block
        x[1, 32:36] = [65000.0, -65504.0, 1.5, -2.5]  # near the f16 limit, ties
    if rows > 5:
        x[5, 32:64] = np.linspace(-1e-5, 1e-5, 32)  # tiny block
    return x.astype(dtype)


CASES = [
    # name, codec, params, ggml type, rows, cols
    ("raw_f16", "raw", {}, GGMLType.F16, 5, 64),
    ("f16_from_f32", "f16", {}, GGMLType.F32, 5, 64),
    ("f16_from_bf16", "f16", {}, GGMLType.BF16, 5, 64),
    ("q8_0_f16", "q8_0", {}, GGMLType.F16, 6, 96),
    ("q8_0_f32", "q8_0", {}, GGMLType.F32, 6, 64),
    ("q4_0_f16", "q4_0", {}, GGMLType.F16, 6, 96),
    ("q4_0_bf16", "q4_0", {}, GGMLType.BF16, 6, 64),
    ("delta-q4_0_n4_f16", "delta-q4_0", {"keyframe_interval": 4}, GGMLType.F16, 11, 64),
    ("delta-q4_0_n32_f32", "delta-q4_0", {"keyframe_interval": 32}, GGMLType.F32, 40, 64),
    ("dkv-q4_n8_r64_f16", "dkv-q4", {"keyframe_interval": 8, "rotation": 64}, GGMLType.F16, 19, 128),
    ("dkv-q4_n5_r16_bf16", "dkv-q4", {"keyframe_interval": 5, "rotation": 16}, GGMLType.BF16, 12, 96),
    ("dkv-q4_n3_r0_f32", "dkv-q4", {"keyframe_interval": 3, "rotation": 0}, GGMLType.F32, 7, 64),
    ("dkv-q4_n32_r256_f16", "dkv-q4", {"keyframe_interval": 32, "rotation": 256}, GGMLType.F16, 34, 256),
    # version 2: dkv-ans (SPEC.md 6.5); rope parameters as f32 bits, positions from the case's context
    ("dkv-ans_none_f16", "dkv-ans", {"stream_rows": 8}, GGMLType.F16, 21, 64),
    ("dkv-ans_norm_f32", "dkv-ans", dict(stream_rows=6, rope=1, rope_dims=64, head_dim=64,
                                         theta_scale_f32=0x3F3FF911), GGMLType.F32, 19, 128),
    ("dkv-ans_neox_bf16", "dkv-ans", dict(stream_rows=4, sink_rows=2, rope=2, rope_dims=32, head_dim=64,
                                          theta_scale_f32=0x3F0FF59A, freq_scale_f32=0x3F000000),
     GGMLType.BF16, 17, 128),
    ("dkv-ans_neox_f16_append", "dkv-ans", dict(stream_rows=5, rope=2, rope_dims=64, head_dim=64,
                                                theta_scale_f32=0x3F3FF911), GGMLType.F16, 12, 64),
]
# the segment's first row and the cells' positions of the cases that take them (others: 0 and none)
CONTEXTS = {
    "dkv-ans_norm_f32": (0, "gaps"),
    "dkv-ans_neox_bf16": (0, "large"),
    "dkv-ans_neox_f16_append": (40, "gaps"),  # an appended segment: no sink rows
}

NUMPY_DTYPE = {GGMLType.F16: np.float16, GGMLType.F32: np.float32}


def make(name, codec_name, params, ggml_type, rows, cols, seed):
    rng = np.random.default_rng(seed)
    if ggml_type == GGMLType.BF16:
        values = _inputs(rng, rows, cols, np.float32)
        bits = (values.view(np.uint32) >> 16).astype(np.uint16)  # truncation is fine for inputs
    else:
        bits = _inputs(rng, rows, cols, NUMPY_DTYPE[ggml_type]).view(
            np.uint16 if ggml_type == GGMLType.F16 else np.uint32
        )
    codec = get_codec(codec_name, **params)
    first_row, kind = CONTEXTS.get(name, (0, None))
    positions = None
    if kind == "gaps":  # increasing, with gaps (a context shift, removed cells)
        positions = np.cumsum(rng.integers(1, 4, rows)).astype(np.int32) + 100
    elif kind == "large":  # far positions: the range reduction of SPEC.md 6.5 with large k
        positions = np.sort(rng.integers(0, 2 ** 31 - 1, rows)).astype(np.int32)
    context = TrackContext(positions=positions, first_row=first_row)
    parts = codec.encode(bits, ggml_type, name, context=context)
    decoded = codec.decode(parts, ggml_type, cols, 0, rows, context=context)
    stored = {}
    for part in codec.parts(ggml_type, cols):
        if part.role not in parts:
            continue
        array = np.ascontiguousarray(parts[part.role])
        stored[part.role] = {
            "ggml_type": GGMLType(part.ggml_type).name,
            "rows": int(array.shape[0]),
            "values_per_row": int(part.n_values),
            "hex": array.tobytes().hex(),
        }
    extra = {}
    if codec.takes_context:
        extra = {"first_row": first_row, "positions": None if positions is None else positions.tolist()}
    return {
        "name": name,
        "spec_version": 2 if codec_name == "dkv-ans" else 1,
        **extra,
        "codec": codec.get_config(),
        "source_type": GGMLType(ggml_type).name,
        "rows": rows,
        "values_per_row": cols,
        "input_hex": np.ascontiguousarray(bits).tobytes().hex(),
        "parts": stored,
        "decoded_hex": np.ascontiguousarray(decoded).tobytes().hex(),
    }


SESSION_SOURCE = "smollm2_v10_fa1.ggsn"  # a real llama.cpp session file from fixtures/
# SmolLM2-135M's rotary embedding (norm, 64 of 64 values per head, base 100000), given by hand so that
# the vector needs no model file: K is coded before rotary embedding with the cells' positions
SMOLLM2_ROPE = {"kind": "norm", "n_rot": 64, "head_dim": 64, "theta_base": 100000.0, "freq_scale": 1.0}
SESSIONS = [("smollm2_v10_fa1.dkv", "dkv-q4", None), ("smollm2_v10_fa1_ans.dkv", "dkv-ans", SMOLLM2_ROPE),
            ("smollm2_v10_q8_0_fa1_transcode.dkv", "dkv-ans", SMOLLM2_ROPE)]
# the source fixture of a session vector, where not SESSION_SOURCE; a q8_0 cache's vector is transcoded
# (SPEC.md 6.6: dkv-ans on the blocks' values, re-quantized to Q8_0 on decode)
SESSION_SOURCES = {"smollm2_v10_q8_0_fa1_transcode.dkv": "smollm2_v10_q8_0_fa1.ggsn"}
TRANSCODED_SESSIONS = {"smollm2_v10_q8_0_fa1_transcode.dkv"}


def session_rope(rope: dict | None):
    """``write_session``'s ``rope=`` for a session vector's ``rope`` entry: every layer alike."""
    if rope is None:
        return None
    from deltakv_format.model_info import RopeParams

    theta = float(np.float32(rope["theta_base"]) ** np.float32(-2.0 / rope["n_rot"]))
    return [[RopeParams(rope["kind"], rope["n_rot"], rope["head_dim"], theta, rope["freq_scale"])] * 256]


def write_session_vector(source: Path, out: Path, codec: str, rope: dict | None, transcode: bool = False) -> None:
    """What the session vectors are: ``source`` parsed and written by the current writer."""
    from deltakv_format.operations import MappedFile, parse_state_file
    from deltakv_format.session import write_session

    with MappedFile(source) as mapped:
        state = parse_state_file(mapped)
        write_session(state, out, get_codec(codec), rope=session_rope(rope), transcode=transcode)


def make_session_vector(force: bool) -> None:
    """Whole .dkv files of a real session file (dkv-q4; dkv-ans with rotary parameters), and the
    SHA-256 of the state each restores to."""
    import hashlib

    from deltakv_format.operations import restore

    fixtures = Path(__file__).resolve().parent.parent / "fixtures"
    for name, codec, rope in SESSIONS:
        source_name = SESSION_SOURCES.get(name, SESSION_SOURCE)
        source = fixtures / source_name
        transcode = name in TRANSCODED_SESSIONS
        dkv = HERE / name
        meta = HERE / f"{name}.json"
        if dkv.exists() and not force:
            print(f"kept {dkv}")
            continue
        write_session_vector(source, dkv, codec, rope, transcode)
        restored = HERE / "restored.tmp"
        restore(dkv, restored)
        digest = hashlib.sha256(restored.read_bytes()).hexdigest()
        restored.unlink()
        info = {"source_fixture": source_name, "codec": codec, "spec_version": 2,
                "source_sha256": hashlib.sha256(source.read_bytes()).hexdigest(), "restored_sha256": digest}
        if rope is not None:
            info["rope"] = rope
        if transcode:
            info["transcode"] = True
        meta.write_text(json.dumps(info, indent=1) + "\n")
        print(f"wrote {dkv}")


def main() -> int:
    force = "--force" in sys.argv
    HERE.mkdir(exist_ok=True)
    make_session_vector(force or "--session" in sys.argv)
    if "--session" in sys.argv:
        return 0
    names = []
    for seed, (name, codec_name, params, ggml_type, rows, cols) in enumerate(CASES):
        path = HERE / f"{name}.json"
        names.append(path.name)
        if path.exists() and not force:
            print(f"kept {path} (use --force to overwrite)")
            continue
        vector = make(name, codec_name, params, ggml_type, rows, cols, seed)
        path.write_text(json.dumps(vector, indent=1) + "\n")
        print(f"wrote {path}")
    (HERE / "MANIFEST").write_text("".join(f"{n}\n" for n in names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
