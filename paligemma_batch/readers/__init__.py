"""Readers: one per input format, chosen by ``input.format``. Nothing outside this package compares format names.

    reader = reader_for(config.input)
    for uri in reader.list_shards():
        for row in reader.iter_rows(uri, wanted_fields):
            ...
"""

from __future__ import annotations

from collections.abc import Iterator

from paligemma_batch.config import InputConfig, StorageOptions
from paligemma_batch.readers.base import KEY_SEPARATOR, Reader, ShardList, SourceImage, SourceRow, expand_braces, image_id
from paligemma_batch.readers.folder import ImageFolderReader
from paligemma_batch.readers.parquet import ParquetReader
from paligemma_batch.readers.webdataset import WebDatasetReader

READERS: dict[str, type[Reader]] = {r.format: r for r in (WebDatasetReader, ImageFolderReader, ParquetReader)}


def reader_for(cfg: InputConfig) -> Reader:
    """The reader of ``cfg.format``."""
    return READERS[cfg.format](cfg)


def list_shards(cfg: InputConfig) -> ShardList:
    """Every shard ``cfg`` names, sorted, as full URIs, with what was missing or skipped (see :meth:`Reader.list_shards`)."""
    return reader_for(cfg).list_shards()


def iter_rows(uri: str, cfg: InputConfig, wanted_fields: list[str] | None = None) -> Iterator[SourceRow]:
    """The rows of shard ``uri`` (see :meth:`Reader.iter_rows`)."""
    return reader_for(cfg).iter_rows(uri, wanted_fields or ())


def reader_for_shard(shard_uri: str, storage: StorageOptions) -> Reader:
    """The reader a shard's extension implies, with default options (for reading sources back without a config)."""
    for fmt in ("webdataset", "parquet", "images"):
        reader = READERS[fmt](InputConfig(uri=shard_uri, format=fmt, storage_options=storage))
        if reader.claims(shard_uri):
            return reader
    return reader


__all__ = ["KEY_SEPARATOR", "READERS", "Reader", "ShardList", "SourceImage", "SourceRow", "expand_braces", "image_id",
           "iter_rows", "list_shards", "reader_for", "reader_for_shard"]
