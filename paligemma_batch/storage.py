"""The storage helpers every module uses: the fsspec filesystem of a URI, local or not, and atomic writes."""

from __future__ import annotations

import posixpath
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

import fsspec
import fsspec.asyn

if TYPE_CHECKING:
    from paligemma_batch.config import StorageOptions


def filesystem(uri: str, storage: StorageOptions | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem and in-filesystem path for ``uri`` (local paths need no options)."""
    protocol = fsspec.core.split_protocol(uri)[0]
    opts: dict = {}
    if storage is not None and protocol in ("s3", "s3a"):
        opts = storage.to_fsspec()
    elif storage is not None and storage.anon and protocol not in (None, "file", "local"):
        opts = {"token": "anon"}
    return fsspec.core.url_to_fs(uri, **opts)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether ``fs`` is the local filesystem."""
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


LISTING_BATCH = 1000  # objects handed over from s3fs's event loop at a time (one S3 list page)


def iter_files(fs: fsspec.AbstractFileSystem, root: str, maxdepth: int | None = None) -> Iterator[str]:
    """The path of every file under folder ``root``, down to ``maxdepth`` levels (None: all), streamed.

    Keeps no listing: on S3 the objects come a page at a time from s3fs's object iterator (a flat listing of the
    prefix, or one level with ``maxdepth=1``), so memory holds what the caller keeps; elsewhere they come from one
    ``find``, and the filesystem's listing cache is cleared after it.
    """
    root = root.rstrip("/") or root
    protocols = fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)
    if "s3" not in protocols or not root:
        try:
            yield from fs.find(root, maxdepth=maxdepth, detail=False)
        finally:
            fs.invalidate_cache()
        return
    bucket, key, _ = fs.split_path(root)
    depth = root.count("/")
    objects = fs._iterdir(bucket, prefix=f"{key}/" if key else "", delimiter="/" if maxdepth == 1 else "")

    async def next_files() -> list[str] | None:
        """The files among the next LISTING_BATCH objects; None when there are no more."""
        files, seen = [], 0
        async for info in objects:
            name = info["name"]
            if info["type"] == "file" and not name.endswith("/") and (
                    maxdepth is None or name.count("/") - depth <= maxdepth):
                files.append(name)
            seen += 1
            if seen == LISTING_BATCH:
                return files
        return files if seen else None

    while (files := fsspec.asyn.sync(fs.loop, next_files)) is not None:
        yield from files


def full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """``path`` with its protocol (``s3://b/k``); local paths stay plain."""
    return path if is_local(fs) else fs.unstrip_protocol(path)


def atomic_write(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Commit ``data`` at ``path`` whole or not at all: a rename locally, a single PUT on object storage."""
    if is_local(fs):
        fs.makedirs(posixpath.dirname(path), exist_ok=True)
        tmp = posixpath.join(posixpath.dirname(path), f".tmp-{uuid.uuid4().hex}")
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, path)
    else:
        fs.pipe_file(path, data)


def write_uri(uri: str, data: bytes, storage: StorageOptions | None = None) -> None:
    """Write ``data`` to a local path or fsspec URI, atomically."""
    fs, path = filesystem(uri, storage)
    atomic_write(fs, path, data)
