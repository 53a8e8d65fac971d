"""Build the seed corpora: fuzz/corpus/dkv (fixtures converted with every codec, appended and
synthetic sessions) and fuzz/corpus/state (fixtures/ plus tiny synthetic states)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fuzz.common import make_dkv_seeds, make_state_seeds  # noqa: E402

if __name__ == "__main__":
    print(len(make_dkv_seeds(ROOT / "fuzz" / "corpus" / "dkv")), "dkv seeds")
    print(len(make_state_seeds(ROOT / "fuzz" / "corpus" / "state")), "state seeds")
