"""Regenerate the README's configuration reference from the config models: ``python docs/config_reference.py``.

``--check`` exits 1 when the README's reference differs from the models (the tests run it).
"""

from __future__ import annotations

import sys
import typing
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from paligemma_batch.config import JobConfig, StorageOptions, VideoConfig

README = Path(__file__).parents[1] / "README.md"
START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def _section_model(annotation) -> type[BaseModel]:
    candidates = [annotation, *typing.get_args(annotation)]
    return next(c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel))


def _default(field) -> str:
    if field.is_required():
        return "required"
    if field.default is PydanticUndefined:
        return ""
    return f"`{field.default}`"


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    return [f"| `{prefix}{name}` | {_default(f)} | {f.description or ''} |" for name, f in model.model_fields.items()]


def reference() -> str:
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for section, field in JobConfig.model_fields.items():
        lines.append(f"| **`{section}`** | | {field.description} |")
        lines += _rows(_section_model(field.annotation), f"{section}[]." if section == "tasks" else f"{section}.")
    lines += ["", "`storage_options` (under `input`, `output` and `model`):", "",
              "| key | default | meaning |", "|---|---|---|", *_rows(StorageOptions, "")]
    lines += ["", "`input.video` (frame sampling, with `input.media: video`):", "",
              "| key | default | meaning |", "|---|---|---|", *_rows(VideoConfig, "input.video.")]
    return "\n".join(lines)


def updated(readme: str) -> str:
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{reference()}\n{END}{tail}"


if __name__ == "__main__":
    text = README.read_text()
    if "--check" in sys.argv:
        sys.exit(0 if updated(text) == text else 1)
    README.write_text(updated(text))
