"""The progress display without Ray: its line, and one plain line per interval when output is not a terminal."""

from __future__ import annotations

import io
import time

from paligemma_batch.progress import Progress, ProgressDisplay, error_kind


def test_line_counts_images_rows_rate_and_eta():
    progress = Progress(shards_total=4, tasks=2, images_total=40, shards_read=1,
                        rows_by_status={"ok": 15, "error": 5}, latest_error="decode: UnidentifiedImageError")
    line = progress.line(now=progress.started + 5)
    assert line == ("progress: shards 1/4 · images 10/40 · rows error=5 ok=15 · 2.0 images/s · ETA 15s · "
                    "latest error: decode: UnidentifiedImageError")
    assert error_kind("decode: UnidentifiedImageError: cannot identify") == "decode: UnidentifiedImageError"


def test_plain_lines_at_the_configured_interval():
    out = io.StringIO()
    display = ProgressDisplay(out, interval_s=0.2)
    progress = Progress(shards_total=2, tasks=1)
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        display.update(progress)
        time.sleep(0.01)
    display.close(progress)
    lines = out.getvalue().splitlines()
    assert 5 <= len(lines) <= 7 and all(line.startswith("progress: shards 0/2") for line in lines)
