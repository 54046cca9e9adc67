"""A real two-node Ray cluster on this machine, with token auth and the head's dashboard (job server) on
127.0.0.1: the job is submitted with the README's ``ray job submit`` command as written, its logs followed, the
worker node is killed mid-job, and the job still succeeds with every (image, task) exactly once."""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
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

BIN = Path(sys.executable).parent
RAY = str(BIN / "ray")
REPO = Path(__file__).parents[1]
README_DASHBOARD = "http://127.0.0.1:8265"  # the address the README submits to
NODE_TAG = "PGB_TEST_NODE"  # marks every process of a node we started, so we stop only those
# Fast node-death detection (the default takes about 15 s).
SYSTEM_CONFIG = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3, "health_check_initial_delay_ms": 1000}


@dataclass
class Cluster:
    address: str  # the GCS, for drivers
    dashboard: str  # the job server, for `ray job submit`
    env: dict[str, str]  # what a driver or `ray` command needs: token auth on, and the token
    head_tag: str
    worker_tag: str


def _start_node(args: list[str], env: dict[str, str], tag: str, temp_dir: Path) -> None:
    node = [RAY, "start", "--num-cpus=1", "--memory=2000000000", "--object-store-memory=300000000",
            f"--temp-dir={temp_dir}", "--disable-usage-stats", *args]
    done = subprocess.run(node, env={**env, NODE_TAG: tag}, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]


def _readme_submit() -> list[str]:
    """The ``ray job submit`` command of the README's cluster section, split as a shell would."""
    section = (REPO / "README.md").read_text().split("## On a Ray cluster", 1)[1]
    return shlex.split(next(line for line in section.splitlines() if line.startswith("ray job submit ")))


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def loopback_cluster():
    """A head and a worker node, 1 CPU each, their own temp dirs, token auth with a generated token; the head
    serves the dashboard and job server on 127.0.0.1. The nodes run in this venv, as if it were activated, so a
    job's ``python`` is the one with paligemma-batch installed."""
    token = secrets.token_hex(32)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
               # A job's actor pool starts work once every actor is up, so one is on the worker node to kill.
               RAY_DATA_DEFAULT_WAIT_FOR_MIN_ACTORS_S="300")
    root = Path(tempfile.mkdtemp(prefix="pgbc-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    tag = uuid.uuid4().hex[:8]
    cluster = Cluster("", f"http://127.0.0.1:{_free_port()}", env, f"{tag}-head", f"{tag}-worker")
    # The agents' HTTP port defaults to a fixed 52365, which another cluster on this machine may hold.
    agent = "--dashboard-agent-listen-port=0"
    try:
        _start_node(["--head", "--port=0", "--node-ip-address=127.0.0.1", "--include-dashboard=true",
                     "--dashboard-host=127.0.0.1", f"--dashboard-port={cluster.dashboard.rsplit(':', 1)[1]}", agent,
                     f"--system-config={json.dumps(SYSTEM_CONFIG)}"], env, cluster.head_tag, root / "head")
        cluster.address = (root / "head" / "ray_current_cluster").read_text().strip()
        _start_node([f"--address={cluster.address}", "--node-ip-address=127.0.0.1", agent], env,
                    cluster.worker_tag, root / "worker")
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
    # What a user submits from: a checkout with the entry point and the job's config (the README's command).
    work = tmp_path / "checkout"
    shutil.copytree(REPO / "pipelines", work / "pipelines", ignore=shutil.ignore_patterns("__pycache__"))
    out, config, log = tmp_path / "out", work / "configs" / "job.yaml", tmp_path / "submit.log"
    config.parent.mkdir()
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
    submit = _readme_submit()
    assert submit[:3] == ["ray", "job", "submit"] and README_DASHBOARD in submit and "configs/job.yaml" in submit
    submit = [RAY, *(loopback_cluster.dashboard if arg == README_DASHBOARD else arg for arg in submit[1:])]
    with open(log, "wb") as sink:  # without --no-wait, the command follows the job's logs until it ends
        client = subprocess.Popen(submit, cwd=work, env=loopback_cluster.env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not (list(out.glob("runs/*/part-*.parquet")) and _actor_on(loopback_cluster.worker_tag)):
            assert client.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "no actor on the worker node with rows committed"
            time.sleep(0.05)
        committed_before_kill = len(list(out.glob("runs/*/part-*.parquet")))
        for pid in processes_with_env(NODE_TAG, loopback_cluster.worker_tag):  # the whole worker node, at once
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert client.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        if client.poll() is None:
            client.kill()

    print(f"worker node killed with {committed_before_kill} part files committed")
    assert not processes_with_env(NODE_TAG, loopback_cluster.worker_tag)
    expected = expected_keys(shards, ["caption", "prompt"])
    assert output_keys(out) == expected and sum(expected.values()) == 8 * 3 * 2
    summary = json.loads((out / "_SUMMARY.json").read_text())
    assert summary["status"] == "finished" and summary["rows_written"] == 48 and summary["rows_error"] == 0
    followed = log.read_text()
    assert re.search(r"Job '\w+' succeeded", followed), followed[-3000:]
    assert f"run {summary['run_id']}: 8 shards" in followed, followed[-3000:]  # the driver's own lines, followed
    # The cluster sees the worker node die (its health check can lag a job that finished on the head alone).
    probe = ("import json, time, ray\nray.init()\nfor _ in range(120):\n"
             "    alive = sorted(n['Alive'] for n in ray.nodes())\n"
             "    if alive == [False, True]:\n        break\n    time.sleep(0.5)\nprint(json.dumps(alive))")
    driver_env = {**loopback_cluster.env, "RAY_ADDRESS": loopback_cluster.address}
    nodes = subprocess.run([sys.executable, "-c", probe], env=driver_env, capture_output=True, text=True, timeout=120)
    assert nodes.stdout.strip().splitlines()[-1] == "[false, true]", nodes.stderr[-2000:]
