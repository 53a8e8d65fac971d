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
  state with a recurrent block;
- the RoPE llama.cpp applied to each layer's cached K (:class:`RopeParams`,
  :meth:`ModelInfo.rope_params`), for codecs that undo it before coding K.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass

import numpy as np

from .constants import GGUFValueType
from .errors import CorruptError, DeltaKVError, TruncatedError
from .gguf_io import SkippedStrings, parse_header

__all__ = ["ModelInfo", "RopeParams", "SkippedStrings", "read_gguf_metadata", "read_gguf_tensor_names",
           "rope_params_of_state_layers"]

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


# ---- RoPE applied to cached K (llama.cpp 0.3.36) ------------------------------------------------

# llama_model_rope_type() (src/llama-model.cpp): LLAMA_ROPE_TYPE_NORM rotates pairs (2i, 2i+1) ...
ROPE_NORM_ARCHS = frozenset({
    "arcee", "arctic", "baichuan", "bailingmoe", "chameleon", "chatglm", "cohere2", "cohere2moe", "command-r",
    "deci", "deepseek", "deepseek2", "deepseek2-ocr", "deepseek32", "deepseek4", "dots3note", "eagle3", "ernie4_5",
    "ernie4_5-moe", "glm-dsa", "granite", "granite_swa", "granitehybrid", "granitemoe", "graniteswitch", "hy_v4",
    "internlm2", "llada", "llama", "llama-embed", "llama4", "maincoder", "minicpm", "mistral3", "mistral4",
    "muse-glimmer", "nanbeige", "neo-bert", "olmo", "plm", "pockettts", "smollm3", "starcoder", "xverse",
    # NORM unless use_mrope() ({arch}.rope.dimension_sections[0] and [1] non-zero): then MROPE
    "bailingmoe3", "glm4",
})
# ... LLAMA_ROPE_TYPE_NEOX rotates pairs (i, i + n_rot/2).
ROPE_NEOX_ARCHS = frozenset({
    "afmoe", "apertus", "bailingmoe2", "bert", "bitnet", "codeshell", "cogvlm", "dbrx", "dots1", "dream",
    "eurobert", "exaone", "exaone-moe", "exaone4", "falcon", "falcon-h1", "gemma", "gemma-embedding", "gemma2",
    "gemma3", "gemma3n", "gemma4", "gemma4-assistant", "gpt-oss", "gptneox", "grok", "grovemoe", "hrm_text",
    "hunyuan-dense", "hunyuan-moe", "hy_v3", "jais2", "jina-bert-v3", "laguna", "lfm2", "lfm2moe", "llada-moe",
    "maple", "mellum", "mimo2", "minicpm3", "minimax-01", "minimax-m2", "minimax-m3", "modern-bert", "nemotron",
    "nomic-bert", "nomic-bert-moe", "olmo2", "olmoe", "openelm", "orion", "pangu-embedded", "phi2", "phi3",
    "phimoe", "plamo", "plamo2", "plamo3", "qwen", "qwen2", "qwen2moe", "qwen3", "qwen3moe", "qwen3next", "rnd1",
    "seed_oss", "smallthinker", "spark2_5", "stablelm", "starcoder2", "step35", "talkie",
    # NEOX unless use_mrope(): then MROPE
    "glm4moe", "hunyuan_vl",
})
# Every other architecture gets kind "none": LLAMA_ROPE_TYPE_NONE in llama_model_rope_type() (gpt2, bloom,
# mpt, t5, jais, rwkv*, mamba*, jamba, nemotron_h*, kimi-*, glm5-next, ...), MROPE/IMROPE (MROPE_ARCHS,
# vision/multi-section positions), dflash (MROPE or NORM/NEOX depending on the drafted target), and:
ROPE_NOT_REPRODUCED_ARCHS = frozenset({
    # MLA (or MLA-style) attention: the cache holds a compressed latent plus a separately roped k_pe
    # part (models/deepseek2.cpp & co. build K from wkv_a_mqa), not per-head K roped on its first n_rot
    # dims; the rope-type table above says NORM, but un-rotating K rows that way is wrong.
    "deepseek2", "deepseek2-ocr", "deepseek32", "deepseek4", "glm-dsa", "minicpm3", "plm", "dots3note",
    "hy_v4", "mistral4",
    # models/bert.cpp ropes only some BERT variants; plain BERT uses absolute position embeddings.
    # (Encoders have no KV cache state anyway.)
    "bert",
})

