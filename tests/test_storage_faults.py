"""Object-storage faults: a seeded proxy in front of moto answers 500/503 or resets ~10% of requests.

The retry settings reach botocore through s3fs, the whole job completes with every row, and a reader never
sees a half-written Parquet file: an interrupted PUT leaves no object, and only whole part files ever appear.
"""

from __future__ import annotations

import io
import json
import posixpath
import threading
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from botocore.exceptions import EndpointConnectionError

from conftest import job_config
from fault_proxy import FaultProxy
from paligemma_batch.config import StorageOptions
from paligemma_batch.pipeline import run
from paligemma_batch.store import OutputStore
from paligemma_batch.storage import filesystem

FAULT_SEED = 20261127


@pytest.fixture
def proxy(s3_endpoint):
    """A proxy with no random faults (tests add targeted ones or raise the rate); stopped at test end."""
    with FaultProxy(s3_endpoint, rate=0.0, seed=FAULT_SEED, deadline_s=240) as p:
        yield p
    p.thread.join(5)
    assert not p.thread.is_alive()


def _storage(proxy: FaultProxy, **kwargs) -> StorageOptions:
    return StorageOptions(endpoint_url=proxy.url, key="testing", secret="testing", **kwargs)


def test_retries_setting_reaches_botocore_through_s3fs(proxy, s3_bucket):
    """storage_options.retries is botocore's retry count for 5xx answers. (s3fs also retries SlowDown and
    dropped connections itself, up to 5 times, whatever this setting says.)"""
    fs_direct, bucket = s3_bucket
    fs_direct.pipe(f"{bucket}/object", b"payload")
    no_retries, _ = filesystem(f"s3://{bucket}/object", _storage(proxy, retries=0))
    proxy.inject("500", "GET", f"/{bucket}/object")
    with pytest.raises(OSError, match="internal error"):
        no_retries.cat_file(f"{bucket}/object")
    two_retries, _ = filesystem(f"s3://{bucket}/object", _storage(proxy, retries=2))
    proxy.inject("500", "GET", f"/{bucket}/object", times=2)
    assert two_retries.cat_file(f"{bucket}/object") == b"payload"
    assert proxy.counts() == {"500": 3}


def test_an_interrupted_put_leaves_no_object(proxy, s3_bucket):
    """S3 commits a PUT whole or not at all: a reset halfway through the body leaves nothing to read."""
    fs_direct, bucket = s3_bucket
    store = OutputStore(f"s3://{bucket}/out", _storage(proxy, retries=0))
    path = store.path("runs", "r1", "part-x.parquet")
    buf = io.BytesIO()
    pq.write_table(pa.table({"a": list(range(10_000))}), buf)
    proxy.inject("reset_request", "PUT", "part-x", times=1000)  # every attempt cut halfway through the body
    with pytest.raises(EndpointConnectionError):
        store.write_bytes(path, buf.getvalue())
    attempts = proxy.counts()["reset_request"]
    assert attempts >= 2  # s3fs retried the dropped connection before giving up
    assert not fs_direct.exists(path) and store.data_files("r1") == []
    proxy.clear_rules()
    proxy.inject("reset_request", "PUT", "part-x")
    store.write_bytes(path, buf.getvalue())
    assert fs_direct.cat_file(path) == buf.getvalue()
    assert proxy.counts() == {"reset_request": attempts + 1}


class PartFileWatcher:
    """Reads every part file under a prefix as soon as it is listed (straight from moto), recording any that
    is not a whole Parquet file."""

    def __init__(self, fs, prefix: str):
        self.fs, self.prefix = fs, prefix
        self.seen: dict[str, int] = {}  # path -> rows
        self.broken: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self.stop.wait(0.05):
            self.scan()

    def scan(self) -> None:
        self.fs.invalidate_cache()
        for path in self.fs.glob(f"{self.prefix}/runs/*/part-*.parquet"):
            if path not in self.seen:
                try:
                    self.seen[path] = pq.read_table(io.BytesIO(self.fs.cat_file(path))).num_rows
                except Exception as err:  # recorded and asserted on: a partial file would land here
                    self.broken.append(f"{path}: {type(err).__name__}: {err}")

    def __enter__(self) -> PartFileWatcher:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(10)
        self.scan()


def test_job_completes_through_storage_faults(ray_local, proxy, s3_bucket, s3_endpoint, tiny_model_dir,
                                              scene_shards):
    fs_direct, bucket = s3_bucket
    for shard in scene_shards:
        fs_direct.put(str(shard), f"{bucket}/shards/{shard.name}")
    storage = {"endpoint_url": proxy.url, "key": "testing", "secret": "testing", "retries": 10}
    config = job_config(
        tiny_model_dir, f"s3://{bucket}/shards/*.tar", f"s3://{bucket}/out",
        input={"uri": f"s3://{bucket}/shards/*.tar", "format": "webdataset", "storage_options": storage},
        output={"uri": f"s3://{bucket}/out", "rows_per_file": 5},
    )
    # Besides ~10% random faults, make sure each kind hits the paths that matter at least once.
    proxy.rate = 0.10
    proxy.inject("reset_response", "GET", r"/shards/.*\.tar")  # a shard download cut halfway
    proxy.inject("503", "GET", r"/shards/.*\.tar")
    proxy.inject("reset_request", "PUT", r"/runs/.*/part-.*\.parquet")  # a part file cut halfway up
    proxy.inject("500", "PUT", r"/runs/.*/part-.*\.parquet")
    proxy.inject("500", "PUT", r"_RUNS\.json")
    with PartFileWatcher(fs_direct, f"{bucket}/out") as watcher:
        summary = run(config)
    faults = proxy.counts()
    requests = dict(proxy.requests)
    where = Counter(f"{f.kind} {f.method} {f.path.rsplit('/', 1)[-1][:12]}" for f in proxy.injected)
    proxy.stop()

    images, tasks = 3 * 4, 2
    direct = StorageOptions(endpoint_url=s3_endpoint, key="testing", secret="testing")
    table = OutputStore(f"s3://{bucket}/out", direct).read_run(summary["run_id"])
    keys = Counter(zip(table["image_id"].to_pylist(), table["task"].to_pylist()))
    print(f"requests through the proxy {requests}; faults injected {dict(faults)} (total {sum(faults.values())}); "
          f"{table.num_rows} rows in {len(watcher.seen)} part files; faults: {dict(where)}")
    assert sum(faults.values()) >= 10 and {"500", "503", "reset_request", "reset_response"} <= set(faults)
    assert table.num_rows == images * tasks == summary["rows_written"] and set(keys.values()) == {1}
    assert set(table["status"].to_pylist()) == {"ok"}
    assert watcher.broken == []
    # Only whole, committed objects exist: part files that read in full, and bookkeeping JSON that parses.
    objects = [posixpath.relpath(p, f"{bucket}/out") for p in fs_direct.find(f"{bucket}/out")]
    run_dir = f"runs/{summary['run_id']}"
    parts = [o for o in objects if o.startswith(f"{run_dir}/part-")]
    bookkeeping = sorted(set(objects) - set(parts))
    assert {"_RUNS.json", "_SUMMARY.json", f"{run_dir}/_SUMMARY.json"} <= set(bookkeeping)
    assert all(o.endswith(".json") for o in bookkeeping), bookkeeping
    assert all(isinstance(json.loads(fs_direct.cat_file(f"{bucket}/out/{o}")), dict) for o in bookkeeping)
    assert sorted(watcher.seen) == sorted(f"{bucket}/out/{p}" for p in parts)
    assert sum(watcher.seen.values()) == table.num_rows
