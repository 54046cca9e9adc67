"""What every reader shares: the row it yields, the stable id rule, listing, and turning broken shards into rows.

A reader owns one input format: which files are its shards, how rows stream out of a shard, each row's
``image_id``, the sidecar or column fields, whether a shard's row count is known before reading, and how a
source is found again by id. Nothing here knows about models or Ray.
"""

from __future__ import annotations

import posixpath
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import fsspec

from paligemma_batch.config import InputConfig
from paligemma_batch.storage import filesystem, full_uri, is_local

KEY_SEPARATOR = "::"
DEFAULT_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")


@dataclass
class SourceRow:
    """One input image (or one unreadable input) as read from its shard."""

    image_id: str
    source_uri: str
    data: bytes | None
    fields: dict[str, str] = field(default_factory=dict)  # sidecar/column values such as per-image questions
    error: str | None = None


@dataclass(frozen=True)
class SourceImage:
    """One image read back from its shard: the bytes, or why they could not be had."""

    data: bytes | None
    error: str | None = None


def image_id(shard_uri: str, key: str) -> str:
    """The id rule: the shard URI, ``::`` and the row's key in its shard."""
    return f"{shard_uri}{KEY_SEPARATOR}{key}"


class ShardKeys:
    """Stable, unique image ids for one shard: ``uri::key``, and ``uri::key#n`` for the n-th repeat of a key."""

    def __init__(self, uri: str):
        self.uri = uri
        self.seen: dict[str, int] = {}

    def image_id(self, key: str) -> str:
        self.seen[key] = self.seen.get(key, 0) + 1
        count = self.seen[key]
        return image_id(self.uri, key) + (f"#{count}" if count > 1 else "")


def _shard_error(uri: str, err: Exception, rows_read: int) -> SourceRow:
    """The row standing for a shard (or the rest of one) that could not be read."""
    if isinstance(err, FileNotFoundError):
        return SourceRow(uri, uri, None, error=f"missing_shard: {uri} does not exist (never written, or deleted after listing)")
    if isinstance(err, tarfile.ReadError) and "empty file" in str(err):
        return SourceRow(uri, uri, None, error=f"empty_shard: {uri} is empty (0 bytes)")
    where = f"after {rows_read} rows; the rest of the shard is unread" if rows_read else "nothing read"
    return SourceRow(uri, uri, None, error=f"bad_shard: {type(err).__name__}: {err} ({where})")


def image_exts(cfg: InputConfig) -> tuple[str, ...]:
    """The media extensions of files and tar members: the image defaults (or, for ``input.media: video``, the
    clip extensions) plus ``input.image_exts``."""
    if cfg.media == "video":
        from paligemma_batch.video import CLIP_EXTS

        return tuple(dict.fromkeys([*CLIP_EXTS, *(e.strip().lower().lstrip(".") for e in cfg.image_exts if e.strip())]))
    extra = (e.strip().lower().lstrip(".") for e in cfg.image_exts)
    return tuple(dict.fromkeys([*DEFAULT_IMAGE_EXTS, *(e for e in extra if e)]))


class Reader:
    """One input format. Subclasses set ``format`` and implement :meth:`shard_exts` and :meth:`shard_rows`."""

    format: ClassVar[str]
    rows_known: ClassVar[bool] = False  # whether a shard's row count is known without reading it
    has_fields: ClassVar[bool] = True  # whether rows carry per-image fields (sidecars, columns)

    def __init__(self, cfg: InputConfig):
        self.cfg = cfg

    def shard_exts(self) -> tuple[str, ...]:
        """File extensions (lower case, no dot) of this format's shards in folder and glob listings."""
        raise NotImplementedError

    def shard_rows(self, fs: fsspec.AbstractFileSystem, path: str, uri: str, wanted: list[str]) -> Iterator[SourceRow]:
        """The rows of one shard, streamed; ``wanted`` names the per-image fields to fetch."""
        raise NotImplementedError

    def claims(self, uri: str) -> bool:
        """Whether ``uri`` has one of this format's shard extensions."""
        return uri.lower().endswith(tuple("." + e for e in self.shard_exts()))

    def list_shards(self) -> list[str]:
        """Every shard the input names, sorted, as full URIs.

        Globs expand to what exists now; a plain URI of a file is kept even when missing, so that it becomes an
        error row rather than silently vanishing. A folder lists its files recursively.
        """
        cfg = self.cfg
        uris = [cfg.uri] if isinstance(cfg.uri, str) else list(cfg.uri)
        found: set[str] = set()
        for uri in uris:
            fs, path = filesystem(uri, cfg.storage_options)
            fs.invalidate_cache()  # "what exists now": a long-lived process must see shards added since its last listing
            path = path.rstrip("/") if is_local(fs) or "://" in uri else path
            if any(c in path for c in "*?["):
                candidates = fs.glob(path)
            elif fs.isdir(path):
                candidates = [p for p in fs.find(path) if not posixpath.basename(p).startswith((".", "_"))]
            else:
                found.add(full_uri(fs, path))
                continue
            for p in candidates:
                if self.claims(p) and not fs.isdir(p):
                    found.add(full_uri(fs, p))
        return sorted(found)

    def iter_rows(self, uri: str, wanted_fields: Iterable[str] = ()) -> Iterator[SourceRow]:
        """Stream the rows of one shard; never holds a whole shard in memory.

        Every input is accounted for and the job goes on: a shard that is missing, empty, malformed or breaks
        mid-way yields one error row keyed by the shard URI (after the rows read before the break).
        """
        wanted = list(wanted_fields)
        fs, path = filesystem(uri, self.cfg.storage_options)
        rows_read = 0
        try:
            for row in self.shard_rows(fs, path, uri, wanted):
                rows_read += 1
                yield row
        except Exception as err:  # a broken shard is data: it becomes an error row
            yield _shard_error(uri, err, rows_read)
            return
        if rows_read == 0:
            yield SourceRow(uri, uri, None, error=f"empty_shard: {uri} holds no {self.format} rows")

    def find(self, uri: str, image_ids: set[str]) -> dict[str, SourceImage]:
        """The sources of ``image_ids`` in shard ``uri``, reading it once and stopping when all were seen."""
        found: dict[str, SourceImage] = {}
        for row in self.iter_rows(uri):
            if row.image_id in image_ids:
                found[row.image_id] = SourceImage(row.data, row.error)
                if len(found) == len(image_ids):
                    break
        for missing in image_ids - found.keys():
            found[missing] = SourceImage(None, f"not found in {uri}")
        return found
