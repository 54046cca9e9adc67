"""`paligemma-batch validate` and `run` refuse a bad config before any side effect: one line per problem, exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

CLI = [sys.executable, "-m", "paligemma_batch.cli"]


def _write_config(tmp_path: Path, model_dir: Path, shard: Path, **over) -> Path:
    data = {
        "input": {"uri": str(shard)},
        "tasks": [{"task": "caption"}],
        "model": {"source": str(model_dir), "precision": "float32"},
        "inference": {"num_cpus": 0.5},
        "output": {"uri": str(tmp_path / "out")},
        "ray": {"num_cpus": 2, "num_gpus": 0},
    }
    for dotted, value in over.items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_ADDRESS="")
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120, env=env)


def _snapshot(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def test_validate_accepts_a_good_config(tmp_path, tiny_model_dir, scene_shards):
    config = _write_config(tmp_path, tiny_model_dir, scene_shards[0])
    result = _cli("validate", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: 1 shards, 1 tasks")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"model.precison": "int8"}, "error: model.precison: unknown key"),
        ({"input.uri": "/nonexistent/shards/*.tar"}, "error: input.uri: no webdataset shards at /nonexistent/shards/*.tar"),
        ({"output.uri": "UNDER_A_FILE"}, "error: output.uri: "),
        ({"inference.num_gpus": 1}, "error: inference.num_gpus: 1 actor(s) x 1.0 GPU need more than the cluster's 0 GPU"),
        ({"inference.num_cpus": 2}, "error: inference.num_cpus: 1 actor(s) x 2.0 CPU leave no room"),
        ({"model.source": "not a model"}, "error: model.source: 'not a model' is neither"),
        ({"tasks": [{"task": "detect"}]}, "error: tasks.0: detect needs objects"),
    ],
)
def test_validate_reports_one_line_and_writes_nothing(tmp_path, tiny_model_dir, scene_shards, change, expected):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    change = {k: (str(blocker / "out") if v == "UNDER_A_FILE" else v) for k, v in change.items()}
    config = _write_config(tmp_path, tiny_model_dir, scene_shards[0], **change)
    before = _snapshot(tmp_path)
    result = _cli("validate", str(config))
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and lines[0].startswith(expected), result.stderr
    assert _snapshot(tmp_path) == before


def test_run_refuses_before_starting_ray(tmp_path, tiny_model_dir, scene_shards):
    config = _write_config(tmp_path, tiny_model_dir, scene_shards[0], **{"input.uri": "/nonexistent/x.tar"})
    config_text = config.read_text().replace("/nonexistent/x.tar", "/nonexistent/*.tar")
    config.write_text(config_text)
    result = _cli("run", str(config))
    assert result.returncode == 2
    assert "Started a local Ray instance" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_set_overrides_config_values(tmp_path, tiny_model_dir, scene_shards):
    config = _write_config(tmp_path, tiny_model_dir, scene_shards[0])
    result = _cli("validate", str(config), "--set", "model.max_new_tokens=0")
    assert result.returncode == 2
    assert "error: model.max_new_tokens: Input should be greater than or equal to 1" in result.stderr
