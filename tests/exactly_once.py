"""Helpers for the fault tests: the keys a job must produce, the keys its output holds (read straight from the
Parquet files, not through the sink), and cleanup of the Ray processes a test started."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

CLI = str(Path(sys.executable).parent / "paligemma-batch")


def expected_keys(shards: list[Path], tasks: list[str]) -> Counter:
    """(image_id, task) for every image member of every shard: what a complete run holds, once each."""
    keys: Counter = Counter()
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                stem, _, ext = member.name.partition(".")
                if ext in ("jpg", "png"):
                    keys.update((f"{shard}::{stem}", task) for task in tasks)
    return keys


def part_files(output: Path) -> list[Path]:
    """Every Parquet part file under an output root, as any Parquet reader would find them."""
    return sorted(output.glob("runs/*/part-*.parquet"))


def committed_rows(output: Path) -> int:
    """Rows in the part files now present (a progress probe while a job runs)."""
    total = 0
    for path in part_files(output):
        try:
            total += pq.read_metadata(path).num_rows
        except (FileNotFoundError, OSError):
            continue
    return total


def output_keys(output: Path) -> Counter:
    """(image_id, task) -> how many rows hold it, over all part files of all runs, read with plain pyarrow."""
    keys: Counter = Counter()
    for path in part_files(output):
        table = pq.read_table(path, columns=["image_id", "task"])
        keys.update(zip(table["image_id"].to_pylist(), table["task"].to_pylist()))
    return keys


def start_job(config: Path, ray_tmpdir: Path, log: Path, extra_env: dict[str, str] | None = None) -> subprocess.Popen:
    """``paligemma-batch run CONFIG`` as its own process group, its local Ray under ``ray_tmpdir``."""
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmpdir), **(extra_env or {})}
    with open(log, "ab") as out:
        return subprocess.Popen([CLI, "run", str(config)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def processes_with_env(name: str, value: str) -> list[int]:
    """PIDs of this user's processes whose environment holds ``name=value`` (ours: a unique temp dir)."""
    needle = f"{name}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def kill_processes_with_env(name: str, value: str, grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, every process marked with ``name=value``; only processes a test started carry it."""
    pids = processes_with_env(name, value)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if Path(f"/proc/{p}").exists() and not _is_zombie(p)]
            time.sleep(0.1)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
