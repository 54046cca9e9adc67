"""Exactly-once resume: the driver killed with SIGKILL at three seeded points, rerun each time; and a resumed run
that skips finished shards without reading them."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from conftest import job_config
from exactly_once import committed_rows, expected_keys, kill_processes_with_env, output_keys, start_job
from paligemma_batch.config import StorageOptions
from paligemma_batch.store import INDEX_FILE, MANIFEST_FILE, OutputStore

TASKS = [{"task": "caption", "lang": "en"}, {"task": "prompt", "prompt": "describe the colours"}]
TASK_NAMES = ["caption", "prompt"]


def _write_config(path: Path, model: Path, shards: Path, output: Path) -> None:
    path.write_text(yaml.safe_dump({
        "input": {"uri": f"{shards}/*.tar"},
        "tasks": TASKS,
        "model": {"source": str(model), "precision": "float32", "max_new_tokens": 12},
        "inference": {"batch_size": 2, "num_cpus": 0.5},
        "preprocess": {"num_cpus": 0.5, "batch_size": 4},
        "output": {"uri": str(output), "rows_per_file": 2},
        "ray": {"num_cpus": 2, "progress_bars": False},
    }))


def _run_started(output: Path) -> bool:
    try:
        return json.loads((output / INDEX_FILE).read_text())["runs"][-1]["status"] == "running"
    except (FileNotFoundError, json.JSONDecodeError, IndexError, KeyError):
        return False


def _kill_when(proc, ready, what: str, timeout_s: float = 240) -> None:
    """SIGKILL the driver (only the driver) as soon as ``ready()``; fail if the job ends first."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        assert proc.poll() is None, f"the job ended (rc={proc.returncode}) before the kill point: {what}"
        assert time.monotonic() < deadline, f"no kill point within {timeout_s}s: {what}"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def test_driver_killed_three_times_then_exactly_once(tmp_path, tiny_model_dir):
    from paligemma_batch.fixtures.scenes import write_scene_shards

    shards = write_scene_shards(tmp_path / "shards", shards=10, per_shard=3, seed=11)
    expected = expected_keys(shards, TASK_NAMES)
    total = sum(expected.values())
    out, config, log = tmp_path / "out", tmp_path / "job.yaml", tmp_path / "job.log"
    _write_config(config, tiny_model_dir, tmp_path / "shards", out)
    ray_tmp = Path(tempfile.mkdtemp(prefix="pgbk-", dir="/tmp"))  # short: Ray's socket paths have a length limit

    rng = random.Random(20261127)
    started = [0.0]
    start_delay = rng.uniform(0.5, 4.0)  # early: while the model loads or the first batches run
    mid, late = rng.uniform(0.25, 0.5) * total, rng.uniform(0.6, 0.9) * total
    kill_points = [
        (lambda: _run_started(out) and time.monotonic() - started[0] > start_delay, f"{start_delay:.1f}s after start"),
        (lambda: committed_rows(out) >= mid, f">= {mid:.0f} of {total} rows committed"),
        (lambda: committed_rows(out) >= late, f">= {late:.0f} of {total} rows committed"),
    ]
    try:
        committed_at_kill = []
        for ready, what in kill_points:
            proc = start_job(config, ray_tmp, log)
            started[0] = time.monotonic()
            _kill_when(proc, ready, what)
            committed_at_kill.append(committed_rows(out))
        proc = start_job(config, ray_tmp, log)
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        kill_processes_with_env("RAY_TMPDIR", str(ray_tmp))  # what the killed drivers' Ray left behind
        shutil.rmtree(ray_tmp, ignore_errors=True)

    print(f"kill points: {[w for _, w in kill_points]}; rows in part files at each kill: {committed_at_kill}")
    assert committed_at_kill[1] >= mid and committed_at_kill[2] >= late
    # Read straight from the Parquet files, as any reader would: each key exactly once, nothing missing.
    got = output_keys(out)
    assert sum(got.values()) == total == len(expected) == 30 * 2
    assert got == expected
    assert not list(out.rglob(".tmp-*"))
    [record] = json.loads((out / INDEX_FILE).read_text())["runs"]
    assert record["status"] == "finished" and record["attempts"] == 4 and record["rows"] == total
    summary = json.loads((out / "_SUMMARY.json").read_text())
    assert summary["resumed"] and summary["rows_written"] == total and summary["inputs_seen"] == 30
    assert summary["shards_read"] < summary["shards"] == 10  # finished shards were not read again
    manifest = json.loads((out / "runs" / record["run_id"] / MANIFEST_FILE).read_text())
    assert manifest["rows"] == total


def test_resume_skips_finished_shards_and_committed_rows(ray_local, tmp_path, tiny_model_dir):
    from paligemma_batch.fixtures.scenes import write_scene_shards
    from paligemma_batch.pipeline import run

    shards = write_scene_shards(tmp_path / "shards", shards=3, per_shard=4, seed=5)
    out = tmp_path / "out"
    config = job_config(tiny_model_dir, f"{tmp_path}/shards/*.tar", str(out), tasks=TASKS,
                        output={"uri": str(out), "rows_per_file": 1})
    first = run(config)
    store = OutputStore(str(out), StorageOptions())
    complete = store.read_run(first["run_id"]).to_pylist()

    # Make it a crashed run: unfinished in the index, no manifest; shard 1 lost one row, shard 2 all its rows.
    index = json.loads((out / INDEX_FILE).read_text())
    index["runs"][0]["status"] = "running"
    (out / INDEX_FILE).write_text(json.dumps(index))
    (out / "runs" / first["run_id"] / MANIFEST_FILE).unlink()
    lost = []
    for path in store.part_files(first["run_id"]):
        [row] = pq.read_table(path).to_pylist()
        first_of_shard_1 = row["source_uri"] == str(shards[1]) and not any(str(shards[1]) in i for i, _ in lost)
        if row["source_uri"] == str(shards[2]) or first_of_shard_1:
            lost.append((row["image_id"], row["task"]))
            os.unlink(path)
    # Shard 0 is finished: the resumed run must not even open it.
    shards[0].unlink()

    second = run(config)
    assert second["resumed"] and second["run_id"] == first["run_id"]
    assert second["shards_read"] == 2 and second["rows_this_invocation"] == len(lost) == 1 + 4 * 2
    assert second["rows_error"] == 0
    resumed = store.read_run(first["run_id"]).to_pylist()
    key = lambda r: (r["image_id"], r["task"])  # noqa: E731
    assert sorted(map(key, resumed)) == sorted(map(key, complete))
    assert {key(r): r["text"] for r in resumed} == {key(r): r["text"] for r in complete}
