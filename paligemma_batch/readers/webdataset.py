"""WebDataset tars: one sample per member key, the image in a member with an image extension, sidecars beside it."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import posixpath
import tarfile
from collections.abc import Iterator
from typing import IO

from paligemma_batch.readers.base import Reader, ShardKeys, SourceRow, image_exts


def split_member(name: str) -> tuple[str, str]:
    """WebDataset convention: the key is the path up to the first dot of the basename; the rest is the ext.

    Member names are only ever keys: nothing is extracted to disk, so ``../`` and absolute names are harmless.
    """
    directory, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return (posixpath.join(directory, stem) if directory else stem), ext.lower()


def _member(members: dict[str, bytes | None], ext: str) -> bytes | None:
    """The member with extension ``ext``, or one whose extension ends in ``.ext`` (the key had dots)."""
    if ext in members:
        return members[ext]
    return next((data for e, data in members.items() if e.endswith("." + ext)), None)


def sidecar_fields(members: dict[str, bytes | None], wanted: list[str]) -> dict[str, str]:
    """Per-image fields from sidecar members: ``EXT`` (the member's text) or ``json.FIELD``."""
    out = {}
    for spec in wanted:
        if spec.startswith("json."):
            raw = _member(members, "json")
            if raw is not None:
                doc = json.loads(raw.decode("utf-8"))
                if not isinstance(doc, dict):
                    raise ValueError(f"the json member is a {type(doc).__name__}, not an object")
                value = doc.get(spec[5:])
                if value is not None:
                    out[spec] = str(value)
        elif (raw := _member(members, spec)) is not None:
            out[spec] = raw.decode("utf-8").strip()
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
        fields = sidecar_fields(members, wanted)
    except (ValueError, UnicodeDecodeError) as err:
        return SourceRow(image_id, uri, members[image_ext], error=f"bad_sidecar: {err}")
    return SourceRow(image_id, uri, members[image_ext], fields)


# Plain and compressed tars; tarfile's stream mode reads gzip (and bz2, xz) itself, zstd goes through zstandard.
SHARD_EXTS = ("tar", "tar.gz", "tgz", "tar.zst")


def zstd_missing() -> bool:
    """Whether ``.tar.zst`` shards cannot be read here (the zstandard package is not installed)."""
    return importlib.util.find_spec("zstandard") is None


@contextlib.contextmanager
def _decompressed(f: IO[bytes], path: str) -> Iterator[IO[bytes]]:
    """``f`` as a tar stream: zstd-decompressed for ``.tar.zst``, else as it is (tarfile detects gzip itself)."""
    if not path.lower().endswith(".zst"):
        yield f
        return
    if zstd_missing():
        raise ImportError("pip install zstandard to read .tar.zst shards")
    import zstandard

    with zstandard.ZstdDecompressor().stream_reader(f) as stream:
        yield stream


class WebDatasetReader(Reader):
    format = "webdataset"

    def shard_exts(self) -> tuple[str, ...]:
        return SHARD_EXTS

    def shard_rows(self, fs, path: str, uri: str, wanted: list[str]) -> Iterator[SourceRow]:
        """Samples in tar order, reading one member at a time (stream mode: no seeking, no index, no extraction)."""
        exts = image_exts(self.cfg)
        keys = ShardKeys(uri)
        key, members = None, {}
        with fs.open(path, "rb") as raw, _decompressed(raw, path) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
            for info in tar:
                tar.members = []  # stream mode keeps every header it read; drop them so memory stays flat
                if info.isdir():
                    continue
                member_key, ext = split_member(info.name)
                if member_key != key or ext in members:
                    if key is not None:
                        yield _sample_row(keys.image_id(key), uri, members, exts, wanted)
                    key, members = member_key, {}
                members[ext] = tar.extractfile(info).read() if info.isfile() else None
            if key is not None:
                yield _sample_row(keys.image_id(key), uri, members, exts, wanted)
