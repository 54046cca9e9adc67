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
    "readers/base.py": {"ray", "torch"},
    "storage.py": {"ray", "torch"},
    "store.py": {"ray", "torch"},
    "video.py": {"ray", "torch"},
    "lease.py": {"ray", "torch"},
    "prompts.py": {"ray", "torch", "transformers"},  # the CPU stage tokenizes without them
    "model.py": {"ray"},
    "engines/transformers_engine.py": {"ray"},
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


# The Ray layer, and the model code that is torch by nature; every other module stays free of both.
RAY_LAYER = ("paligemma_batch.distributed",)
TORCH_LAYER = ("paligemma_batch.engines.transformers_engine", "paligemma_batch.masks",
               "paligemma_batch.fixtures.tiny", "paligemma_batch.fixtures.train", "paligemma_batch.fixtures.vae")


def _light_modules() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if not name.startswith(RAY_LAYER + TORCH_LAYER):
            names.append(name)
    return names


def test_no_module_outside_the_ray_and_model_layers_pulls_in_ray_or_torch():
    """Transitive: each module, imported in a fresh interpreter, must leave ray and torch out of sys.modules."""
    import subprocess
    import sys

    modules = _light_modules()
    assert "paligemma_batch" in modules and "paligemma_batch.cli" in modules and len(modules) > 20
    code = ("import importlib, sys\n"
            f"for name in {modules!r}:\n"
            "    importlib.import_module(name)\n"
            "    heavy = [m for m in ('ray', 'torch') if m in sys.modules]\n"
            "    if heavy:\n"
            "        print(name, heavy)\n"
            "        break\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == ""


def test_validate_and_a_run_with_nothing_to_do_start_no_ray_and_import_no_torch(tmp_path, tiny_model_dir,
                                                                                  scene_shards, ray_local):
    """After one finished run, ``validate`` and an incremental ``run`` with nothing to do touch neither."""
    import subprocess
    import sys

    import yaml

    from conftest import job_config
    from paligemma_batch.pipeline import run

    config = job_config(tiny_model_dir, [str(p) for p in scene_shards[:1]], str(tmp_path / "out"),
                        tasks=[{"task": "caption", "lang": "en"}], output={"uri": str(tmp_path / "out"),
                                                                          "mode": "incremental"})
    assert run(config).status == "finished"
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_none=True)))
    code = ("import sys\nfrom paligemma_batch.cli import app\n"
            "for args in (['validate', sys.argv[1]], ['run', sys.argv[1]]):\n"
            "    try:\n        app(args)\n    except SystemExit as e:\n        assert not e.code, e.code\n"
            "print('heavy:', [m for m in ('ray', 'torch', 'transformers') if m in sys.modules])\n")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "nothing to do" in out.stdout and "heavy: []" in out.stdout, out.stdout
