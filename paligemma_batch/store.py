"""The output store: part files under a run prefix, the run index, summaries and exactly-once bookkeeping.

Ray-free: the Ray layer's Datasink (:mod:`paligemma_batch.distributed.sink`) calls :meth:`OutputStore.write_part`.

Layout under the output root::

    _RUNS.json                      the run index: one small record per run (status, attempts, rows, times)
    _SUMMARY.json                   the summary of the latest finished run
    runs/RUN_ID/_SHARDS.json        the run's shards, written once when it starts (for image folders, each
                                    group's size and key sum)
    runs/RUN_ID/_GROUPS.parquet     an image-folder run's groups: (group, file) rows, written once with
                                    _SHARDS.json; read only for covered files and the groups a resume reads again
    runs/RUN_ID/part-aN-*.parquet   rows written by attempt N, each file whole or not at all; its footer's
                                    key-value metadata holds its statistics (paligemma_batch.stats)
    runs/RUN_ID/_shards/H-R-K.json  a shard read to its end: H hashes its URI, R rows, K their key sum; read
                                    from the listing alone (the object names), never one GET each
    runs/RUN_ID/_MANIFEST.json      written once, when the run finishes: the part files of its output
    runs/RUN_ID/_SUMMARY.json       that run's summary

Costs: finishing reads no row (the summary merges the statistics the write tasks returned and the committed
files' footers); resuming reads one footer per part file, and key columns only of the files holding a shard
that the statistics do not prove finished and duplicate-free.

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
from bisect import bisect_left
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from paligemma_batch.config import StorageOptions
from paligemma_batch.schema import ANNOTATIONS
from paligemma_batch.stats import STATS_KEY, FileStats, keysum
from paligemma_batch.storage import atomic_write, filesystem

logger = logging.getLogger(__name__)

RUNS_DIR = "runs"
INDEX_FILE = "_RUNS.json"
SUMMARY_FILE = "_SUMMARY.json"
MANIFEST_FILE = "_MANIFEST.json"
SHARD_LIST_FILE = "_SHARDS.json"
GROUPS_FILE = "_GROUPS.parquet"
GROUPS_ROW_GROUP = 1 << 16  # files per Parquet row group of _GROUPS.parquet: a resume reads only those it needs
SHARDS_DIR = "_shards"
KEY_COLUMNS = ["image_id", "task"]
FOOTER_BLOCK = 1 << 16  # bytes fetched to read a part file's footer on object storage


def now_iso() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def new_run_id() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


def row_key(image_id: str, task: str, frame_index: int | None = None) -> str:
    """The exactly-once key of an output row; a video's frame rows add their frame index (images: none)."""
    return f"{image_id}\t{task}" if frame_index is None else f"{image_id}\t{task}\t{frame_index}"


@dataclass
class RunRecord:
    """One run in the index. ``shards`` lives in the run's ``_SHARDS.json``, not in ``_RUNS.json``."""

    run_id: str
    status: str  # "running" | "finished"
    config_hash: str
    started_at: str
    shards: list[str]
    finished_at: str | None = None
    rows: int | None = None
    attempts: int = 1  # invocations that worked on this run (1 + resumes)
    num_shards: int | None = None  # len(shards), kept in the index where shards are not


@dataclass(frozen=True)
class ShardMark:
    """A shard's source rows and their key sum (None: unknown, so its committed keys are read on resume)."""

    rows: int
    keysum: int | None = None


@dataclass
class WriteStats:
    """What one write task (or the whole invocation, combined) committed: part file path -> rows, and stats."""

    files: dict[str, int] = field(default_factory=dict)
    file_stats: dict[str, FileStats] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return sum(self.files.values())

    def add(self, path: str, stats: FileStats) -> None:
        self.files[path] = stats.rows
        self.file_stats[path] = stats

    def merge(self, other: WriteStats) -> None:
        self.files.update(other.files)
        self.file_stats.update(other.file_stats)


@dataclass
class Progress:
    """What an unfinished run has committed: key-disjoint part files, their stats, and rows per shard.

    ``keys`` holds the committed keys of the shards that the statistics did not prove finished (the only
    ones a resume reads again); a finished shard's keys are never read.
    """

    files: dict[str, int] = field(default_factory=dict)  # accepted part file path -> rows
    keys: dict[str, str] = field(default_factory=dict)  # row key -> the shard (source_uri) it came from
    rows_by_shard: Counter = field(default_factory=Counter)
    rejected: list[str] = field(default_factory=list)  # files sharing a key with an accepted file
    stats: dict[str, FileStats] = field(default_factory=dict)  # accepted part file path -> its statistics
    keys_read_from: int = 0  # files whose key columns were read

    def complete_shards(self, sizes: dict[str, int], num_tasks: int) -> set[str]:
        """Shards whose every row (``sizes[shard]`` source rows x ``num_tasks``) is committed."""
        return {s for s, n in sizes.items() if self.rows_by_shard.get(s, 0) >= n * num_tasks}