# SWA layers (llama_model::get_rope_freq_base/_scale: hparams.rope_freq_base/scale_train_swa). The hparams
# defaults are base 10000, scale 1.0 (llama-hparams.h); these archs' load_arch_hparams() (models/*.cpp)
# first copy the full-attention value, then read {arch}.rope.freq_base_swa when present.
SWA_ROPE_BASE_INHERITS = frozenset({
    "afmoe", "cohere2", "cohere2moe", "exaone-moe", "exaone4", "gemma2", "gpt-oss", "laguna", "llama4",
    "maple", "mellum", "muse-glimmer", "olmo2", "smallthinker", "spark2_5",
})
# ... and these copy the full-attention freq_scale too (all others: 1.0, e.g. Gemma 3 4B+'s linear 8 is
# for global layers only; olmo2/laguna set 1.0 on purpose).
SWA_ROPE_SCALE_INHERITS = frozenset({
    "afmoe", "cohere2", "cohere2moe", "exaone-moe", "exaone4", "gemma2", "gpt-oss", "llama4", "maple",
    "mellum", "smallthinker", "spark2_5",
})
# Graphs that rope SWA layers with the full-attention base and scale, ignoring the _swa values
# (models/cohere2.cpp, cohere2moe.cpp: "freq_base, freq_scale"), or with the plain full base and scale 1
# and no YaRN (models/olmo2.cpp, mellum.cpp: "freq_base, 1.0, 0.0, 1.0").
SWA_ROPE_USES_FULL = frozenset({"cohere2", "cohere2moe"})
SWA_ROPE_PLAIN_FULL_BASE = frozenset({"olmo2", "mellum"})
# Graphs that use the per-layer hparams.n_rot(il) (n_rot_swa on SWA layers); all others use the graph's
# n_rot = hparams.n_rot(0) on every layer (llm_graph_context, llama-graph.cpp).
PER_LAYER_N_ROT_ARCHS = frozenset({"gemma4", "gemma4-assistant", "laguna", "maple", "spark2_5", "step35"})
# Graphs that pass no frequency factors on SWA layers (models/gemma4.cpp, gemma4-assistant.cpp, step35.cpp).
SWA_NO_FREQ_FACTORS = frozenset({"gemma4", "gemma4-assistant", "step35"})
# Per-architecture frequency-factor tensors (llama_model::get_rope_factors: layers[il].rope_freqs,
# else rope_long / rope_short).
ROPE_FACTOR_TENSORS = ("rope_freqs.weight", "rope_factors_long.weight", "rope_factors_short.weight")


def _rope_skipped(arch: str, il: int, n_layer: int, swa: bool, has_swa: bool, kv: dict) -> bool:
    """Layers whose graph builds K without ggml_rope_ext (models/*.cpp, ``use_rope``)."""
    get = lambda name, default=None: kv.get(f"{arch}.{name}", default)  # noqa: E731
    if arch in ("llama4", "afmoe"):
        # n_no_rope_layer_step: 4 (llama-hparams.h); llama4 with sliding_window 0 sets it to n_layer
        step = 4
        if arch == "llama4" and get("attention.sliding_window") == 0:
            step = n_layer
        return not (step > 0 and (il + 1) % step != 0)
    if arch == "smollm3":  # n_no_rope_layer_step = 4, use_rope = (il + 1) % 4 != 0
        return (il + 1) % 4 == 0
    if arch == "smallthinker":  # step = n_layer without SWA (rope everywhere), else il % 4 != 0
        return has_swa and il % 4 == 0
    if arch == "cohere2":  # only SWA layers are roped
        return not swa
    if arch == "cohere2moe":  # SWA layers and the leading dense layers (force_rope)
        return not swa and il >= int(get("leading_dense_block_count", 0) or 0)
    if arch in ("exaone-moe", "maple", "muse-glimmer"):  # only local (SWA) layers are roped
        return not swa
    if arch == "exaone4":  # use_rope = is_swa(il) || swa_type == NONE
        return has_swa and not swa
    if arch.startswith("granite"):  # llama_hparams::has_rope(): {arch}.attention.rope_pattern, default all 1
        pattern = get("attention.rope_pattern")
        return isinstance(pattern, (list, tuple)) and il < len(pattern) and not pattern[il]
    return False


@dataclass(frozen=True)
class RopeParams:
    """The RoPE llama.cpp 0.3.36 applied to one layer's cached K.

    ``kind``: "none" (K is cached as is, or this reader cannot reproduce the rotation: code K as it
    is), "norm" (LLAMA_ROPE_TYPE_NORM: pairs (2i, 2i+1) of each head) or "neox"
    (LLAMA_ROPE_TYPE_NEOX: pairs (i, i + n_rot/2)). Only the first ``n_rot`` of each head's
    ``head_dim`` values are rotated. Pair i of a cell at position p is rotated by the angle
    ``p * freq_scale * theta_scale ** i``; ``theta_scale`` is ggml's ``powf(freq_base, -2.0f/n_rot)``,
    computed here in float32 as ``np.float32(base) ** np.float32(-2.0 / n_rot)`` and stored as the
    (exact) Python float of that float32. ``freq_factors``: llama.cpp also divides each pair's
    frequency by a per-pair factor from a ``rope_freqs`` / ``rope_factors_*`` tensor (llama 3.1,
    phi3, gemma 4 global layers); the parameters here are the plain frequencies without those factors,
    exact for the high-frequency pairs (factor 1) and an approximation elsewhere, still closer to
    position-independent K than no un-rotation.
    """

    kind: str
    n_rot: int
    head_dim: int
    theta_scale: float
    freq_scale: float
    freq_factors: bool = False

    NONE = "none"
    NORM = "norm"
    NEOX = "neox"


