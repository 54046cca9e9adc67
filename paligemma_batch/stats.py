"""Per-file statistics: what one part file holds, small enough for its Parquet footer.

The run's summary is a merge of these (O(files)), and resume tells finished shards from their per-shard,
per-task row counts and key sums without reading a key. Ray-free and torch-free.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

STATS_KEY = b"paligemma_batch.stats"
KEYSUM_MOD = 1 << 64
MAX_REASONS = 20  # distinct error texts kept per file: the run's top 5 are exact while no file has more


def key_hash(image_id: str) -> int:
    """A 64-bit hash of an image id; a shard's key sum is the sum of its images' hashes mod 2**64."""
    return int.from_bytes(hashlib.blake2b(image_id.encode(), digest_size=8).digest(), "little")


def keysum(image_ids) -> int:
    return sum(map(key_hash, image_ids)) % KEYSUM_MOD


def error_kind(error: str | None) -> str:
    """The short kind of an error message: the text before the first ':'."""
    return (error or "").split(":", 1)[0].strip() or "unknown"


@dataclass
class FileStats:
    """Counts over the rows of one part file (or, merged, of many)."""

    rows: int = 0
    shards: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # shard -> task -> [rows, key sum]
    status: dict[str, dict[str, int]] = field(default_factory=dict)  # task -> status -> rows
    errors: dict[str, int] = field(default_factory=dict)  # error kind -> rows
    reasons: dict[str, int] = field(default_factory=dict)  # error text -> rows (the most common MAX_REASONS)
    output_tokens: int = 0
    input_tokens: int = 0
    invalid_objects: int = 0

    @classmethod
    def of_table(cls, table: pa.Table) -> FileStats:
        """The statistics of ``table`` (annotation rows; only the columns read here are needed)."""
        stats = cls(rows=table.num_rows)
        ids, shards = table["image_id"].to_pylist(), table["source_uri"].to_pylist()
        tasks, statuses, errors = table["task"].to_pylist(), table["status"].to_pylist(), table["error"].to_pylist()
        for image, shard, task, status, error in zip(ids, shards, tasks, statuses, errors):
            pair = stats.shards.setdefault(shard, {}).setdefault(task, [0, 0])
            pair[0] += 1
            pair[1] = (pair[1] + key_hash(image)) % KEYSUM_MOD
            by_status = stats.status.setdefault(task, {})
            by_status[status] = by_status.get(status, 0) + 1
            if status == "error":
                kind = error_kind(error)
                stats.errors[kind] = stats.errors.get(kind, 0) + 1
                stats.reasons[error] = stats.reasons.get(error, 0) + 1
        stats.reasons = dict(Counter(stats.reasons).most_common(MAX_REASONS))
        for name, column in (("output_tokens", "num_output_tokens"), ("input_tokens", "num_input_tokens"),
                             ("invalid_objects", "invalid_objects")):
            if column in table.column_names:
                setattr(stats, name, int(pc.sum(table[column]).as_py() or 0))
        return stats

    def merge(self, other: FileStats) -> None:
        self.rows += other.rows
        for shard, by_task in other.shards.items():
            mine = self.shards.setdefault(shard, {})
            for task, (rows, ks) in by_task.items():
                pair = mine.setdefault(task, [0, 0])
                pair[0] += rows
                pair[1] = (pair[1] + ks) % KEYSUM_MOD
        for task, by_status in other.status.items():
            mine_s = self.status.setdefault(task, {})
            for status, n in by_status.items():
                mine_s[status] = mine_s.get(status, 0) + n
        for target, source in ((self.errors, other.errors), (self.reasons, other.reasons)):
            for key, n in source.items():
                target[key] = target.get(key, 0) + n
        self.output_tokens += other.output_tokens
        self.input_tokens += other.input_tokens
        self.invalid_objects += other.invalid_objects

    def rows_by_shard(self) -> Counter:
        return Counter({s: sum(r for r, _ in by_task.values()) for s, by_task in self.shards.items()})

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), ensure_ascii=False, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> FileStats:
        return cls(**json.loads(raw))

    def summary_counts(self) -> dict[str, Any]:
        """The row counts of :class:`~paligemma_batch.summary.RunSummary` over these (key-disjoint) rows.

        ``inputs_seen`` counts, per shard, the rows of its most complete task: a finished run has one row per
        image and task, so this is the number of distinct images without reading one id.
        """
        by_status = Counter()
        for counts in self.status.values():
            by_status.update(counts)
        reasons = sorted(self.reasons.items(), key=lambda item: (-item[1], item[0]))[:5]
        return {
            "inputs_seen": sum(max((r for r, _ in by_task.values()), default=0) for by_task in self.shards.values()),
            "rows_written": self.rows,
            "rows_by_task": {t: dict(c) for t, c in sorted(self.status.items())},
            "rows_ok": by_status.get("ok", 0),
            "rows_error": by_status.get("error", 0),
            "errors_by_kind": dict(sorted(self.errors.items(), key=lambda item: (-item[1], item[0]))),
            "top_error_reasons": [{"error": e, "rows": n} for e, n in reasons],
            "output_tokens": self.output_tokens,
            "invalid_objects": self.invalid_objects,
        }
