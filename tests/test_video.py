"""decode_clip on synthetic clips with known truth: sampling, seeking, rotation, guards and every bad file."""

from __future__ import annotations

import io
from functools import cache

import numpy as np
import pytest
from PIL import Image

av = pytest.importorskip("av")

from paligemma_batch.fixtures import clips  # noqa: E402
from paligemma_batch.fixtures.scenes import COLORS  # noqa: E402
from paligemma_batch.images import decode_image, to_model_input  # noqa: E402
from paligemma_batch.video import (  # noqa: E402
    VideoDecodeError, VideoSampling, decode_clip, sample_indices,
)

NEAREST = Image.Resampling.NEAREST


@cache
def clip(name: str) -> clips.Clip:
    """The clips the tests share, each written once: 2 s at 24 fps, keyframe every 12 frames."""
    makers = {
        "mp4": lambda: clips.moving_shape_clip(1, ext="mp4"),
        "webm": lambda: clips.moving_shape_clip(2, ext="webm"),
        "mkv-unseekable": lambda: clips.moving_shape_clip(3, ext="mkv", unseekable=True),
        "raw-h264": lambda: clips.moving_shape_clip(4, ext="h264"),
        "vfr": lambda: clips.vfr_clip(5),
        "gif": lambda: clips.animated_clip(6, fmt="gif"),
        "webp": lambda: clips.animated_clip(7, fmt="webp"),
        "short": lambda: clips.moving_shape_clip(8, seconds=0.25),
        "long": lambda: clips.moving_shape_clip(9, seconds=4.0),
    }
    return makers[name]()


def native(c: clips.Clip, sampling: VideoSampling = VideoSampling(), **kwargs):
    """Decode at the clip's displayed size, so frame pixels are displayed pixels."""
    return decode_clip(c.data, sampling, (c.height, c.width), NEAREST, **kwargs)


def shape_box(pixels: np.ndarray, color: str) -> tuple[int, int, int, int] | None:
    near = np.abs(pixels.astype(int) - np.asarray(COLORS[color])).max(axis=-1) <= 45
    ys, xs = np.nonzero(near)
    return (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1) if len(xs) else None


def iou(a, b) -> float:
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def every_frame(c: clips.Clip) -> list[Image.Image]:
    """Every frame, upright, decoded front to back without seeking (PyAV; Pillow for animations)."""
    if c.ext in ("gif", "webp"):
        img, frames = Image.open(io.BytesIO(c.data)), []
        for k in range(img.n_frames):
            img.seek(k)
            frames.append(img.convert("RGB"))
        return frames
    with av.open(io.BytesIO(c.data)) as container:
        return [frame.to_image().rotate(frame.rotation, expand=True) for frame in container.decode(video=0)]


def assert_frames_show_their_truth(c: clips.Clip, decoded) -> None:
    """Every sampled frame is the frame of its index decoded front to back, its timestamp is that frame's,
    and the shape sits where that frame has it (decoded at the displayed size)."""
    everything = every_frame(c)
    assert len(everything) == len(c.frames)
    for pixels, index, t in zip(decoded.frames, decoded.frame_indices, decoded.timestamps_s):
        truth = c.frames[index]
        assert np.array_equal(pixels, np.asarray(everything[index])), index
        assert t == pytest.approx(truth.timestamp_s, abs=1e-3)
        found = shape_box(pixels, c.color)
        assert found is not None and iou(found, truth.box) >= 0.75, (index, found, truth.box)


