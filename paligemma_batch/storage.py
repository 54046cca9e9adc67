"""The storage helpers every module uses: the fsspec filesystem of a URI, local or not, and atomic writes."""

from __future__ import annotations

import posixpath
import uuid
from typing import TYPE_CHECKING

import fsspec

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
