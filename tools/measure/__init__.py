"""Measurements of deltakv on real llama.cpp: ``deltakv eval``, ``deltakv demo`` and ``deltakv bench``.

- ``evaluate`` and ``eval_rows``: the quality table (KL, perplexity, top-1 vs f16 after save/restore);
  ``eval_results``: the folder it is kept in (merging runs, EVAL.md, the plot);
- ``demo``: one save / resume / continue round with SmolLM2;
- ``chat_agreement``: ``deltakv demo --chat``, chat answers through DeltaKVCache before and after a process restart;
- ``bench_codec`` (CPU codecs), ``bench_runtime`` (resume and extend), ``bench_gpu`` (the GPU kernels);
- ``texts`` and ``data/``: the texts they evaluate.

They use the public calls of ``deltakv_format`` and ``deltakv_runtime``, as any program would; nothing
in those packages imports them.
"""
