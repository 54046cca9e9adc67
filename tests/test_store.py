"""The sink's exactly-once bookkeeping: atomic part files, key-disjoint progress of an unfinished run, the
manifest that fixes a finished run's output, shard row counts; RunSink called directly and inside Ray Data."""

from __future__ import annotations

import io
import posixpath

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from paligemma_batch.config import StorageOptions
from paligemma_batch.schema import ANNOTATIONS
from paligemma_batch.distributed.sink import RunSink
from paligemma_batch.store import OutputStore, Progress, ShardLog, row_key
from paligemma_batch.storage import is_local

RUN = "20260101T000000Z-abcdef"


def rows(shard: str, images: range, tasks=("caption",)) -> pa.Table:
    """Annotation rows for images ``images`` of ``shard`` (only the key columns filled in)."""
    return pa.Table.from_pylist(
        [{"image_id": f"{shard}::{i:03d}", "source_uri": shard, "task": t, "status": "ok"} for i in images for t in tasks],
        schema=ANNOTATIONS,
    )


def commit(store: OutputStore, name: str, table: pa.Table) -> str:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    path = store.run_path(RUN, name)
    store.write_bytes(path, buf.getvalue())
    return path


def keys_of(table: pa.Table) -> list[str]:
    return [row_key(i, t) for i, t in zip(table["image_id"].to_pylist(), table["task"].to_pylist())]


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return OutputStore(str(tmp_path / "out"), StorageOptions())
    s3_bucket, s3_endpoint = request.getfixturevalue("s3_bucket"), request.getfixturevalue("s3_endpoint")
    storage = StorageOptions(endpoint_url=s3_endpoint, key="testing", secret="testing")
    return OutputStore(f"s3://{s3_bucket[1]}/out", storage)


def test_progress_and_manifest_keep_each_key_exactly_once(store):
    a, b = "mem://a.tar", "mem://b.tar"
    # Attempt 1 committed a0 and a1, then its write task was retried and committed a1 again with more rows;
    # a crash left a temporary file.
    a0 = commit(store, "part-a1-0.parquet", rows(a, range(0, 4)))
    a1 = commit(store, "part-a1-1.parquet", rows(b, range(0, 2)))
    retried = commit(store, "part-a1-2.parquet", rows(b, range(0, 3)))
    local = is_local(store.fs)
    if local:  # object stores have no temporary files: a PUT is whole or absent
        store.fs.pipe_file(store.run_path(RUN, ".tmp-deadbeef"), b"half a parquet file")
        store.fs.makedirs(store.run_path(RUN, "_shards"), exist_ok=True)
        store.fs.pipe_file(store.run_path(RUN, "_shards", ".tmp-cafe"), b"{")

    progress = store.progress(RUN)
    assert sorted(progress.files) == [a0, a1] and progress.rejected == [retried]
    assert progress.rows_by_shard == {a: 4, b: 2}
    assert progress.complete_shards({a: 4, b: 3}, num_tasks=1) == {a}
    assert store.data_files(RUN) == sorted([a0, a1])

    # Attempt 2 redoes b's images 2..3. Meanwhile a writer of attempt 1 that outlived the crash commits b:2
    # after attempt 2 listed the committed keys: the race that would duplicate rows.
    commit(store, "part-a1-3.parquet", rows(b, range(2, 3)))
    redo = commit(store, "part-a2-0.parquet", rows(b, range(2, 4)))
    with pytest.raises(FileNotFoundError, match="1 committed part file\\(s\\) vanished"):
        store.finish_run(RUN, {**progress.files, redo: 2, store.run_path(RUN, "part-a2-gone.parquet"): 1})
    assert store.manifest(RUN) is None
    removed = store.finish_run(RUN, {**progress.files, redo: 2})

    committed = store.read_run(RUN)
    assert sorted(keys_of(committed)) == sorted(set(keys_of(rows(a, range(4))) + keys_of(rows(b, range(4)))))
    assert len(keys_of(committed)) == 8
    assert store.manifest(RUN) == {a0: 4, a1: 2, redo: 2}
    assert sorted(store.part_files(RUN)) == sorted([a0, a1, redo])  # the retried and orphaned files are gone
    assert removed == 2 + 2 * local
    assert not [p for p in store.fs.find(store.run_path(RUN)) if ".tmp-" in p]

    # An orphan that commits even after the run finished is never part of the output.
    commit(store, "part-a1-4.parquet", rows(b, range(0, 4)))
    assert store.read_run(RUN).num_rows == 8
    assert store.progress(RUN).files == {a0: 4, a1: 2, redo: 2}  # a resumer would trust the manifest first


