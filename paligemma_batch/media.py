"""Videos → model inputs for the CPU stage: one prepared row per sampled frame for ``per: frame`` tasks, and
one row holding every sampled frame for ``per: clip`` tasks. Ray-free and torch-free.

Rows are dicts in the CPU stage's prepared layout (``distributed.stages.PREPARED_SCHEMA``). A video that
cannot be decoded gives one error row carrying every task still to do, so each (video, task) gets an error
row; a task whose per-video question is missing fails alone, in each of its rows. A short video's repeated last frame is one frame row (the exactly-once key holds the frame index); clip
prompts keep the repeats, as big_vision does.
"""

from __future__ import annotations

import json
from typing import Protocol

from paligemma_batch.config import TaskConfig
from paligemma_batch.prompts import PromptEncoder
from paligemma_batch.store import row_key
from paligemma_batch.video import VideoDecodeError, VideoSampling, decode_clip


class VideoPlan(Protocol):
    tasks: list[TaskConfig]
    encoder: PromptEncoder
    max_image_pixels: int
    video: VideoSampling | None
    done_keys: frozenset[str]


def _row(source: dict, tasks: list[TaskConfig], fields: dict[str, str], error: str | None, **extra) -> dict:
    """A prepared row for ``tasks``; a task whose per-video question is missing carries its own error."""
    prompts, task_errors = zip(*(t.prompt_from(fields) for t in tasks))
    return {"image_id": source["image_id"], "source_uri": source["source_uri"], "width": None, "height": None,
            "pixels": None, "tasks": [t.output_name for t in tasks], "prompts": list(prompts),
            "input_ids": [[] for _ in tasks], "task_errors": list(task_errors), "error": error, **extra}


def _ids(row: dict, encode) -> list[list[int]]:
    """Each task's prompt ids, or none for a task that can't run."""
    return [encode(p) if e is None else [] for p, e in zip(row["prompts"], row["task_errors"])]


def prepare_video(source: dict, plan: VideoPlan) -> list[dict]:
    """One source row (``SOURCE_SCHEMA`` layout) of a video → its prepared rows; finished keys are skipped."""
    done = plan.done_keys
    fields = json.loads(source["fields"] or "{}")
    vid = source["image_id"]
    open_tasks = [t for t in plan.tasks if row_key(vid, t.output_name) not in done]
    if not open_tasks:  # every task finished (clip rows) or failed as a whole video before
        return []
    frame_tasks = [t for t in plan.tasks if t.per == "frame"]
    clip_tasks = [t for t in open_tasks if t.per == "clip"]
    error = source["error"]
    if error is None:
        try:
            clip = decode_clip(source["data"], plan.video, plan.encoder.size, plan.encoder.resample,
                               plan.max_image_pixels)
        except VideoDecodeError as err:
            error = str(err)
    if error is not None:
        return [_row(source, open_tasks, fields, error)]
    encoder, out = plan.encoder, []
    size = {"width": clip.width, "height": clip.height, "num_frames": clip.num_frames}
    first_seen = {}
    for position, index in enumerate(clip.frame_indices):
        first_seen.setdefault(index, position)
    for index, position in first_seen.items():
        todo = [t for t in frame_tasks if row_key(vid, t.output_name, index) not in done]
        if not todo:
            continue
        row = _row(source, todo, fields, None, frame_index=index, timestamp_s=clip.timestamps_s[position], **size)
        row.update(pixels=clip.frames[position].tobytes(), input_ids=_ids(row, encoder.ids))
        out.append(row)
    if clip_tasks:
        row = _row(source, clip_tasks, fields, None, **size)
        row.update(pixels=clip.frames.tobytes(), input_ids=_ids(row, lambda p: encoder.clip_ids(p, clip.num_frames)))
        out.append(row)
    return out
