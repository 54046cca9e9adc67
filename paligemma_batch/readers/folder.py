"""Image folders: every image file is one row, keyed by its URI; files are read in groups of
``input.files_per_shard``, cut from the sorted listing."""

from __future__ import annotations

from collections.abc import Iterator

from paligemma_batch.readers.base import Reader, SourceImage, SourceRow, image_exts

GROUP_MARK = "#files="


def group_id(files: list[str]) -> str:
    """A group's shard id: its first file and its size. Groups of one run, or of runs that each group only
    files no earlier run covered, never share a first file, so the id is unique under an output root."""
    return f"{files[0]}{GROUP_MARK}{len(files)}"


class ImageFolderReader(Reader):
    format = "images"
    rows_known = True  # one row per file; a group's size is its file count
    has_fields = False

    def shard_exts(self) -> tuple[str, ...]:
        return image_exts(self.cfg)

    def shard_rows(self, fs, path: str, uri: str, wanted: list[str]) -> Iterator[SourceRow]:
        yield SourceRow(uri, uri, fs.cat_file(path))

    def group(self, uris: list[str]) -> dict[str, list[str]]:
        """Consecutive runs of ``input.files_per_shard`` files of the sorted ``uris``: the same files group the
        same way on a rerun."""
        files = sorted(uris)
        n = self.cfg.files_per_shard
        chunks = [files[i:i + n] for i in range(0, len(files), n)]
        return {group_id(chunk): chunk for chunk in chunks}

    def find(self, uri: str, image_ids: set[str]) -> dict[str, SourceImage]:
        """An image's id is its file, so each is read directly (``uri`` may be a file or a group id)."""
        found = {}
        for image in image_ids:
            row = next(self.iter_rows(image))
            found[image] = SourceImage(row.data, row.error)
        return found