def test_shard_log_records_row_counts(store):
    log = ShardLog(store, RUN)
    log.record("s3://in/shards/0000.tar", 5)
    log.record("s3://in/shards/ünïcode key.tar", 0)
    log.record("s3://in/shards/0000.tar", 5)  # a retried read rewrites the same marker
    assert store.shard_sizes(RUN) == {"s3://in/shards/0000.tar": 5, "s3://in/shards/ünïcode key.tar": 0}
    assert store.shard_sizes("no-such-run") == {}


def test_complete_shards_needs_every_task_row():
    progress = Progress(rows_by_shard={"x": 6, "y": 5, "z": 0})
    assert progress.complete_shards({"x": 3, "y": 3, "z": 0}, num_tasks=2) == {"x", "z"}
    assert progress.complete_shards({}, num_tasks=2) == set()  # never read to the end: not complete


def test_run_sink_direct(tmp_path):
    store = OutputStore(str(tmp_path / "out"), StorageOptions())
    sink = RunSink(store, RUN, attempt=3, rows_per_file=4, schema=ANNOTATIONS)
    stats = sink.write([rows("mem://a.tar", range(6)), rows("mem://a.tar", range(6, 6)), rows("mem://b.tar", range(4))],
                       ctx=None)
    assert stats.rows == 10 and sorted(stats.files.values()) == [2, 4, 4]
    assert all(posixpath.basename(p).startswith("part-a3-") for p in stats.files)
    assert sorted(store.part_files(RUN)) == sorted(stats.files)
    assert store.read_run(RUN).num_rows == 10


def test_run_sink_in_ray_data(ray_local, tmp_path):
    import ray

    store = OutputStore(str(tmp_path / "out"), StorageOptions())
    table = pa.concat_tables([rows(f"mem://{s}.tar", range(5), tasks=("caption", "ocr")) for s in "abc"])
    sink = RunSink(store, RUN, attempt=1, rows_per_file=4, schema=ANNOTATIONS)
    ray.data.from_arrow(table).repartition(3).write_datasink(sink, ray_remote_args={"num_cpus": 0.5})
    assert sink.stats.rows == 30
    assert sorted(store.part_files(RUN)) == sorted(sink.stats.files)
    store.finish_run(RUN, sink.stats.files)
    written = store.read_run(RUN)
    assert written.schema.equals(ANNOTATIONS)
    assert sorted(keys_of(written)) == sorted(keys_of(table))


def test_run_sink_in_ray_data_gathers_small_blocks_into_full_files(ray_local, tmp_path):
    import ray

    store = OutputStore(str(tmp_path / "out"), StorageOptions())
    table = pa.concat_tables([rows(f"mem://{s}.tar", range(3)) for s in "abcdefghij"])
    sink = RunSink(store, RUN, attempt=1, rows_per_file=10, schema=ANNOTATIONS)
    ray.data.from_arrow(table).repartition(10).write_datasink(sink, ray_remote_args={"num_cpus": 0.5})
    # Ten 3-row blocks: without gathering, ten 3-row files.
    assert sink.stats.rows == 30 and max(sink.stats.files.values()) == 10 and len(sink.stats.files) <= 5
