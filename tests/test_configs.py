"""Every shipped YAML config loads and validates its keys."""

from pathlib import Path

import pytest

from paligemma_batch.config import load_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_config_loads(path):
    config = load_config(path)
    assert config.tasks and config.output.uri


def test_demo_config_exists():
    assert "demo.yaml" in [p.name for p in CONFIGS]
