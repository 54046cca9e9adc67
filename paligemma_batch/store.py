"""The output store: part files under a run prefix, the run index, summaries and exactly-once bookkeeping.

Ray-free: the Ray layer's Datasink (:mod:`paligemma_batch.distributed.sink`) calls :meth:`OutputStore.write_part`.

Layout under the output root::

    _RUNS.json                      the run index: every run, its status, its shards and its attempts
    _SUMMARY.json                   the summary of the latest finished run
    runs/RUN_ID/part-aN-*.parquet   rows written by attempt N; each file appears whole or not at all
    runs/RUN_ID/_MANIFEST.json      written when the run finishes: the part files that make up its output
    runs/RUN_ID/_shards/*.json      how many rows each read shard yielded (for skipping finished shards)
    runs/RUN_ID/_SUMMARY.json       that run's summary

A part file is committed by an atomic rename (local) or a single object PUT (object storage), so a crash
leaves only whole files. Writers that outlive a crash (a retried write task, a worker of a killed driver) can
still commit files whose rows another file holds too, so while a run is unfinished its committed output is
the *key-disjoint* subset of its part files (:meth:`OutputStore.progress`), and once it finishes it is
exactly the files its manifest lists; every other file in the run folder is removed then and ignored always.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import logging
import posixpath
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from paligemma_batch.config import StorageOptions
from paligemma_batch.schema import ANNOTATIONS
from paligemma_batch.storage import atomic_write, filesystem

logger = logging.getLogger(__name__)

RUNS_DIR = "runs"
INDEX_FILE = "_RUNS.json"
SUMMARY_FILE = "_SUMMARY.json"
MANIFEST_FILE = "_MANIFEST.json"
SHARDS_DIR = "_shards"
KEY_COLUMNS = ["image_id", "task"]


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_run_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def row_key(image_id: str, task: str, frame_index: int | None = None) -> str:
    """The exactly-once key of an output row; a video's frame rows add their frame index (images: none)."""
    return f"{image_id}\t{task}" if frame_index is None else f"{image_id}\t{task}\t{frame_index}"


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
    attempts: int = 1  # invocations that worked on this run (1 + resumes)


@dataclass
class WriteStats:
    """What one write task (or the whole invocation, combined) committed: part file path -> rows."""

    files: dict[str, int] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return sum(self.files.values())

    def merge(self, other: WriteStats) -> None:
        self.files.update(other.files)


@dataclass
class Progress:
    """What an unfinished run has committed: key-disjoint part files, their keys and rows per shard."""

    files: dict[str, int] = field(default_factory=dict)  # accepted part file path -> rows
    keys: dict[str, str] = field(default_factory=dict)  # row key -> the shard (source_uri) it came from
    rows_by_shard: Counter = field(default_factory=Counter)
    rejected: list[str] = field(default_factory=list)  # files sharing a key with an accepted file

    def complete_shards(self, sizes: dict[str, int], num_tasks: int) -> set[str]:
        """Shards whose every row (``sizes[shard]`` source rows x ``num_tasks``) is committed."""
        return {s for s, n in sizes.items() if self.rows_by_shard.get(s, 0) >= n * num_tasks}


