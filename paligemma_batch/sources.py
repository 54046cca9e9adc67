"""Listing shards and streaming rows out of WebDataset tars, image folders and Parquet files.

Every row gets a stable ``image_id``: the shard URI plus the member key (tars), the file URI (folders), or the
file URI plus the key column or row number (Parquet). Nothing here knows about models or Ray.
"""

from __future__ import annotations

import json
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from paligemma_batch.config import InputConfig, StorageOptions

DEFAULT_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
KEY_SEPARATOR = "::"


@dataclass
class SourceRow:
    """One input image (or one unreadable input) as read from its shard."""

    image_id: str
    source_uri: str
    data: bytes | None
    fields: dict[str, str] = field(default_factory=dict)  # sidecar/column values such as per-image questions
    error: str | None = None


def filesystem(uri: str, storage: StorageOptions) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and in-filesystem path for ``uri`` (local paths need no options)."""
    protocol = fsspec.core.split_protocol(uri)[0]
    opts = storage.to_fsspec() if protocol in ("s3", "s3a") else ({"token": "anon"} if storage.anon else {})
    if protocol in (None, "file", "local"):
        opts = {}
    return fsspec.core.url_to_fs(uri, **opts)


def _full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    return fs.unstrip_protocol(path) if fs.protocol not in ("file", ("file", "local")) else path


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def image_exts(cfg: InputConfig) -> tuple[str, ...]:
    return tuple(e.strip().lower().lstrip(".") for e in cfg.image_key.split(";")) if cfg.image_key else DEFAULT_IMAGE_EXTS


def list_shards(cfg: InputConfig) -> list[str]:
    """Every shard (tar, Parquet or image file) the input names, sorted, as full URIs.

    Globs expand to what exists now; a plain URI of a file is kept even when missing, so that it becomes an
    error row rather than silently vanishing. A folder lists its files recursively.
    """
    uris = [cfg.uri] if isinstance(cfg.uri, str) else list(cfg.uri)
    wanted = {"webdataset": ("tar",), "parquet": ("parquet",), "images": image_exts(cfg)}[cfg.format]
    found: set[str] = set()
    for uri in uris:
        fs, path = filesystem(uri, cfg.storage_options)
        fs.invalidate_cache()  # "what exists now": a long-lived process must see shards added since its last listing
        path = path.rstrip("/") if _is_local(fs) or "://" in uri else path
        if any(c in path for c in "*?["):
            candidates = fs.glob(path)
        elif fs.isdir(path):
            candidates = [p for p in fs.find(path) if not posixpath.basename(p).startswith((".", "_"))]
        else:
            found.add(_full_uri(fs, path))
            continue
        for p in candidates:
            if p.lower().endswith(tuple("." + w for w in wanted)) and not fs.isdir(p):
                found.add(_full_uri(fs, p))
    return sorted(found)


def _split_member(name: str) -> tuple[str, str]:
    """WebDataset convention: the key is the path up to the first dot of the basename; the rest is the ext.

    Member names are only ever keys: nothing is extracted to disk, so ``../`` and absolute names are harmless.
    """
    directory, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    return (posixpath.join(directory, stem) if directory else stem), ext.lower()


class _Keys:
    """Stable, unique image ids for one shard: ``uri::key``, and ``uri::key#n`` for the n-th repeat of a key."""

    def __init__(self, uri: str):
        self.uri = uri
        self.seen: dict[str, int] = {}

    def image_id(self, key: str) -> str:
        self.seen[key] = self.seen.get(key, 0) + 1
        count = self.seen[key]
        return f"{self.uri}{KEY_SEPARATOR}{key}" + (f"#{count}" if count > 1 else "")


def _sidecar_fields(members: dict[str, bytes | None], wanted: list[str]) -> dict[str, str]:
    out = {}
    for spec in wanted:
        if spec.startswith("json."):
            raw = members.get("json")
            if raw is not None:
                doc = json.loads(raw.decode("utf-8"))
                if not isinstance(doc, dict):
                    raise ValueError(f"the json member is a {type(doc).__name__}, not an object")
                value = doc.get(spec[5:])
                if value is not None:
                    out[spec] = str(value)
        elif members.get(spec) is not None:
            out[spec] = members[spec].decode("utf-8").strip()
    return out


def _sample_row(image_id: str, uri: str, members: dict[str, bytes | None], exts: tuple[str, ...],
                wanted: list[str]) -> SourceRow:
    """One WebDataset sample (its members by extension; ``None`` for a link) as a row."""
    image_ext = next((e for e in members if e in exts or e.rsplit(".", 1)[-1] in exts), None)
    if image_ext is None:
        found = ", ".join(sorted(members)) or "nothing"
        return SourceRow(image_id, uri, None, error=f"no_image: the sample has no image member (found: {found})")
    if members[image_ext] is None:
        return SourceRow(image_id, uri, None, error=f"link: the image member '.{image_ext}' is a link or special "
                         "file; links are never followed")
    try:
        fields = _sidecar_fields(members, wanted)
    except (ValueError, UnicodeDecodeError) as err:
        return SourceRow(image_id, uri, members[image_ext], error=f"bad_sidecar: {err}")
    return SourceRow(image_id, uri, members[image_ext], fields)


