"""Image folders: every image file is one row, keyed by its URI."""

from __future__ import annotations

from collections.abc import Iterator

from paligemma_batch.readers.base import Reader, SourceRow, image_exts


class ImageFolderReader(Reader):
    format = "images"
    rows_known = True  # one row per file
    has_fields = False

    def shard_exts(self) -> tuple[str, ...]:
        return image_exts(self.cfg)

    def shard_rows(self, fs, path: str, uri: str, wanted: list[str]) -> Iterator[SourceRow]:
        yield SourceRow(uri, uri, fs.cat_file(path))
