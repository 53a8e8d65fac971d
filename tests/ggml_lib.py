"""ctypes access to the ggml C library that llama-cpp-python installs: the reference for Q4_0/Q8_0."""

import ctypes
import importlib.util
from pathlib import Path

import numpy as np


def load_ggml_base():
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return None
    libdir = Path(spec.origin).parent / "lib"
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        if (libdir / name).exists():
            lib = ctypes.CDLL(str(libdir / name))
            for fn in ("quantize_row_q4_0_ref", "quantize_row_q8_0_ref"):
                getattr(lib, fn).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
                getattr(lib, fn).restype = None
            for fn in ("dequantize_row_q4_0", "dequantize_row_q8_0"):
                getattr(lib, fn).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
                getattr(lib, fn).restype = None
            return lib
    return None


def ggml_quantize(lib, fn: str, x: np.ndarray, block_bytes: int) -> np.ndarray:
    x = np.ascontiguousarray(x, np.float32)
    out = np.empty(x.size // 32 * block_bytes, np.uint8)
    getattr(lib, fn)(x.ctypes.data, out.ctypes.data, x.size)
    return out


def ggml_dequantize(lib, fn: str, blocks: np.ndarray, n: int) -> np.ndarray:
    blocks = np.ascontiguousarray(blocks, np.uint8)
    out = np.empty(n, np.float32)
    getattr(lib, fn)(blocks.ctypes.data, out.ctypes.data, n)
    return out
