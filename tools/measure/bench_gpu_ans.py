"""dkv-ans decode throughput on the GPU (one thread per rANS stream), next to a device-to-device copy.

Shape: an 8B model's session (Llama-3-8B: 32 layers, 8 KV heads x 128 = 1024 values per token and
tensor, f16); K coded with rotary embedding undone (rope norm, 128 dims, base 500000), V without.
Parts: one K and one V tensor per token count, encoded on the CPU (the Numba encoder) from
synthetic K/V-like rows (per-channel means and spreads, outlier channels; K rotated by its
positions); the session decode runs the 32 layers' K and V (64 decodes of those parts into 64
distinct outputs) spread over several CUDA streams, with one cos/sin table per session
(dkv_rope_table: the K layers share the positions). Throughput: GB of decoded rows (output) per
second, and (parts + rows) per second like bench_gpu; copy = cudaMemcpy D2D of the decoded size.

    python -m deltakv_tools.measure.bench_gpu_ans --out ans.md [--tokens 4096,32768,131072]
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import statistics
import sys
import time

import numpy as np

from deltakv_format.codecs import get_codec
from deltakv_format.codecs.dkv_ans import TrackContext, parse_head
from deltakv_format.codecs.dkv_ans_codec import DkvAnsCodec
from deltakv_format.constants import GGMLType
from deltakv_runtime import gpu

VALUES, HEAD_DIM, N_ROT, BASE, LAYERS = 1024, 128, 128, 500000.0, 32
GB = 1e9


def synthetic(rng, n, rotate):
    mean = rng.standard_normal(VALUES).astype(np.float32) * 1.5
    spread = (np.exp(rng.standard_normal(VALUES) * 0.7) * 0.4).astype(np.float32)
    spread[rng.random(VALUES) < 0.04] *= 12
    v = mean + rng.standard_normal((n, VALUES), dtype=np.float32) * spread
    if rotate:
        inv = (np.float64(BASE) ** (-np.arange(0, N_ROT, 2) / N_ROT))
        ang = np.arange(n, dtype=np.float64)[:, None] * inv[None, :]
        c, s = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
        v = v.reshape(n, VALUES // HEAD_DIM, HEAD_DIM // 2, 2)
        a, b = v[..., 0].copy(), v[..., 1].copy()
        v[..., 0] = a * c[:, None] - b * s[:, None]
        v[..., 1] = a * s[:, None] + b * c[:, None]
        v = v.reshape(n, VALUES)
    return np.clip(v, -60000, 60000).astype(np.float16).view(np.uint16)


class Seg:
    """One encoded tensor's parts on the device."""

    def __init__(self, k, codec, rows, positions):
        t0 = time.perf_counter()
        self.parts = codec.encode(rows, GGMLType.F16, "bench", TrackContext(positions=positions))
        self.encode_s = time.perf_counter() - t0
        self.codec, self.k, self.n = codec, k, rows.shape[0]
        words = self.parts["data"].view("<u2")
        h = parse_head(self.parts["head"], VALUES, None, codec.stream_rows, words.size, "bench")
        self.h, self.n_words, self.n_sink = h, words.size, self.parts["sink"].shape[0]
        self.ptrs = []

        def put(a):
            a = np.ascontiguousarray(a)
            p = k.malloc(a.nbytes)
            k.memcpy_h2d(p, a.ctypes.data, a.nbytes)
            self.ptrs.append(p)
            return p

        self.words, self.starts = put(words), put(h.starts.astype(np.uint32))
        self.classes, self.shifts = put(h.classes.astype(np.uint8)), put(h.shifts.astype(np.uint8))
        self.freqs, self.means = put(h.freqs.astype(np.uint16)), put(h.means.astype(np.float32))
        self.bad = k.malloc(8)
        self.ptrs.append(self.bad)
        self.part_bytes = sum(a.nbytes for a in self.parts.values())

    def decode(self, out, table, stream=None, bad=None):
        c = self.codec
        self.k.decode_ans(self.words, self.starts, self.n_words, self.h.n_rows, c.stream_rows, self.classes, self.shifts,
                          self.freqs, len(self.h.shifts), ctypes.c_float(float(self.h.step)), self.means, VALUES, 0,
                          table, c.head_dim, c.rope_dims, c.rope, 0, self.h.n_rows, out, bad or self.bad, stream)

    def free(self):
        for p in self.ptrs:
            self.k.free(p)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="4096,32768,131072")
    ap.add_argument("--stream-rows", type=int, default=32)
    ap.add_argument("--streams", type=int, default=16, help="CUDA streams the session's 64 decodes are spread over")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    k = gpu.load()
    e0, e1 = ctypes.c_void_p(), ctypes.c_void_p()
    k.event_create(ctypes.byref(e0))
    k.event_create(ctypes.byref(e1))

    def timed(fn, reps):
        fn()
        k.synchronize(None)
        ts = []
        for _ in range(reps):
            k.synchronize(None)
            k.event_record(e0, None)
            fn()
            for s in streams:  # the default stream waits for nothing else: sync, then record
                k.synchronize(s)
            k.event_record(e1, None)
            ts.append(k.elapsed_ms(e0, e1))
        return statistics.median(ts)

    streams = []
    for _ in range(args.streams):
        s = ctypes.c_void_p()
        k.stream_create(ctypes.byref(s))
        streams.append(s.value)
    base = get_codec("dkv-ans", stream_rows=args.stream_rows)
    theta = float(np.float32(BASE) ** np.float32(-2.0 / N_ROT))
    codec_k = DkvAnsCodec.with_rope(base, "norm", N_ROT, HEAD_DIM, theta)
    codec_v = base
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"dkv-ans decode, {now}, {k.device_name()}, backend {k.backend}; 1024 values/token (8 x 128), f16, "
             f"stream_rows {args.stream_rows}; K rope norm 128 base 500000, V none; session = 32 layers x (K, V) "
             f"over {args.streams} CUDA streams. out GB/s = decoded bytes / time; io GB/s = (parts + rows) / time.",
             "",
             "| case | tokens | tensors | bits/value | encode s (CPU, 1 tensor) | rope table ms | decode ms | out GB/s | "
             "io GB/s | copy GB/s | out / copy |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    print("\n".join(lines), flush=True)
    rng = np.random.default_rng(1)
    for n in [int(x) for x in args.tokens.split(",")]:
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        k.mem_info(ctypes.byref(free), ctypes.byref(total))
        row_bytes = n * VALUES * 2
        n_out = 2 * LAYERS if free.value > 2 * LAYERS * row_bytes * 1.2 + 2**30 else 2
        positions = np.arange(n, dtype=np.int32)
        segs = {"K": Seg(k, codec_k, synthetic(rng, n, True), positions),
                "V": Seg(k, codec_v, synthetic(rng, n, False), positions)}
        pos_d = k.malloc(n * 4)
        k.memcpy_h2d(pos_d, positions.ctypes.data, n * 4)
        th = np.ascontiguousarray(codec_k.thetas, np.float32)
        th_d = k.malloc(th.nbytes)
        k.memcpy_h2d(th_d, th.ctypes.data, th.nbytes)
        sk = segs["K"].n_sink
        table = k.malloc((n - sk) * N_ROT // 2 * 8)
        outs = [k.malloc(row_bytes) for _ in range(n_out)]
        copy_ms = timed(lambda: k.memcpy_d2d(outs[1], outs[0], row_bytes, None), 10)
        copy_bw = 2 * row_bytes / (copy_ms * 1e-3) / GB
        table_ms = timed(lambda: k.rope_table(pos_d + 4 * sk, n - sk, th_d, N_ROT // 2, table, None), 10)
        reps = 5 if n >= 65536 else 10
        for name, seg in segs.items():
            ms = timed(lambda: seg.decode(outs[0], table if name == "K" else None), reps)
            coded = seg.n - seg.n_sink
            out_b = coded * VALUES * 2
            bits = 8 * (seg.part_bytes) / (seg.n * VALUES)
            line = (f"| {name} one tensor | {n} | 1 | {bits:.2f} | {seg.encode_s:.1f} | {table_ms:.3f} | {ms:.3f} | "
                    f"{out_b / (ms * 1e-3) / GB:.0f} | {(out_b + seg.part_bytes) / (ms * 1e-3) / GB:.0f} | {copy_bw:.0f} | "
                    f"{out_b / (ms * 1e-3) / GB / copy_bw:.1%} |")
            lines.append(line)
            print(line, flush=True)
            # check: the GPU rows equal the CPU decode (a sample: the first 2 streams' rows and the last rows)
            got = np.empty((coded, VALUES), np.uint16)
            k.synchronize(None)
            k.memcpy_d2h(got.ctypes.data, outs[0], got.nbytes)
            bad = np.empty(1, np.int64)
            k.memcpy_d2h(bad.ctypes.data, seg.bad, 8)
            ctx = TrackContext(positions=positions)
            lo = max(seg.n_sink, n - 300)
            want = seg.codec.decode(seg.parts, GGMLType.F16, VALUES, lo, n, None, ctx)
            ok = bad[0] == -1 and np.array_equal(got[lo - seg.n_sink:], want)
            if not ok:
                print(f"  MISMATCH {name} n={n}: bad stream {bad[0]}", flush=True)
                lines.append(f"| {name} n={n}: GPU rows DIFFER from the CPU decode | | | | | | | | | | |")

        def session():
            for i in range(n_out):
                seg = segs["K" if i % 2 == 0 else "V"]
                seg.decode(outs[i], table if i % 2 == 0 else None, streams[i % len(streams)],
                           None)

        ms = timed(session, 3)
        out_b = sum((segs["K" if i % 2 == 0 else "V"].n - segs["K" if i % 2 == 0 else "V"].n_sink) * VALUES * 2
                    for i in range(n_out))
        pb = sum(segs["K" if i % 2 == 0 else "V"].part_bytes for i in range(n_out))
        line = (f"| session K+V | {n} | {n_out} | - | - | {table_ms:.3f} | {ms:.3f} | {out_b / (ms * 1e-3) / GB:.0f} | "
                f"{(out_b + pb) / (ms * 1e-3) / GB:.0f} | {copy_bw:.0f} | {out_b / (ms * 1e-3) / GB / copy_bw:.1%} |")
        lines.append(line)
        print(line, flush=True)
        for p in (pos_d, th_d, table, *outs):
            k.free(p)
        for seg in segs.values():
            seg.free()
    for s in streams:
        k.stream_destroy(s)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
