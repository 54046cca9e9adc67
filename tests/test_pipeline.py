"""End to end: the whole job on a local Ray, from WebDataset on S3, an image folder and Parquet bytes."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import job_config
from paligemma_batch.config import StorageOptions
from paligemma_batch.pipeline import run
from paligemma_batch.store import OutputStore


def _read_output(uri: str, storage: StorageOptions, run_id: str) -> pa.Table:
    return OutputStore(uri, storage).read_run(run_id)


def test_webdataset_on_s3_to_s3(ray_local, s3_bucket, s3_endpoint, tiny_model_dir, scene_shards, vae_npz):
    fs, bucket = s3_bucket
    for shard in scene_shards:
        fs.put(str(shard), f"{bucket}/shards/{shard.name}")
    storage = {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"}
    tasks = [
        {"task": "caption", "lang": "en"},
        {"task": "answer", "lang": "en", "question_key": "json.question"},
        {"task": "detect", "objects": ["circle", "square"]},
        {"task": "segment", "objects": ["circle"]},
    ]
    config = job_config(
        tiny_model_dir, f"s3://{bucket}/shards/*.tar", f"s3://{bucket}/out",
        input={"uri": f"s3://{bucket}/shards/*.tar", "format": "webdataset", "storage_options": storage},
        tasks=tasks,
        model={"source": str(tiny_model_dir), "precision": "float32", "max_new_tokens": 8,
               "mask_decoder": str(vae_npz)},
    )
    summary = run(config)
    images = 3 * 4
    assert summary["inputs_seen"] == images
    assert summary["rows_written"] == images * len(tasks)
    assert summary["rows_error"] == 0

    table = _read_output(f"s3://{bucket}/out", config.input.storage_options, summary["run_id"])
    assert table.schema.equals(__import__("paligemma_batch.schema", fromlist=["x"]).ANNOTATIONS)
    rows = table.to_pylist()
    assert {r["status"] for r in rows} == {"ok"}
    keys = {(r["image_id"], r["task"]) for r in rows}
    assert len(keys) == images * len(tasks)
    # Every image id is the shard URI plus the member key, and joins back to its ground truth.
    assert all(r["image_id"].startswith(f"s3://{bucket}/shards/scenes-") and "::" in r["image_id"] for r in rows)
    by_id = {r["image_id"]: r for r in rows if r["task"] == "answer"}
    for shard in scene_shards:
        import tarfile

        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                if m.name.endswith(".json"):
                    truth = json.load(tar.extractfile(m))
                    row = by_id[f"s3://{bucket}/shards/{shard.name}::{m.name[:-5]}"]
                    assert (row["width"], row["height"]) == (truth["width"], truth["height"])
                    assert row["prompt"] == f"answer en {truth['question']}"
    # Summary and run index are in the bucket, without any secret.
    summary_raw = fs.cat(f"{bucket}/out/runs/{summary['run_id']}/_SUMMARY.json").decode()
    assert json.loads(summary_raw)["rows_written"] == images * len(tasks)
    index = json.loads(fs.cat(f"{bucket}/out/_RUNS.json"))
    assert [r["status"] for r in index["runs"]] == ["finished"]


def test_image_folder_input(ray_local, tmp_path, tiny_model_dir):
    folder = tmp_path / "images" / "nested"
    folder.mkdir(parents=True)
    sizes = [(40, 30), (300, 120), (64, 64), (17, 90)]
    for i, (w, h) in enumerate(sizes):
        Image.new("RGB", (w, h), (i * 60, 100, 200)).save(folder / f"img {i}.png")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    config = job_config(tiny_model_dir, str(tmp_path / "images"), str(out),
                        input={"uri": str(tmp_path / "images"), "format": "images"})
    summary = run(config)
    table = _read_output(str(out), StorageOptions(), summary["run_id"])
    assert table.num_rows == len(sizes) * 2
    got = {(r["image_id"], r["width"], r["height"]) for r in table.to_pylist()}
    assert got == {(str(folder / f"img {i}.png"), w, h) for i, (w, h) in enumerate(sizes)}
    assert set(table["status"].to_pylist()) == {"ok"}


def test_parquet_bytes_input(ray_local, tmp_path, tiny_model_dir):
    records = []
    for i in range(5):
        buf = io.BytesIO()
        Image.new("RGB", (50 + i, 40), (10 * i, 20, 30)).save(buf, "JPEG")
        records.append({"key": f"k{i}", "image": buf.getvalue(), "q": f"is it {i}?"})
    records.append({"key": "broken", "image": b"not an image", "q": "?"})
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "part-0.parquet")
    out = tmp_path / "out"
    config = job_config(
        tiny_model_dir, str(tmp_path / "part-0.parquet"), str(out),
        input={"uri": str(tmp_path / "*.parquet"), "format": "parquet", "id_column": "key"},
        tasks=[{"task": "answer", "question_key": "q"}],
    )
    summary = run(config)
    rows = {r["image_id"].split("::")[1]: r for r in _read_output(str(out), StorageOptions(), summary["run_id"]).to_pylist()}
    assert sorted(rows) == sorted(r["key"] for r in records)
    assert rows["k3"]["prompt"] == "answer en is it 3?" and rows["k3"]["status"] == "ok"
    assert rows["k3"]["width"] == 53
    assert rows["broken"]["status"] == "error" and rows["broken"]["error"].startswith("decode:")
    assert summary["errors_by_kind"] == {"decode": 1}


def test_rerun_of_finished_output_is_refused(ray_local, tmp_path, tiny_model_dir, scene_shards):
    from paligemma_batch.config import ConfigError

    config = job_config(tiny_model_dir, str(scene_shards[0]), str(tmp_path / "out"))
    run(config)
    with pytest.raises(ConfigError, match="output.uri: holds a finished run"):
        run(config)
