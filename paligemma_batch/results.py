"""Reading a job's output back: the annotation rows of its runs, and the source images they came from.

``read_results`` is the notebook entry point; ``read_source_images`` reads images back from their original
shards by ``image_id`` (each shard read once, streaming, stopping when every wanted key was seen).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from paligemma_batch.config import InputConfig, StorageOptions
from paligemma_batch.readers import SourceImage, reader_for, reader_for_shard
from paligemma_batch.storage import write_uri
from paligemma_batch.store import OutputStore

# Shards read at the same time when fetching source images (object storage latency dominates).
READ_THREADS = 8


def _storage(options: StorageOptions | Mapping[str, Any] | None) -> StorageOptions:
    if options is None:
        return StorageOptions()
    return options if isinstance(options, StorageOptions) else StorageOptions.model_validate(dict(options))


def result_runs(store: OutputStore, run_id: str | None = None) -> list[str]:
    """The runs to read: ``run_id`` if given, else every finished run (incremental runs add up to the corpus)."""
    index = store.read_index(with_shards=False)
    if not index:
        raise FileNotFoundError(f"no paligemma-batch output at {store.uri} (no _RUNS.json)")
    if run_id is not None:
        if run_id not in {r.run_id for r in index}:
            raise ValueError(f"run {run_id} is not in {store.uri}; runs: {', '.join(r.run_id for r in index)}")
        return [run_id]
    finished = [r.run_id for r in index if r.status == "finished"]
    if not finished:
        listed = ", ".join(f"{r.run_id} ({r.status})" for r in index)
        raise ValueError(f"no finished run in {store.uri} ({listed}); pass run_id to read an unfinished run's rows")
    return finished


def write_beside(uri: str, output: str | None, name: str, data: bytes,
                 storage_options: StorageOptions | Mapping[str, Any] | None = None) -> str:
    """Write ``data`` to ``output`` (a local path or fsspec URI), or by default as ``name`` in the output root."""
    storage = _storage(storage_options)
    if output is None:
        store = OutputStore(uri, storage)
        store.write_bytes(store.path(name), data)
        return f"{store.uri}/{name}"
    write_uri(output, data, storage)
    return output


def read_results(
    uri: str,
    run_id: str | None = None,
    as_pandas: bool = False,
    columns: list[str] | None = None,
    filters: list[tuple[str, str, Any]] | None = None,
    storage_options: StorageOptions | Mapping[str, Any] | None = None,
):
    """The annotation rows under an output root, with the nested ``detections``/``masks`` columns intact.

    Reads every finished run (or only ``run_id``, finished or not). ``columns`` and pyarrow ``filters``
    (``[("status", "=", "error")]``) are applied while reading. ``as_pandas`` returns a DataFrame whose
    columns keep their Arrow types (``pd.ArrowDtype``), so nested lists of structs survive unchanged.
    Storage options default to the environment (AWS_* variables, AWS_ENDPOINT_URL).
    """
    store = OutputStore(uri, _storage(storage_options))
    tables = []
    for run in result_runs(store, run_id):
        for path in store.data_files(run):
            with store.fs.open(path, "rb") as f:
                tables.append(pq.read_table(f, columns=columns, filters=filters))
    if tables:
        table = pa.concat_tables(tables)
    else:
        from paligemma_batch.schema import ANNOTATIONS

        table = (ANNOTATIONS if columns is None else pa.schema([ANNOTATIONS.field(c) for c in columns])).empty_table()
    if as_pandas:
        import pandas as pd

        return table.to_pandas(types_mapper=pd.ArrowDtype)
    return table


def _read_shard(shard_uri: str, wanted: set[str], template: InputConfig | None,
                storage: StorageOptions) -> dict[str, SourceImage]:
    if template is not None:
        reader = reader_for(template.model_copy(update={"uri": shard_uri}))
    else:
        reader = reader_for_shard(shard_uri, storage)
    return reader.find(shard_uri, wanted)


def read_source_images(
    pairs: Iterable[tuple[str, str]],
    input_config: InputConfig | None = None,
    storage_options: StorageOptions | Mapping[str, Any] | None = None,
) -> dict[str, SourceImage]:
    """The source bytes of each ``(image_id, source_uri)``, reading each shard once.

    ``input_config`` (the job's ``input`` section) supplies the format, image key, id column and storage
    options; without it the format follows the shard's extension and storage comes from ``storage_options``.
    """
    by_shard: dict[str, set[str]] = {}
    for image_id, source_uri in pairs:
        by_shard.setdefault(source_uri, set()).add(image_id)
    storage = _storage(storage_options)
    with ThreadPoolExecutor(READ_THREADS) as pool:
        parts = pool.map(lambda item: _read_shard(item[0], item[1], input_config, storage), sorted(by_shard.items()))
        return {image_id: image for part in parts for image_id, image in part.items()}
