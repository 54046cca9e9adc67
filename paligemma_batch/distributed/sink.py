"""The Ray Datasink of a run: blocks in, part files committed through :class:`~paligemma_batch.store.OutputStore`."""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa
from ray.data import Datasink
from ray.data.block import BlockAccessor

from paligemma_batch.store import OutputStore, WriteStats


class RunSink(Datasink[WriteStats]):
    """Writes the annotations schema under ``runs/RUN_ID/``, each file atomically.

    The files a write task returns, with each file's statistics (also in its footer), are the invocation's
    committed files (``stats``); a task attempt that failed after committing some files is retried, and its
    files are left out of the manifest.
    """

    def __init__(self, store: OutputStore, run_id: str, attempt: int, rows_per_file: int, schema: pa.Schema):
        self.store = store
        self.run_id = run_id
        self.attempt = attempt
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
            stats.add(*self.store.write_part(self.run_id, self.attempt, part))
        return stats

    @property
    def min_rows_per_write(self) -> int:
        """Ray gathers a file's worth of rows before a write: fewer, fuller files and write tasks."""
        return self.rows_per_file

    def on_write_complete(self, write_result) -> None:
        for stats in write_result.write_returns:
            self.stats.merge(stats)