class OutputStore:
    """An output root on any fsspec filesystem."""

    def __init__(self, uri: str, storage: StorageOptions):
        self.uri = uri.rstrip("/")
        self.storage = storage
        self.fs, self.root = filesystem(self.uri, storage)
        self.root = self.root.rstrip("/")

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def run_path(self, run_id: str, *parts: str) -> str:
        return self.path(RUNS_DIR, run_id, *parts)

    def run_uri(self, run_id: str) -> str:
        return f"{self.uri}/{RUNS_DIR}/{run_id}"

    def write_bytes(self, path: str, data: bytes) -> None:
        """Commit ``data`` at ``path`` whole or not at all."""
        atomic_write(self.fs, path, data)

    def write_part(self, run_id: str, attempt: int, table: pa.Table) -> str:
        """Commit one part file of ``table`` (already in the output schema) for ``attempt``; its path."""
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        path = self.run_path(run_id, f"part-a{attempt}-{uuid.uuid4().hex}.parquet")
        self.write_bytes(path, buf.getvalue())
        return path

    def write_json(self, path: str, obj: Any) -> None:
        self.write_bytes(path, json.dumps(obj, indent=2, ensure_ascii=False).encode())

    def read_json(self, path: str) -> Any | None:
        try:
            return json.loads(self.fs.cat_file(path))
        except FileNotFoundError:
            return None

    def read_index(self) -> list[RunRecord]:
        index = self.read_json(self.path(INDEX_FILE))
        return [RunRecord(**r) for r in index["runs"]] if index else []

    def write_index(self, records: list[RunRecord]) -> None:
        self.write_json(self.path(INDEX_FILE), {"runs": [asdict(r) for r in records]})

    def upsert_run(self, record: RunRecord) -> None:
        records = [r for r in self.read_index() if r.run_id != record.run_id] + [record]
        self.write_index(records)

    def _listing(self, *parts: str) -> list[str]:
        """A fresh listing of a folder under the output root (other processes write there); [] if absent."""
        folder = self.path(*parts)
        self.fs.invalidate_cache(folder)
        try:
            return sorted(self.fs.ls(folder, detail=False))
        except FileNotFoundError:
            return []

    def part_files(self, run_id: str) -> list[str]:
        """Every part file in the run folder, committed or not (temporary files never count)."""
        return [n for n in self._listing(RUNS_DIR, run_id)
                if posixpath.basename(n).startswith("part-") and n.endswith(".parquet")]

    def manifest(self, run_id: str) -> dict[str, int] | None:
        """The finished run's part files (path -> rows), or None while the run is unfinished."""
        manifest = self.read_json(self.run_path(run_id, MANIFEST_FILE))
        if manifest is None:
            return None
        return {self.run_path(run_id, f["name"]): f["rows"] for f in manifest["files"]}

    def data_files(self, run_id: str) -> list[str]:
        """The part files that make up the run's committed output: its manifest, or its progress so far."""
        files = self.manifest(run_id)
        return sorted(files if files is not None else self.progress(run_id).files)

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

    def progress(self, run_id: str) -> Progress:
        """The run's committed output so far, each ``(image_id, task)`` once.

        Part files are taken in a fixed order (the manifest's first, then by name) and a file is accepted
        only when it shares no key with the files accepted before it; a rejected file's rows are the work of
        a writer that outlived a crash or a retried task, and the rows it alone held are simply redone.
        """
        listed = self.part_files(run_id)
        first = sorted(set(self.manifest(run_id) or ()) & set(listed))
        progress = Progress()
        for path in first + [p for p in listed if p not in first]:
            try:
                with self.fs.open(path, "rb") as f:
                    columns = pq.read_schema(f).names
                    f.seek(0)
                    table = pq.read_table(f, columns=[*KEY_COLUMNS, "source_uri",
                                                      *(["frame_index"] if "frame_index" in columns else [])])
            except FileNotFoundError:
                continue
            frames = table["frame_index"].to_pylist() if "frame_index" in table.column_names else [None] * table.num_rows
            keys = dict(zip(map(row_key, table["image_id"].to_pylist(), table["task"].to_pylist(), frames),
                            table["source_uri"].to_pylist()))
            if not keys.keys().isdisjoint(progress.keys):
                progress.rejected.append(path)
                continue
            progress.files[path] = table.num_rows
            progress.keys.update(keys)
            progress.rows_by_shard.update(table["source_uri"].to_pylist())
        return progress

    def mark_shard(self, run_id: str, shard: str, rows: int) -> None:
        """Record that reading ``shard`` yielded ``rows`` source rows (idempotent: a re-read rewrites it)."""
        name = hashlib.sha256(shard.encode()).hexdigest()[:32] + ".json"
        self.write_json(self.run_path(run_id, SHARDS_DIR, name), {"shard": shard, "rows": rows})

    def shard_sizes(self, run_id: str) -> dict[str, int]:
        """Source rows per shard, for the shards of the run that were read to the end."""
        paths = [p for p in self._listing(RUNS_DIR, run_id, SHARDS_DIR) if p.endswith(".json")]
        records = [json.loads(raw) for raw in self.fs.cat(paths, on_error="omit").values()] if paths else []
        return {r["shard"]: r["rows"] for r in records}

    def finish_run(self, run_id: str, files: dict[str, int]) -> int:
        """Commit the run's output as exactly ``files`` (path -> rows) and remove every other part or
        temporary file from its folder; return how many were removed.

        Raises FileNotFoundError, committing nothing, when one of ``files`` is gone: only another job writing to
        the same output (which this design does not allow) removes committed files.
        """
        listed = self._listing(RUNS_DIR, run_id)
        missing = sorted(set(files) - set(listed))
        if missing:
            raise FileNotFoundError(f"run {run_id}: {len(missing)} committed part file(s) vanished, e.g. {missing[0]}; "
                                    f"is another job writing to {self.uri}?")
        self.write_json(self.run_path(run_id, MANIFEST_FILE), {
            "files": [{"name": posixpath.basename(p), "rows": n} for p, n in sorted(files.items())],
            "rows": sum(files.values()),
        })
        stray = [p for p in listed if posixpath.basename(p).startswith((".tmp-", "part-")) and p not in files]
        stray += [p for p in self._listing(RUNS_DIR, run_id, SHARDS_DIR) if posixpath.basename(p).startswith(".tmp-")]
        for path in stray:
            try:
                self.fs.rm_file(path)
            except FileNotFoundError:
                pass
        if stray:
            logger.info("run %s: removed %d uncommitted file(s) left by crashed or retried writers", run_id,
                        len(stray))
        return len(stray)


@dataclass(frozen=True)
class ShardLog:
    """Lets read tasks record each shard's row count under a run (see :meth:`OutputStore.mark_shard`)."""

    store: OutputStore  # shipped whole: its root is already resolved against the driver's working directory
    run_id: str

    def record(self, shard: str, rows: int) -> None:
        self.store.mark_shard(self.run_id, shard, rows)


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
