"""paligemma-batch: annotate large image corpora with PaliGemma on Ray Data."""

from paligemma_batch.config import JobConfig, load_config
from paligemma_batch.pipeline import build, run, validate
from paligemma_batch.results import read_results

__all__ = ["JobConfig", "load_config", "build", "run", "validate", "read_results"]
