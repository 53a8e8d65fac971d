"""GPU encode and decode of the Delta-KV codecs: a ctypes binding to runtime/kernels/deltakv_kernels.cu.

The kernel library is built from the one CUDA/HIP source with :func:`build_library` (nvcc, or hipcc
for AMD) into ``runtime/build/`` (git-ignored) the first time it is needed; ``runtime/kernels/build.sh``
does the same from a shell. :func:`is_available` says whether a GPU and the library are usable.

:func:`decode` and :func:`encode` take a codec object and numpy arrays (host memory) and return the
results of its methods (``Codec.decode`` / ``Codec.encode`` in deltakv_format/codecs): the same
bytes as the Numba reference, bit for bit. The kernels are registered per codec class in
``CODEC_KERNELS``; with ``kernels_for`` this module is itself the accelerator that
``deltakv_format.codecs.use_accelerator`` takes. :class:`Kernels` exposes the C ABI on device
pointers (see deltakv_kernels.h) for callers that keep data on the GPU.

Backends (``DELTAKV_GPU_BACKEND``): ``cuda`` (default when nvcc is found), ``hip``, or ``emulator``:
the same kernels compiled for the CPU by a C++ compiler with a small warp emulator, to test the
kernel logic on machines without a GPU (slow; small inputs only). The emulator is never chosen
unless asked for.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

from deltakv_format.codecs import (
    BITS_DTYPE,
    KIND_OF_TYPE,
    Codec,
    DeltaQ4_0Codec,
    DkvQ4Codec,
    F16Codec,
    KernelRegistry,
    Q4_0Codec,
    Q8_0Codec,
    check_finite,
)
from deltakv_format.codecs.dkv_ans_codec import DkvAnsCodec, corrupt_stream
from deltakv_format.codecs import ans as _ans
from deltakv_format.constants import FLOAT_TYPES, GGMLType, ggml_row_bytes
from deltakv_format.errors import CodecError

KERNEL_DIR = Path(__file__).resolve().parent / "kernels"
BUILD_DIR = Path(__file__).resolve().parent / "build"
SOURCE = KERNEL_DIR / "deltakv_kernels.cu"
HEADERS = [KERNEL_DIR / "deltakv_kernels.h", KERNEL_DIR / "deltakv_gpu_compat.h", KERNEL_DIR / "deltakv_emu.h"]

CUDA_ARCHS = ("80", "90")
HIP_ARCHS = ("gfx906", "gfx90a", "gfx942")

# Flags that the bit-exact arithmetic needs: no contraction into FMA, no flush-to-zero, IEEE division.
NVCC_FLAGS = ["-std=c++17", "-O3", "-fmad=false", "-ftz=false", "-prec-div=true", "-prec-sqrt=true"]
# -fno-slp-vectorize: clang 15 (ROCm 5.2) spends hours on gfx90a SLP-vectorising the in-register butterflies.
HIPCC_FLAGS = ["-std=c++17", "-O3", "-ffp-contract=off", "-fno-gpu-flush-denormals-to-zero", "-fno-slp-vectorize"]
EMU_FLAGS = ["-std=c++17", "-O2", "-DDKV_EMU", "-ffp-contract=off", "-fno-strict-aliasing", "-Wno-unknown-pragmas"]

DKV_OK = 0
_ERRORS = {1: "invalid argument", 2: "misaligned pointer", 3: "kernel launch failed", 4: "runtime error", 5: "no device"}


class GPUError(RuntimeError):
    """A kernel or runtime call failed; the message is the library's (dkv_last_error)."""


# ---- building -----------------------------------------------------------------------------------


def default_backend() -> str:
    env = os.environ.get("DELTAKV_GPU_BACKEND")
    if env:
        if env not in ("cuda", "hip", "emulator"):
            raise GPUError(f"DELTAKV_GPU_BACKEND must be cuda, hip or emulator, found {env!r}")
        return env
    if shutil.which("nvcc") or Path("/usr/local/cuda/bin/nvcc").exists():
        return "cuda"
    if shutil.which("hipcc"):
        return "hip"
    return "cuda"


