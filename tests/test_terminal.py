"""What a user sees while a job runs: the tool's own progress display, and no line of Ray's logger."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid

from exactly_once import processes_with_env

RAY_LINES = (" INFO ", "streaming_executor", "core_worker", "logging_progress")


def _job_file(tmp_path, tiny_model_dir, scene_shards, **ray):
    import yaml

    from conftest import job_config

    config = job_config(tiny_model_dir, [str(p) for p in scene_shards], str(tmp_path / "out"),
                        tasks=[{"task": "caption", "lang": "en"}], ray={"num_cpus": 2, **ray})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_none=True)))
    return path


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from paligemma_batch.cli import main; main()", *args]


def test_in_a_pseudo_terminal_progress_shows_images_before_the_report_and_no_ray_line(tmp_path, tiny_model_dir,
                                                                                       scene_shards):
    """A real pty: the live display counts images before the report; Ray's lines go to the log file it names."""
    import pty

    leader, follower = pty.openpty()
    proc = subprocess.Popen(_cli("run", str(_job_file(tmp_path, tiny_model_dir, scene_shards))),
                            stdin=follower, stdout=follower, stderr=follower, close_fds=True)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=300) == 0
    shown = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", b"".join(chunks).decode(errors="replace")).replace("\r", "\n")
    live = shown[:shown.index("output:")]  # everything before the end-of-run report's locations
    assert re.search(r"progress: shards \d/3 · images 12\b", live), shown[-3000:]
    log = re.search(r"Ray and model logs: (\S+driver\.log)", shown)
    assert log and os.path.getsize(log.group(1)) > 0
    assert not [line for line in shown.splitlines() if any(r in line for r in RAY_LINES)], shown[-3000:]


def test_without_a_terminal_progress_lines_come_at_the_configured_interval_and_no_ray_process_outlives_the_run(
        tmp_path, tiny_model_dir, scene_shards):
    marker = uuid.uuid4().hex  # inherited by every process of the local Ray the command starts
    proc = subprocess.Popen(_cli("run", str(_job_file(tmp_path, tiny_model_dir, scene_shards, progress_interval_s=1))),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PGB_TEST_RUN": marker})
    stamped = [(time.monotonic(), line) for line in proc.stdout]
    assert proc.wait(timeout=300) == 0
    assert processes_with_env("PGB_TEST_RUN", marker) == []  # no raylet, GCS, agent or worker left running
    lines = [(t, line) for t, line in stamped if line.startswith("progress: ")]
    assert len(lines) >= 3, "".join(line for _, line in stamped)
    gaps = [b[0] - a[0] for a, b in zip(lines[:-2], lines[1:-1])]  # the last line comes at the end
    assert all(0.8 <= g <= 3.0 for g in gaps), gaps
    assert re.search(r"shards 3/3 · images 12 · rows ok=12", lines[-1][1]), lines[-1][1]
    assert not [line for _, line in stamped if any(r in line for r in RAY_LINES)]
