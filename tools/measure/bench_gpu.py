"""GPU codec throughput next to a device-to-device copy, measured in one process.

Shape: an 8B model's KV cache (Llama-3-8B: 32 layers, 8 KV heads x 128 = 1024 values per token and
tensor, f16), from one tensor (one layer's K of a 128k-token session) to the whole 128k-token session
(32 layers x K and V = 64 tensors, 16 GiB). Source data: a synthetic K/V-like pattern made on the
device (per-channel offsets, outlier channels, a slow drift over tokens, noise), so that dkv-q4 meets
both intra and inter blocks.

Throughput counts bytes read + bytes written per second (parts + rows), for the codec calls and for a
cudaMemcpy device-to-device copy of the decoded size (that copy reads and writes that size). Times
are CUDA-event medians of several calls after a warm-up. Output: a markdown table (stdout and
--out FILE) with the date and the GPU name.

    python -m deltakv_tools.measure.bench_gpu --out results.md [--sizes 1,2,16,64]
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import platform
import statistics
import sys
import time

import numpy as np

from deltakv_runtime import gpu

TOKENS = 131072  # 128k tokens
VALUES = 1024  # 8 KV heads x 128
KIND_F16 = 0
CODECS = [  # (label, codec, interval, rotation)
    ("f16", "f16", 1, 0),
    ("q8_0", "q8_0", 1, 0),
    ("q4_0", "q4_0", 1, 0),
    ("delta-q4_0 kf32", "delta-q4_0", 32, 0),
    ("dkv-q4 kf32 H64", "dkv-q4", 32, 64),
]
GB = 1e9


class Bench:
    def __init__(self, k: gpu.Kernels):
        self.k = k
        self.e0 = ctypes.c_void_p()
        self.e1 = ctypes.c_void_p()
        k.event_create(ctypes.byref(self.e0))
        k.event_create(ctypes.byref(self.e1))

    def time(self, fn, reps: int) -> float:
        """Median milliseconds of fn() over reps calls, after one warm-up call."""
        fn()
        self.k.synchronize(None)
        times = []
        for _ in range(reps):
            self.k.event_record(self.e0, None)
            fn()
            self.k.event_record(self.e1, None)
            times.append(self.k.elapsed_ms(self.e0, self.e1))
        return statistics.median(times)


def part_bytes(codec: str, rows: int, interval: int) -> dict[str, int]:
    nb = VALUES // 32
    if codec == "f16":
        return {"data": rows * VALUES * 2}
    if codec == "q8_0":
        return {"data": rows * nb * 34}
    if codec == "q4_0":
        return {"data": rows * nb * 18}
    keys = -(-rows // interval)
    deltas = rows - keys
    out = {"key": keys * VALUES * 2, "q4": deltas * nb * 18}
    if codec == "dkv-q4":
        out["mode"] = deltas * ((nb + 7) // 8)
    return out


def main(argv=None) -> int:
    global TOKENS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1,2,16,64", help="tensors of 128k tokens x 1024 values (64 = whole session)")
    ap.add_argument("--out", default=None, help="also write the markdown here")
    ap.add_argument("--vpl16", action="store_true", help="also time the delta decoders with 16 values per thread")
    ap.add_argument("--alt-lib", default=None, help="a variant build of the library: its delta decoders are timed too")
    ap.add_argument("--alt-label", default="alt", help="label of the variant's rows")
    ap.add_argument("--tokens", type=int, default=TOKENS, help="rows per tensor (smoke tests use fewer)")
    ap.add_argument("--profile-one", action="store_true", help="run one dkv-q4 decode of one tensor and exit (for ncu)")
    ap.add_argument("--ans", default=None, metavar="TOKENS",
                    help="only the dkv-ans decode case (bench_gpu_ans.py) at these token counts, e.g. 4096,131072")
    args = ap.parse_args(argv)
    TOKENS = args.tokens
    if args.ans:
        from . import bench_gpu_ans

        return bench_gpu_ans.main(["--tokens", args.ans, *(["--out", args.out] if args.out else [])])

    k = k0 = gpu.load()
    name = k.device_name()
    sizes = [int(s) for s in args.sizes.split(",")]
    max_rows = max(sizes) * TOKENS
    src_bytes = max_rows * VALUES * 2
    b = Bench(k)

    src = k.malloc(src_bytes)
    dec = k.malloc(src_bytes)
    enc = {role: k.malloc(n) for role, n in
           {"data": src_bytes, "key": part_bytes("dkv-q4", max_rows, 32)["key"],
            "q4": part_bytes("dkv-q4", max_rows, 32)["q4"], "mode": part_bytes("dkv-q4", max_rows, 32)["mode"]}.items()}
    k.fill_random(src, KIND_F16, max_rows, VALUES, 12345, ctypes.c_float(1.0), None)
    k.synchronize(None)

    def encode(codec, rows, interval, rotation):
        if codec == "f16":
            k.encode_f16(src, KIND_F16, rows, VALUES, enc["data"], None)
        elif codec == "q8_0":
            k.encode_q8_0(src, KIND_F16, rows, VALUES, enc["data"], None)
        elif codec == "q4_0":
            k.encode_q4_0(src, KIND_F16, rows, VALUES, enc["data"], None)
        else:
            adaptive = int(codec == "dkv-q4")
            k.encode_delta(src, KIND_F16, rows, VALUES, interval, rotation, adaptive, adaptive,
                           enc["key"], enc["q4"], enc["mode"] if adaptive else None, None)

    alt = gpu.Kernels(args.alt_lib) if args.alt_lib else None

    def decode(codec, rows, interval, rotation, lo=0, hi=None, out=None, kk=None):
        k = kk or k0
        hi = rows if hi is None else hi
        out = dec if out is None else out
        if codec == "f16":
            k.decode_f16(enc["data"], rows, VALUES, KIND_F16, out, None)
        elif codec == "q8_0":
            k.decode_q8_0(enc["data"], rows, VALUES, KIND_F16, out, None)
        elif codec == "q4_0":
            k.decode_q4_0(enc["data"], rows, VALUES, KIND_F16, out, None)
        else:
            k.decode_delta(enc["key"], enc["q4"], enc["mode"], int(codec == "dkv-q4"), rows, VALUES, interval,
                           rotation, KIND_F16, lo, hi, out, None)

    if args.profile_one:
        encode("dkv-q4", TOKENS, 32, 64)
        k.synchronize(None)
        decode("dkv-q4", TOKENS, 32, 64)
        k.synchronize(None)
        return 0

    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    k.mem_info(ctypes.byref(free), ctypes.byref(total))
    lines = []
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines.append(f"GPU codec throughput, {now}, {name} ({total.value / 2**30:.0f} GiB), backend {k.backend}, "
                 f"host {platform.node() or '?'}")
    lines.append("")
    lines.append("Shape: 1024 values/token/tensor (8 KV heads x 128), f16 source and output, 131072 tokens per tensor "
                 "(one layer's K of a 128k-token session); 64 tensors = 32 layers x K,V = the whole 128k session. "
                 "GB/s = (bytes read + bytes written) / time; copy = cudaMemcpy D2D of the decoded size, same process. "
                 "Medians of CUDA-event timings.")
    lines.append("")
    lines.append("| codec | tensors | rows | parts GB | rows GB | copy GB/s | decode ms | decode GB/s | decode / copy "
                 "| encode ms | encode GB/s | encode / copy |")
    lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(lines), flush=True)
    notes = []

    for n_t in sizes:
        rows = n_t * TOKENS
        row_bytes = rows * VALUES * 2
        reps = max(3, min(20, int(40e9 / row_bytes)))
        copy_ms = b.time(lambda: k.memcpy_d2d(dec, src, row_bytes, None), reps)
        copy_bw = 2 * row_bytes / (copy_ms * 1e-3) / GB
        variants = []
        for label, codec, interval, rotation in CODECS:
            variants.append((label, codec, interval, rotation, 8, None))
            if alt is not None and codec in ("dkv-q4", "delta-q4_0"):
                variants.append((f"{label} {args.alt_label}", codec, interval, rotation, 8, alt))
            if args.vpl16 and codec in ("dkv-q4", "delta-q4_0"):
                variants.append((label + " vpl16", codec, interval, rotation, 16, None))
        for label, codec, interval, rotation, vpl, kk in variants:
            pb = sum(part_bytes(codec, rows, interval).values())
            enc_reps = reps if codec not in ("dkv-q4",) else max(2, min(reps, 5))
            k.set_option(b"decode_vpl", vpl)
            t0 = time.perf_counter()
            if vpl == 8 and kk is None:
                enc_ms = b.time(lambda: encode(codec, rows, interval, rotation), enc_reps)
            else:
                enc_ms = float("nan")
                encode(codec, rows, interval, rotation)
            dec_ms = b.time(lambda: decode(codec, rows, interval, rotation, kk=kk), reps)
            if kk is not None and n_t == sizes[0]:  # the variant must give the same bytes
                n_check = rows * VALUES
                a, c = np.empty(n_check, np.uint16), np.empty(n_check, np.uint16)
                k.memcpy_d2h(a.ctypes.data, dec, n_check * 2)
                decode(codec, rows, interval, rotation)
                k.synchronize(None)
                k.memcpy_d2h(c.ctypes.data, dec, n_check * 2)
                notes.append(f"- {label}: output {'identical to' if np.array_equal(a, c) else 'DIFFERENT from'} the default build's")
            k.set_option(b"decode_vpl", 8)
            dec_bw = (pb + row_bytes) / (dec_ms * 1e-3) / GB
            enc_bw = (pb + row_bytes) / (enc_ms * 1e-3) / GB
            line = (f"| {label} | {n_t} | {rows} | {pb / GB:.3f} | {row_bytes / GB:.3f} | {copy_bw:.0f} | {dec_ms:.3f} | "
                    f"{dec_bw:.0f} | {dec_bw / copy_bw:.0%} | "
                    + (f"{enc_ms:.3f} | {enc_bw:.0f} | {enc_bw / copy_bw:.0%} |" if enc_ms == enc_ms else "- | - | - |"))
            lines.append(line)
            print(line + f"  ({time.perf_counter() - t0:.1f} s)", flush=True)

        # Sanity: the decoded rows are close to the source (lossless for f16), on the last codec run.
        if n_t == sizes[-1]:
            sample = min(4096, rows) * VALUES
            a = np.empty(sample, np.uint16)
            d = np.empty(sample, np.uint16)
            for label, codec, interval, rotation in CODECS:
                encode(codec, rows, interval, rotation)
                decode(codec, rows, interval, rotation)
                k.synchronize(None)
                off = (rows - sample // VALUES) * VALUES * 2  # the last rows: the end of the longest chains
                k.memcpy_d2h(a.ctypes.data, src + off, sample * 2)
                k.memcpy_d2h(d.ctypes.data, dec + off, sample * 2)
                x, y = a.view(np.float16).astype(np.float64), d.view(np.float16).astype(np.float64)
                rel = np.sqrt(np.mean((x - y) ** 2) / np.mean(x ** 2))
                notes.append(f"- {label}: relative RMS error of the last {sample // VALUES} decoded rows vs the source: {rel:.2e}")

    # One session decoded as 64 per-tensor calls (how a loader would call it), next to one call.
    if 64 in sizes:
        rows_t = TOKENS
        encode("dkv-q4", 64 * rows_t, 32, 64)
        k.synchronize(None)
        keys_t = part_bytes("dkv-q4", rows_t, 32)

        def per_tensor():
            for t in range(64):
                k.decode_delta(enc["key"] + t * keys_t["key"], enc["q4"] + t * keys_t["q4"],
                               enc["mode"] + t * keys_t["mode"], 1, rows_t, VALUES, 32, 64, KIND_F16, 0, rows_t,
                               dec + t * rows_t * VALUES * 2, None)

        ms = b.time(per_tensor, 5)
        pb = sum(part_bytes("dkv-q4", 64 * rows_t, 32).values()) + 64 * rows_t * VALUES * 2
        notes.append(f"- dkv-q4 decode of the whole session as 64 per-tensor calls: {ms:.3f} ms, {pb / (ms * 1e-3) / GB:.0f} GB/s")

    for p in (src, dec, *enc.values()):
        k.free(p)
    lines.append("")
    lines.extend(notes)
    print("\n".join(["", *notes]), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
