"""What a model's GGUF header says about the shape of its llama.cpp KV cache state.

A llama.cpp state does not record how many KV caches it holds, which layers each holds, or
whether its cells carry the 12-byte ext record: those follow from the model. :class:`ModelInfo`
reads them from the model's GGUF header (gguf-py's ``GGUFReader``; no llama.cpp needed), the way
llama.cpp 0.3.36 derives them (``llama-model.cpp``, ``llama-hparams.cpp``, ``models/*.cpp``,
``llama-kv-cache.cpp``):

- per-layer KV heads: ``{arch}.attention.head_count_kv`` (scalar or per-layer array; defaults to
  ``head_count``); a layer with 0 KV heads has no attention cache (recurrent layer of a hybrid);
- head sizes: ``{arch}.attention.key_length`` / ``value_length`` (default embedding_length /
  head_count) and the ``_swa`` variants for sliding-window layers;
- sliding-window layers: ``{arch}.attention.sliding_window_pattern`` (per-layer bool array, or a
  period n), else the architecture's default period (Gemma 3: 6). With period n, layer il is SWA
  when ``il % n < n - 1`` (every n-th layer is full attention) or, for "dense first" models,
  when ``il % n != 0``; an iSWA model writes the full-attention cache first, then the SWA cache;
- per-cell ext record (``llama_kv_cache::has_cell_ext``): M-RoPE/IM-RoPE models
  (``n_pos_per_embd() > 1``) and models with PLE n-gram heads (``{arch}.ple.layers``);
- MLA caches (``{arch}.attention.key_length_mla``) have no V tensors;
- recurrent / hybrid architectures (``llm_arch_is_recurrent`` / ``llm_arch_is_hybrid``) end the
  state with a recurrent block.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

import numpy as np

from .constants import GGUFValueType
from .errors import CorruptError, DeltaKVError, TruncatedError
from .gguf_io import SkippedStrings, parse_header

__all__ = ["ModelInfo", "SkippedStrings", "read_gguf_metadata"]

# (default period, dense_first) of load_swa_pattern() per architecture, for models whose GGUF
# has a sliding window but no explicit pattern key (llama.cpp 0.3.36, models/*.cpp).
SWA_DEFAULT_PATTERN: dict[str, tuple[int, bool]] = {
    "afmoe": (4, False),
    "cohere2": (4, False),
    "cohere2moe": (4, True),
    "exaone-moe": (4, False),
    "exaone4": (4, False),
    "gemma-embedding": (6, False),
    "gemma2": (2, False),
    "gemma3": (6, False),
    "gemma3n": (5, False),
    "laguna": (4, True),
    "llama4": (4, False),
    "mellum": (4, False),
    "modern-bert": (3, True),
    "muse-glimmer": (4, False),
    "olmo2": (4, False),
    "gpt-oss": (2, False),
    "plamo3": (8, False),
    "smallthinker": (4, True),
}

# llama_model_rope_type() == MROPE / IMROPE unconditionally ...
MROPE_ARCHS = frozenset(
    {"qwen2vl", "paddleocr", "qwen3vl", "qwen3vlmoe", "qwen35", "qwen35moe", "qwen4exp", "qwen3tts"}
)
# ... or when {arch}.rope.dimension_sections has its first two entries non-zero (use_mrope()).
MROPE_IF_SECTIONS_ARCHS = frozenset({"glm4", "glm4moe", "hunyuan_vl", "bailingmoe3", "dflash"})

RECURRENT_ARCHS = frozenset({"mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7"})
HYBRID_ARCHS = frozenset(
    {
        "jamba", "falcon-h1", "plamo2", "granitehybrid", "lfm2", "lfm2moe", "nemotron_h", "nemotron_h_moe",
        "qwen3next", "kimi-linear", "bailingmoe3", "kimi-k3", "glm5-next", "qwen35", "qwen35moe", "qwen4exp",
        "deepseek4", "minimax-01",
    }
)

# gemma3n keeps a KV cache only for its first 20 layers (n_layer_kv_from_start, hard-coded).
KV_FROM_START: dict[str, int] = {"gemma3n": 20}


@dataclass(frozen=True)
class ModelInfo:
    """The parts of a model's hyperparameters that decide its llama.cpp state layout."""

    arch: str
    n_layer: int
    n_head_kv: tuple[int, ...]  # per layer
    key_length: int  # head size of K in full-attention layers
    value_length: int
    key_length_swa: int
    value_length_swa: int
    embedding_length: int
    sliding_window: int | None  # None: no sliding-window attention
    swa_layers: tuple[bool, ...]  # per layer: True for sliding-window layers
    cell_ext: bool  # cells carry the 12-byte ext record in v10+ states
    is_mla: bool  # the cache has no V tensors
    has_recurrent: bool  # the state ends with a recurrent block (recurrent or hybrid model)
    n_layer_kv_from_start: int | None = None
    n_vocab: int | None = None  # logits per output in the legacy outputs section

    @property
    def is_iswa(self) -> bool:
        return self.sliding_window is not None and any(self.swa_layers) and not all(self.swa_layers)

    def n_embd_k_gqa(self, il: int) -> int:
        return (self.key_length_swa if self.swa_layers[il] else self.key_length) * self.n_head_kv[il]

    def n_embd_v_gqa(self, il: int) -> int:
        return (self.value_length_swa if self.swa_layers[il] else self.value_length) * self.n_head_kv[il]

    def kv_layers(self) -> list[int]:
        """Layers that have an attention KV cache."""
        limit = self.n_layer if self.n_layer_kv_from_start is None else self.n_layer_kv_from_start
        return [il for il in range(min(limit, self.n_layer)) if self.n_head_kv[il] > 0]

    def kv_cache_layers(self, *, sequence: bool = False, single_cache: bool = False) -> list[list[list[int]]]:
        """The accepted ways the state's KV caches split the layers: a list of alternatives, each
        a list of caches in file order, each a list of layer ids.

        iSWA models write the full-attention cache, then the SWA cache; a sequence state saved with
        LLAMA_STATE_SEQ_FLAGS_PARTIAL_ONLY holds the SWA cache only. ``single_cache``: llama.cpp of
        2025-05 (no iSWA cache yet) kept every layer in one cache.
        """
        layers = self.kv_layers()
        if not layers:
            return [[]]
        if single_cache or not self.is_iswa:
            return [[layers]]
        full = [il for il in layers if not self.swa_layers[il]]
        swa = [il for il in layers if self.swa_layers[il]]
        plans = [[full, swa]]
        if sequence:
            plans.append([swa])
        return plans

    @classmethod
    def from_gguf(cls, path: str | os.PathLike, *, use_gguf_reader: bool = False) -> ModelInfo:
        """Read the model's GGUF header (key-values only; tensors are not touched).

        By default the key-value section is read directly (bounds-checked, string arrays such as
        the vocabulary skipped): gguf-py's ``GGUFReader`` builds every field and tensor record
        up front, which takes ~25 s for Gemma 3's 262k-token vocabulary on this machine.
        ``use_gguf_reader=True`` reads through ``GGUFReader`` instead (same result).
        """
        path = os.fspath(path)
        if use_gguf_reader:
            from gguf import GGUFReader

            try:
                reader = GGUFReader(path, "r")
            except (OSError, ValueError, KeyError, IndexError) as e:
                raise CorruptError(f"expected a GGUF model file, could not read its header: {e}", path=path) from e
            values = {}
            for key, fld in reader.fields.items():
                if fld.types and fld.types[0] == GGUFValueType.ARRAY and fld.types[-1] == GGUFValueType.STRING:
                    values[key] = SkippedStrings(len(fld.data))
                    continue
                values[key] = fld.contents()
        else:
            values = read_gguf_metadata(path)
        return cls.from_metadata(values, source=path)

    @classmethod
    def from_metadata(cls, kv: dict, *, source: str = "model") -> ModelInfo:
        """Build from a GGUF key-value mapping (what :meth:`from_gguf` reads)."""
        arch = kv.get("general.architecture")
        if not isinstance(arch, str):
            raise CorruptError(f"{source}: expected a string general.architecture, found {arch!r}")

        def get(name, default=None):
            return kv.get(f"{arch}.{name}", default)

        n_layer = get("block_count")
        if not isinstance(n_layer, int) or not 0 < n_layer <= 1 << 16:
            raise CorruptError(f"{source}: expected {arch}.block_count in 1..65536, found {n_layer!r}")

        def per_layer(value, name):
            if isinstance(value, (list, tuple)):
                if len(value) != n_layer:
                    raise CorruptError(f"{source}: {arch}.{name} has {len(value)} entries, expected {n_layer}")
                return tuple(int(x) for x in value)
            return (int(value),) * n_layer

        n_embd = int(get("embedding_length", 0))
        n_head = per_layer(get("attention.head_count", 0), "attention.head_count")
        n_head_kv = per_layer(get("attention.head_count_kv", n_head), "attention.head_count_kv")
        n_head_max = max(n_head) if n_head else 0
        default_head = n_embd // n_head_max if n_head_max else 0
        key_length = int(get("attention.key_length", default_head))
        value_length = int(get("attention.value_length", default_head))
        key_length_swa = int(get("attention.key_length_swa", key_length))
        value_length_swa = int(get("attention.value_length_swa", value_length))

        sliding_window = get("attention.sliding_window")
        swa_layers = (False,) * n_layer
        if isinstance(sliding_window, int) and sliding_window > 0:
            pattern = get("attention.sliding_window_pattern")
            if isinstance(pattern, (list, tuple)):
                swa_layers = tuple(bool(x) for x in per_layer(pattern, "attention.sliding_window_pattern"))
            else:
                period, dense_first = SWA_DEFAULT_PATTERN.get(arch, (0, False))
                if isinstance(pattern, int):
                    period = pattern
                if dense_first:
                    swa_layers = tuple(period == 0 or il % period != 0 for il in range(n_layer))
                else:
                    swa_layers = tuple(period == 0 or il % period < period - 1 for il in range(n_layer))
        else:
            sliding_window = None

        sections = get("rope.dimension_sections")
        use_mrope = isinstance(sections, (list, tuple)) and len(sections) >= 2 and sections[0] > 0 and sections[1] > 0
        mrope = arch in MROPE_ARCHS or (arch in MROPE_IF_SECTIONS_ARCHS and use_mrope)
        ple = arch == "qwen4exp" and bool(get("ple.layers"))
        is_mla = bool(get("attention.key_length_mla", 0)) and bool(get("attention.value_length_mla", 0))
        n_vocab = get("vocab_size")
        if n_vocab is None and "tokenizer.ggml.tokens" in kv:
            n_vocab = len(kv["tokenizer.ggml.tokens"])

        return cls(
            arch=arch,
            n_layer=n_layer,
            n_head_kv=n_head_kv,
            key_length=key_length,
            value_length=value_length,
            key_length_swa=key_length_swa,
            value_length_swa=value_length_swa,
            embedding_length=n_embd,
            sliding_window=sliding_window,
            swa_layers=swa_layers,
            cell_ext=mrope or ple,
            is_mla=is_mla,
            has_recurrent=arch in RECURRENT_ARCHS or arch in HYBRID_ARCHS,
            n_layer_kv_from_start=KV_FROM_START.get(arch),
            n_vocab=int(n_vocab) if n_vocab else None,
        )


