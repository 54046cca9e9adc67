"""The job's live progress: a state the Ray layer fills while the job runs, and its display.

Ray-free. On a terminal the display is one ``rich`` live panel; otherwise (CI logs, ``ray job submit`` logs)
it is one plain line every ``interval_s`` seconds.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import TextIO


@dataclass
class Progress:
    """What the job has committed so far."""

    shards_total: int
    tasks: int
    images_total: int | None = None  # known when every shard's row count is (an image folder)
    shards_read: int = 0
    rows_by_status: dict[str, int] = field(default_factory=dict)
    latest_error: str | None = None  # the kind (text before the first ':') of the newest error row
    started: float = field(default_factory=time.monotonic)

    @property
    def images_done(self) -> int:
        return sum(self.rows_by_status.values()) // max(self.tasks, 1)

    def images_per_second(self, now: float | None = None) -> float:
        elapsed = (now or time.monotonic()) - self.started
        return self.images_done / elapsed if elapsed > 0 else 0.0

    def eta_s(self, now: float | None = None) -> float | None:
        """Seconds left at the current rate; None while unknown."""
        rate = self.images_per_second(now)
        if rate <= 0:
            return None
        if self.images_total is not None:
            return max(self.images_total - self.images_done, 0) / rate
        if self.shards_read:  # images per shard so far, times the shards left
            return self.images_done / self.shards_read * (self.shards_total - self.shards_read) / rate
        return None

    def line(self, now: float | None = None) -> str:
        """One plain line: shards, images, rows by status, images/s, ETA, latest error kind."""
        images = f"{self.images_done}" + (f"/{self.images_total}" if self.images_total is not None else "")
        statuses = " ".join(f"{k}={v}" for k, v in sorted(self.rows_by_status.items())) or "none yet"
        eta = self.eta_s(now)
        parts = [f"shards {self.shards_read}/{self.shards_total}", f"images {images}", f"rows {statuses}",
                 f"{self.images_per_second(now):.1f} images/s", f"ETA {_duration(eta)}"]
        if self.latest_error:
            parts.append(f"latest error: {self.latest_error}")
        return "progress: " + " · ".join(parts)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def error_kind(error: str) -> str:
    """The kind of an error row's text: ``decode: UnidentifiedImageError: ...`` → ``decode: UnidentifiedImageError``."""
    return ":".join(error.split(":")[:2]).strip()


class ProgressDisplay:
    """Shows :class:`Progress` updates: a live ``rich`` line on a terminal, else a plain line per interval."""

    def __init__(self, file: TextIO | None = None, interval_s: float = 10.0):
        self.file = file or sys.stderr
        self.interval_s = interval_s
        self.last_line = 0.0
        self.live = None
        if self.file.isatty():
            from rich.console import Console
            from rich.live import Live

            self.live = Live(console=Console(file=self.file), auto_refresh=False, transient=False)
            self.live.start()

    def update(self, progress: Progress) -> None:
        now = time.monotonic()
        if self.live is not None:
            from rich.text import Text

            self.live.update(Text(progress.line(now)), refresh=True)
        elif now - self.last_line >= self.interval_s:
            self.last_line = now
            print(progress.line(now), file=self.file, flush=True)

    def close(self, progress: Progress) -> None:
        """The final state, shown once more."""
        if self.live is not None:
            self.update(progress)
            self.live.stop()
        else:
            print(progress.line(), file=self.file, flush=True)
