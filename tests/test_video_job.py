"""Videos through the job (issue 14): clip prompts against the processor, multi-image requests, per-frame
tracking with the shipped shapes fixture, rotation and bad files through ``pipeline.run``."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from conftest import job_config
from paligemma_batch.config import ConfigError
from paligemma_batch.fixtures.clips import (animated_clip, audio_only_m4a, corrupt_payload_mp4, moving_shape_clip,
                                            truncated, vfr_clip)
from paligemma_batch.fixtures.demo import SHAPES_MODEL
from paligemma_batch.pipeline import run
from paligemma_batch.prompts import PromptEncoder
from paligemma_batch.store import OutputStore
from paligemma_batch.video import VideoSampling, decode_clip

VIDEO_INPUT = {"format": "images", "media": "video"}


def _frames(encoder: PromptEncoder, count: int, seed: int = 0) -> np.ndarray:
    clip = moving_shape_clip(seed, seconds=1.0)
    return decode_clip(clip.data, VideoSampling(frames=count), encoder.size, encoder.resample).frames


@pytest.mark.parametrize("count", [4, 16])
def test_clip_prompt_ids_and_pixel_values_equal_the_processor(count, loaded, tiny_model_dir):
    from paligemma_batch.engines.transformers_engine import TransformersEngine

    model, processor = loaded
    encoder = PromptEncoder.from_folder(tiny_model_dir)
    frames = _frames(encoder, count)
    for prompt in ["caption en", "answer en what is moving?"]:
        expected = processor(text=prompt, images=[list(frames)], return_tensors="pt")
        assert encoder.clip_ids(prompt, count) == expected["input_ids"][0].tolist()
    ours = TransformersEngine(model, processor, max_new_tokens=4).pixel_values(list(frames))
    torch.testing.assert_close(ours, expected["pixel_values"], atol=1e-6, rtol=0)


def test_clip_requests_batched_equal_batch_size_one(loaded, tiny_model_dir):
    from paligemma_batch.engines import Request
    from paligemma_batch.engines.transformers_engine import TransformersEngine

    model, processor = loaded
    engine = TransformersEngine(model, processor, max_new_tokens=6, min_new_tokens=6)
    encoder = PromptEncoder.from_folder(tiny_model_dir)
    clip_a, clip_b = _frames(encoder, 4, seed=1), _frames(encoder, 4, seed=2)
    pixels = [*clip_a, *clip_b, clip_b[0]]
    requests = [Request(0, encoder.clip_ids("caption en", 4), (0, 1, 2, 3)),
                Request(4, encoder.clip_ids("answer en what shape moves?", 4), (4, 5, 6, 7)),
                Request(8, encoder.ids("caption en")),
                Request(4, encoder.clip_ids("caption es", 4), (7, 6, 5, 4))]
    batched = engine.generate(pixels, requests)
    for request, got in zip(requests, batched):
        alone = engine.generate([pixels[i] for i in request.images],
                                [Request(0, request.input_ids, tuple(range(len(request.images))))])[0]
        assert got.token_ids == alone.token_ids
    # the order of the frames is part of the prompt
    assert batched[0].num_input_tokens == len(requests[0].input_ids) == 4 * encoder.image_seq_length + 1 + len(
        encoder.ids("caption en")) - encoder.image_seq_length - 1


def test_clip_is_refused_for_boxes_and_masks(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="tasks.0: .*per: clip is not supported for detect"):
        job_config(tiny_model_dir, str(tmp_path), str(tmp_path / "out"), input={"uri": str(tmp_path), **VIDEO_INPUT},
                   tasks=[{"task": "detect", "objects": ["circle"], "per": "clip"}])


def test_video_without_pyav_fails_validation_in_one_line(tiny_model_dir, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "av" else real(name, *a))
    with pytest.raises(ConfigError) as err:
        job_config(tiny_model_dir, str(tmp_path), str(tmp_path / "out"), input={"uri": str(tmp_path), **VIDEO_INPUT})
    assert err.value.problems == ["input: media: video needs PyAV: install paligemma-batch[video]"]


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _shapes_job(folder, out, frames: int, tasks: list[dict], **sections):
    return job_config(SHAPES_MODEL, str(folder), str(out),
                      input={"uri": str(folder), **VIDEO_INPUT, "video": {"frames": frames}},
                      tasks=tasks, model={"source": str(SHAPES_MODEL), "precision": "float32", "max_new_tokens": 24},
                      inference={"batch_size": 8, "num_cpus": 0.5}, **sections)


def _rows(config, summary) -> list[dict]:
    return OutputStore(config.output.uri, config.output_storage).read_run(summary["run_id"]).to_pylist()


DETECT = {"task": "detect", "objects": ["circle", "square", "triangle"]}


@pytest.mark.slow
def test_per_frame_detection_tracks_the_moving_shape(ray_local, tmp_path):
    """H.264 MP4 and VP9 WebM, 24 sampled frames each: 48 frames, each box against the truth."""
    clips = {"track-mp4.mp4": moving_shape_clip(3, 224, 160, 2.0, ext="mp4"),
             "track-webm.webm": moving_shape_clip(4, 224, 160, 2.0, ext="webm"),
             "rotated.mp4": moving_shape_clip(5, 160, 224, 1.0, ext="mp4", rotate=90)}
    folder = tmp_path / "clips"
    folder.mkdir()
    for name, clip in clips.items():
        (folder / name).write_bytes(clip.data)
    config = _shapes_job(folder, tmp_path / "out", 24, [DETECT, {"task": "caption", "lang": "en"}])
    summary = run(config)
    rows = _rows(config, summary)
    assert summary["rows_error"] == 0
    ious, stats = [], {}
    for name, clip in clips.items():
        mine = [r for r in rows if r["image_id"].endswith(name) and r["task"] == "detect"]
        assert len({r["frame_index"] for r in mine}) == len(mine) == len({r["frame_index"] for r in mine})
        assert len(mine) == (24 if clip.duration_s == 2.0 else len(clip.frames))
        interval = 1 / 24
        clip_ious = []
        for r in mine:
            truth = clip.frames[r["frame_index"]]
            assert abs(r["timestamp_s"] - truth.timestamp_s) <= interval
            assert (r["width"], r["height"]) == (clip.width, clip.height)  # displayed pixels, after rotation
            boxes = [d["box_xyxy"] for d in r["detections"] or [] if d["label"] == clip.shape]
            clip_ious.append(max([_iou(b, truth.box) for b in boxes], default=0.0))
        stats[name] = float(np.mean(clip_ious))
        if name != "rotated.mp4":
            ious += clip_ious
        captions = [r for r in rows if r["image_id"].endswith(name) and r["task"] == "caption"]
        assert len(captions) == len(mine) and all(r["text"] for r in captions)
    print("tracking mean IoU", stats, "over", len(ious), "frames:", float(np.mean(ious)))
    assert len(ious) == 48
    assert np.mean(ious) >= 0.6
    assert stats["rotated.mp4"] >= 0.5

    # Looking at results: a strip of the annotated frames per video, and one COCO image per annotated frame.
    from paligemma_batch.export import to_coco
    from paligemma_batch.report import build_report

    page, result = build_report(config.output.uri, sample=3, input_config=config.input)
    assert result.images == 3 and page.count('class="strip"') == 3
    assert page.count('alt="frame ') == 24 + 24 + len(clips["rotated.mp4"].frames) and page.count("<rect") >= 40
    coco = to_coco(OutputStore(config.output.uri, config.output_storage).read_run(summary["run_id"]))
    names = {i["file_name"] for i in coco["images"]}
    detect_rows = [r for r in rows if r["task"] == "detect"]
    assert names == {f"{r['image_id']}#frame={r['frame_index']}" for r in detect_rows}


BAD = {
    "truncated.mp4": lambda: truncated(moving_shape_clip(0, seconds=1.0).data),
    "corrupt.mp4": lambda: corrupt_payload_mp4(0),
    "audio.m4a.mp4": lambda: audio_only_m4a(),
    "empty.mp4": lambda: b"",
    "huge.mp4": lambda: moving_shape_clip(1, 640, 480, 0.5).data,
    "vfr.mp4": lambda: vfr_clip(0, count=12).data,
    "no-duration.mkv": lambda: moving_shape_clip(2, seconds=0.5, ext="mkv", unseekable=True).data,
    "still.gif": lambda: animated_clip(0, count=1).data,
    "anim.webp": lambda: animated_clip(1, count=6, fmt="webp").data,
}
FINE = {"vfr.mp4", "no-duration.mkv", "still.gif", "anim.webp"}


@pytest.mark.slow
def test_bad_videos_become_error_rows_per_video_and_task(ray_local, tiny_model_dir, tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    for name, make in BAD.items():
        (folder / name).write_bytes(make())
    tasks = [{"task": "caption", "lang": "en", "per": "clip"}, {"task": "detect", "objects": ["circle"]}]
    config = job_config(tiny_model_dir, str(folder), str(tmp_path / "out"),
                        input={"uri": str(folder), **VIDEO_INPUT, "video": {"frames": 3}}, tasks=tasks,
                        preprocess={"num_cpus": 0.5, "batch_size": 4, "max_image_pixels": 200_000})
    summary = run(config)
    rows = _rows(config, summary)
    by_video: dict[str, list[dict]] = {}
    for r in rows:
        by_video.setdefault(r["image_id"].rsplit("/", 1)[-1], []).append(r)
    assert set(by_video) == set(BAD)
    reasons = {}
    for name, mine in by_video.items():
        assert {r["task"] for r in mine} == {"caption", "detect"}, name
        if name in FINE:
            assert {r["status"] for r in mine} == {"ok"}, (name, mine[0]["error"])
            clip_rows = [r for r in mine if r["task"] == "caption"]
            assert len(clip_rows) == 1 and clip_rows[0]["num_frames"] == 3 and clip_rows[0]["frame_index"] is None
        else:
            assert len(mine) == 2 and {r["status"] for r in mine} == {"error"}, name
            reasons[name] = mine[0]["error"].split(":")[0]
    assert reasons == {"truncated.mp4": "bad_video", "corrupt.mp4": "no_frames", "audio.m4a.mp4": "no_video_stream",
                       "empty.mp4": "empty", "huge.mp4": "too_large"}, reasons


def test_a_video_lacking_its_question_fails_only_the_task_that_asks_it(loaded, tiny_model_dir, tmp_path):
    """Direct, then through the inference stage: the caption frame rows stay ok, the answer rows are errors."""
    import json

    import pyarrow as pa

    from paligemma_batch.distributed.stages import SOURCE_SCHEMA, InferenceStage, PreprocessPlan, preprocess

    tasks = [{"task": "caption"}, {"task": "answer", "question_key": "json.question"},
             {"task": "answer", "name": "clip_answer", "question_key": "json.question", "per": "clip"}]
    config = job_config(tiny_model_dir, str(tmp_path / "*.mp4"), str(tmp_path / "out"), tasks=tasks,
                        input={"uri": str(tmp_path / "*.mp4"), **VIDEO_INPUT, "video": {"frames": 3}})
    clip = moving_shape_clip(1, seconds=1.0)
    sources = pa.Table.from_pylist([
        {"image_id": f"{tmp_path}/{name}.mp4", "source_uri": f"{tmp_path}/{name}.mp4", "data": clip.data,
         "fields": json.dumps(fields), "error": None}
        for name, fields in [("asked", {"json.question": "what moves?"}), ("unasked", {})]], schema=SOURCE_SCHEMA)
    prepared = preprocess(sources, PreprocessPlan.create(config, PromptEncoder.from_folder(tiny_model_dir)))
    unasked = [r for r in prepared.to_pylist() if r["image_id"].endswith("unasked.mp4")]
    assert [r["frame_index"] is None for r in unasked] == [False] * 3 + [True]  # 3 frame rows and the clip row
    assert all(r["task_errors"][0] is None and r["input_ids"][0] for r in unasked[:3])
    assert all(r["task_errors"][-1] == "input: no 'json.question' for task " + r["tasks"][-1] and r["input_ids"][-1] == []
               for r in unasked)
    out = InferenceStage(config, run_id="r")(prepared).to_pylist()
    status = {(r["image_id"].rsplit("/", 1)[1], r["task"], r["status"]) for r in out}
    assert status == {("asked.mp4", t, "ok") for t in ("caption", "answer", "clip_answer")} | {
        ("unasked.mp4", "caption", "ok"), ("unasked.mp4", "answer", "error"), ("unasked.mp4", "clip_answer", "error")}
    assert len(out) == 2 * (3 * 2 + 1)  # per video: 3 frames x 2 frame tasks, and the clip row