def _iter_webdataset(fs, path: str, uri: str, exts: tuple[str, ...], wanted: list[str]) -> Iterator[SourceRow]:
    """Samples in tar order, reading one member at a time (stream mode: no seeking, no index, no extraction)."""
    keys = _Keys(uri)
    key, members = None, {}
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for info in tar:
            tar.members = []  # stream mode keeps every header it read; drop them so memory stays flat
            if info.isdir():
                continue
            member_key, ext = _split_member(info.name)
            if member_key != key or ext in members:
                if key is not None:
                    yield _sample_row(keys.image_id(key), uri, members, exts, wanted)
                key, members = member_key, {}
            members[ext] = tar.extractfile(info).read() if info.isfile() else None
        if key is not None:
            yield _sample_row(keys.image_id(key), uri, members, exts, wanted)


def _image_bytes(value: Any, column: str) -> tuple[bytes | None, str | None]:
    """Bytes from an image cell: binary, or the HF datasets Image struct ``{"bytes", "path"}``."""
    if isinstance(value, dict):
        if value.get("bytes") is None:
            return None, f"no_image: {column}.bytes is null (path: {value.get('path')!r}; paths are not followed)"
        value = value["bytes"]
    if value is None:
        return None, f"no_image: {column} is null"
    return value, None


def _check_parquet_schema(schema: pa.Schema, image_col: str, needed: list[str]) -> None:
    missing = [c for c in needed if c not in schema.names]
    if missing:
        raise KeyError(f"missing column(s) {missing}; the file has {schema.names}")
    kind = schema.field(image_col).type
    is_struct = pa.types.is_struct(kind)
    image_type = kind.field("bytes").type if is_struct and kind.get_field_index("bytes") >= 0 else kind
    if not (pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type)):
        raise TypeError(f"column '{image_col}' is {kind}; expected binary or a struct with a binary 'bytes' field")


def _iter_parquet(fs, path: str, uri: str, cfg: InputConfig, wanted: list[str]) -> Iterator[SourceRow]:
    """Rows batch by batch; keyed by ``id_column`` (repeats get ``#n``) or by the row number."""
    image_col = cfg.image_key or "image"
    keys = _Keys(uri)
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        columns = [c for c in dict.fromkeys([image_col, cfg.id_column, *wanted]) if c]
        _check_parquet_schema(pf.schema_arrow, image_col, columns)
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


def _shard_error(uri: str, err: Exception, rows_read: int) -> SourceRow:
    """The row standing for a shard (or the rest of one) that could not be read."""
    if isinstance(err, FileNotFoundError):
        return SourceRow(uri, uri, None, error=f"missing_shard: {uri} does not exist (never written, or deleted after listing)")
    if isinstance(err, tarfile.ReadError) and "empty file" in str(err):
        return SourceRow(uri, uri, None, error=f"empty_shard: {uri} is empty (0 bytes)")
    where = f"after {rows_read} rows; the rest of the shard is unread" if rows_read else "nothing read"
    return SourceRow(uri, uri, None, error=f"bad_shard: {type(err).__name__}: {err} ({where})")


def iter_rows(uri: str, cfg: InputConfig, wanted_fields: list[str] | None = None) -> Iterator[SourceRow]:
    """Stream the rows of one shard; never holds a whole shard in memory (tars are read member by member).

    Every input is accounted for and the job goes on: a shard that is missing, empty, malformed or breaks
    mid-way yields one error row keyed by the shard URI (after the rows read before the break).
    """
    wanted = list(wanted_fields or [])
    fs, path = filesystem(uri, cfg.storage_options)
    rows_read = 0
    try:
        if cfg.format == "webdataset":
            rows = _iter_webdataset(fs, path, uri, image_exts(cfg), wanted)
        elif cfg.format == "parquet":
            rows = _iter_parquet(fs, path, uri, cfg, wanted)
        else:
            rows = iter([SourceRow(uri, uri, fs.cat_file(path))])
        for row in rows:
            rows_read += 1
            yield row
    except Exception as err:  # a broken shard is data: it becomes an error row
        yield _shard_error(uri, err, rows_read)
        return
    if rows_read == 0:
        yield SourceRow(uri, uri, None, error=f"empty_shard: {uri} holds no {cfg.format} rows")


def row_to_dict(row: SourceRow) -> dict[str, Any]:
    return {
        "image_id": row.image_id,
        "source_uri": row.source_uri,
        "data": row.data,
        "fields": json.dumps(row.fields, ensure_ascii=False),
        "error": row.error,
    }