# ------------------------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("name", ["mp4", "webm", "mkv-unseekable", "raw-h264", "vfr", "gif", "webp"])
def test_uniform_sampling_lands_within_a_frame_of_each_segment_centre(name):
    c = clip(name)
    decoded = native(c)
    assert decoded.num_frames == 8 and decoded.frames.shape == (8, c.height, c.width, 3)
    assert (decoded.width, decoded.height) == (c.width, c.height)
    if name == "vfr":  # containers guess the last frame's duration
        assert c.frames[-1].timestamp_s < decoded.duration_s <= c.duration_s
    else:
        assert decoded.duration_s == pytest.approx(c.duration_s, abs=0.01)
    starts = [f.timestamp_s for f in c.frames] + [decoded.duration_s]
    for i, (index, t) in enumerate(zip(decoded.frame_indices, decoded.timestamps_s)):
        centre = (i + 0.5) * decoded.duration_s / 8
        assert starts[index] - 1e-3 <= centre < starts[index + 1] + 1e-3, (i, index, centre)  # the frame shown then
    assert decoded.frame_indices == sorted(set(decoded.frame_indices))
    assert_frames_show_their_truth(c, decoded)


def test_fps_sampling_takes_a_frame_every_interval_up_to_max_frames():
    c = clip("mp4")
    decoded = native(c, VideoSampling(fps=5))
    assert decoded.timestamps_s == pytest.approx([k / 5 for k in range(10)], abs=1 / 24)  # 2 s at 5 fps
    assert_frames_show_their_truth(c, decoded)
    assert native(c, VideoSampling(fps=5, max_frames=4)).timestamps_s == decoded.timestamps_s[:4]


def test_start_and_end_bound_the_sampled_window():
    c = clip("webm")
    decoded = native(c, VideoSampling(frames=4, start_s=0.5, end_s=1.0))
    assert decoded.num_frames == 4
    assert all(0.5 - 1 / 24 < t < 1.0 for t in decoded.timestamps_s), decoded.timestamps_s
    assert_frames_show_their_truth(c, decoded)
    with pytest.raises(VideoDecodeError) as err:
        native(c, VideoSampling(start_s=5.0))
    assert err.value.kind == "no_frames"


def test_a_video_shorter_than_the_frame_count_repeats_its_last_frame():
    c = clip("short")  # 6 frames
    decoded = native(c)
    assert decoded.frame_indices == [0, 1, 2, 3, 4, 5, 5, 5]
    assert decoded.timestamps_s[5:] == [decoded.timestamps_s[5]] * 3
    assert np.array_equal(decoded.frames[7], decoded.frames[5])
    assert not np.array_equal(decoded.frames[4], decoded.frames[5])
    assert_frames_show_their_truth(c, decoded)


@pytest.mark.parametrize("fmt", ["gif", "webp"])
def test_a_one_frame_animation_is_a_one_frame_clip_repeated(fmt):
    c = clips.animated_clip(10, count=1, fmt=fmt)
    decoded = native(c)
    assert decoded.frame_indices == [0] * 8 and decoded.timestamps_s == [0.0] * 8
    assert all(np.array_equal(f, decoded.frames[0]) for f in decoded.frames)
    assert_frames_show_their_truth(c, decoded)


def test_sample_indices_on_a_plain_timeline():
    times = [i / 24 for i in range(48)]
    assert sample_indices(times, 2.0, VideoSampling(frames=8)) == [3, 9, 15, 21, 27, 33, 39, 45]
    assert sample_indices(times, 2.0, VideoSampling(frames=48)) == list(range(48))
    assert sample_indices(times[:3], 0.125, VideoSampling(frames=5)) == [0, 1, 2, 2, 2]
    assert sample_indices(times, 2.0, VideoSampling(fps=2)) == [0, 12, 24, 36]
    assert sample_indices(times, 2.0, VideoSampling(fps=2, start_s=0.5, end_s=1.5)) == [12, 24]


@pytest.mark.parametrize("fields", [{"frames": 0}, {"fps": 0}, {"max_frames": 0}, {"start_s": -1},
                                    {"start_s": 2, "end_s": 1}])
def test_invalid_sampling_is_refused(fields):
    with pytest.raises(ValueError):
        VideoSampling(**fields)


# ------------------------------------------------------------------------------------- orientation, size


