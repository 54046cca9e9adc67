"""Engines, chosen by ``model.engine``. Adding one is a module here and one entry in :data:`ENGINES`.

Each entry names what the CPU stage must prepare (a :class:`~paligemma_batch.prompts.PromptEncoder`, read
without torch) and the :class:`~paligemma_batch.engines.base.Engine` class that the actor loads (imported
only in the actor).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from paligemma_batch.config import ModelConfig, StorageOptions
from paligemma_batch.engines.base import Engine, Generated, Request
from paligemma_batch.prompts import PromptEncoder, load_prompt_encoder


@dataclass(frozen=True)
class EngineEntry:
    input_spec: Callable[[ModelConfig, StorageOptions], PromptEncoder]  # the one source of the input size
    engine_class: str  # "module:Class", imported where the model runs


ENGINES: dict[str, EngineEntry] = {
    "transformers": EngineEntry(load_prompt_encoder, "paligemma_batch.engines.transformers_engine:TransformersEngine"),
}


def input_spec(model: ModelConfig, storage: StorageOptions) -> PromptEncoder:
    """What the CPU stage prepares for ``model.engine``: input size, resampling filter and prompt ids."""
    return ENGINES[model.engine].input_spec(model, storage)


def engine_class(model: ModelConfig) -> type[Engine]:
    """The engine class of ``model.engine`` (imports its runtime, e.g. torch)."""
    module, name = ENGINES[model.engine].engine_class.split(":")
    return getattr(importlib.import_module(module), name)


__all__ = ["ENGINES", "Engine", "EngineEntry", "Generated", "Request", "engine_class", "input_spec"]
