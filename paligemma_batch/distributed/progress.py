"""Progress while the job runs: the inference actors report each annotated batch to a small actor the driver polls."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import ray

from paligemma_batch.distributed.stages import InferenceStage
from paligemma_batch.progress import Progress, error_kind


@ray.remote(num_cpus=0)
class ProgressCounter:
    """Rows by status, shards seen and the latest error kind of the annotated batches."""

    def __init__(self):
        self.rows_by_status: dict[str, int] = {}
        self.shards: set[str] = set()
        self.latest_error: str | None = None

    def add(self, rows_by_status: dict[str, int], shards: list[str], latest_error: str | None) -> None:
        for status, rows in rows_by_status.items():
            self.rows_by_status[status] = self.rows_by_status.get(status, 0) + rows
        self.shards.update(shards)
        self.latest_error = latest_error or self.latest_error

    def snapshot(self) -> tuple[dict[str, int], int, str | None]:
        return dict(self.rows_by_status), len(self.shards), self.latest_error


def report_batch(counter, part: pa.Table) -> None:
    """Tell ``counter`` about one annotated batch (fire and forget: the actor never waits on it)."""
    counts = part.group_by("status").aggregate([("status", "count")]).to_pylist()
    errors = part.filter(pc.is_valid(part["error"]))["error"]
    latest = error_kind(errors[-1].as_py()) if len(errors) else None
    counter.add.remote({r["status"]: r["status_count"] for r in counts},
                       pc.unique(part["source_uri"]).to_pylist(), latest)


def poll(counter, progress: Progress) -> None:
    """Copy the counter's state into ``progress``."""
    progress.rows_by_status, progress.shards_read, progress.latest_error = ray.get(counter.snapshot.remote(),
                                                                                 timeout=10)


class CountedInferenceStage(InferenceStage):
    """The inference stage, telling a :class:`ProgressCounter` about each batch it annotates."""

    def __init__(self, progress_counter, **kwargs):
        super().__init__(**kwargs)
        self.progress_counter = progress_counter

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = super().__call__(batch)
        if out.num_rows:
            report_batch(self.progress_counter, out)
        return out
