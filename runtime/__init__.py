"""deltakv_runtime: the llama.cpp shim (save / load / extend a live context, a compressed prompt cache)."""

from .session import extend, live_state, load, save
from .tail import add_spare_sequence

__all__ = ["save", "load", "extend", "live_state", "add_spare_sequence", "DeltaKVCache"]


def __getattr__(name):
    if name == "DeltaKVCache":  # imports llama_cpp; only when asked for
        from .cache import DeltaKVCache

        return DeltaKVCache
    raise AttributeError(name)