def _theta_scale(base: float, n_rot: int) -> float:
    return float(np.float32(base) ** np.float32(-2.0 / n_rot))


def _layer_rope(arch: str, kv: dict, n_layer: int, swa_layers: tuple[bool, ...], has_swa: bool, key_length: int,
                key_length_swa: int, mrope: bool, tensor_names) -> tuple[RopeParams, ...]:
    get = lambda name, default=None: kv.get(f"{arch}.{name}", default)  # noqa: E731
    head_dims = [key_length_swa if swa_layers[il] else key_length for il in range(n_layer)]
    kind = "norm" if arch in ROPE_NORM_ARCHS else "neox" if arch in ROPE_NEOX_ARCHS else "none"
    if mrope or arch in ROPE_NOT_REPRODUCED_ARCHS:
        kind = "none"
    # hparams (llama_model_base::load_hparams): rope type string default "linear"; factor from
    # rope.scaling.factor (or the old rope.scale_linear); freq_scale_train = 1/factor (1 when 0 or absent);
    # llama_context: scaling type "none" forces freq_scale 1; yarn adds ext_factor (not reproduced),
    # longrope uses per-pair factors tied to the context size (not reproduced).
    scaling = get("rope.scaling.type", "linear")
    factor = get("rope.scaling.factor")
    if factor is None:
        factor = get("rope.scale_linear", 0.0)
    freq_scale = 1.0 if not factor else 1.0 / float(factor)
    if scaling == "none":
        freq_scale = 1.0
    full_unreproducible = scaling not in ("linear", "none")
    base = float(get("rope.freq_base", 10000.0))
    base_swa = base if arch in SWA_ROPE_BASE_INHERITS else 10000.0
    base_swa = float(get("rope.freq_base_swa", base_swa))
    scale_swa = freq_scale if arch in SWA_ROPE_SCALE_INHERITS else 1.0
    n_rot_full = int(get("rope.dimension_count", key_length))
    n_rot_swa = int(get("rope.dimension_count_swa", n_rot_full))
    has_factors = tensor_names is not None and any(t in tensor_names for t in ROPE_FACTOR_TENSORS)

    out = []
    for il in range(n_layer):
        swa = has_swa and swa_layers[il]
        if arch in PER_LAYER_N_ROT_ARCHS:
            n_rot = n_rot_swa if swa else n_rot_full
        else:
            n_rot = n_rot_swa if has_swa and swa_layers[0] else n_rot_full
        unreproducible = full_unreproducible
        if not swa:
            b, s = base, freq_scale
        elif arch in SWA_ROPE_USES_FULL:
            b, s = base, freq_scale
        elif arch in SWA_ROPE_PLAIN_FULL_BASE:
            b, s, unreproducible = base, 1.0, False  # ext_factor 0, scale 1 on SWA layers
        else:
            b, s = base_swa, scale_swa
        factors = has_factors and not (swa and arch in SWA_NO_FREQ_FACTORS)
        if (kind == "none" or unreproducible or n_rot <= 0 or n_rot % 2 or n_rot > head_dims[il]
                or _rope_skipped(arch, il, n_layer, swa, has_swa, kv)):
            out.append(RopeParams("none", 0, head_dims[il], 1.0, 1.0))
        else:
            out.append(RopeParams(kind, n_rot, head_dims[il], _theta_scale(b, n_rot), s, factors))
    return tuple(out)


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
    layer_rope: tuple[RopeParams, ...] = ()  # per layer; empty: not known (built without from_metadata)

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

    def rope_params(self, *, sequence: bool = False, single_cache: bool = False) -> list[list[RopeParams]]:
        """Per KV cache of the state, in the order the state writes them (the first plan of
        :meth:`kv_cache_layers`: iSWA models write the full-attention cache, then the SWA cache), the
        :class:`RopeParams` of each layer of that cache, in layer order. ``sequence`` /
        ``single_cache``: as for :meth:`kv_cache_layers` (the first plan is taken either way).
        Layers of a ModelInfo built without :meth:`from_metadata` get kind "none"."""
        plan = self.kv_cache_layers(sequence=sequence, single_cache=single_cache)[0]
        return [[self._layer_rope(il) for il in cache] for cache in plan]

    def rope_params_for(self, layers_per_cache: list[int]) -> list[list[RopeParams]] | None:
        """:meth:`rope_params` for a state whose KV caches hold ``layers_per_cache`` layers each (in
        file order; 0: an empty cache, which fits any): the first split of the layers
        (:meth:`kv_cache_layers` of a sequence, then the single-cache split of older builds) whose
        caches have those counts. None when none has (another model's state: code keys as they are)."""
        plans = self.kv_cache_layers(sequence=True) + self.kv_cache_layers(single_cache=True)
        for plan in plans:
            if len(plan) == len(layers_per_cache) and all(n in (0, len(c)) for n, c in zip(layers_per_cache, plan)):
                return [[self._layer_rope(il) for il in cache] for cache in plan]
        return None

    def _layer_rope(self, il: int) -> RopeParams:
        if il < len(self.layer_rope):
            return self.layer_rope[il]
        head_dim = self.key_length_swa if self.swa_layers[il] else self.key_length
        return RopeParams("none", 0, head_dim, 1.0, 1.0)

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
            tensor_names = frozenset(t.name for t in reader.tensors)
        else:
            values = read_gguf_metadata(path)
            tensor_names = read_gguf_tensor_names(path)
        return cls.from_metadata(values, source=path, tensor_names=tensor_names)

    @classmethod
    def from_metadata(cls, kv: dict, *, source: str = "model", tensor_names=None) -> ModelInfo:
        """Build from a GGUF key-value mapping (what :meth:`from_gguf` reads). ``tensor_names``: the
        model's tensor names, when known (only whether RoPE frequency-factor tensors exist is read)."""
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
            layer_rope=_layer_rope(arch, kv, n_layer, swa_layers, sliding_window is not None, key_length,
                                   key_length_swa, mrope, tensor_names),
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


