"""The rows of ``deltakv eval``'s table (here, apart, so that the CLI can list them without loading the codecs).

A codec row is (label, codec, parameters): ``write_session``'s codec and its parameters, where
``k_codec`` / ``v_codec`` give the K or V tracks another codec.
"""

CODEC_ROWS = [
    ("raw", "raw", {}),
    ("q8_0", "q8_0", {}),
    ("q4_0", "q4_0", {}),
    ("delta-q4_0 kf16", "delta-q4_0", {"keyframe_interval": 16}),
    ("delta-q4_0 kf32", "delta-q4_0", {"keyframe_interval": 32}),
    ("delta-q4_0 kf64", "delta-q4_0", {"keyframe_interval": 64}),
    ("dkv-q4 kf32 (default of format v1)", "dkv-q4", {"keyframe_interval": 32}),
    ("dkv-q4 kf64", "dkv-q4", {"keyframe_interval": 64}),
    # per-role codecs (write_session k_codec / v_codec): which half of the cache the KL comes from
    ("dkv-q4 on K only (V f16)", "dkv-q4", {"v_codec": "f16"}),
    ("dkv-q4 on V only (K f16)", "dkv-q4", {"k_codec": "f16"}),
    ("K q8_0 + V dkv-q4", "dkv-q4", {"k_codec": "q8_0"}),
    # format v2: dkv-ans (K before rotary embedding, exact sinks, one step, rANS); "rope": False codes
    # K as it is (what `deltakv convert` without --model writes)
    ("K dkv-ans 4.0 + V dkv-q4 (default)", "dkv-q4", {"k_codec": ("dkv-ans", {"rate": 400})}),
    ("dkv-ans 4.4 (K and V)", "dkv-ans", {"rate": 440}),
    ("dkv-ans 3.0 (--bits 3)", "dkv-ans", {"rate": 300}),
    ("dkv-ans 4.4, K without RoPE undone", "dkv-ans", {"rate": 440, "rope": False}),
    ("dkv-ans on K only (V f16)", "dkv-ans", {"rate": 440, "v_codec": "f16"}),
    ("dkv-ans on V only (K f16)", "dkv-ans", {"rate": 440, "k_codec": "f16"}),
    # how the bits split between K and V: more for V (Gemma 3's V is the costly half at 4.4 / 4.4)
    ("dkv-ans K 3.9 + V 4.9", "dkv-ans", {"rate": 490, "k_codec": ("dkv-ans", {"rate": 390})}),
]
REFERENCE_ROWS = ["llama.cpp cache q8_0", "llama.cpp cache q4_0", "f16 noise floor"]
# Quantized caches saved with --transcode (SPEC.md 6.6): (label, the cache's type, codec, parameters) as
# for CODEC_ROWS. The prefix is evaluated with that cache, its state transcoded, restored into the same
# context and continued; each row is measured twice: KL vs f16 (as every row) and KL vs the untouched
# quantized cache (the row's label + TRANSCODE_VS_CACHE), which is what --transcode itself costs.
TRANSCODE_ROWS = [
    ("q8_0 cache --transcode (default codecs)", "q8_0", "dkv-ans", {}),
    ("q4_0 cache --transcode (default codecs)", "q4_0", "dkv-ans", {}),
    ("q8_0 cache --transcode --bits 3", "q8_0", "dkv-ans", {"rate": 300}),
    ("q4_0 cache --transcode --bits 3", "q4_0", "dkv-ans", {"rate": 300}),
]
TRANSCODE_VS_CACHE = ": KL vs its own cache"
ROW_LABELS = [label for label, _, _ in CODEC_ROWS] + REFERENCE_ROWS + [label for label, *_ in TRANSCODE_ROWS]
TABLE_ORDER = ROW_LABELS + [label + TRANSCODE_VS_CACHE for label, *_ in TRANSCODE_ROWS]
