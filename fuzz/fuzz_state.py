"""Fuzz the llama.cpp state parser: parse_state (detected and forced framings, with a model when
one is installed), write_state of what parses (must be byte-identical), framing conversion, and a
raw-codec .dkv round trip.

    python3 fuzz/make_seeds.py
    nice -n 19 python3 fuzz/fuzz_state.py fuzz/corpus/state -max_total_time=900 -timeout=10 \
        -rss_limit_mb=3072 -print_final_stats=1 -artifact_prefix=fuzz/findings/state/
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fuzz.harness import run  # noqa: E402


def make_target():
    from fuzz.common import StateTarget

    return StateTarget()


def mutator(data, max_size, seed, generic=None):
    from fuzz.common import mutate_state

    return mutate_state(data, max_size, seed, generic)


if __name__ == "__main__":
    run("state", make_target, mutator, ["fuzz/corpus/state"])
