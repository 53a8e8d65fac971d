"""The texts shipped with deltakv for the demo and the evaluation (data/README.md next to this module says what they are)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def _data_dir() -> Path:
    return Path(str(resources.files("deltakv_tools.measure").joinpath("data")))


def prose() -> str:
    return (_data_dir() / "prose_gpl3.txt").read_text(encoding="utf-8")


def code() -> str:
    return (_data_dir() / "code_llama_kv_cache.cpp.txt").read_text(encoding="utf-8")


TEXTS = {"prose": prose, "code": code}
