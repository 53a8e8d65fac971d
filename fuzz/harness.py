"""The atheris driver shared by fuzz_dkv.py and fuzz_state.py.

Contract violations (fuzz/common.py) do not stop the run: each distinct one (kind + innermost
deltakv frame) is logged to fuzz/findings/<target>/findings.log with its traceback, and up to
three inputs per finding are saved next to it. Set FUZZ_CRASH=1 to abort on the first one
instead (libFuzzer then writes the crash input itself). Hangs are libFuzzer's -timeout;
memory beyond the contract's bound is caught by tracemalloc in the target, and libFuzzer's
-rss_limit_mb is the backstop.
"""

from __future__ import annotations

import hashlib
import os
import sys
import traceback
import tracemalloc
from pathlib import Path

import atheris

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# Numba-compiled modules must not be instrumented (atheris rewrites bytecode numba compiles).
NOT_INSTRUMENTED = ["deltakv_format.numerics", "deltakv_format.codecs.kernels", "deltakv_format.codecs.simd"]


def run(target_name: str, make_target, mutator, seed_dirs_default: list[str]) -> None:
    # FUZZ_NO_CMP=1: coverage only, no comparison (data-flow) tracing: several times more inputs
    # per second; the structure-aware mutators supply the magic values that tracing would find.
    from atheris.import_hook import HookManager

    hooks = HookManager({"deltakv_format"}, set(NOT_INSTRUMENTED), True, os.environ.get("FUZZ_NO_CMP") != "1")
    with hooks:
        from fuzz import common  # noqa: F401  (imports deltakv_format under instrumentation)
    from fuzz.common import ContractViolation

    target = make_target()
    out = ROOT / "fuzz" / "findings" / target_name
    out.mkdir(parents=True, exist_ok=True)
    log = out / "findings.log"
    seen: dict[str, int] = {}
    crash = os.environ.get("FUZZ_CRASH") == "1"

    # Warm up (Numba compiles on first use; that is not the reader's allocation or time).
    dirs = [a for a in sys.argv[1:] if not a.startswith("-")] or seed_dirs_default
    tracemalloc.start()
    for d in dirs:
        for p in sorted(Path(d).glob("*"))[:40]:
            try:
                target(p.read_bytes())
            except ContractViolation as v:
                print(f"seed {p} violates the contract: {v}", file=sys.stderr)

    def one(data: bytes) -> None:
        try:
            target(data)
        except ContractViolation as v:
            if crash:
                raise
            key = v.key()
            n = seen.get(key, 0)
            seen[key] = n + 1
            if n < 3:
                h = hashlib.sha1(data).hexdigest()[:12]
                name = hashlib.sha1(key.encode()).hexdigest()[:8]
                (out / f"{name}-{h}.bin").write_bytes(data)
                with open(log, "a") as f:
                    f.write(f"=== {key}  input {name}-{h}.bin ({len(data)} bytes)\n{v}\n")
                    if v.cause is not None:
                        f.write("".join(traceback.format_exception(v.cause)))
                    f.write("\n")
                if n == 0:
                    print(f"NEW FINDING {key}: {v}", file=sys.stderr, flush=True)

    def mutate(data: bytes, max_size: int, seed: int) -> bytes:
        return mutator(data, max_size, seed, generic=atheris.Mutate)

    atheris.Setup(sys.argv, one, custom_mutator=mutate)
    atheris.Fuzz()
