"""Write the golden test vectors of SPEC.md into spec/vectors/ (run by hand, never by the tests).

    python spec/make_vectors.py            # refuses to overwrite existing vectors
    python spec/make_vectors.py --force    # only when the format version changes

Each vector is a JSON file: the codec and its parameters, the source type, the input rows
(element bits, hex, little-endian), every stored part (hex bytes, with its GGUF type and shape) and
the decoded rows (element bits, hex). The inputs mix smooth and noisy rows, zeros, subnormals,
values near the f16 limit and rounding ties, so that every branch of the decode arithmetic is hit.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from deltakv_format.codecs import get_codec
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
]

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
    parts = codec.encode(bits, ggml_type, name)
    decoded = codec.decode(parts, ggml_type, cols, 0, rows)
    stored = {}
    for part in codec.parts(ggml_type, cols):
        array = np.ascontiguousarray(parts[part.role])
        stored[part.role] = {
            "ggml_type": GGMLType(part.ggml_type).name,
            "rows": int(array.shape[0]),
            "values_per_row": int(part.n_values),
            "hex": array.tobytes().hex(),
        }
    return {
        "name": name,
        "spec_version": 1,
        "codec": codec.get_config(),
        "source_type": GGMLType(ggml_type).name,
        "rows": rows,
        "values_per_row": cols,
        "input_hex": np.ascontiguousarray(bits).tobytes().hex(),
        "parts": stored,
        "decoded_hex": np.ascontiguousarray(decoded).tobytes().hex(),
    }


SESSION_SOURCE = "smollm2_v10_fa1.ggsn"  # a real llama.cpp session file from fixtures/


def make_session_vector(force: bool) -> None:
    """A whole .dkv (dkv-q4) of a real session file, and the SHA-256 of the state it restores to."""
    import hashlib

    from deltakv_format.operations import convert, restore

    dkv = HERE / "smollm2_v10_fa1.dkv"
    meta = HERE / "smollm2_v10_fa1.dkv.json"
    if dkv.exists() and not force:
        print(f"kept {dkv}")
        return
    source = Path(__file__).resolve().parent.parent / "fixtures" / SESSION_SOURCE
    convert(source, dkv, codec="dkv-q4")
    restored = HERE / "restored.tmp"
    restore(dkv, restored)
    digest = hashlib.sha256(restored.read_bytes()).hexdigest()
    restored.unlink()
    meta.write_text(json.dumps({"source_fixture": SESSION_SOURCE, "codec": "dkv-q4",
                                "source_sha256": hashlib.sha256(source.read_bytes()).hexdigest(),
                                "restored_sha256": digest}, indent=1) + "\n")
    print(f"wrote {dkv}")


def main() -> int:
    force = "--force" in sys.argv
    HERE.mkdir(exist_ok=True)
    make_session_vector(force)
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
