"""Actor faults: the model actor SIGKILLed mid-batch is restarted by Ray and no row is lost or duplicated; a
model that fails to load is retried on fresh actors a bounded number of times, then fails the job with its
cause, and the run stays resumable."""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from conftest import job_config
from exactly_once import expected_keys, output_keys
from paligemma_batch.config import StorageOptions
from paligemma_batch.store import OutputStore

TASKS = [{"task": "caption", "lang": "en"}, {"task": "prompt", "prompt": "describe the colours"}]


def _inference_actors() -> dict[str, dict]:
    """This driver's PaliGemma actors (Ray Data fuses the reading stages into them), by actor id."""
    import ray
    from ray._private import state

    job = ray.get_runtime_context().get_job_id()
    return {aid: a for aid, a in state.actors().items() if "InferenceStage" in a["ActorClassName"] and a["JobID"] == job}


def _cpu_ticks(pid: int) -> int:
    """User + system CPU time a process has used, in clock ticks (1/100 s)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def _run_in_thread(config) -> tuple[threading.Thread, dict]:
    from paligemma_batch.pipeline import run

    outcome: dict = {}

    def target():
        try:
            outcome["summary"] = run(config)
        except BaseException as err:  # handed to the test thread, which re-raises it
            outcome["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, outcome


def test_actor_killed_mid_batch_is_restarted_without_losing_or_duplicating_rows(ray_local, tmp_path, tiny_model_dir):
    from paligemma_batch.fixtures.scenes import write_scene_shards

    shards = write_scene_shards(tmp_path / "shards", shards=6, per_shard=4, seed=3)
    out = tmp_path / "out"
    config = job_config(tiny_model_dir, f"{tmp_path}/shards/*.tar", str(out), tasks=TASKS,
                        inference={"batch_size": 2, "num_cpus": 0.5},
                        model={"source": str(tiny_model_dir), "precision": "float32", "max_new_tokens": 16},
                        output={"uri": str(out), "rows_per_file": 3})
    before = set(_inference_actors())
    thread, outcome = _run_in_thread(config)

    # Kill the actor mid-batch: once it has loaded the model, shards have been read, and it is computing (an
    # actor waiting for input burns no CPU), with most of the 24 images still to go.
    deadline = time.monotonic() + 180

    def wait_for(condition, what):
        while not condition():
            assert thread.is_alive(), outcome
            assert time.monotonic() < deadline, f"never happened: {what}"
            time.sleep(0.02)

    wait_for(lambda: list(out.glob("runs/*/_shards/*.json")), "a shard read")
    alive = lambda: [(a, i) for a, i in _inference_actors().items() if a not in before and i["State"] == "ALIVE"]  # noqa: E731
    wait_for(alive, "the actor loaded the model")
    [(actor_id, actor)] = alive()
    ticks = _cpu_ticks(actor["Pid"])
    wait_for(lambda: _cpu_ticks(actor["Pid"]) >= ticks + 20, "the actor computing")
    os.kill(actor["Pid"], signal.SIGKILL)
    thread.join(timeout=300)
    assert not thread.is_alive() and "error" not in outcome, outcome

    summary = outcome["summary"]
    restarted = _inference_actors()[actor_id]
    assert restarted["NumRestarts"] >= 1 and restarted["Pid"] != actor["Pid"]
    expected = expected_keys(shards, ["caption", "prompt"])
    assert summary["rows_written"] == summary["rows_this_invocation"] == sum(expected.values()) == 6 * 4 * 2
    assert output_keys(out) == expected  # every (image, task) exactly once in the Parquet files
    assert summary["rows_error"] == 0


def test_model_load_failure_is_retried_then_fails_loudly_and_resumes_once_fixed(ray_local, tmp_path, tiny_model_dir,
                                                                                  scene_shards):
    from paligemma_batch.pipeline import RunFailed, run

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    weights.write_bytes(data[:header + 1000])  # a download cut in its tensors (validate reads only the header)
    out = tmp_path / "out"
    config = job_config(model, str(scene_shards[0]), str(out),
                        inference={"batch_size": 4, "num_cpus": 0.5, "model_load_retries": 1},
                        model={"source": str(model), "precision": "float32", "max_new_tokens": 8})
    before = set(_inference_actors())
    with pytest.raises(RunFailed) as failed:
        run(config)
    message = str(failed.value)
    assert message.startswith("inference: 2 actor(s) in a row died loading the model (inference.model_load_retries=1)")
    assert "SafetensorError" in message  # the cause, not just "actor died"
    died = {a: info for a, info in _inference_actors().items() if a not in before}
    assert len(died) == 2 and {info["State"] for info in died.values()} == {"DEAD"}

    store = OutputStore(str(out), StorageOptions())
    [record] = store.read_index()
    assert record.status == "running" and not store.part_files(record.run_id)
    shutil.copy(tiny_model_dir / "model.safetensors", weights)
    summary = run(config)
    assert summary["resumed"] and summary["run_id"] == record.run_id and summary["attempts"] == 2
    assert summary["rows_written"] == 4 * 2 and summary["rows_error"] == 0
