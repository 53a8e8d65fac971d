"""The import rules of the README's layout: each package imports only the floors below it.

deltakv_format < deltakv_runtime < deltakv_tools: a program that saves and loads imports the runtime and
gets neither the CLI nor the measurements; the format runs where llama.cpp is not installed.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# folder -> the top-level modules its sources must never import
FORBIDDEN = {
    "deltakv_format": ("llama_cpp", "deltakv_runtime", "deltakv_tools"),
    "runtime": ("deltakv_tools",),
}


def _imported_modules(path: Path) -> set[str]:
    """Every absolute module name the file imports, at module level or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_a_package_never_imports_the_floors_above_it(folder):
    offenders = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        for module in _imported_modules(path):
            if module.split(".")[0] in FORBIDDEN[folder]:
                offenders.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not offenders, offenders

