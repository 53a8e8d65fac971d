"""Models of a real model's shape with random weights, for machines a real model cannot be carried to.

The GPU machine (device tool) takes at most 64 MiB along and fetches nothing; SmolLM2's GGUF is 98 MB and
Gemma 3's 253 MB. What a KV-cache benchmark needs from a model is its architecture, its cache's shape and a
tokenizer, not its weights: a *skeleton* (every key of the GGUF header, the tokenizer's arrays included, and
the shape of every tensor) is small enough to carry, and :func:`write_synthetic` turns it back into a GGUF
that llama.cpp loads, with seeded random F16 weights. Generation from it is noise, but deterministic noise:
a session restored exactly continues with exactly the same tokens, which is what is checked.

    python -m deltakv_tools.measure.synthetic_gguf skeleton MODEL.gguf OUT.json.gz
    python -m deltakv_tools.measure.synthetic_gguf write SKELETON.json.gz OUT.gguf [--kv-shape-8b]

``--kv-shape-8b`` reshapes a llama-architecture skeleton to an 8B model's KV cache (32 layers of 8 KV heads
x 128 values: 128 KiB of f16 K+V per token, 4 GiB at 32k tokens) while keeping its small embedding.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import numpy as np

SKIPPED_KEYS = ("GGUF.", "general.file_type", "general.quantization_version")


def skeleton(path) -> dict:
    """Every key of ``path``'s GGUF header and the shape of every tensor (no tensor data)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    kvs = []
    for name, field in reader.fields.items():
        if name.startswith(SKIPPED_KEYS):
            continue
        types = [t.name for t in field.types]
        value = field.contents()
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        kvs.append({"name": name, "types": types, "value": value})
    tensors = [{"name": t.name, "shape": [int(d) for d in t.shape]} for t in reader.tensors]
    return {"source": Path(path).name, "kvs": kvs, "tensors": tensors}


def save_skeleton(skel: dict, path) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        json.dump(skel, f)


def load_skeleton(path) -> dict:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return json.load(f)


def _kv(skel: dict, name: str):
    return next(kv["value"] for kv in skel["kvs"] if kv["name"] == name)


def kv_shape_8b(skel: dict) -> dict:
    """A llama-architecture skeleton reshaped to an 8B model's KV cache: 32 layers, 8 query and 8 KV heads
    of 128 values (the embedding and feed-forward widths stay the source's, so the weights stay small)."""
    if _kv(skel, "general.architecture") != "llama":
        raise ValueError(f"kv_shape_8b takes a llama-architecture skeleton, found {_kv(skel, 'general.architecture')!r}")
    n_layer, n_head, head = 32, 8, 128
    n_embd = _kv(skel, "llama.embedding_length")
    n_ff = _kv(skel, "llama.feed_forward_length")
    kvs = [kv for kv in skel["kvs"] if not kv["name"].startswith("llama.")]
    keep = {kv["name"]: kv for kv in skel["kvs"] if kv["name"].startswith("llama.")}
    for name, value in (("llama.block_count", n_layer), ("llama.attention.head_count", n_head),
                        ("llama.attention.head_count_kv", n_head), ("llama.attention.key_length", head),
                        ("llama.attention.value_length", head), ("llama.rope.dimension_count", head),
                        ("llama.context_length", 131072)):
        keep[name] = {"name": name, "types": ["UINT32"], "value": value}
    keep["general.name"] = {"name": "general.name", "types": ["STRING"], "value": "synthetic 8B KV shape"}
    kvs = [kv for kv in kvs if kv["name"] != "general.name"] + list(keep.values())
    tensors = [t for t in skel["tensors"] if not t["name"].startswith("blk.")]
    for il in range(n_layer):
        for name, shape in (("attn_norm", [n_embd]), ("attn_q", [n_embd, n_head * head]),
                            ("attn_k", [n_embd, n_head * head]), ("attn_v", [n_embd, n_head * head]),
                            ("attn_output", [n_head * head, n_embd]), ("ffn_norm", [n_embd]),
                            ("ffn_gate", [n_embd, n_ff]), ("ffn_up", [n_embd, n_ff]), ("ffn_down", [n_ff, n_embd])):
            tensors.append({"name": f"blk.{il}.{name}.weight", "shape": shape})
    return {"source": skel["source"] + " (8B KV shape)", "kvs": kvs, "tensors": tensors}


def write_synthetic(skel: dict, path, *, seed: int = 0) -> Path:
    """A GGUF with ``skel``'s header and seeded random weights: 2-D tensors F16 with N(0, 1/fan_in)
    entries (activations stay of order one through the layers), 1-D tensors (norms) F32 ones."""
    import gguf

    arch = _kv(skel, "general.architecture")
    writer = gguf.GGUFWriter(str(path), arch)
    for kv in skel["kvs"]:
        if kv["name"] == "general.architecture":
            continue
        types = [gguf.GGUFValueType[t] for t in kv["types"]]
        if types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(kv["name"], kv["value"], types[0], sub_type=types[1] if len(types) > 1 else None)
        else:
            writer.add_key_value(kv["name"], kv["value"], types[0])
    rng = np.random.default_rng(seed)
    for t in skel["tensors"]:
        shape = t["shape"][::-1]  # GGUF lists the fastest dimension first, numpy last
        if len(shape) == 1:
            data = np.ones(shape, np.float32)
        else:
            fan_in = shape[-1]
            data = (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(fan_in)).astype(np.float16)
        writer.add_tensor(t["name"], data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("skeleton", help="write MODEL's header and tensor shapes as gzipped JSON")
    s.add_argument("model")
    s.add_argument("out")
    w = sub.add_parser("write", help="write a GGUF of SKELETON's shape with random weights")
    w.add_argument("skeleton")
    w.add_argument("out")
    w.add_argument("--kv-shape-8b", action="store_true", help="32 layers x 8 KV heads x 128 (llama skeletons)")
    w.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.cmd == "skeleton":
        save_skeleton(skeleton(args.model), args.out)
    else:
        skel = load_skeleton(args.skeleton)
        if args.kv_shape_8b:
            skel = kv_shape_8b(skel)
        write_synthetic(skel, args.out, seed=args.seed)
    print(args.out)


if __name__ == "__main__":
    main()
