"""paligemma-batch: annotate large image corpora with PaliGemma on Ray Data.

The public names load lazily, so ``import paligemma_batch`` imports neither ray nor torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_PUBLIC = {
    "JobConfig": "paligemma_batch.config",
    "load_config": "paligemma_batch.config",
    "validate": "paligemma_batch.pipeline",
    "run": "paligemma_batch.pipeline",
    "build": "paligemma_batch.distributed.pipeline",
    "read_results": "paligemma_batch.results",
    "RunSummary": "paligemma_batch.summary",
}

if TYPE_CHECKING:
    from paligemma_batch.config import JobConfig, load_config
    from paligemma_batch.distributed.pipeline import build
    from paligemma_batch.pipeline import run, validate
    from paligemma_batch.results import read_results
    from paligemma_batch.summary import RunSummary


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'paligemma_batch' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)


__all__ = sorted(_PUBLIC)
