"""What every reader shares: the row it yields, the stable id rule, listing, and turning broken shards into rows.

A reader owns one input format: which files are its shards, how rows stream out of a shard, each row's
``image_id``, the sidecar or column fields, whether a shard's row count is known before reading, and how a
source is found again by id. Nothing here knows about models or Ray.
"""

from __future__ import annotations

import posixpath
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar

import fsspec
from fsspec.utils import glob_translate

from paligemma_batch.config import InputConfig
from paligemma_batch.images import image_extensions
from paligemma_batch.storage import filesystem, full_uri, is_local, iter_files

KEY_SEPARATOR = "::"


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
    """The media extensions of files and tar members: every one Pillow registers for a format
    :mod:`paligemma_batch.images` decodes (or, for ``input.media: video``, the clip extensions), plus
    ``input.image_exts``."""
    if cfg.media == "video":
        from paligemma_batch.video import CLIP_EXTS

        return tuple(dict.fromkeys([*CLIP_EXTS, *(e.strip().lower().lstrip(".") for e in cfg.image_exts if e.strip())]))
    extra = (e.strip().lower().lstrip(".") for e in cfg.image_exts)
    return tuple(dict.fromkeys([*image_extensions(), *(e for e in extra if e)]))


class ShardList(list):
    """The shards a listing found (a sorted list of URIs), with what it left out."""

    def __init__(self, shards: Iterable[str] = ()):
        super().__init__(shards)
        self.missing: list[str] = []  # plain URIs named in the config that do not exist
        self.skipped: dict[str, int] = {}  # files of folders and globs left out, by extension
        self.skipped_paths: list[str] = []


_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?$")


def _closing(text: str, start: int) -> int | None:
    """The index of the ``}`` that closes the ``{`` at ``start``."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return i
    return None


def _alternatives(body: str) -> list[str] | None:
    """The choices of one brace group: a numeric range (zero padding kept) or a comma list; None: literal."""
    match = _RANGE.match(body)
    if match:
        first, last, step = int(match[1]), int(match[2]), abs(int(match[3] or 1)) or 1
        padded = any(len(g.lstrip("-")) > 1 and g.lstrip("-").startswith("0") for g in match.groups()[:2])
        width = max(len(match[1]), len(match[2])) if padded else 0
        numbers = range(first, last + 1, step) if first <= last else range(first, last - 1, -step)
        return [str(n).zfill(width) for n in numbers]
    parts, depth, begin = [], 0, 0
    for i, c in enumerate(body):
        depth += {"{": 1, "}": -1}.get(c, 0)
        if c == "," and depth == 0:
            parts.append(body[begin:i])
            begin = i + 1
    return [*parts, body[begin:]] if parts else None


def expand_braces(pattern: str) -> list[str]:
    """WebDataset's brace notation: ``shard-{000000..000099}.tar``, ``{train,val}/*.tar``, nested or repeated.

    Numeric ranges keep their zero padding (and take an optional step, ``{0..10..2}``); a group without a range
    or a comma (``{x}``) stays as written.
    """
    start = pattern.find("{")
    while start != -1:
        end = _closing(pattern, start)
        if end is None:
            break
        options = _alternatives(pattern[start + 1:end])
        if options is not None:
            head, tail = pattern[:start], pattern[end + 1:]
            return [uri for option in options for uri in expand_braces(head + option + tail)]
        start = pattern.find("{", start + 1)
    return [pattern]


def _glob_root(path: str) -> tuple[str, int | None]:
    """The folder a glob's matches lie under (up to its first wildcard) and how many levels below it (None: any,
    for ``**``), as fsspec's ``glob`` decides them."""
    head = path[:min(i for i in (path.find(c) for c in "*?[") if i >= 0)]
    root = head[:head.rindex("/") + 1] if "/" in head else ""
    return root, None if "**" in path else path[len(root):].count("/") + 1


def _kinds(fs: fsspec.AbstractFileSystem, paths: list[str]) -> dict[str, str | None]:
    """``file``, ``directory`` or None (missing) for each path, listing each parent folder once."""
    by_parent: dict[str, dict[str, str]] = {}
    kinds: dict[str, str | None] = {}
    for path in dict.fromkeys(paths):
        parent = posixpath.dirname(path)
        if parent in ("", path):
            kinds[path] = "directory" if fs.isdir(path) else ("file" if fs.exists(path) else None)
            continue
        if parent not in by_parent:
            try:
                by_parent[parent] = {e["name"].rstrip("/"): e["type"] for e in fs.ls(parent, detail=True)}
            except (FileNotFoundError, NotADirectoryError):
                by_parent[parent] = {}
        kinds[path] = by_parent[parent].get(path)
    return kinds


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

    def list_shards(self) -> ShardList:
        """Every shard the input names, sorted, as full URIs, with what the listing left out.

        Brace ranges and lists (``{000..099}``, ``{a,b}``) expand first; globs (``**`` too) expand to what exists
        now; a folder lists its files recursively. A plain URI of a file is kept even when missing, so that it
        becomes an error row rather than silently vanishing (``missing`` names it). Files of a folder or glob
        without one of this format's extensions are counted by extension in ``skipped``. Folders and globs are
        listed without holding the listing (:func:`~paligemma_batch.storage.iter_files`): memory holds the URIs.
        """
        cfg = self.cfg
        uris = [cfg.uri] if isinstance(cfg.uri, str) else list(cfg.uri)
        found: set[str] = set()
        listing = ShardList()
        for pattern in uris:
            fs, _ = filesystem(pattern, cfg.storage_options)
            fs.invalidate_cache()  # "what exists now": a long-lived process must see shards added since its last listing
            plain: list[str] = []
            for uri in expand_braces(pattern):
                path = fs._strip_protocol(uri)
                path = path.rstrip("/") if is_local(fs) or "://" in uri else path
                if any(c in path for c in "*?["):
                    root, depth = _glob_root(path)
                    matches = re.compile(glob_translate(path)).match
                    for file in iter_files(fs, root, depth):
                        if matches(file):
                            self._take(fs, file, found, listing)
                else:
                    plain.append(path)
            for path, kind in _kinds(fs, plain).items():
                if kind == "directory":
                    for file in iter_files(fs, path):
                        if not posixpath.basename(file).startswith((".", "_")):
                            self._take(fs, file, found, listing)
                else:
                    found.add(full_uri(fs, path))
                    if kind is None:
                        listing.missing.append(full_uri(fs, path))
            fs.invalidate_cache()  # the parent listings of plain URIs: no listing outlives this call
        listing.extend(sorted(found))
        listing.skipped_paths.sort()
        return listing

    def _take(self, fs: fsspec.AbstractFileSystem, path: str, found: set[str], listing: ShardList) -> None:
        """Add a listed file to the shards if it is one; otherwise count it by extension."""
        if self.claims(path):
            found.add(full_uri(fs, path))
            return
        base = posixpath.basename(path)
        ext = base.rpartition(".")[2].lower() if "." in base else "(none)"
        listing.skipped[ext] = listing.skipped.get(ext, 0) + 1
        listing.skipped_paths.append(full_uri(fs, path))

    def group(self, uris: list[str]) -> dict[str, list[str]]:
        """Shards made of several listed files (group id -> files, in order); {}: each listed URI is a shard."""
        return {}

    def iter_group(self, group_id: str, files: list[str], wanted_fields: Iterable[str] = ()) -> Iterator[SourceRow]:
        """The rows of a group's files in order, each attributed to the group (``source_uri``)."""
        for uri in files:
            for row in self.iter_rows(uri, wanted_fields):
                row.source_uri = group_id
                yield row

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
