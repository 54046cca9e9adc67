"""The run summary: one typed record, written as ``_SUMMARY.json`` and returned by :func:`paligemma_batch.run`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class RunSummary:
    """What a run did. ``status`` is ``finished`` or ``nothing_to_do`` (every shard covered by a finished run)."""

    run_id: str
    output: str  # the run's folder URI
    status: str
    resumed: bool = False
    config_hash: str | None = None
    model: dict[str, str | None] = field(default_factory=dict)  # source, revision, precision
    masks_decoded: bool = False
    shards: int = 0  # shards of the run
    shards_read: int = 0  # shards this invocation read
    skipped_files: dict[str, int] = field(default_factory=dict)  # files the listing left out, by extension
    attempts: int = 1
    inputs_seen: int = 0  # distinct image ids with a committed row
    rows_written: int = 0
    rows_by_task: dict[str, dict[str, int]] = field(default_factory=dict)  # task -> status -> rows
    rows_ok: int = 0
    rows_error: int = 0
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    top_error_reasons: list[dict[str, Any]] = field(default_factory=list)  # [{"error", "rows"}], at most 5
    output_tokens: int = 0
    invalid_objects: int = 0
    rows_this_invocation: int = 0
    uncommitted_files_removed: int = 0
    wall_time_s: float = 0.0
    images_per_second: float = 0.0
    output_tokens_per_second: float = 0.0
    files: int = 0
    started_at: str | None = None
    finished_at: str | None = None

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2, ensure_ascii=False).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> RunSummary:
        data = json.loads(raw)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def __getitem__(self, name: str) -> Any:
        """Mapping-style reads (``summary["rows_written"]``), as 0.1 returned a dict."""
        if name not in {f.name for f in fields(self)}:
            raise KeyError(name)
        return getattr(self, name)