def _proven(by_task: dict[str, list[int]], mark: ShardMark | None, tasks: list[str] | None) -> bool:
    """Whether a shard's rows over *all* files are each of its keys exactly once, for every task present
    (and every task of ``tasks``): row counts equal its size and key sums equal its key sum."""
    if mark is None or mark.keysum is None:
        return False
    if tasks is not None and set(tasks) - set(by_task):
        return False
    return all(rows == mark.rows and ks == mark.keysum for rows, ks in by_task.values())


def _shard_marker_name(shard: str, rows: int, ks: int | None) -> str:
    digest = hashlib.sha256(shard.encode()).hexdigest()[:32]
    return f"{digest}-{rows}" + (f"-{ks:016x}" if ks is not None else "") + ".json"


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

    def write_part(self, run_id: str, attempt: int, table: pa.Table) -> tuple[str, FileStats]:
        """Commit one part file of ``table`` (already in the output schema) for ``attempt``, its statistics in
        its footer; its path and those statistics."""
        stats = FileStats.of_table(table)
        meta = dict(table.schema.metadata or {})
        meta[STATS_KEY] = stats.to_json()
        buf = io.BytesIO()
        pq.write_table(table.replace_schema_metadata(meta), buf, compression="zstd")
        path = self.run_path(run_id, f"part-a{attempt}-{uuid.uuid4().hex}.parquet")
        self.write_bytes(path, buf.getvalue())
        return path, stats

    def write_json(self, path: str, obj: Any) -> None:
        self.write_bytes(path, json.dumps(obj, indent=2, ensure_ascii=False).encode())

    def read_json(self, path: str) -> Any | None:
        try:
            return json.loads(self.fs.cat_file(path))
        except FileNotFoundError:
            return None

    # -- the run index and the runs' shard lists -------------------------------------------------------------

    def read_index(self, with_shards: bool = True) -> list[RunRecord]:
        """The runs, oldest first; ``with_shards`` also reads each run's shard list (one file per run)."""
        index = self.read_json(self.path(INDEX_FILE))
        records = [RunRecord(**{"shards": [], **r}) for r in index["runs"]] if index else []
        if with_shards:
            for record in records:
                record.shards = record.shards or self.run_shards(record.run_id)
        return records

    def write_index(self, records: list[RunRecord]) -> None:
        small = [{k: v for k, v in asdict(r).items() if k != "shards"}
                 | {"num_shards": len(r.shards) if r.shards or r.num_shards is None else r.num_shards} for r in records]
        self.write_json(self.path(INDEX_FILE), {"runs": small})

    def upsert_run(self, record: RunRecord, members: dict[str, list[str]] | None = None) -> None:
        """Add or update ``record`` in the index; a run's shard list (and groups) is written once, the first time."""
        if not self.fs.exists(self.run_path(record.run_id, SHARD_LIST_FILE)):
            self.write_shard_list(record.run_id, record.shards, members or {})
        self.write_index([r for r in self.read_index(with_shards=False) if r.run_id != record.run_id] + [record])

    def write_shard_list(self, run_id: str, shards: list[str], members: dict[str, list[str]]) -> None:
        """The run's shards, written once. An image-folder run's groups (``members``: group id -> files) go to
        ``_GROUPS.parquet``, written first; ``_SHARDS.json`` keeps each group's size and key sum only."""
        groups = {s: {"size": len(members[s]), "keysum": f"{keysum(members[s]):016x}"} for s in shards if s in members}
        if groups:
            self._write_groups(run_id, {s: members[s] for s in groups})
        self.write_bytes(self.run_path(run_id, SHARD_LIST_FILE),
                         json.dumps({"shards": shards, "groups": groups}, ensure_ascii=False,
                                    separators=(",", ":")).encode())

    def _write_groups(self, run_id: str, members: dict[str, list[str]]) -> None:
        """``_GROUPS.parquet``: one (group, file) row per file, in group order; the group column dictionary-encoded."""
        ids = pa.array(list(members))
        sizes = np.fromiter(map(len, members.values()), np.int64, len(members))
        index = pa.array(np.repeat(np.arange(len(members), dtype=np.int32), sizes))
        table = pa.table({"group": pa.DictionaryArray.from_arrays(index, ids),
                          "file": pa.array([f for files in members.values() for f in files], pa.string())})
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd", row_group_size=GROUPS_ROW_GROUP)
        self.write_bytes(self.run_path(run_id, GROUPS_FILE), buf.getvalue())

    def _shard_list(self, run_id: str) -> dict[str, Any]:
        listed = self.read_json(self.run_path(run_id, SHARD_LIST_FILE)) or {"shards": [], "groups": {}}
        for group in listed["groups"].values():  # roots written before _GROUPS.parquet list each group's files here
            group.setdefault("size", len(group.get("files", ())))
        return listed

    @staticmethod
    def _inline_members(listed: dict[str, Any]) -> dict[str, list[str]] | None:
        """The groups of an older run, whose ``_SHARDS.json`` (``listed``) holds their files; None when the run has
        ``_GROUPS.parquet``."""
        return {s: g["files"] for s, g in listed["groups"].items() if "files" in g} or None

    def run_shards(self, run_id: str) -> list[str]:
        """The run's shard URIs (or group ids), in order."""
        return self._shard_list(run_id)["shards"]

    def run_members(self, run_id: str, groups: set[str]) -> dict[str, list[str]]:
        """The files of the run's image-folder groups among ``groups`` (group id -> files, in order). Only the row
        groups of ``_GROUPS.parquet`` whose range of group ids holds one of them are read."""
        wanted = sorted(groups)
        if not wanted:
            return {}
        try:
            f = self.fs.open(self.run_path(run_id, GROUPS_FILE), "rb")
        except FileNotFoundError:
            return {s: files for s, files in (self._inline_members(self._shard_list(run_id)) or {}).items()
                    if s in groups}
        with f:
            parquet = pq.ParquetFile(f)
            needed = []
            for i in range(parquet.num_row_groups):
                stats = parquet.metadata.row_group(i).column(0).statistics
                if stats is None or not stats.has_min_max:
                    needed.append(i)
                    continue
                first = bisect_left(wanted, stats.min)
                if first < len(wanted) and wanted[first] <= stats.max:
                    needed.append(i)
            table = parquet.read_row_groups(needed)
        members: dict[str, list[str]] = {}
        for group, file in zip(table["group"].to_pylist(), table["file"].to_pylist()):
            if group in groups:
                members.setdefault(group, []).append(file)
        return members

    def uncovered(self, records: list[RunRecord], uris: list[str]) -> list[str]:
        """The ``uris`` (in order) that no run of ``records`` covers: neither one of its shards nor a file of one of
        its image-folder groups, read from its ``_GROUPS.parquet`` a batch of files at a time."""
        remaining = set(uris)
        for record in records:
            shard_list = self._shard_list(record.run_id)
            if not shard_list["groups"]:
                remaining.difference_update(shard_list["shards"] or record.shards)
                continue
            inline = self._inline_members(shard_list)
            if inline is not None:
                remaining.difference_update(f for files in inline.values() for f in files)
                continue
            with self.fs.open(self.run_path(record.run_id, GROUPS_FILE), "rb") as f:
                for batch in pq.ParquetFile(f).iter_batches(GROUPS_ROW_GROUP, columns=["file"]):
                    remaining.difference_update(batch.column(0).to_pylist())
        return [uri for uri in uris if uri in remaining]

    # -- part files and progress -----------------------------------------------------------------------------

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

    def file_stats(self, path: str) -> FileStats:
        """A part file's statistics from its footer (a file written without them: counted from its rows)."""
        with self.fs.open(path, "rb", block_size=FOOTER_BLOCK) as f:
            meta = pq.read_metadata(f).metadata or {}
            if STATS_KEY in meta:
                return FileStats.from_json(meta[STATS_KEY])
            f.seek(0)
            return FileStats.of_table(pq.read_table(
                f, columns=["image_id", "source_uri", "task", "status", "error", "num_output_tokens",
                            "num_input_tokens", "invalid_objects"]))

    def _keys(self, path: str, shards: set[str]) -> dict[str, str]:
        """The row keys of ``path`` that belong to ``shards`` (key -> shard); a video frame's key has its index."""
        with self.fs.open(path, "rb") as f:
            names = pq.read_schema(f).names
            f.seek(0)
            table = pq.read_table(f, columns=[*KEY_COLUMNS, "source_uri", *(["frame_index"] if "frame_index" in names
                                                                            else [])])
        frames = table["frame_index"].to_pylist() if "frame_index" in names else [None] * table.num_rows
        return {row_key(i, t, f): s for i, t, f, s in zip(table["image_id"].to_pylist(), table["task"].to_pylist(),
                                                         frames, table["source_uri"].to_pylist()) if s in shards}

    def progress(self, run_id: str, marks: dict[str, ShardMark] | None = None,
                 tasks: list[str] | None = None) -> Progress:
        """The run's committed output so far, each ``(image_id, task)`` once.

        Part files are taken in a fixed order (the manifest's first, then by name) and a file is accepted
        only when it shares no key with the files accepted before it; a rejected file's rows are the work of
        a writer that outlived a crash or a retried task, and the rows it alone held are simply redone.

        Only footers are read first. A shard whose rows, summed over every file, match its size and key sum
        for each task (``tasks``, or those present) holds each key once, so its keys are never read. Keys are
        read only for the other shards (partly committed, duplicated by a zombie writer, or of unknown size,
        ``marks`` defaulting to the run's recorded sizes), and only from the files holding them.
        """
        marks = self.shard_marks(run_id) if marks is None else marks
        listed = self.part_files(run_id)
        first = sorted(set(self.manifest(run_id) or ()) & set(listed))
        ordered = first + [p for p in listed if p not in first]
        stats: dict[str, FileStats] = {}
        for path in ordered:
            try:
                stats[path] = self.file_stats(path)
            except FileNotFoundError:
                continue
        total = FileStats()
        for s in stats.values():
            total.merge(s)
        unproven = {shard for shard, by_task in total.shards.items() if not _proven(by_task, marks.get(shard), tasks)}
        progress = Progress()
        keys_of: dict[str, dict[str, str]] = {}
        for path, s in stats.items():  # the acceptance rule, on the keys of unproven shards only
            if unproven.isdisjoint(s.shards):
                progress.files[path] = s.rows
                continue
            keys_of[path] = self._keys(path, unproven)
            if not keys_of[path].keys().isdisjoint(progress.keys):
                progress.rejected.append(path)
                continue
            progress.files[path] = s.rows
            progress.keys.update(keys_of[path])
        # A proven shard that a rejected file also held lost rows: it is partly committed now, so its keys count.
        lost = {shard for path in progress.rejected for shard in stats[path].shards} - unproven
        for path in progress.files:
            if lost.isdisjoint(stats[path].shards):
                continue
            keys_of[path] = keys_of.get(path, {}) | self._keys(path, lost)
            progress.keys.update({k: v for k, v in keys_of[path].items() if v in lost})
        progress.keys_read_from = len(keys_of)
        progress.stats = {p: stats[p] for p in progress.files}
        for s in progress.stats.values():
            progress.rows_by_shard.update(s.rows_by_shard())
        return progress

    # -- shard row counts ------------------------------------------------------------------------------------

    def mark_shard(self, run_id: str, shard: str, rows: int, ks: int | None = None) -> None:
        """Record that reading ``shard`` yielded ``rows`` source rows whose ids sum to ``ks`` (idempotent: a
        re-read writes the same name)."""
        name = _shard_marker_name(shard, rows, ks)
        self.write_json(self.run_path(run_id, SHARDS_DIR, name), {"shard": shard, "rows": rows, "keysum": ks})

    def shard_marks(self, run_id: str) -> dict[str, ShardMark]:
        """Source rows (and key sum) of each shard of the run whose size is known: the groups of its shard list,
        and the shards read to the end, from the marker names in one listing (a marker is read only when its
        shard is not in the run's shard list)."""
        listed = self._shard_list(run_id)
        groups = listed["groups"]
        marks = {s: ShardMark(g["size"], int(g["keysum"], 16)) for s, g in groups.items()}
        by_digest = {hashlib.sha256(s.encode()).hexdigest()[:32]: s for s in listed["shards"] if s not in groups}
        unknown = []
        for path in self._listing(RUNS_DIR, run_id, SHARDS_DIR):
            name = posixpath.basename(path)
            if name.startswith(".") or not name.endswith(".json"):
                continue
            digest, *counts = name[:-5].split("-")
            if digest in by_digest and counts:
                marks[by_digest[digest]] = ShardMark(int(counts[0]), int(counts[1], 16) if len(counts) > 1 else None)
            else:
                unknown.append(path)
        if unknown:
            for raw in self.fs.cat(unknown, on_error="omit").values():
                record = json.loads(raw)
                marks[record["shard"]] = ShardMark(record["rows"], record.get("keysum"))
        return marks

    def shard_sizes(self, run_id: str) -> dict[str, int]:
        """Source rows per shard, for the shards of the run whose size is known (see :meth:`shard_marks`)."""
        return {s: m.rows for s, m in self.shard_marks(run_id).items()}

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

    def record(self, shard: str, rows: int, ks: int | None = None) -> None:
        self.store.mark_shard(self.run_id, shard, rows, ks)
