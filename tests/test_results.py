"""read_results and read_source_images: runs of an output root read back, and images read back from shards.

Also home of the "truth output" helpers the report and export tests share: an output root in the real layout
whose rows are the scene ground truth (boxes and masks known exactly).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from paligemma_batch.config import StorageOptions
from paligemma_batch.results import read_results, read_source_images
from paligemma_batch.schema import ANNOTATIONS
from paligemma_batch.store import OutputStore, RunRecord, now_iso

ERROR_ROW = "decode: broken on purpose"


def scene_truth(shard: Path) -> dict[str, dict]:
    """Member key → ground-truth record of every scene in a local tar."""
    with tarfile.open(shard) as tar:
        return {m.name[:-5]: json.load(tar.extractfile(m)) for m in tar.getmembers() if m.name.endswith(".json")}


def truth_rows(shards: list[Path], shard_uri=str) -> list[dict]:
    """Output rows whose predictions are the ground truth: caption, detect and segment rows per image (labels are
    the shapes), plus one answer row with an error for the second image of the first shard."""
    rows = []

    def row(image_id, uri, truth, task, **fields):
        base = {name: None for name in ANNOTATIONS.names}
        base.update(image_id=image_id, source_uri=uri, width=truth["width"], height=truth["height"], task=task,
                    prompt=task, text="", invalid_objects=0, status="ok", model_id="truth", run_id="truth")
        base.update(fields)
        return base

    for s, shard in enumerate(shards):
        uri = shard_uri(shard)
        for i, (key, truth) in enumerate(sorted(scene_truth(shard).items())):
            image_id = f"{uri}::{key}"
            w, h = truth["width"], truth["height"]
            dets = [{"label": o["shape"], "box_xyxy": [float(v) for v in o["box"]],
                     "box_norm": [o["box"][0] / w, o["box"][1] / h, o["box"][2] / w, o["box"][3] / h],
                     "loc_tokens": [0, 0, 1, 1]} for o in truth["objects"]]
            masks = [{"label": o["shape"], "box_xyxy": [float(v) for v in o["box"]], "seg_tokens": [0] * 16,
                      "rle": o["rle"], "area": _area(o["rle"])} for o in truth["objects"]]
            rows.append(row(image_id, uri, truth, "caption", text=truth["caption"]))
            rows.append(row(image_id, uri, truth, "detect", detections=dets))
            rows.append(row(image_id, uri, truth, "segment", detections=dets, masks=masks))
            if s == 0 and i == 1:
                rows.append(row(image_id, uri, truth, "answer", status="error", error=ERROR_ROW))
    return rows


def _area(rle: dict) -> int:
    from paligemma_batch.rle import decode_rle

    return int(decode_rle(rle).sum())


def write_output(uri: str, rows: list[dict], run_id: str = "20260101T000000Z-truth", status: str = "finished",
                 storage: StorageOptions | None = None) -> None:
    """An output root in the sink's layout: the rows as one committed Parquet file, the run in the index (and,
    once finished, its manifest)."""
    store = OutputStore(uri, storage or StorageOptions())
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist([{**r, "run_id": run_id} for r in rows], schema=ANNOTATIONS), buf)
    part = store.run_path(run_id, "part-a1-00000.parquet")
    store.write_bytes(part, buf.getvalue())
    if status == "finished":
        store.finish_run(run_id, {part: len(rows)})
    shards = sorted({r["source_uri"] for r in rows})
    store.upsert_run(RunRecord(run_id, status, "truth", now_iso(), shards,
                               now_iso() if status == "finished" else None, len(rows)))


def test_read_results_keeps_nested_columns_and_reads_every_finished_run(tmp_path, scene_shards):
    rows = truth_rows(scene_shards)
    first, second = rows[: len(rows) // 2], rows[len(rows) // 2:]
    write_output(str(tmp_path), first, run_id="20260101T000000Z-one")
    write_output(str(tmp_path), second, run_id="20260102T000000Z-two")

    table = read_results(str(tmp_path))
    assert table.schema.equals(ANNOTATIONS)
    assert table.num_rows == len(rows)
    assert {(r["image_id"], r["task"]) for r in table.to_pylist()} == {(r["image_id"], r["task"]) for r in rows}
    segment = next(r for r in table.to_pylist() if r["task"] == "segment")
    truth = next(r for r in rows if r["task"] == "segment" and r["image_id"] == segment["image_id"])
    assert segment["masks"][0]["rle"] == truth["masks"][0]["rle"]
    assert segment["detections"][0]["box_xyxy"] == truth["detections"][0]["box_xyxy"]

    assert read_results(str(tmp_path), run_id="20260102T000000Z-two").num_rows == len(second)
    errors = read_results(str(tmp_path), filters=[("status", "=", "error")], columns=["image_id", "error"])
    assert errors.column_names == ["image_id", "error"] and errors["error"].to_pylist() == [ERROR_ROW]

    df = read_results(str(tmp_path), as_pandas=True)
    assert len(df) == len(rows)
    assert df["detections"].dtype.pyarrow_dtype.equals(ANNOTATIONS.field("detections").type)
    round_trip = pa.Table.from_pandas(df, preserve_index=False)
    assert round_trip.select(ANNOTATIONS.names).cast(ANNOTATIONS).equals(table.cast(ANNOTATIONS))


def test_read_results_says_what_is_missing(tmp_path, scene_shards):
    with pytest.raises(FileNotFoundError, match="no _RUNS.json"):
        read_results(str(tmp_path / "nothing"))
    write_output(str(tmp_path), truth_rows(scene_shards[:1]), run_id="20260101T000000Z-part", status="running")
    with pytest.raises(ValueError, match=r"no finished run .*20260101T000000Z-part \(running\)"):
        read_results(str(tmp_path))
    assert read_results(str(tmp_path), run_id="20260101T000000Z-part").num_rows == len(truth_rows(scene_shards[:1]))
    with pytest.raises(ValueError, match="run nope is not in"):
        read_results(str(tmp_path), run_id="nope")


def _image_bytes(shard: Path, key: str) -> bytes:
    with tarfile.open(shard) as tar:
        return next(tar.extractfile(m).read() for m in tar.getmembers()
                    if m.name.startswith(key + ".") and not m.name.endswith(".json"))


def test_read_source_images_by_image_id(tmp_path, scene_shards):
    keys = {shard: sorted(scene_truth(shard)) for shard in scene_shards}
    wanted = [(f"{scene_shards[0]}::{keys[scene_shards[0]][2]}", str(scene_shards[0])),
              (f"{scene_shards[2]}::{keys[scene_shards[2]][0]}", str(scene_shards[2])),
              (f"{scene_shards[2]}::{keys[scene_shards[2]][3]}", str(scene_shards[2])),
              (f"{scene_shards[1]}::no-such-key", str(scene_shards[1])),
              (str(tmp_path / "gone.tar"), str(tmp_path / "gone.tar"))]
    got = read_source_images(wanted)
    assert set(got) == {i for i, _ in wanted}
    for image_id, shard in wanted[:3]:
        assert got[image_id].data == _image_bytes(Path(shard), image_id.split("::")[1])
        assert got[image_id].error is None
    assert got[wanted[3][0]].data is None and got[wanted[3][0]].error == f"not found in {scene_shards[1]}"
    assert got[wanted[4][0]].data is None and "gone.tar" in got[wanted[4][0]].error


def test_read_results_and_source_images_on_s3(s3_bucket, s3_endpoint, scene_shards, monkeypatch):
    fs, bucket = s3_bucket
    for shard in scene_shards:
        fs.put(str(shard), f"{bucket}/shards/{shard.name}")
    storage = StorageOptions(endpoint_url=s3_endpoint, key="testing", secret="testing")
    rows = truth_rows(scene_shards, shard_uri=lambda p: f"s3://{bucket}/shards/{p.name}")
    write_output(f"s3://{bucket}/out", rows, storage=storage)

    table = read_results(f"s3://{bucket}/out", storage_options={"endpoint_url": s3_endpoint})
    assert table.num_rows == len(rows)
    image_id = rows[0]["image_id"]
    images = read_source_images([(image_id, rows[0]["source_uri"])], storage_options=storage)
    assert images[image_id].data == _image_bytes(scene_shards[0], image_id.split("::")[1])

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)  # no options at all: the environment decides
    assert read_results(f"s3://{bucket}/out", columns=["image_id"]).num_rows == len(rows)
