"""Incremental mode: a bucket that gains shards; each run processes only the new ones under its own prefix, the
run index lists runs and shards, and ``paligemma-batch runs`` prints it (local and S3)."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from conftest import job_config
from paligemma_batch.cli import app
from paligemma_batch.config import StorageOptions
from paligemma_batch.pipeline import plan_run, validate
from paligemma_batch.store import OutputStore, RunRecord

TASKS = [{"task": "caption", "lang": "en"}, {"task": "prompt", "prompt": "describe the colours"}]


def test_new_shards_only_under_a_new_run_prefix_on_s3(ray_local, s3_bucket, s3_endpoint, tiny_model_dir,
                                                     scene_shards, tmp_path):
    from paligemma_batch.pipeline import run
    from paligemma_batch.results import read_results

    fs, bucket = s3_bucket
    storage = {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"}
    shards_uri, out = f"s3://{bucket}/shards/*.tar", f"s3://{bucket}/out"
    config = job_config(tiny_model_dir, shards_uri, out, tasks=TASKS,
                        input={"uri": shards_uri, "storage_options": storage},
                        output={"uri": out, "mode": "incremental", "rows_per_file": 5})
    for shard in scene_shards[:2]:
        fs.put(str(shard), f"{bucket}/shards/{shard.name}")
    first = run(config)
    fs.put(str(scene_shards[2]), f"{bucket}/shards/{scene_shards[2].name}")  # the bucket grew
    second = run(config)
    third = run(config)

    assert (first["shards"], first["rows_written"]) == (2, 2 * 4 * len(TASKS))
    assert (second["shards"], second["rows_written"]) == (1, 1 * 4 * len(TASKS))
    assert second["run_id"] != first["run_id"] and not second["resumed"]
    assert third["status"] == "nothing_to_do"
    store = OutputStore(out, config.output_storage)
    index = store.read_index()
    shard_uris = [f"s3://{bucket}/shards/{s.name}" for s in scene_shards]
    assert [(r.run_id, r.status, r.shards, r.rows) for r in index] == [
        (first["run_id"], "finished", shard_uris[:2], 16),
        (second["run_id"], "finished", shard_uris[2:], 8),
    ]
    second_rows = store.read_run(second["run_id"]).to_pylist()
    assert {r["source_uri"] for r in second_rows} == {shard_uris[2]}
    assert all(p.startswith(f"{bucket}/out/runs/{second['run_id']}/") for p in store.data_files(second["run_id"]))
    # Across runs, the corpus holds every (image, task) once.
    everything = read_results(out, storage_options=storage, columns=["image_id", "task"])
    pairs = list(zip(everything["image_id"].to_pylist(), everything["task"].to_pylist()))
    assert len(pairs) == len(set(pairs)) == 3 * 4 * len(TASKS)

    # `paligemma-batch runs` reads the index on S3, from an endpoint option or from the job's config.
    cli = CliRunner()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
    listed = cli.invoke(app, ["runs", out, "--endpoint-url", s3_endpoint, "--shards"], env=env)
    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    assert lines[0].startswith(f"{first['run_id']}  finished  attempts=1  shards=2 ") and "rows=16" in lines[0]
    assert lines[1:3] == [f"    {u}" for u in shard_uris[:2]]
    assert lines[3].startswith(f"{second['run_id']}  finished  attempts=1  shards=1 ") and "rows=8" in lines[3]
    assert lines[4:] == [f"    {shard_uris[2]}"]
    config_file = tmp_path / "job.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_none=True) | {
        "input": {"uri": shards_uri, "storage_options": storage}}))
    as_json = cli.invoke(app, ["runs", out, "--config", str(config_file), "--json"])
    assert as_json.exit_code == 0, as_json.output
    assert [r["shards"] for r in json.loads(as_json.output)["runs"]] == [shard_uris[:2], shard_uris[2:]]


def test_incremental_refuses_runs_of_another_config(tmp_path, tiny_model_dir, scene_shards):
    out = tmp_path / "out"
    config = job_config(tiny_model_dir, str(scene_shards[0]), str(out), output={"uri": str(out), "mode": "incremental"})
    OutputStore(str(out), StorageOptions()).upsert_run(
        RunRecord("20260101T000000Z-aaaaaa", "finished", "0123456789abcdef", "2026-01-01T00:00:00Z", ["x.tar"]))
    problems, _ = validate(config, check_resources=False)
    assert problems == ["output.mode: incremental adds to runs of the same config, but 20260101T000000Z-aaaaaa ran "
                        "another one (model, tasks, input or preprocessing differ); use a new output.uri"]


def test_unfinished_run_resumes_before_new_shards_start_a_run(tmp_path, tiny_model_dir, scene_shards):
    out = tmp_path / "out"
    config = job_config(tiny_model_dir, f"{scene_shards[0].parent}/*.tar", str(out),
                        output={"uri": str(out), "mode": "incremental"})
    store = OutputStore(str(out), StorageOptions())
    all_shards = [str(s) for s in scene_shards]
    crashed = RunRecord("20260101T000000Z-aaaaaa", "running", config.fingerprint(), "2026-01-01T00:00:00Z",
                        all_shards[:2])
    store.upsert_run(crashed)

    plan = plan_run(config, store, all_shards)
    assert plan.resumed and plan.run_id == crashed.run_id and plan.shards == all_shards[:2]
    assert plan.record.attempts == 2

    store.upsert_run(RunRecord(crashed.run_id, "finished", crashed.config_hash, crashed.started_at, all_shards[:2]))
    plan = plan_run(config, store, all_shards)
    assert not plan.resumed and plan.run_id != crashed.run_id and plan.shards == all_shards[2:]


@pytest.mark.parametrize("args", [["--json"], []])
def test_runs_command_on_a_local_output(tmp_path, args):
    store = OutputStore(str(tmp_path), StorageOptions())
    store.upsert_run(RunRecord("20260101T000000Z-aaaaaa", "finished", "h", "2026-01-01T00:00:00Z", ["a.tar", "b.tar"],
                               "2026-01-01T00:10:00Z", 16, attempts=3))
    result = CliRunner().invoke(app, ["runs", str(tmp_path), *args])
    assert result.exit_code == 0, result.output
    if args:
        assert json.loads(result.output)["runs"][0]["attempts"] == 3
    else:
        assert result.output == ("20260101T000000Z-aaaaaa  finished  attempts=3  shards=2      rows=16        "
                                 "started=2026-01-01T00:00:00Z  finished=2026-01-01T00:10:00Z\n")
    empty = CliRunner().invoke(app, ["runs", str(tmp_path / "nothing")])
    assert empty.exit_code == 2 and "no runs at" in empty.output
