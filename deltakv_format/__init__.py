"""deltakv_format: the Delta-KV format (SPEC.md), its reference codecs and llama.cpp state I/O."""

import os as _os

if "NUMBA_THREADING_LAYER" not in _os.environ:
    # Numba's default OpenMP layer lets idle workers spin, then sleep: on a busy machine every parallel
    # call then waits milliseconds for a descheduled worker, and a session decodes as dozens of small
    # calls (one per layer): 5x slower measured here. The workqueue layer has no such wait, and
    # keeps out of the OpenMP runtime that llama.cpp shares in the same process. It is not safe for
    # concurrent calls from several Python threads: codecs/__init__.py serialises kernel calls.
    import numba as _numba

    _numba.config.THREADING_LAYER = "workqueue"