@pytest.mark.parametrize("rotate", [90, 180, 270])
def test_rotation_side_data_gives_the_displayed_orientation(rotate):
    c = clips.moving_shape_clip(11, width=240, height=320, seconds=0.5, rotate=rotate, marker=True)
    with av.open(io.BytesIO(c.data)) as container:  # stored turned, with a display matrix saying so
        stream = container.streams.video[0]
        stored = (stream.codec_context.width, stream.codec_context.height)
        assert next(container.decode(stream)).rotation % 360 == rotate
    assert stored == ((320, 240) if rotate != 180 else (240, 320))
    decoded = native(c, VideoSampling(frames=4))
    assert (decoded.width, decoded.height) == (240, 320)
    for pixels in decoded.frames:
        m = c.marker_box[2]
        h = m // 2
        corners = [pixels[:h, :h], pixels[:h, -h:], pixels[-h:, :h], pixels[-h:, -h:]]
        assert corners[0].mean() < 40 and min(corner.mean() for corner in corners[1:]) > 100
    assert_frames_show_their_truth(c, decoded)


def test_max_pixels_refuses_large_frames_before_decoding():
    c = clip("mp4")
    assert native(c, max_pixels=c.width * c.height).num_frames == 8
    for data in (c.data, clip("gif").data):
        with pytest.raises(VideoDecodeError) as err:
            decode_clip(data, VideoSampling(), (32, 32), max_pixels=1000)
        assert err.value.kind == "too_large" and "1000" in str(err.value)


# --------------------------------------------------------------------------------------------- bad files


BAD = {
    "empty": (lambda: b"", "empty"),
    "not-a-video": (lambda: b"hello, world\n" * 50, "bad_video"),
    "truncated-mp4": (lambda: clips.truncated(clip("mp4").data), "bad_video"),
    "truncated-faststart-mp4": (lambda: clips.truncated(clips.moving_shape_clip(12, faststart=True).data), "bad_video"),
    "truncated-webm": (lambda: clips.truncated(clip("webm").data), "bad_video"),
    "truncated-gif": (lambda: clips.truncated(clip("gif").data, 0.01), "bad_video"),
    "audio-only": (lambda: clips.audio_only_m4a(), "no_video_stream"),
    "zero-decodable-frames": (lambda: clips.corrupt_payload_mp4(), "no_frames"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_files_raise_their_kind(name):
    make, kind = BAD[name]
    with pytest.raises(VideoDecodeError) as err:
        decode_clip(make(), VideoSampling(), (32, 32))
    assert err.value.kind == kind
    assert str(err.value).startswith(f"{kind}: ") and len(str(err.value)) > len(kind) + 5


# ------------------------------------------------------------------------------------ seeking, identity


def test_seeking_decodes_fewer_frames_and_gives_the_same_frames_as_full_decoding():
    c = clip("long")  # 96 frames, a keyframe every 12
    everything = every_frame(c)
    assert len(everything) == 96
    decoded = decode_clip(c.data, VideoSampling(frames=4), (48, 64), Image.Resampling.BICUBIC)
    assert decoded.decoded_frames <= 4 * 12 and decoded.decoded_frames < len(everything) / 2, decoded.decoded_frames
    for pixels, index in zip(decoded.frames, decoded.frame_indices):
        assert np.array_equal(pixels, to_model_input(everything[index], (48, 64), Image.Resampling.BICUBIC))


@pytest.mark.parametrize("name", ["mp4", "webm", "gif"])
def test_frames_are_prepared_as_images_are(name):
    """A sampled frame equals decode_image on the same frame saved as PNG, at a distorting model size."""
    c = clip(name)
    everything = every_frame(c)
    decoded = decode_clip(c.data, VideoSampling(frames=3), (56, 40), Image.Resampling.BICUBIC)
    for pixels, index in zip(decoded.frames, decoded.frame_indices):
        png = io.BytesIO()
        everything[index].save(png, "PNG")
        assert np.array_equal(pixels, decode_image(png.getvalue(), (56, 40), Image.Resampling.BICUBIC).pixels)


def test_importing_the_module_does_not_import_av():
    import subprocess
    import sys

    code = "import paligemma_batch.video, sys; print('av' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", out.stderr
