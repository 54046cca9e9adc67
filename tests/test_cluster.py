"""A real two-node Ray cluster on this machine, with token auth: the job is submitted the way ``ray job submit``
runs it (``pipelines/annotate.py`` with ``RAY_ADDRESS`` set), the worker node is killed mid-job, and the job
still completes with every (image, task) exactly once."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from exactly_once import expected_keys, kill_processes_with_env, output_keys, processes_with_env

RAY = str(Path(sys.executable).parent / "ray")
ANNOTATE = Path(__file__).parents[1] / "pipelines" / "annotate.py"
NODE_TAG = "PGB_TEST_NODE"  # marks every process of a node we started, so we stop only those
# Fast node-death detection (the default takes about 15 s).
SYSTEM_CONFIG = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3, "health_check_initial_delay_ms": 1000}


@dataclass
class Cluster:
    address: str
    env: dict[str, str]  # what a driver needs: token auth on, and the token
    head_tag: str
    worker_tag: str


def _start_node(args: list[str], env: dict[str, str], tag: str, temp_dir: Path) -> None:
    node = [RAY, "start", "--num-cpus=1", "--memory=2000000000", "--object-store-memory=300000000",
            f"--temp-dir={temp_dir}", "--disable-usage-stats", *args]
    done = subprocess.run(node, env={**env, NODE_TAG: tag}, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


@pytest.fixture
def loopback_cluster():
    """A head and a worker node, 1 CPU each, their own temp dirs, token auth with a generated token."""
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    root = Path(tempfile.mkdtemp(prefix="pgbc-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    tag = uuid.uuid4().hex[:8]
    cluster = Cluster("", env, f"{tag}-head", f"{tag}-worker")
    try:
        _start_node(["--head", "--port=0", "--node-ip-address=127.0.0.1", "--include-dashboard=false",
                     f"--system-config={json.dumps(SYSTEM_CONFIG)}"], env, cluster.head_tag, root / "head")
        cluster.address = (root / "head" / "ray_current_cluster").read_text().strip()
        _start_node([f"--address={cluster.address}", "--node-ip-address=127.0.0.1"], env, cluster.worker_tag,
                    root / "worker")
        yield cluster
    finally:
        for node in (cluster.worker_tag, cluster.head_tag):
            kill_processes_with_env(NODE_TAG, node)
        shutil.rmtree(root, ignore_errors=True)


def _actor_on(tag: str) -> int | None:
    """The PID of a PaliGemma actor process of the node marked ``tag``, if one runs there."""
    for pid in processes_with_env(NODE_TAG, tag):
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::MapWorker"):
                return pid
        except OSError:
            continue
    return None


def test_worker_node_killed_mid_job_then_exactly_once(loopback_cluster, tmp_path, tiny_model_dir):
    from paligemma_batch.fixtures.scenes import write_scene_shards

    shards = write_scene_shards(tmp_path / "shards", shards=8, per_shard=3, seed=2)
    out, config, log = tmp_path / "out", tmp_path / "job.yaml", tmp_path / "job.log"
    config.write_text(yaml.safe_dump({
        "input": {"uri": f"{tmp_path}/shards/*.tar"},
        "tasks": [{"task": "caption"}, {"task": "prompt", "prompt": "describe the colours"}],
        "model": {"source": str(tiny_model_dir), "precision": "float32", "max_new_tokens": 12},
        # One actor per node; after the worker node dies, both actors and a write task fit the head's 1 CPU.
        "inference": {"batch_size": 2, "num_cpus": 0.25, "min_actors": 2, "max_actors": 2},
        "preprocess": {"num_cpus": 0.25, "batch_size": 4},
        "output": {"uri": str(out), "rows_per_file": 3},
        "ray": {"progress_bars": False},
    }))
    driver_env = {**loopback_cluster.env, "RAY_ADDRESS": loopback_cluster.address}  # as `ray job submit` sets it
    with open(log, "wb") as sink:
        driver = subprocess.Popen([sys.executable, str(ANNOTATE), "--config", str(config)], env=driver_env,
                                  stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not (list(out.glob("runs/*/part-*.parquet")) and _actor_on(loopback_cluster.worker_tag)):
            assert driver.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no actor on the worker node with rows committed"
            time.sleep(0.05)
        committed_before_kill = len(list(out.glob("runs/*/part-*.parquet")))
        for pid in processes_with_env(NODE_TAG, loopback_cluster.worker_tag):  # the whole worker node, at once
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert driver.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        if driver.poll() is None:
            driver.kill()

    print(f"worker node killed with {committed_before_kill} part files committed")
    assert not processes_with_env(NODE_TAG, loopback_cluster.worker_tag)
    expected = expected_keys(shards, ["caption", "prompt"])
    assert output_keys(out) == expected and sum(expected.values()) == 8 * 3 * 2
    summary = json.loads((out / "_SUMMARY.json").read_text())
    assert summary["status"] == "finished" and summary["rows_written"] == 48 and summary["rows_error"] == 0
    # The cluster sees the worker node die (its health check can lag a job that finished on the head alone).
    probe = ("import json, time, ray\nray.init()\nfor _ in range(120):\n"
             "    alive = sorted(n['Alive'] for n in ray.nodes())\n"
             "    if alive == [False, True]:\n        break\n    time.sleep(0.5)\nprint(json.dumps(alive))")
    nodes = subprocess.run([sys.executable, "-c", probe], env=driver_env, capture_output=True, text=True, timeout=120)
    assert nodes.stdout.strip().splitlines()[-1] == "[false, true]", nodes.stderr[-2000:]
