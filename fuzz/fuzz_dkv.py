"""Fuzz the .dkv reader: DkvSession open, verify(), tokens(), to_llama_state(), write_state().

    python3 fuzz/make_seeds.py                      # fuzz/corpus/{dkv,state}/ from fixtures/
    nice -n 19 python3 fuzz/fuzz_dkv.py fuzz/corpus/dkv -max_total_time=900 -timeout=10 \
        -rss_limit_mb=3072 -print_final_stats=1 -artifact_prefix=fuzz/findings/dkv/
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fuzz.harness import run  # noqa: E402


def make_target():
    from fuzz.common import DkvTarget

    return DkvTarget()


def mutator(data, max_size, seed, generic=None):
    from fuzz.common import mutate_dkv

    return mutate_dkv(data, max_size, seed, generic)


if __name__ == "__main__":
    run("dkv", make_target, mutator, ["fuzz/corpus/dkv"])
