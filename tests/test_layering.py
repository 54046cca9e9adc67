"""The architecture's one-way layering: model code knows nothing of Ray; parsing knows nothing of torch."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "paligemma_batch"

# module -> top-level packages it must never import (at any depth of the file)
FORBIDDEN = {
    "config.py": {"ray", "torch"},
    "tasks.py": {"ray", "torch"},
    "parse.py": {"ray", "torch"},
    "schema.py": {"ray", "torch"},
    "images.py": {"ray", "torch"},
    "sources.py": {"ray", "torch"},
    "lease.py": {"ray", "torch"},
    "prompts.py": {"ray", "torch", "transformers"},  # the CPU stage tokenizes without them
    "model.py": {"ray"},
    "engine.py": {"ray"},
    "masks.py": {"ray"},
    "annotate.py": {"ray"},
}


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("module", sorted(FORBIDDEN))
def test_module_stays_in_its_layer(module):
    assert not _imports(PACKAGE / module) & FORBIDDEN[module]


def test_importing_the_package_starts_nothing():
    import subprocess
    import sys

    code = "import paligemma_batch, sys; print('ray' in sys.modules and __import__('ray').is_initialized())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() in ("False",), out.stderr
