"""paligemma-batch: annotate large image corpora with PaliGemma on Ray Data."""

from paligemma_batch.config import JobConfig, load_config
from paligemma_batch.pipeline import build, run, validate

__all__ = ["JobConfig", "load_config", "build", "run", "validate"]
