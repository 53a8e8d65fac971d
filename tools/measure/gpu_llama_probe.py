"""Find the first step at which a llama.cpp context on this machine's GPU fails, one step per process.

    python -m deltakv_tools.measure.gpu_llama_probe MODEL.gguf [--step NAME]

Without ``--step`` it runs each step in a child process (so that a crash in one is reported, with
its exit status and llama.cpp's own log, and the next still runs) and prints one line per step.
llama-cpp-python's ``verbose=False`` sends llama.cpp's stderr to /dev/null while a model or context
is made, which also swallows a crash's report: every step here runs with ``verbose=True``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

# name -> keyword arguments of Llama(...) (plus what the step does after)
STEPS = {
    "cpu-layers": dict(n_gpu_layers=0, n_ctx=512),
    "gpu-layers": dict(n_gpu_layers=-1, n_ctx=512),
    "gpu-flash": dict(n_gpu_layers=-1, n_ctx=4352, n_batch=2048, n_ubatch=512, flash_attn=True),
    "gpu-spare": dict(n_gpu_layers=-1, n_ctx=4352, n_batch=2048, n_ubatch=512, flash_attn=True),
    # deltakv's kernels in the same process: what is done before the context is made (see run_step)
    "cudart-first": dict(n_gpu_layers=-1, n_ctx=4352, n_batch=2048, n_ubatch=512, flash_attn=True),
    "kernels-first": dict(n_gpu_layers=-1, n_ctx=4352, n_batch=2048, n_ubatch=512, flash_attn=True),
    # deltakv_format (numba, llvmlite, ...) imported before llama_cpp: the order the bench used to have
    "format-first": dict(n_gpu_layers=-1, n_ctx=4352, n_batch=2048, n_ubatch=512, flash_attn=True),
    "kernels-after": dict(n_gpu_layers=-1, n_ctx=4352, n_batch=2048, n_ubatch=512, flash_attn=True),
}


def run_step(model: str, name: str) -> None:
    if name == "format-first":
        import deltakv_format.codecs  # noqa: F401  (before llama_cpp loads libllama)

        print(f"probe {name}: deltakv_format imported, then llama_cpp", flush=True)
    from llama_cpp import Llama

    kw = STEPS[name]
    if name == "cudart-first":  # only the CUDA runtime's device count, as the kernels' availability check asks it
        from deltakv_runtime import gpu

        print(f"probe {name}: cudart device probe says {gpu._probe_cuda_device()}", flush=True)
    if name == "kernels-first":
        from deltakv_runtime import gpu

        print(f"probe {name}: kernels available {gpu.is_available()}", flush=True)
    t = time.perf_counter()
    llm = Llama(model, verbose=True, **kw)
    print(f"probe {name}: context made in {time.perf_counter() - t:.2f} s", flush=True)
    if name == "gpu-spare":
        import deltakv_runtime as rt

        rt.add_spare_sequence(llm)
        print(f"probe {name}: spare sequence added", flush=True)
    if name == "kernels-after":
        from deltakv_runtime import gpu

        print(f"probe {name}: kernels available {gpu.is_available()}", flush=True)
        Llama(llm.model_path, verbose=True, **kw)
        print(f"probe {name}: a second context made after the kernels loaded", flush=True)
    toks = llm.tokenize(b"The quick brown fox jumps over the lazy dog. " * 8)
    llm.eval(toks)
    print(f"probe {name}: evaluated {len(toks)} tokens, logit[0] {llm.scores[len(toks) - 1][0]:.4f}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--step", choices=sorted(STEPS))
    args = p.parse_args(argv)
    if args.step:
        run_step(args.model, args.step)
        return 0
    worst = 0
    only = os.environ.get("PROBE_STEPS")
    for name in only.split(",") if only else STEPS:
        cmd = [sys.executable, "-X", "faulthandler", "-m", __spec__.name, args.model, "--step", name]
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        took = time.perf_counter() - t
        print(f"step {name}: rc {proc.returncode} in {took:.1f} s", flush=True)
        if proc.returncode != 0:
            worst = proc.returncode
            lines = (proc.stdout + proc.stderr).splitlines()
            print("\n".join("    " + line for line in lines[-40:]), flush=True)
    return 1 if worst else 0


if __name__ == "__main__":
    sys.exit(main())
