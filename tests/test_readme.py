"""The README documents every config key and output column, so the reference cannot silently drift."""

from __future__ import annotations

import typing
from pathlib import Path

from pydantic import BaseModel

from paligemma_batch.config import JobConfig, StorageOptions
from paligemma_batch.schema import ANNOTATIONS

README = (Path(__file__).parent.parent / "README.md").read_text()


def _section_model(annotation) -> type[BaseModel]:
    candidates = [annotation, *typing.get_args(annotation)]
    return next(c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel))


def test_every_config_key_is_in_the_reference():
    missing = []
    for section, field in JobConfig.model_fields.items():
        for name in _section_model(field.annotation).model_fields:
            key = f"`{section}[].{name}`" if section == "tasks" else f"`{section}.{name}`"
            if key not in README:
                missing.append(key)
    missing += [f"`{name}`" for name in StorageOptions.model_fields if f"| `{name}` |" not in README]
    assert not missing, f"README lacks {missing}"


def test_every_output_column_is_documented():
    assert [name for name in ANNOTATIONS.names if f"`{name}`" not in README] == []


def test_readme_shows_the_two_commands():
    assert "make demo" in README and "make test" in README


def test_the_reference_is_generated_from_the_config_models():
    import subprocess
    import sys

    script = Path(__file__).parent.parent / "docs" / "config_reference.py"
    done = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, "README's reference is stale: run python docs/config_reference.py"
