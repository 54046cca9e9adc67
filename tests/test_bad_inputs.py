"""The whole bad-input corpus through the Ray job: it finishes, and every input is one correct row per task."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from bad_corpus import MAX_PIXELS, write_corpus
from conftest import job_config
from paligemma_batch import pipeline
from paligemma_batch.config import StorageOptions
from paligemma_batch.store import OutputStore


def test_bad_inputs_never_kill_the_job(ray_local, tmp_path, tiny_model_dir, monkeypatch):
    corpus = write_corpus(tmp_path / "corpus")
    listed: list[str] = []

    def list_then_delete(cfg):
        """List the shards as the driver does, then lose one before any reader opens it."""
        listed.extend(real_list_shards(cfg))
        os.remove(corpus.delete_after_listing)
        return list(listed)

    real_list_shards = pipeline.list_shards
    monkeypatch.setattr(pipeline, "list_shards", list_then_delete)
    out = tmp_path / "out"
    config = job_config(
        tiny_model_dir, corpus.shard_uris, str(out),
        input={"uri": corpus.shard_uris, "format": "webdataset"},
        preprocess={"num_cpus": 0.5, "batch_size": 8, "max_image_pixels": MAX_PIXELS},
    )
    summary = pipeline.run(config)

    assert corpus.delete_after_listing in listed
    tasks = [t.output_name for t in config.tasks]
    rows = OutputStore(str(out), StorageOptions()).read_run(summary["run_id"]).to_pylist()
    print(f"{len(corpus.kinds)} kinds of bad or odd input, {len(corpus.expected)} inputs, {len(rows)} rows; "
          f"errors by kind: {summary['errors_by_kind']}")
    assert len(corpus.kinds) >= 25
    assert len(rows) == len(corpus.expected) * len(tasks) == summary["rows_written"]
    assert Counter((r["image_id"], r["task"]) for r in rows) == Counter(
        {(image_id, task): 1 for image_id in corpus.expected for task in tasks})
    for row in rows:
        expected = corpus.expected[row["image_id"]]
        if expected.outcome == "ok":
            assert row["status"] == "ok" and row["error"] is None, (row["image_id"], row["error"])
            assert (row["width"], row["height"]) == expected.size, row["image_id"]
            assert row["text"] is not None and row["num_output_tokens"] > 0
        else:
            assert row["status"] == "error" and row["error"].startswith(f"{expected.outcome}: "), (
                row["image_id"], row["error"])
            assert row["text"] is None
    expected_errors = Counter(e.outcome for e in corpus.expected.values() if e.outcome != "ok")
    assert summary["errors_by_kind"] == {kind: n * len(tasks) for kind, n in expected_errors.items()}
    assert summary["inputs_seen"] == len(corpus.expected)
    # Member names such as ../../escape-dotdot and /etc/escape-absolute were keys, never paths.
    assert not any("escape" in p.name for p in Path(tmp_path).rglob("*") if p.is_file() and p.suffix != ".tar")
    assert not Path("/etc/escape-absolute.jpg").exists()
