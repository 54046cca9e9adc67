"""Parquet files with an image-bytes column: rows keyed by ``input.id_column`` or by the row number."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from paligemma_batch.readers.base import KEY_SEPARATOR, Reader, ShardKeys, SourceRow


def _image_bytes(value: Any, column: str) -> tuple[bytes | None, str | None]:
    """Bytes from an image cell: binary, or the HF datasets Image struct ``{"bytes", "path"}``."""
    if isinstance(value, dict):
        if value.get("bytes") is None:
            return None, f"no_image: {column}.bytes is null (path: {value.get('path')!r}; paths are not followed)"
        value = value["bytes"]
    if value is None:
        return None, f"no_image: {column} is null"
    return value, None


def check_schema(schema: pa.Schema, image_col: str, needed: list[str]) -> None:
    """Raise KeyError for missing ``needed`` columns, TypeError for an image column that holds no bytes."""
    missing = [c for c in needed if c not in schema.names]
    if missing:
        raise KeyError(f"missing column(s) {missing}; the file has {schema.names}")
    kind = schema.field(image_col).type
    is_struct = pa.types.is_struct(kind)
    image_type = kind.field("bytes").type if is_struct and kind.get_field_index("bytes") >= 0 else kind
    if not (pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type)):
        raise TypeError(f"column '{image_col}' is {kind}; expected binary or a struct with a binary 'bytes' field")


class ParquetReader(Reader):
    format = "parquet"

    def shard_exts(self) -> tuple[str, ...]:
        return ("parquet",)

    def columns(self, wanted: list[str]) -> list[str]:
        """The columns a shard is read for: the image, the id and the per-image fields."""
        return [c for c in dict.fromkeys([self.cfg.image_column, self.cfg.id_column, *wanted]) if c]

    def shard_rows(self, fs, path: str, uri: str, wanted: list[str]) -> Iterator[SourceRow]:
        """Rows batch by batch; keyed by ``id_column`` (repeats get ``#n``) or by the row number."""
        cfg = self.cfg
        image_col = cfg.image_column
        keys = ShardKeys(uri)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            columns = self.columns(wanted)
            check_schema(pf.schema_arrow, image_col, columns)
            row = 0
            for batch in pf.iter_batches(batch_size=64, columns=columns):
                for record in batch.to_pylist():
                    key = str(row) if not cfg.id_column else record[cfg.id_column]
                    row += 1
                    if key is None:
                        yield SourceRow(f"{uri}{KEY_SEPARATOR}@row{row - 1}", uri, None,
                                        error=f"null_id: {cfg.id_column} is null in row {row - 1}")
                        continue
                    data, error = _image_bytes(record[image_col], image_col)
                    fields = {c: str(record[c]) for c in wanted if record[c] is not None}
                    yield SourceRow(keys.image_id(str(key)), uri, data, fields, error)
