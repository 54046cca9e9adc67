"""Bookkeeping at scale: resume planning and finishing on a committed run of 1M and 10M rows; one JSON line.

    python benchmarks/scale.py                      # 1M and 10M rows (a few minutes to build)
    python benchmarks/scale.py --rows 100000000     # 1M and 100M rows
    python benchmarks/scale.py --mode listing       # Reader.list_shards over 100k objects on moto

The run is built in the real layout through the store's own functions (``upsert_run``, ``write_part``,
``mark_shard``): 10k-row part files, 2 tasks, shards of 1,000 images, 60-character image ids. Each
measurement runs in a fresh interpreter, so its peak RSS is the driver's: resume is
``pipeline._resume_plan``, finishing is ``pipeline._finish`` after reading every file's footer statistics
(what a driver holds after a resume). The crash variant adds partial shards (half committed) and one zombie file
repeating part of a finished shard, which the overlap rule must reject.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

ROWS_PER_FILE = 10_000
IMAGES_PER_SHARD = 1_000
TASKS = ("caption", "ocr")
RUN = "20260101T000000Z-bench0"
PARTIAL_SHARDS = 3


def shard_uri(s: int) -> str:
    return f"s3://corpus-bucket/laion/shards/{s:06d}.tar"


def image_ids(s: int, images: range) -> list[str]:
    prefix = shard_uri(s) + "::"
    return [prefix + f"{i:0{60 - len(prefix)}d}" for i in images]  # 60 characters, like real ids


def _config(root: str):
    from paligemma_batch.config import JobConfig

    return JobConfig(input={"uri": "s3://corpus-bucket/laion/shards/*.tar"}, output={"uri": root},
                     model={"source": "google/paligemma-3b-pt-224"}, tasks=[{"task": t} for t in TASKS])


def _table(pairs: list[tuple[int, list[str]]]) -> pa.Table:
    from paligemma_batch.schema import ANNOTATIONS

    ids = [i for _, chunk in pairs for i in chunk for _ in TASKS]
    n = len(ids)
    columns = {
        "image_id": ids,
        "source_uri": [shard_uri(s) for s, chunk in pairs for _ in chunk for _ in TASKS],
        "task": [t for _, chunk in pairs for _ in chunk for t in TASKS],
        "status": ["ok"] * n,
        "num_output_tokens": pa.array([7] * n, pa.int32()),
        "invalid_objects": pa.array([0] * n, pa.int32()),
    }
    return pa.table({f.name: columns.get(f.name, pa.nulls(n, f.type)) for f in ANNOTATIONS}, schema=ANNOTATIONS)


def build(root: str, rows: int, crash: bool) -> None:
    """A committed, unfinished run of ``rows`` rows (plus the crash's partial shards and zombie file)."""
    from paligemma_batch.stats import keysum
    from paligemma_batch.store import OutputStore, RunRecord

    store = OutputStore(root, _config(root).output_storage)
    shards = rows // (IMAGES_PER_SHARD * len(TASKS))
    extra = PARTIAL_SHARDS if crash else 0
    store.upsert_run(RunRecord(RUN, "running", _config(root).fingerprint(), "2026-01-01T00:00:00Z",
                               [shard_uri(s) for s in range(shards + extra)]))
    per_file = ROWS_PER_FILE // len(TASKS)
    for first in range(0, shards, per_file // IMAGES_PER_SHARD):
        group = range(first, min(shards, first + per_file // IMAGES_PER_SHARD))
        store.write_part(RUN, 1, _table([(s, image_ids(s, range(IMAGES_PER_SHARD))) for s in group]))
    for s in range(shards + extra):
        store.mark_shard(RUN, shard_uri(s), IMAGES_PER_SHARD, keysum(image_ids(s, range(IMAGES_PER_SHARD))))
    if crash:
        half = range(IMAGES_PER_SHARD // 2)
        store.write_part(RUN, 1, _table([(s, image_ids(s, half)) for s in range(shards, shards + extra)]))
        store.write_part(RUN, 1, _table([(0, image_ids(0, range(10)))]))  # a zombie writer's duplicate rows


def measure(root: str, what: str) -> dict:
    """In this (fresh) interpreter: time and peak RSS of resume planning or finishing."""
    from paligemma_batch.pipeline import RunPlan, _finish, _resume_plan
    from paligemma_batch.store import OutputStore, WriteStats

    config = _config(root)
    store = OutputStore(root, config.output_storage)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    out: dict = {}
    [record] = store.read_index(with_shards=False)
    if what == "resume":
        plan = _resume_plan(config, store, record)
        progress_note = {"shards_todo": len(plan.shards), "done_keys": len(plan.done_keys),
                         "files_accepted": len(plan.committed)}
        out.update(progress_note)
    else:
        written = WriteStats()
        for path in store.part_files(RUN):
            written.add(path, store.file_stats(path))
        record.shards = store.run_shards(RUN)
        summary = _finish(config, store, RunPlan(record, []), written, 1.0)
        out.update(rows_written=summary.rows_written, inputs_seen=summary.inputs_seen, files=summary.files)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out["peak_rss_mb"], out["rss_growth_mb"] = round(peak / 1024, 1), round((peak - base) / 1024, 1)
    return out


def _fresh(root: str, what: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--measure", what, "--root", root], capture_output=True,
                          text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _label(rows: int) -> str:
    return f"{rows / 1_000_000:g}m"


def bookkeeping(sizes: list[int]) -> dict:
    result: dict = {"mode": "bookkeeping", "rows_per_file": ROWS_PER_FILE, "tasks": len(TASKS)}
    for rows in sizes:
        for crash in (False, True):
            with tempfile.TemporaryDirectory(prefix="pgb-scale-") as tmp:
                root = str(Path(tmp) / "out")
                t0 = time.perf_counter()
                build(root, rows, crash)
                entry = {"build_s": round(time.perf_counter() - t0, 1), "resume": _fresh(root, "resume")}
                if not crash:
                    entry["finish"] = _fresh(root, "finish")
                result[f"{_label(rows)}{'_crash' if crash else ''}"] = entry
    small, big = map(_label, sizes)
    for step in ("resume", "finish"):
        result[f"peak_rss_ratio_{big}_vs_{small}_{step}"] = round(
            result[big][step]["peak_rss_mb"] / result[small][step]["peak_rss_mb"], 3)
        result[f"seconds_ratio_{big}_vs_{small}_{step}"] = round(
            result[big][step]["seconds"] / max(result[small][step]["seconds"], 0.01), 2)
    result[f"peak_rss_ratio_{big}_vs_{small}"] = max(result[f"peak_rss_ratio_{big}_vs_{small}_{s}"]
                                                     for s in ("resume", "finish"))
    result[f"seconds_ratio_{big}_vs_{small}"] = max(result[f"seconds_ratio_{big}_vs_{small}_{s}"]
                                                    for s in ("resume", "finish"))
    return result


def listing(objects: int) -> dict:
    """``Reader.list_shards`` over ``objects`` tars on moto: time, list calls and the memory they held."""
    import os

    import boto3
    from moto.server import ThreadedMotoServer

    from paligemma_batch.config import InputConfig, StorageOptions
    from paligemma_batch.readers import reader_for

    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                      AWS_EC2_METADATA_DISABLED="true")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket="corpus")
    t0 = time.perf_counter()
    for i in range(objects):
        s3.put_object(Bucket="corpus", Key=f"shards/{i:07d}.tar", Body=b"")
    put_s = time.perf_counter() - t0
    reader = reader_for(InputConfig(uri="s3://corpus/shards/*.tar",
                                    storage_options=StorageOptions(endpoint_url=endpoint)))
    import tracemalloc

    tracemalloc.start()
    t0 = time.perf_counter()
    uris = reader.list_shards()
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    server.stop()
    uri_bytes = sum(sys.getsizeof(u) for u in uris) + sys.getsizeof(uris)
    return {"mode": "listing", "objects": objects, "listed": len(uris), "seconds": round(seconds, 2),
            "put_seconds": round(put_s, 1), "peak_python_mb": round(peak / 2**20, 1),
            "uris_mb": round(uri_bytes / 2**20, 1), "peak_vs_uris": round(peak / uri_bytes, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["bookkeeping", "listing"], default="bookkeeping")
    parser.add_argument("--rows", type=int, default=10_000_000, help="the larger run")
    parser.add_argument("--base", type=int, default=1_000_000, help="the smaller run, the ratios' base")
    parser.add_argument("--objects", type=int, default=100_000, help="listing: objects in the bucket")
    parser.add_argument("--measure", choices=["resume", "finish"], help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.root, args.measure)))
    elif args.mode == "listing":
        print(json.dumps(listing(args.objects)))
    else:
        print(json.dumps(bookkeeping([args.base, args.rows])))


if __name__ == "__main__":
    main()