def _nvcc() -> str:
    return shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"


def compile_command(backend: str, output: Path, archs=None, shared: bool = True, defines=()) -> list[str]:
    """The compiler command line for one backend (used by build_library and the compile tests).

    ``defines``: extra preprocessor definitions (tuning experiments), e.g. ``("DKV_DECODE_MIN_BLOCKS(v)=4",)``.
    """
    cmd = _compile_command(backend, output, archs, shared)
    return [*cmd[:1], *(f"-D{d}" for d in defines), *cmd[1:]]


def _compile_command(backend: str, output: Path, archs, shared: bool) -> list[str]:
    if backend == "cuda":
        cmd = [_nvcc(), *NVCC_FLAGS]
        for a in archs or CUDA_ARCHS:
            cmd += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        last = (archs or CUDA_ARCHS)[-1]
        cmd += ["-gencode", f"arch=compute_{last},code=compute_{last}"]  # PTX for newer GPUs
        cmd += ["-Xcompiler", "-fPIC", "-shared"] if shared else ["-c"]
        cmd += os.environ.get("DELTAKV_NVCC_EXTRA", "").split()  # e.g. "-cudart shared", for a variant build
    elif backend == "hip":
        cmd = [shutil.which("hipcc") or "hipcc", *HIPCC_FLAGS]
        cmd += [f"--offload-arch={a}" for a in archs or HIP_ARCHS]
        cmd += ["-fPIC", "-shared"] if shared else ["-c"]
    elif backend == "emulator":
        cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or "c++"
        cmd = [cxx, *EMU_FLAGS, "-fPIC", "-shared", "-x", "c++"] if shared else [cxx, *EMU_FLAGS, "-c", "-x", "c++"]
    else:
        raise GPUError(f"unknown backend {backend!r}")
    return [*cmd, "-o", str(output), str(SOURCE)]


def library_path(backend: str | None = None, tag: str = "") -> Path:
    return BUILD_DIR / f"libdeltakv_kernels_{backend or default_backend()}{tag}.so"


