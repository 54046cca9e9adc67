"""Writing Parquet under a run prefix, the run index, ``_SUMMARY.json`` and resume bookkeeping.

Layout under the output root::

    _RUNS.json                      the run index: every run, its status and its shards
    _SUMMARY.json                   the summary of the latest finished run
    runs/RUN_ID/part-*.parquet      committed rows; each file appears whole or not at all
    runs/RUN_ID/_SUMMARY.json       that run's summary

A file is committed by an atomic rename (local) or a single object PUT (object storage), so a crash leaves
only whole files, and a rerun can skip exactly the ``(image_id, task)`` pairs they hold.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import posixpath
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data import Datasink
from ray.data.block import BlockAccessor

from paligemma_batch.config import StorageOptions
from paligemma_batch.schema import ANNOTATIONS
from paligemma_batch.sources import _is_local, filesystem

RUNS_DIR = "runs"
INDEX_FILE = "_RUNS.json"
SUMMARY_FILE = "_SUMMARY.json"
KEY_COLUMNS = ["image_id", "task"]


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_run_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


@dataclass
class RunRecord:
    """One run in the index."""

    run_id: str
    status: str  # "running" | "finished"
    config_hash: str
    started_at: str
    shards: list[str]
    finished_at: str | None = None
    rows: int | None = None


@dataclass
class WriteStats:
    """What one write task (or the whole run, combined) committed."""

    rows: int = 0
    files: list[str] = field(default_factory=list)

    def merge(self, other: WriteStats) -> None:
        self.rows += other.rows
        self.files += other.files


class OutputStore:
    """An output root on any fsspec filesystem."""

    def __init__(self, uri: str, storage: StorageOptions):
        self.uri = uri.rstrip("/")
        self.storage = storage
        self.fs, self.root = filesystem(self.uri, storage)
        self.root = self.root.rstrip("/")

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def run_path(self, run_id: str) -> str:
        return self.path(RUNS_DIR, run_id)

    def run_uri(self, run_id: str) -> str:
        return f"{self.uri}/{RUNS_DIR}/{run_id}"

    def write_bytes(self, path: str, data: bytes) -> None:
        """Commit ``data`` at ``path`` whole or not at all."""
        if _is_local(self.fs):
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
            tmp = posixpath.join(posixpath.dirname(path), f".tmp-{uuid.uuid4().hex}")
            with self.fs.open(tmp, "wb") as f:
                f.write(data)
            self.fs.mv(tmp, path)
        else:
            self.fs.pipe_file(path, data)

    def write_json(self, path: str, obj: Any) -> None:
        self.write_bytes(path, json.dumps(obj, indent=2, ensure_ascii=False).encode())

    def read_index(self) -> list[RunRecord]:
        try:
            raw = self.fs.cat_file(self.path(INDEX_FILE))
        except FileNotFoundError:
            return []
        return [RunRecord(**r) for r in json.loads(raw)["runs"]]

    def write_index(self, records: list[RunRecord]) -> None:
        self.write_json(self.path(INDEX_FILE), {"runs": [asdict(r) for r in records]})

    def upsert_run(self, record: RunRecord) -> None:
        records = [r for r in self.read_index() if r.run_id != record.run_id] + [record]
        self.write_index(records)

    def data_files(self, run_id: str) -> list[str]:
        try:
            names = self.fs.ls(self.run_path(run_id), detail=False)
        except FileNotFoundError:
            return []
        return sorted(n for n in names if posixpath.basename(n).startswith("part-") and n.endswith(".parquet"))

    def read_run(self, run_id: str, columns: list[str] | None = None) -> pa.Table:
        """Every committed row of a run (optionally only some columns)."""
        tables = []
        for path in self.data_files(run_id):
            with self.fs.open(path, "rb") as f:
                tables.append(pq.read_table(f, columns=columns))
        if not tables:
            schema = ANNOTATIONS if columns is None else pa.schema([ANNOTATIONS.field(c) for c in columns])
            return schema.empty_table()
        return pa.concat_tables(tables)

    def done_keys(self, run_id: str) -> set[str]:
        """``image_id\\ttask`` for every committed row of a run: what a resumed run must skip."""
        table = self.read_run(run_id, KEY_COLUMNS)
        return {f"{i}\t{t}" for i, t in zip(table["image_id"].to_pylist(), table["task"].to_pylist())}


class RunSink(Datasink[WriteStats]):
    """A Ray Data sink writing the annotations schema under ``runs/RUN_ID/``, each file atomically."""

    def __init__(self, store: OutputStore, run_id: str, rows_per_file: int, schema: pa.Schema):
        self.store = store
        self.run_id = run_id
        self.rows_per_file = rows_per_file
        self.schema = schema
        self.stats = WriteStats()

    def write(self, blocks: Iterable, ctx) -> WriteStats:
        stats = WriteStats()
        tables = [BlockAccessor.for_block(b).to_arrow() for b in blocks]
        tables = [t for t in tables if t.num_rows]
        if not tables:
            return stats
        table = pa.concat_tables([t.select(self.schema.names).cast(self.schema) for t in tables])
        for start in range(0, table.num_rows, self.rows_per_file):
            part = table.slice(start, self.rows_per_file)
            buf = io.BytesIO()
            pq.write_table(part, buf, compression="zstd")
            path = posixpath.join(self.store.run_path(self.run_id), f"part-{uuid.uuid4().hex}.parquet")
            self.store.write_bytes(path, buf.getvalue())
            stats.rows += part.num_rows
            stats.files.append(path)
        return stats

    def on_write_complete(self, write_result) -> None:
        for stats in write_result.write_returns:
            self.stats.merge(stats)


def error_kind(error: str | None) -> str:
    """The short kind of an error message: the text before the first ':'."""
    return (error or "").split(":", 1)[0].strip() or "unknown"


def summarize_rows(table: pa.Table) -> dict[str, Any]:
    """Counts over a run's committed rows: inputs, rows by task and status, errors by kind, tokens."""
    statuses = table["status"].to_pylist()
    tasks = table["task"].to_pylist()
    by_task: dict[str, Counter] = {}
    for t, s in zip(tasks, statuses):
        by_task.setdefault(t, Counter())[s] += 1
    errors = Counter(error_kind(e) for e, s in zip(table["error"].to_pylist(), statuses) if s == "error")
    reasons = Counter(e for e, s in zip(table["error"].to_pylist(), statuses) if s == "error")
    return {
        "inputs_seen": pc.count_distinct(table["image_id"]).as_py() if table.num_rows else 0,
        "rows_written": table.num_rows,
        "rows_by_task": {t: dict(c) for t, c in sorted(by_task.items())},
        "rows_ok": statuses.count("ok"),
        "rows_error": statuses.count("error"),
        "errors_by_kind": dict(errors.most_common()),
        "top_error_reasons": [{"error": e, "rows": n} for e, n in reasons.most_common(5)],
        "output_tokens": int(pc.sum(table["num_output_tokens"]).as_py() or 0),
        "invalid_objects": int(pc.sum(table["invalid_objects"]).as_py() or 0),
    }
