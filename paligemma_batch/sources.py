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
    """WebDataset convention: the key is the path up to the first dot of the basename; the rest is the ext."""
    directory, base = posixpath.split(name)
    stem, dot, ext = base.partition(".")
    return (posixpath.join(directory, stem) if directory else stem), ext.lower()


def _sidecar_fields(members: dict[str, bytes], wanted: list[str]) -> dict[str, str]:
    out = {}
    for spec in wanted:
        if spec.startswith("json."):
            raw = members.get("json")
            if raw is not None:
                value = json.loads(raw.decode("utf-8")).get(spec[5:])
                if value is not None:
                    out[spec] = str(value)
        elif spec in members:
            out[spec] = members[spec].decode("utf-8").strip()
    return out


def _iter_webdataset(fs, path: str, uri: str, exts: tuple[str, ...], wanted: list[str]) -> Iterator[SourceRow]:
    seen: dict[str, int] = {}

    def emit(key: str, members: dict[str, bytes]) -> SourceRow:
        seen[key] = seen.get(key, 0) + 1
        image_id = f"{uri}{KEY_SEPARATOR}{key}" + (f"#{seen[key]}" if seen[key] > 1 else "")
        image_ext = next((e for e in members if e in exts or e.rsplit(".", 1)[-1] in exts), None)
        if image_ext is None:
            found = ", ".join(sorted(members)) or "nothing"
            return SourceRow(image_id, uri, None, error=f"read: no image member (found: {found})")
        try:
            fields = _sidecar_fields(members, wanted)
        except (ValueError, UnicodeDecodeError) as err:
            return SourceRow(image_id, uri, members[image_ext], error=f"read: bad sidecar: {err}")
        return SourceRow(image_id, uri, members[image_ext], fields)

    key, members = None, {}
    with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for info in tar:
            if not info.isfile():
                continue
            member_key, ext = _split_member(info.name)
            if member_key != key or ext in members:
                if key is not None:
                    yield emit(key, members)
                key, members = member_key, {}
            extracted = tar.extractfile(info)
            members[ext] = extracted.read() if extracted is not None else b""
        if key is not None:
            yield emit(key, members)


def _iter_parquet(fs, path: str, uri: str, cfg: InputConfig, wanted: list[str]) -> Iterator[SourceRow]:
    image_col = cfg.image_key or "image"
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        names = set(pf.schema_arrow.names)
        missing = [c for c in [image_col, cfg.id_column, *wanted] if c and c not in names]
        if missing:
            raise KeyError(f"missing column(s) {missing}; file has {sorted(names)}")
        columns = [c for c in dict.fromkeys([image_col, cfg.id_column, *wanted]) if c]
        row = 0
        for batch in pf.iter_batches(batch_size=64, columns=columns):
            for record in batch.to_pylist():
                key = str(record[cfg.id_column]) if cfg.id_column else str(row)
                data = record[image_col]
                if isinstance(data, dict):  # HF datasets' Image feature: {"bytes": ..., "path": ...}
                    data = data.get("bytes")
                fields = {c: str(record[c]) for c in wanted if record[c] is not None}
                row += 1
                error = None if data is not None else f"read: null {image_col}"
                yield SourceRow(f"{uri}{KEY_SEPARATOR}{key}", uri, data, fields, error)


def iter_rows(uri: str, cfg: InputConfig, wanted_fields: list[str] | None = None) -> Iterator[SourceRow]:
    """Stream the rows of one shard; never holds a whole shard in memory (tars are read member by member).

    A shard that cannot be opened or breaks mid-way yields one error row keyed by the shard URI after the
    rows read so far, so every input is accounted for and the job goes on.
    """
    wanted = list(wanted_fields or [])
    fs, path = filesystem(uri, cfg.storage_options)
    try:
        if cfg.format == "webdataset":
            yield from _iter_webdataset(fs, path, uri, image_exts(cfg), wanted)
        elif cfg.format == "parquet":
            yield from _iter_parquet(fs, path, uri, cfg, wanted)
        else:
            with fs.open(path, "rb") as f:
                yield SourceRow(uri, uri, f.read())
    except Exception as err:  # a broken shard is data: it becomes an error row
        yield SourceRow(uri, uri, None, error=f"read: {type(err).__name__}: {err}")


def row_to_dict(row: SourceRow) -> dict[str, Any]:
    return {
        "image_id": row.image_id,
        "source_uri": row.source_uri,
        "data": row.data,
        "fields": json.dumps(row.fields, ensure_ascii=False),
        "error": row.error,
    }