# ---- GGUF key-value section -----------------------------------------------------------------


def _python_value(kv):
    """A key-value as :meth:`ModelInfo.from_metadata` takes it: scalars, str, lists, SkippedStrings."""
    if isinstance(kv.value, np.ndarray):
        items = kv.value.tolist()
        return [bool(x) for x in items] if kv.element_type == GGUFValueType.BOOL else items
    return kv.value


def read_gguf_metadata(path: str | os.PathLike) -> dict:
    """The key-values of a GGUF file (v2/v3) as Python values; arrays of strings become
    :class:`SkippedStrings` (their length only). Read with :func:`~deltakv_format.gguf_io.parse_header`,
    every length bounds-checked."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise TruncatedError(f"GGUF header: expected at least 24 bytes, found {size}", path=path, offset=0)
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            header = parse_header(mapped, what="GGUF model header", versions=(2, 3), key_values_only=True,
                                  skip_string_arrays=True)
            values = {key: _python_value(kv) for key, kv in header.kvs.items()}
            del header  # its numeric arrays view the map
        except DeltaKVError as e:
            raise type(e)(e.bare_message, offset=e.offset, path=path) from e
        finally:
            try:
                mapped.close()
            except BufferError:
                pass  # views held by an error's traceback: the map closes when they go
    return values