def read_gguf_tensor_names(path: str | os.PathLike) -> frozenset[str]:
    """The tensor names of a GGUF file (v2/v3), read from its tensor infos (bounds-checked; the
    ggml types are not interpreted)."""
    import struct

    path = os.fspath(path)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise TruncatedError(f"GGUF header: expected at least 24 bytes, found {size}", path=path, offset=0)
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            try:
                header = parse_header(mapped, what="GGUF model header", versions=(2, 3), key_values_only=True,
                                      skip_string_arrays=True)
            except DeltaKVError as e:
                raise type(e)(e.bare_message, offset=e.offset, path=path) from e
            pos = header.header_end
            del header
            (n_tensors,) = struct.unpack_from("<Q", mapped, 8)
            names = set()
            for _ in range(n_tensors):
                if pos + 8 > size:
                    raise TruncatedError("GGUF tensor infos end early", path=path, offset=pos)
                (n,) = struct.unpack_from("<Q", mapped, pos)
                if pos + 8 + n + 4 > size:
                    raise TruncatedError("GGUF tensor name runs past the end", path=path, offset=pos)
                name = bytes(mapped[pos + 8:pos + 8 + n]).decode("utf-8", "replace")
                pos += 8 + n
                (n_dims,) = struct.unpack_from("<I", mapped, pos)
                if not 1 <= n_dims <= 8:
                    raise CorruptError(f"tensor {name!r} has {n_dims} dimensions", path=path, offset=pos)
                pos += 4 + 8 * n_dims + 4 + 8
                if pos > size:
                    raise TruncatedError("GGUF tensor infos end early", path=path, offset=pos)
                names.add(name)
        finally:
            try:
                mapped.close()
            except BufferError:
                pass
    return frozenset(names)


def rope_params_of_state_layers(model_path: str | os.PathLike, *, sequence: bool = False) -> list[list[RopeParams]]:
    """:meth:`ModelInfo.rope_params` of the model at ``model_path``: per KV cache of its states (file
    order), the :class:`RopeParams` of each of that cache's layers."""
    return ModelInfo.from_gguf(model_path).rope_params(sequence=sequence)


MODEL_SAMPLES = 16  # pieces of the model file hashed into its identity
MODEL_SAMPLE_BYTES = 64 << 10


def model_file_digest(path) -> str:
    """sha256 of the model file's size and 16 evenly spaced 64 KiB pieces (1 MiB read).

    Metadata alone does not tell a fine-tune saved under its base model's name from the base;
    its weights differ everywhere, so a few pieces of the file do. Hashing the whole file would
    cost seconds per GB. Raises OSError if the file cannot be read."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        h.update(size.to_bytes(8, "little"))
        last = max(size - MODEL_SAMPLE_BYTES, 0)
        for i in range(MODEL_SAMPLES):
            f.seek(last * i // (MODEL_SAMPLES - 1))
            h.update(f.read(MODEL_SAMPLE_BYTES))
    return h.hexdigest()
