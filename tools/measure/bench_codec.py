"""``deltakv bench codec``: CPU encode/decode throughput of every codec next to a numpy copy, in one run."""

from __future__ import annotations

import os
import platform
import time
from datetime import datetime, timezone

import numpy as np

from deltakv_format.constants import GGMLType


def _synthetic_layer(rng, rows, values):
    # K-like rows drift slowly from token to token, with a few large channels.
    x = np.cumsum(rng.standard_normal((rows, values), dtype=np.float32) * 0.15, axis=0)
    x += rng.standard_normal(values).astype(np.float32) * 3
    return x.astype(np.float16).view(np.uint16)


def _real_layers(path, layers):
    from deltakv_format.operations import MappedFile, parse_state_file

    out = []
    with MappedFile(path) as mapped:
        state = parse_state_file(mapped)
        for sec in state.kv_sections:
            for st in sec.streams:
                for t in st.k + st.v:
                    if t.ggml_type == GGMLType.F16 and t.cell_count:
                        out.append(np.ascontiguousarray(t.rows()))
        del state
    return out[:layers] if layers else out


def _best(fn, repeat):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def run(*, rows, values, layers, repeat, codecs, source=None) -> str:
    import numba

    from deltakv_format.codecs import codec_for_track, get_codec

    rng = np.random.default_rng(0)
    data = _real_layers(source, layers) if source else [_synthetic_layer(rng, rows, values) for _ in range(layers)]
    total_bytes = sum(d.nbytes for d in data)
    copy_s = _best(lambda: [d.copy() for d in data], repeat)
    copy_gbs = total_bytes / copy_s / 1e9
    lines = [
        f"deltakv bench codec, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, numba threads {numba.get_num_threads()}",
        f"data: {'real K/V from ' + str(source) if source else 'synthetic f16'}: {len(data)} tensors of "
        f"{data[0].shape[0]} x {data[0].shape[1]} ({total_bytes / 1e6:.1f} MB f16)",
        f"numpy copy of the same bytes: {copy_gbs:.2f} GB/s",
        "",
        "| codec | bits/value | encode GB/s | decode GB/s | decode / copy |",
        "|---|---|---|---|---|",
    ]
    for name in codecs:
        codec = get_codec(name)
        track_codecs = [codec_for_track(codec, GGMLType.F16, d.shape[1]) for d in data]
        parts = [c.encode(d, GGMLType.F16) for c, d in zip(track_codecs, data)]  # warm-up and compile
        outs = [np.empty_like(d) for d in data]
        for c, p, d, o in zip(track_codecs, parts, data, outs):
            c.decode(p, GGMLType.F16, d.shape[1], 0, d.shape[0], out=o)
            assert o.shape == d.shape
        enc_s = _best(lambda: [c.encode(d, GGMLType.F16) for c, d in zip(track_codecs, data)], repeat)
        dec_s = _best(lambda: [c.decode(p, GGMLType.F16, d.shape[1], 0, d.shape[0], out=o)
                               for c, p, d, o in zip(track_codecs, parts, data, outs)], repeat)
        stored = sum(np.asarray(a).nbytes for p in parts for a in p.values())
        values_n = sum(d.size for d in data)
        dec_gbs = total_bytes / dec_s / 1e9
        # raw, and f16 of an f16 cache, hand back views of their input: there is nothing to time
        is_view = all(np.shares_memory(p["data"], d) for p, d in zip(parts, data)) if "data" in parts[0] else False
        enc = "view, no work" if is_view else f"{total_bytes / enc_s / 1e9:.3f}"
        lines.append(f"| {name} | {8 * stored / values_n:.2f} | {enc} | {dec_gbs:.2f} | {dec_gbs / copy_gbs:.2f} |")
    lines.append("")
    lines.append("GB/s = f16 cache bytes (decoder output, encoder input) per second; best of "
                 f"{repeat}. Decode writes into preallocated arrays, as a copy does. The codecs run on "
                 "numba's threads (above); the numpy copy on one thread.")
    return "\n".join(lines)
