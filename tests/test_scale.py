"""Bookkeeping that scales with files and shards: per-file statistics, resume from footers, the overlap rule
without reading every key, image folders in groups, incremental runs over many runs, GETs on S3."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from conftest import job_config
from paligemma_batch.config import InputConfig, StorageOptions
from paligemma_batch.pipeline import plan_run
from paligemma_batch.readers import list_shards, reader_for
from paligemma_batch.schema import ANNOTATIONS
from paligemma_batch.stats import FileStats, keysum
from paligemma_batch.store import OutputStore, RunRecord, WriteStats

RUN = "20260101T000000Z-abcdef"
TASKS = ["caption", "ocr"]


def ids(shard: str, images: range) -> list[str]:
    return [f"{shard}::{i:05d}" for i in images]


def rows(shard: str, images: range, tasks=TASKS, error: str | None = None) -> pa.Table:
    return pa.Table.from_pylist(
        [{"image_id": i, "source_uri": shard, "task": t, "status": "error" if error else "ok", "error": error,
          "num_output_tokens": 3, "invalid_objects": 1} for i in ids(shard, images) for t in tasks],
        schema=ANNOTATIONS,
    )


def crashed_run(store: OutputStore, images: int) -> dict[str, str]:
    """Shards a and b finished, c half committed, and a zombie file repeating part of b; sizes recorded."""
    shards = {s: f"s3://in/{s}.tar" for s in "abc"}
    store.upsert_run(RunRecord(RUN, "running", "h", "2026-01-01T00:00:00Z", list(shards.values())))
    files = {}
    files["a"] = store.write_part(RUN, 1, rows(shards["a"], range(images)))[0]
    files["b1"] = store.write_part(RUN, 1, rows(shards["b"], range(images // 2)))[0]
    files["b2"] = store.write_part(RUN, 1, rows(shards["b"], range(images // 2, images)))[0]
    files["c"] = store.write_part(RUN, 1, rows(shards["c"], range(images // 2)))[0]
    for s in "abc":
        store.mark_shard(RUN, shards[s], images, keysum(ids(shards[s], range(images))))
    files["zombie"] = store.write_part(RUN, 1, rows(shards["b"], range(images // 4, images // 2)))[0]
    return files | {f"shard_{s}": u for s, u in shards.items()}


def test_file_stats_travel_in_the_footer_and_merge_to_the_summary(tmp_path):
    store = OutputStore(str(tmp_path / "out"), StorageOptions())
    written = WriteStats()
    written.add(*store.write_part(RUN, 1, rows("s3://in/a.tar", range(3))))
    written.add(*store.write_part(RUN, 1, rows("s3://in/b.tar", range(2), error="decode: broken")))
    total = FileStats()
    for path, stats in written.file_stats.items():
        assert store.file_stats(path) == stats  # what the write task returned is what the footer holds
        total.merge(stats)
    assert total.summary_counts() == {
        "inputs_seen": 5, "rows_written": 10, "rows_by_task": {"caption": {"ok": 3, "error": 2}, "ocr": {"ok": 3, "error": 2}},
        "rows_ok": 6, "rows_error": 4, "errors_by_kind": {"decode": 4},
        "top_error_reasons": [{"error": "decode: broken", "rows": 4}], "output_tokens": 30, "invalid_objects": 10,
    }


def test_overlap_rule_when_a_zombie_file_duplicates_part_of_a_shard(tmp_path):
    store = OutputStore(str(tmp_path / "out"), StorageOptions())
    files = crashed_run(store, images=8)
    a, b, c = (files[f"shard_{s}"] for s in "abc")
    marks = store.shard_marks(RUN)
    assert marks[a].rows == 8 and marks[a].keysum == keysum(ids(a, range(8)))  # from the marker names alone

    progress = store.progress(RUN, marks, TASKS)
    # The zombie's name sorts before or after b1's: whichever of the two comes later is refused.
    [rejected] = progress.rejected
    assert rejected in (files["zombie"], files["b1"])
    kept_b = [files["b2"], files["b1"] if rejected == files["zombie"] else files["zombie"]]
    assert sorted(progress.files) == sorted([files["a"], files["c"], *kept_b])
    assert progress.rows_by_shard[a] == 16 and progress.rows_by_shard[c] == 8
    assert progress.complete_shards({s: m.rows for s, m in marks.items()}, len(TASKS)) >= {a}
    # Keys were read only from the files holding b (duplicated) or c (partial), never from a's.
    assert progress.keys_read_from == 4
    assert {shard for shard in progress.keys.values()} <= {b, c}
    assert sum(1 for s in progress.keys.values() if s == c) == 8


def test_finished_shards_need_no_keys(tmp_path):
    store = OutputStore(str(tmp_path / "out"), StorageOptions())
    shards = [f"s3://in/{i}.tar" for i in range(5)]
    store.upsert_run(RunRecord(RUN, "running", "h", "2026-01-01T00:00:00Z", shards))
    for s in shards:
        store.write_part(RUN, 1, rows(s, range(6)))
        store.mark_shard(RUN, s, 6, keysum(ids(s, range(6))))
    progress = store.progress(RUN, tasks=TASKS)
    assert progress.keys_read_from == 0 and progress.keys == {} and progress.rejected == []
    assert progress.complete_shards(store.shard_sizes(RUN), len(TASKS)) == set(shards)
    # The same rows without recorded sizes: nothing is proven, so every file's keys are read.
    assert store.progress(RUN, marks={}, tasks=TASKS).keys_read_from == 5


def _folder(path, names) -> None:
    path.mkdir(parents=True, exist_ok=True)
    for name in names:
        (path / name).write_bytes(b"")


def test_image_folder_of_2500_files_is_3_shards_grouped_the_same_on_a_rerun(tmp_path, tiny_model_dir):
    folder, out = tmp_path / "images", tmp_path / "out"
    _folder(folder, [f"img-{i:05d}.png" for i in range(2500)])
    config = job_config(tiny_model_dir, str(folder), str(out), input={"uri": str(folder), "format": "images"},
                        output={"uri": str(out), "mode": "incremental"})
    store = OutputStore(str(out), StorageOptions())
    listing = list_shards(config.input)
    plan = plan_run(config, store, listing)
    assert [len(plan.members[s]) for s in plan.shards] == [1000, 1000, 500]
    assert sum(plan.members.values(), []) == sorted(listing)
    assert plan_run(config, store, list(reversed(listing))).members == plan.members  # a rerun groups the same

    store.upsert_run(plan.record, plan.members)
    resumed = plan_run(config, store, listing)  # a crashed run resumes with its own groups
    assert resumed.resumed and resumed.shards == plan.shards and resumed.members == plan.members
    marks = store.shard_marks(plan.run_id)
    assert {s: m.rows for s, m in marks.items()} == {s: len(f) for s, f in plan.members.items()}

    plan.record.status = "finished"
    store.upsert_run(plan.record)
    _folder(folder / "later", ["a.png", "b.png"])  # files added later form a new group in incremental mode
    later = plan_run(config, store, list_shards(config.input))
    assert not later.resumed and list(later.members.values()) == [[str(folder / "later" / n) for n in ("a.png", "b.png")]]


def _started_folder_run(tmp_path):
    """An incremental image-folder run of 5 files in groups of 2, recorded: (folder, config, store, plan)."""
    folder, out = tmp_path / "images", tmp_path / "out"
    _folder(folder, [f"img-{i}.png" for i in range(5)])
    config = job_config(tmp_path / "model", str(folder), str(out),
                        input={"uri": str(folder), "format": "images", "files_per_shard": 2},
                        output={"uri": str(out), "mode": "incremental"})
    store = OutputStore(str(out), StorageOptions())
    plan = plan_run(config, store, list_shards(config.input))
    store.upsert_run(plan.record, plan.members)
    return folder, config, store, plan


def test_image_folder_groups_go_to_parquet_and_an_incremental_run_skips_their_files(tmp_path):
    folder, config, store, plan = _started_folder_run(tmp_path)
    run_dir = tmp_path / "out" / "runs" / plan.run_id
    groups = pq.read_table(run_dir / "_GROUPS.parquet").to_pydict()
    assert list(zip(groups["group"], groups["file"])) == [(g, f) for g, files in plan.members.items() for f in files]
    shard_list = (run_dir / "_SHARDS.json").read_text()
    assert [f for files in plan.members.values() for f in files[1:] if f in shard_list] == []  # ids, sizes, sums
    second = list(plan.members)[1]
    assert store.run_members(plan.run_id, {second}) == {second: plan.members[second]}

    plan.record.status = "finished"
    store.upsert_run(plan.record)
    _folder(folder, ["img-5.png"])
    later = plan_run(config, store, list_shards(config.input))
    assert list(later.members.values()) == [[str(folder / "img-5.png")]]


def test_a_group_reads_its_files_in_order_attributed_to_the_group(tmp_path):
    folder = tmp_path / "images"
    _folder(folder, ["x.png", "y.png"])
    reader = reader_for(InputConfig(uri=str(folder), format="images", files_per_shard=5))
    [(group, files)] = reader.group(reader.list_shards()).items()
    (folder / "y.png").unlink()
    got = list(reader.iter_group(group, files))
    assert [(r.image_id, r.source_uri) for r in got] == [(f, group) for f in files]
    assert got[0].error is None and got[1].error.startswith("missing_shard")


def test_incremental_run_over_50_earlier_finished_runs(tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    shards = [str(tmp_path / f"day-{i:03d}.tar") for i in range(51)]
    config = job_config(tiny_model_dir, shards, str(out), output={"uri": str(out), "mode": "incremental"})
    store = OutputStore(str(out), StorageOptions())
    for i in range(50):
        store.upsert_run(RunRecord(f"2026{i:04d}T000000Z-aaaaaa", "finished", config.fingerprint(),
                                   "2026-01-01T00:00:00Z", [shards[i]], "2026-01-01T00:10:00Z", 8))
    index = store.read_index(with_shards=False)
    assert len(index) == 50 and all(r.shards == [] and r.num_shards == 1 for r in index)  # small records
    assert b"day-" not in (out / "_RUNS.json").read_bytes()
    plan = plan_run(config, store, shards)
    assert not plan.resumed and plan.shards == [shards[50]]
    assert [r.shards for r in store.read_index()][:2] == [[shards[0]], [shards[1]]]


def test_resume_on_s3_reads_metadata_not_rows(s3_bucket, s3_endpoint):
    from fault_proxy import FaultProxy

    _, bucket = s3_bucket
    direct = StorageOptions(endpoint_url=s3_endpoint, key="testing", secret="testing")
    gets = {}
    for images in (40, 400):
        crashed_run(OutputStore(f"s3://{bucket}/out-{images}", direct), images)
        with FaultProxy(s3_endpoint, rate=0.0) as proxy:
            store = OutputStore(f"s3://{bucket}/out-{images}", StorageOptions(endpoint_url=proxy.url, key="testing",
                                                                              secret="testing"))
            progress = store.progress(RUN, tasks=TASKS)
            gets[images] = proxy.requests["GET"]
        assert len(progress.rejected) == 1 and progress.keys_read_from == 4
    # 5 part files: a footer each, keys from the 4 holding b or c, the shard list and listings; nothing per row.
    assert gets[400] == gets[40] <= 5 * 2 + 4 * 2 + 6, gets


def test_a_root_written_before_groups_went_to_parquet_still_resumes_and_skips_covered_files(tmp_path):
    """Older runs list each group's files in ``_SHARDS.json``: sizes, members and covered files come from there."""
    import json

    folder, config, store, plan = _started_folder_run(tmp_path)
    run_dir = tmp_path / "out" / "runs" / plan.run_id
    (run_dir / "_GROUPS.parquet").unlink()
    (run_dir / "_SHARDS.json").write_text(json.dumps({"shards": list(plan.members), "groups": {
        s: {"files": files, "keysum": f"{keysum(files):016x}"} for s, files in plan.members.items()}}))
    first, last = list(plan.members)[0], list(plan.members)[-1]
    assert store.shard_marks(plan.run_id)[first].rows == 2 and store.shard_marks(plan.run_id)[last].rows == 1
    assert store.run_members(plan.run_id, {last}) == {last: plan.members[last]}
    plan.record.status = "finished"
    store.upsert_run(plan.record)
    _folder(folder, ["img-5.png"])
    assert list(plan_run(config, store, list_shards(config.input)).members.values()) == [[str(folder / "img-5.png")]]