def build_library(backend: str | None = None, force: bool = False, archs=None, verbose: bool = False,
                  defines=(), tag: str = "") -> Path:
    """Compile the kernel library for ``backend`` into runtime/build/ (skipped when up to date).

    ``defines`` and ``tag`` build a variant (extra -D flags) under its own file name, for experiments.
    """
    backend = backend or default_backend()
    out = library_path(backend, tag)
    newest = max(p.stat().st_mtime for p in [SOURCE, *HEADERS] if p.exists())
    if out.exists() and not force and out.stat().st_mtime >= newest:
        return out
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=BUILD_DIR)
    os.close(fd)
    cmd = compile_command(backend, Path(tmp), archs, defines=defines)
    if verbose:
        print(" ".join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=KERNEL_DIR)
    except FileNotFoundError as e:
        os.unlink(tmp)
        raise GPUError(f"cannot build the {backend} kernels: {cmd[0]} not found") from e
    if proc.returncode != 0:
        os.unlink(tmp)
        raise GPUError(f"building the {backend} kernels failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
    os.replace(tmp, out)  # atomic: concurrent builders never see a half-written library
    return out


# ---- loading ------------------------------------------------------------------------------------

_P, _I, _I64, _U64, _F, _SZ = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_uint64, ctypes.c_float, ctypes.c_size_t
_SIGNATURES = {
    "dkv_abi_version": ([], _I),
    "dkv_last_error": ([], ctypes.c_char_p),
    "dkv_backend": ([], ctypes.c_char_p),
    "dkv_device_count": ([ctypes.POINTER(_I)], _I),
    "dkv_device_name": ([_I, ctypes.c_char_p, _SZ], _I),
    "dkv_set_option": ([ctypes.c_char_p, _I64], _I),
    "dkv_malloc": ([ctypes.POINTER(_P), _SZ], _I),
    "dkv_free": ([_P], _I),
    "dkv_memcpy_h2d": ([_P, _P, _SZ], _I),
    "dkv_memcpy_d2h": ([_P, _P, _SZ], _I),
    "dkv_memcpy_d2d": ([_P, _P, _SZ, _P], _I),
    "dkv_memset": ([_P, _I, _SZ, _P], _I),
    "dkv_synchronize": ([_P], _I),
    "dkv_mem_info": ([ctypes.POINTER(_SZ), ctypes.POINTER(_SZ)], _I),
    "dkv_event_create": ([ctypes.POINTER(_P)], _I),
    "dkv_event_destroy": ([_P], _I),
    "dkv_event_record": ([_P, _P], _I),
    "dkv_event_elapsed_ms": ([_P, _P, ctypes.POINTER(_F)], _I),
    "dkv_fill_random": ([_P, _I, _I64, _I64, _U64, _F, _P], _I),
    "dkv_find_nonfinite": ([_P, _I, _I64, ctypes.POINTER(_I64)], _I),
    "dkv_decode_f16": ([_P, _I64, _I64, _I, _P, _P], _I),
    "dkv_decode_q8_0": ([_P, _I64, _I64, _I, _P, _P], _I),
    "dkv_decode_q4_0": ([_P, _I64, _I64, _I, _P, _P], _I),
    "dkv_decode_delta": ([_P, _P, _P, _I, _I64, _I64, _I64, _I, _I, _I64, _I64, _P, _P], _I),
    "dkv_encode_f16": ([_P, _I, _I64, _I64, _P, _P], _I),
    "dkv_encode_q8_0": ([_P, _I, _I64, _I64, _P, _P], _I),
    "dkv_encode_q4_0": ([_P, _I, _I64, _I64, _P, _P], _I),
    "dkv_encode_delta": ([_P, _I, _I64, _I64, _I64, _I, _I, _I, _P, _P, _P, _P], _I),
    "dkv_rope_table": ([_P, _I64, _P, _I64, _P, _P], _I),
    "dkv_decode_ans": ([_P, _P, _I64, _I64, _I64, _P, _P, _P, _I, _F, _P, _I64, _I, _P, _I64, _I64, _I, _I64, _I64,
                        _P, _P, _P], _I),
    "dkv_stream_create": ([ctypes.POINTER(_P)], _I),
    "dkv_stream_destroy": ([_P], _I),
}


class Kernels:
    """The C ABI of one loaded library; every method raises GPUError on a nonzero return code."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lib = ctypes.CDLL(str(self.path))
        for name, (args, res) in _SIGNATURES.items():
            fn = getattr(self.lib, name)
            fn.argtypes = args
            fn.restype = res
        self.backend = self.lib.dkv_backend().decode()

    def __getattr__(self, name):
        fn = getattr(self.lib, "dkv_" + name)

        def call(*args):
            rc = fn(*args)
            if rc != DKV_OK:
                msg = self.lib.dkv_last_error().decode(errors="replace")
                raise GPUError(f"dkv_{name}: {_ERRORS.get(rc, rc)}: {msg}")
            return rc

        return call

    # conveniences
    def malloc(self, nbytes: int) -> int:
        p = ctypes.c_void_p()
        self.__getattr__("malloc")(ctypes.byref(p), max(int(nbytes), 1))
        return p.value

    def device_count(self) -> int:
        n = ctypes.c_int(0)
        rc = self.lib.dkv_device_count(ctypes.byref(n))
        return n.value if rc == DKV_OK else 0

    def device_name(self, device: int = 0) -> str:
        buf = ctypes.create_string_buffer(256)
        self.__getattr__("device_name")(device, buf, 256)
        return buf.value.decode(errors="replace")

    def elapsed_ms(self, start, stop) -> float:
        ms = ctypes.c_float()
        self.__getattr__("event_elapsed_ms")(start, stop, ctypes.byref(ms))
        return ms.value


_lock = threading.Lock()
_loaded: dict[str, Kernels] = {}
_unavailable: dict[str, str] = {}


def load(backend: str | None = None, build: bool = True) -> Kernels:
    """The kernel library for ``backend`` (built first when needed and ``build``)."""
    backend = backend or default_backend()
    with _lock:
        if backend in _loaded:
            return _loaded[backend]
        path = build_library(backend) if build else library_path(backend)
        if not path.exists():
            raise GPUError(f"kernel library {path} is not built (run runtime/kernels/build.sh)")
        k = Kernels(path)
        _loaded[backend] = k
        return k


def _probe_cuda_device() -> str | None:
    """Ask the CUDA runtime for a device before spending minutes on a build (None: can't tell or yes)."""
    for name in ("libcudart.so", "libcudart.so.13", "libcudart.so.12", "/usr/local/cuda/lib64/libcudart.so"):
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError:
            continue
    else:
        return None
    n = ctypes.c_int(0)
    rc = lib.cudaGetDeviceCount(ctypes.byref(n))
    if rc != 0 or n.value < 1:
        lib.cudaGetErrorString.restype = ctypes.c_char_p
        msg = lib.cudaGetErrorString(rc).decode(errors="replace") if rc else "0 devices"
        return f"no CUDA GPU here (cudaGetDeviceCount: {msg})"
    return None


def unavailable_reason(backend: str | None = None) -> str | None:
    """None when a GPU (or the emulator, if chosen) can run the kernels, else why not."""
    backend = backend or default_backend()
    if backend in _unavailable:
        return _unavailable[backend]
    reason = _probe_cuda_device() if backend == "cuda" else None
    if reason is None:
        try:
            k = load(backend)
            if k.device_count() < 1:
                reason = f"no GPU visible to the {backend} runtime: {k.lib.dkv_last_error().decode(errors='replace')}"
        except (GPUError, OSError) as e:
            reason = str(e)
    _unavailable[backend] = reason
    return reason


def is_available(backend: str | None = None) -> bool:
    """True when the kernels can run here (library builds and loads, and a GPU is visible)."""
    return unavailable_reason(backend) is None


# ---- host-array front end -----------------------------------------------------------------------


class _Device:
    """Device allocations of one call, freed on exit."""

    def __init__(self, k: Kernels):
        self.k = k
        self.ptrs: list[int] = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for p in self.ptrs:
            try:
                self.k.free(p)
            except GPUError:
                pass

    def alloc(self, nbytes: int) -> int:
        p = self.k.malloc(nbytes)
        self.ptrs.append(p)
        return p

    def put(self, array: np.ndarray | None) -> int | None:
        if array is None:
            return None
        a = np.ascontiguousarray(array)
        p = self.alloc(a.nbytes)
        if a.nbytes:
            self.k.memcpy_h2d(p, a.ctypes.data, a.nbytes)
        return p

    def get(self, ptr: int, shape, dtype, into: np.ndarray | None = None) -> np.ndarray:
        """The device array at ``ptr`` copied back: into ``into`` when it is a C-contiguous array of
        that shape and dtype (no host copy after), else into a new array."""
        shape = tuple(shape)
        usable = (into is not None and into.shape == shape and into.dtype == np.dtype(dtype)
                  and into.flags.c_contiguous and into.flags.writeable)
        out = into if usable else np.empty(shape, dtype)
        if out.nbytes:
            self.k.synchronize(None)
            self.k.memcpy_d2h(out.ctypes.data, ptr, out.nbytes)
        if into is not None and not usable:
            into[...] = out
            return into
        return out


def _kind(ggml_type: int) -> int:
    try:
        return KIND_OF_TYPE[GGMLType(ggml_type)]
    except (ValueError, KeyError):
        raise CodecError(f"the GPU codecs take F16, BF16 or F32 tracks, found ggml type {ggml_type}") from None


def _part_shapes(codec: Codec, ggml_type: int, n_rows: int, n_values: int) -> dict[str, tuple[tuple[int, int], type]]:
    """(rows, row elements) and element dtype of each part ``codec.encode`` returns for these rows."""
    rows_of = codec.expected_part_rows(n_rows)
    shapes = {}
    for part in codec.parts(ggml_type, n_values):
        if part.ggml_type in FLOAT_TYPES:
            shapes[part.role] = ((rows_of[part.role], part.n_values), BITS_DTYPE[GGMLType(part.ggml_type)])
        else:  # quantized blocks and bitmaps travel as bytes
            shapes[part.role] = ((rows_of[part.role], ggml_row_bytes(part.ggml_type, part.n_values)), np.uint8)
    return shapes


def decode(codec: Codec, parts: dict, ggml_type: int, n_values: int, row_lo: int, row_hi: int, *,
           backend: str | None = None, context=None) -> np.ndarray:
    """Rows [row_lo, row_hi) of one segment, decoded on the GPU: ``codec.decode`` bit for bit.

    ``parts`` are the segment's parts as host arrays (``Codec.encode``'s output); the result is a
    (row_hi - row_lo) x n_values array of element bits (uint16 for F16/BF16, uint32 for F32).
    A codec without GPU kernels (raw: a byte copy) decodes on the CPU. ``context``: the
    :class:`TrackContext` (cell positions) of codecs with ``takes_context`` (dkv-ans).
    """
    kernels = CODEC_KERNELS.kernels_for(codec)
    extra = (context,) if codec.takes_context else ()
    if kernels is None:
        return codec.decode(parts, ggml_type, n_values, row_lo, row_hi, None, *extra)
    return kernels.decode(codec, parts, ggml_type, n_values, row_lo, row_hi, *extra, backend=backend)


def encode(codec: Codec, rows: np.ndarray, ggml_type: int, *, where: str = "track",
           backend: str | None = None, context=None) -> dict[str, np.ndarray]:
    """Encode one segment's rows (element bits) on the GPU: ``codec.encode`` bit for bit."""
    kernels = CODEC_KERNELS.kernels_for(codec)
    extra = (context,) if codec.takes_context else ()
    if kernels is None:
        return codec.encode(rows, ggml_type, where, *extra)
    return kernels.encode(codec, rows, ggml_type, where, *extra, backend=backend)


def kernels_for(codec: Codec):
    """The accelerator interface (``deltakv_format.codecs.use_accelerator(deltakv_runtime.gpu)``)."""
    return CODEC_KERNELS.kernels_for(codec)


# ---- the kernels of each codec class ------------------------------------------------------------


def _decode_with(launch):
    """A decoder for ``CODEC_KERNELS``: the checks every codec needs, then ``launch`` on the device."""

    def decode_on_gpu(codec, parts, ggml_type, n_values, row_lo, row_hi, *, backend=None, out=None):
        if not codec.accepts(ggml_type, n_values):
            raise CodecError(f"codec {codec.name} cannot decode a {GGMLType(ggml_type).name} track of {n_values} values")
        kind = _kind(ggml_type)
        n_rows = codec.rows_of_parts(parts)
        if not 0 <= row_lo <= row_hi <= n_rows:
            raise CodecError(f"rows [{row_lo}, {row_hi}) are outside the segment's {n_rows} rows")
        n_out = row_hi - row_lo
        dtype = BITS_DTYPE[GGMLType(ggml_type)]
        if n_out == 0:
            return np.empty((0, n_values), dtype) if out is None else out
        k = load(backend)
        with _Device(k) as dev:
            d_out = dev.alloc(n_out * n_values * np.dtype(dtype).itemsize)
            launch(k, dev, codec, parts, dtype, n_rows, n_values, kind, row_lo, row_hi, d_out)
            return dev.get(d_out, (n_out, n_values), dtype, into=out)

    return decode_on_gpu


def _encode_with(launch):
    """An encoder for ``CODEC_KERNELS``: the checks every codec needs, then ``launch`` on the device."""

    def encode_on_gpu(codec, rows, ggml_type, where="track", *, backend=None):
        rows = np.ascontiguousarray(rows)
        n_rows, n_values = rows.shape
        if not codec.accepts(ggml_type, n_values):
            raise CodecError(f"codec {codec.name} cannot encode a {GGMLType(ggml_type).name} track of {n_values} values")
        kind = _kind(ggml_type)
        if rows.dtype != BITS_DTYPE[GGMLType(ggml_type)]:
            raise CodecError(f"rows must be {np.dtype(BITS_DTYPE[GGMLType(ggml_type)])} bit patterns, found {rows.dtype}")
        if isinstance(codec, F16Codec) and ggml_type == GGMLType.F16:
            return {"data": rows.copy()}  # the stored bits are the cache's, NaN and infinities included
        check_finite(rows, ggml_type, where)
        shapes = _part_shapes(codec, ggml_type, n_rows, n_values)
        k = load(backend)
        with _Device(k) as dev:
            src = dev.put(rows)
            outs = {role: dev.alloc(int(np.prod(shape)) * np.dtype(dtype).itemsize) for role, (shape, dtype) in shapes.items()}
            launch(k, src, codec, kind, n_rows, n_values, outs)
            return {role: dev.get(outs[role], shape, dtype) for role, (shape, dtype) in shapes.items()}

    return encode_on_gpu


def _launch_decode_data(kernel: str):
    """f16, q8_0, q4_0: one ``data`` part, each row decoded on its own."""

    def launch(k, dev, codec, parts, dtype, n_rows, n_values, kind, row_lo, row_hi, out):
        data = np.ascontiguousarray(parts["data"][row_lo:row_hi])
        getattr(k, kernel)(dev.put(data), row_hi - row_lo, n_values, kind, out, None)

    return launch


def _launch_encode_data(kernel: str):
    def launch(k, src, codec, kind, n_rows, n_values, outs):
        getattr(k, kernel)(src, kind, n_rows, n_values, outs["data"], None)

    return launch


def _launch_decode_delta(k, dev, codec, parts, dtype, n_rows, n_values, kind, row_lo, row_hi, out):
    keys = np.ascontiguousarray(parts["key"])
    if keys.dtype != dtype or keys.shape[1:] != (n_values,):
        raise CodecError(f"key part must be rows x {n_values} {np.dtype(dtype)}, found {keys.shape} {keys.dtype}")
    q4 = np.ascontiguousarray(parts["q4"], dtype=np.uint8)
    modes = parts.get("mode") if codec.adaptive else None
    k.decode_delta(dev.put(keys), dev.put(q4), dev.put(modes), int(codec.adaptive), n_rows, n_values,
                   codec.keyframe_interval, codec.rotation, kind, row_lo, row_hi, out, None)


def _launch_encode_delta(k, src, codec, kind, n_rows, n_values, outs):
    k.encode_delta(src, kind, n_rows, n_values, codec.keyframe_interval, codec.rotation, int(codec.adaptive),
                   int(codec.search), outs["key"], outs["q4"], outs.get("mode"), None)


CODEC_KERNELS = KernelRegistry()
"""The GPU kernels of each codec class; raw (a byte copy) has none and stays on the CPU. Every decoder
copies its rows back straight into the caller's destination (``decodes_into``)."""
CODEC_KERNELS.register(F16Codec, encode=_encode_with(_launch_encode_data("encode_f16")),
                       decode=_decode_with(_launch_decode_data("decode_f16")), decodes_into=True)
CODEC_KERNELS.register(Q8_0Codec, encode=_encode_with(_launch_encode_data("encode_q8_0")),
                       decode=_decode_with(_launch_decode_data("decode_q8_0")), decodes_into=True)
CODEC_KERNELS.register(Q4_0Codec, encode=_encode_with(_launch_encode_data("encode_q4_0")),
                       decode=_decode_with(_launch_decode_data("decode_q4_0")), decodes_into=True)
# one kernel pair serves both delta codecs: the codec's adaptive / search flags select the variant
CODEC_KERNELS.register(DeltaQ4_0Codec, DkvQ4Codec, encode=_encode_with(_launch_encode_delta),
                       decode=_decode_with(_launch_decode_delta), decodes_into=True)


# ---- dkv-ans: decode on the GPU (one thread per rANS stream), encode on the CPU -------------------


def _encode_ans(codec, rows, ggml_type, where="track", context=None, *, backend=None):
    """dkv-ans encodes on the CPU (quantisation, table choice and stream coding: the Numba encoder)."""
    return codec._encode(rows, ggml_type, where, context)


def _decode_ans(codec, parts, ggml_type, n_values, row_lo, row_hi, context=None, *, backend=None, out=None):
    """``DkvAnsCodec._decode`` on the GPU: sink rows copied, coded rows decoded by dkv_decode_ans
    (positions -> cos/sin by dkv_rope_table on the device), a corrupt stream raises CorruptError."""
    if not codec.accepts(ggml_type, n_values):
        raise CodecError(f"codec {codec.name} cannot decode a {GGMLType(ggml_type).name} track of {n_values} values")
    kind = _kind(ggml_type)
    dtype = BITS_DTYPE[GGMLType(ggml_type)]
    if codec.rope == _ans.ROPE_NEOX and codec.rope_dims > 256:
        return codec._decode(parts, ggml_type, n_values, row_lo, row_hi, out, context)  # beyond the kernel's buffer
    shape = (max(row_hi - row_lo, 0), n_values)
    if out is None or out.shape != shape or out.dtype != np.dtype(dtype) or not out.flags.c_contiguous:
        if out is not None:  # not a destination to decode into: decode, then copy
            out[...] = _decode_ans(codec, parts, ggml_type, n_values, row_lo, row_hi, context, backend=backend)
            return out
        out = np.empty(shape, dtype)
    if row_hi <= row_lo:
        return out
    coded = codec.split_decode(parts, n_values, row_lo, row_hi, out, context)
    if coded is None:
        return out
    clo, chi, words, head = coded.first, coded.end, coded.words, coded.head
    n_out = chi - clo
    k = load(backend)
    with _Device(k) as dev:
        table = None
        n_pairs = codec.rope_dims // 2 if codec.rope else 0
        if codec.rope:
            positions = coded.positions.astype(np.int32)
            table = dev.alloc(n_out * n_pairs * 8)
            k.rope_table(dev.put(positions), n_out, dev.put(np.ascontiguousarray(codec.thetas, np.float32)), n_pairs,
                         table, None)
        d_out = dev.alloc(n_out * n_values * np.dtype(dtype).itemsize)
        bad = dev.alloc(8)
        k.decode_ans(dev.put(words), dev.put(head.starts.astype(np.uint32)), words.size, head.n_rows, codec.stream_rows,
                     dev.put(head.classes.astype(np.uint8)), dev.put(head.shifts.astype(np.uint8)),
                     dev.put(head.freqs.astype(np.uint16)), len(head.shifts), ctypes.c_float(float(head.step)),
                     dev.put(head.means.astype(np.float32)), n_values, kind, table, codec.head_dim, codec.rope_dims,
                     codec.rope, clo, chi, d_out, bad, None)
        first_bad = int(dev.get(bad, (1,), np.int64)[0])
        if first_bad >= 0:
            raise corrupt_stream(first_bad)
        dev.get(d_out, (n_out, n_values), dtype, into=coded.out)
    return out


CODEC_KERNELS.register(DkvAnsCodec, encode=_encode_ans, decode=_decode_ans, decodes_into=True)
