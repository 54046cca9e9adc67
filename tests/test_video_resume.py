"""Exactly-once for videos: the driver killed mid-job, rerun; each (video, frame, task) once."""

from __future__ import annotations

import shutil
import tempfile
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from exactly_once import committed_rows, kill_processes_with_env, part_files, start_job
from paligemma_batch.fixtures.clips import moving_shape_clip
from paligemma_batch.prompts import PromptEncoder
from paligemma_batch.video import VideoSampling, decode_clip
from test_resume import _kill_when

FRAMES = 4


def _video_keys(output: Path) -> Counter:
    keys: Counter = Counter()
    for path in part_files(output):
        table = pq.read_table(path, columns=["image_id", "task", "frame_index"])
        keys.update(zip(*(table[c].to_pylist() for c in ("image_id", "task", "frame_index"))))
    return keys


@pytest.mark.slow
def test_driver_killed_mid_video_job_then_each_frame_once(tmp_path, tiny_model_dir):
    clips = tmp_path / "clips"
    clips.mkdir()
    encoder = PromptEncoder.from_folder(tiny_model_dir)
    expected: Counter = Counter()
    for i in range(24):  # enough work that the driver is killed mid-job
        clip = moving_shape_clip(i, 96, 64, 0.5, ext=("mp4", "webm")[i % 2])
        path = clips / f"clip-{i}.{clip.ext}"
        path.write_bytes(clip.data)
        decoded = decode_clip(clip.data, VideoSampling(frames=FRAMES), encoder.size, encoder.resample)
        expected.update((str(path), "caption", f) for f in set(decoded.frame_indices))
        expected[(str(path), "story", None)] += 1
    out, config, log = tmp_path / "out", tmp_path / "job.yaml", tmp_path / "job.log"
    config.write_text(yaml.safe_dump({
        "input": {"uri": str(clips), "format": "images", "media": "video", "video": {"frames": FRAMES}},
        "tasks": [{"task": "caption", "lang": "en"},
                  {"task": "prompt", "prompt": "what happens", "name": "story", "per": "clip"}],
        "model": {"source": str(tiny_model_dir), "precision": "float32", "max_new_tokens": 6},
        "inference": {"batch_size": 1, "num_cpus": 0.5},
        "preprocess": {"num_cpus": 0.5, "batch_size": 1},
        "output": {"uri": str(out), "rows_per_file": 2},
        "ray": {"num_cpus": 2, "progress_bars": False},
    }))
    total = sum(expected.values())
    ray_tmp = Path(tempfile.mkdtemp(prefix="pgbv-", dir="/tmp"))
    try:
        proc = start_job(config, ray_tmp, log)
        _kill_when(proc, lambda: committed_rows(out) >= 2, f"first part file of {total} rows")
        at_kill = committed_rows(out)
        proc = start_job(config, ray_tmp, log)
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        kill_processes_with_env("RAY_TMPDIR", str(ray_tmp))
        shutil.rmtree(ray_tmp, ignore_errors=True)
    print(f"rows at kill: {at_kill} of {total}")
    assert 0 < at_kill < total
    assert _video_keys(out) == expected
