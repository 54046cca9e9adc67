"""Video bytes → a few sampled RGB frames at the model's resolution.

How a clip is read:

- **Timeline first, without decoding.** One pass over the video stream's packets (demuxing only) gives every
  frame's presentation time and which frames are keyframes. Container metadata (duration, frame count, frame
  rate) is never trusted, so variable frame rate and files without a duration need no special case. A stream
  without timestamps (a raw H.264 file) is timed by its frame rate and decoded front to back.
- **Sampling** picks the frame *shown* at each sampling time (the last frame whose time is at or before it):
  ``frames=N`` samples the centres of N equal segments of the window; ``fps=r`` samples every 1/r seconds from
  the window's start, at most ``max_frames``. With ``frames=N``, a window holding fewer than N frames gives
  all of them, then its last frame repeated (big_vision's ``video_replicate_img``). Times are seconds from the
  first frame.
- **Seek, then decode forward.** For each sampled frame the decoder seeks to the keyframe at or before it and
  decodes up to it, skipping the frames no other frame refers to (``skip_frame=NONREF``, B-frames mostly); it
  seeks only when a keyframe lies between where it is and the target, so nearby samples share one run. Only
  the sampled frames are kept, already at model size.
- **Prepared like images.** Each frame is turned upright by the display matrix (rotation side data, multiples
  of 90°), then goes through :func:`paligemma_batch.images.to_model_input`, exactly as a decoded image does.
- **Animated GIF and WebP** are clips too, decoded with Pillow (FFmpeg's bundled build cannot decode animated
  WebP); a frame with no duration lasts 100 ms, as browsers show it.

Decoding uses one thread per clip: CPU workers run one clip per core. PyAV is imported only when decoding.
Knows nothing of Ray or models.
"""

from __future__ import annotations

import bisect
import io
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from paligemma_batch.images import to_model_input

VIDEO_EXTS = ("mp4", "webm", "mkv", "mov", "avi", "m4v")
ANIMATED_IMAGE_EXTS = ("gif", "webp")  # decoded as clips when the input's media is video
CLIP_EXTS = VIDEO_EXTS + ANIMATED_IMAGE_EXTS

UNTIMED_FRAME_S = 0.1  # an animation frame without a duration, as browsers show it
DEFAULT_RATE = 25.0  # frames per second of a stream that states none (FFmpeg's default for raw streams)
TIME_TOLERANCE_S = 1e-3  # times this close count as equal: Matroska and WebM store milliseconds
# Frames ending this much before the container's stated duration mean a truncated file.
TRUNCATED_SHARE, TRUNCATED_MIN_S = 0.05, 0.25


class VideoDecodeError(ValueError):
    """A video that cannot become model input; ``kind`` is a short machine-readable reason:
    ``empty``, ``bad_video``, ``no_video_stream``, ``no_frames`` or ``too_large``."""

    def __init__(self, kind: str, message: str):
        super().__init__(f"{kind}: {message}")
        self.kind = kind


@dataclass(frozen=True)
class VideoSampling:
    """Which frames of a clip become model input (see the module docstring)."""

    frames: int = 8  # frames spread uniformly over the window; used when fps is None
    fps: float | None = None  # sample every 1/fps seconds instead, at most max_frames
    max_frames: int = 16
    start_s: float = 0.0
    end_s: float | None = None  # None: the end of the video

    def __post_init__(self):
        if self.frames < 1 or self.max_frames < 1:
            raise ValueError(f"frames ({self.frames}) and max_frames ({self.max_frames}) must be at least 1")
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"fps must be positive, got {self.fps}")
        if self.start_s < 0 or (self.end_s is not None and self.end_s <= self.start_s):
            raise ValueError(f"need 0 <= start_s < end_s, got start_s={self.start_s}, end_s={self.end_s}")


@dataclass(frozen=True)
class DecodedClip:
    frames: np.ndarray  # uint8 [num_frames, height, width, 3] at the model resolution, in time order
    width: int  # the video's displayed width (after rotation)
    height: int  # the video's displayed height (after rotation)
    frame_indices: list[int]  # each sampled frame's index in presentation order (repeats when padded)
    timestamps_s: list[float]  # each sampled frame's presentation time, seconds from the first frame
    duration_s: float  # from the first frame's start to the last frame's end
    decoded_frames: int  # frames the decoder produced to get these: the work done

    @property
    def num_frames(self) -> int:
        return len(self.frame_indices)


@dataclass(frozen=True)
class _Timeline:
    times_s: list[float]  # presentation time of every frame, ascending, from the first frame
    pts: list[int] | None  # every frame's stream timestamp, ascending; None: the stream has none
    keyframes: list[int]  # indices of the frames a decoder can start from, ascending
    duration_s: float

    def frame_at(self, t: float) -> int:
        """The frame shown at ``t``: the last one starting at or before it (within :data:`TIME_TOLERANCE_S`)."""
        return max(bisect.bisect_right(self.times_s, t + TIME_TOLERANCE_S) - 1, 0)

    def keyframe_before(self, index: int) -> int:
        return self.keyframes[max(bisect.bisect_right(self.keyframes, index) - 1, 0)]


def sample_indices(times_s: list[float], duration_s: float, sampling: VideoSampling) -> list[int]:
    """Indices of the sampled frames, given every frame's time (ascending, first at 0) and the duration."""
    timeline = _Timeline(times_s, None, [0], duration_s)
    start = sampling.start_s
    end = duration_s if sampling.end_s is None else min(sampling.end_s, duration_s)
    if start >= end:
        raise VideoDecodeError("no_frames", f"sampling window starts at {start} s, the video lasts {duration_s:.3f} s")
    if sampling.fps is not None:
        count = min(sampling.max_frames, int(np.ceil((end - start) * sampling.fps - 1e-9)))
        return [timeline.frame_at(start + k / sampling.fps) for k in range(max(count, 1))]
    first = timeline.frame_at(start)
    last = max(bisect.bisect_left(times_s, end - TIME_TOLERANCE_S) - 1, first)
    if last - first + 1 <= sampling.frames:
        return list(range(first, last + 1)) + [last] * (sampling.frames - (last - first + 1))
    step = (end - start) / sampling.frames
    return [timeline.frame_at(start + (i + 0.5) * step) for i in range(sampling.frames)]


def _av():
    try:
        import av
    except ImportError:
        raise ImportError("decoding videos needs PyAV: pip install 'paligemma-batch[video]'") from None
    return av


def _is_animated_image(data: bytes) -> bool:
    return data[:6] in (b"GIF87a", b"GIF89a") or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def _check_size(width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise VideoDecodeError("too_large", f"{width}x{height} frames exceed {max_pixels} pixels")


def _upright(frame) -> Image.Image:
    """A PyAV frame as displayed: the display matrix's counterclockwise rotation applied."""
    rgb = frame.to_ndarray(format="rgb24")
    quarter_turns = round(frame.rotation / 90) % 4
    return Image.fromarray(np.ascontiguousarray(np.rot90(rgb, quarter_turns)) if quarter_turns else rgb)


class _Prepared:
    """Sampled frames at model size, keyed by target index, and the displayed size of the first one."""

    def __init__(self, size: tuple[int, int], resample: int):
        self.size, self.resample = size, resample
        self.frames: dict[int, tuple[int, np.ndarray]] = {}
        self.display_size: tuple[int, int] | None = None

    def add(self, target: int, index: int, img: Image.Image) -> None:
        self.display_size = self.display_size or img.size
        self.frames[target] = (index, to_model_input(img, self.size, self.resample))

    def clip(self, indices: list[int], timeline: _Timeline, decoded: int) -> DecodedClip:
        """The clip in sampling order; a target the decoder never reached takes the nearest earlier frame."""
        targets = sorted(self.frames)
        pixels, frame_indices = [], []
        for wanted in indices:
            index, frame = self.frames[targets[max(bisect.bisect_right(targets, wanted) - 1, 0)]]
            pixels.append(frame)
            frame_indices.append(index)
        width, height = self.display_size
        return DecodedClip(np.stack(pixels), width, height, frame_indices,
                           [timeline.times_s[i] for i in frame_indices], timeline.duration_s, decoded)


# ------------------------------------------------------------------------------------------------ PyAV


def _scan(container, stream) -> _Timeline:
    """Every frame's time and the keyframes, from the packets alone."""
    packets = [(p.pts, p.is_keyframe, p.duration) for p in container.demux(stream) if p.size]
    if not packets:
        raise VideoDecodeError("no_frames", "the video stream holds no packets")
    rate = float(stream.guessed_rate or stream.average_rate or DEFAULT_RATE)
    if any(pts is None for pts, _, _ in packets):
        return _Timeline([i / rate for i in range(len(packets))], None, [0], len(packets) / rate)
    by_pts = {pts: (key, duration) for pts, key, duration in packets}
    pts = sorted(by_pts)
    time_base = float(stream.time_base)
    times = [(p - pts[0]) * time_base for p in pts]
    last_duration = by_pts[pts[-1]][1] * time_base or (times[-1] / (len(times) - 1) if len(times) > 1 else 1 / rate)
    keyframes = [i for i, p in enumerate(pts) if by_pts[p][0]] or [0]
    return _Timeline(times, pts, keyframes, times[-1] + last_duration)


class _Decoder:
    """Decodes the video stream of ``data`` forward from a keyframe, counting frames and skipping packets that
    fail to decode. Frames nothing refers to are not decoded unless wanted. Where seeking is impossible (raw
    streams), it reopens the file and starts at its start."""

    def __init__(self, data: bytes, container, timeline: _Timeline, max_pixels: int, wanted: list[int]):
        self.data, self.container, self.timeline, self.max_pixels = data, container, timeline, max_pixels
        self.stream = container.streams.video[0]
        self.wanted_pts = None if timeline.pts is None else {timeline.pts[i] for i in wanted}
        self.decoded = 0
        self.failed_packets = 0

    def _reopen(self) -> None:
        self.container.close()
        self.container = _av().open(io.BytesIO(self.data), mode="r")
        self.stream = self.container.streams.video[0]
        self.stream.codec_context.thread_count = 1

    def close(self) -> None:
        self.container.close()

    def _seek(self, pts: int) -> bool:
        """Seek to the keyframe at or before ``pts``; False where the file cannot seek."""
        try:
            self.container.seek(pts, stream=self.stream, backward=True)
        except _av().FFmpegError:
            return False
        return True

    def run(self, keyframe: int) -> Iterator[tuple[int, object]]:
        """(frame index, frame) from frame ``keyframe`` on, in presentation order; without timestamps the
        stream is decoded from its start and frames are counted."""
        av = _av()
        pts = self.timeline.pts
        if pts is None or not self._seek(pts[keyframe]):
            self._reopen()
        counter = 0
        context = self.stream.codec_context
        for packet in self.container.demux(self.stream):
            if self.wanted_pts is not None and packet.pts is not None:
                context.skip_frame = "DEFAULT" if packet.pts in self.wanted_pts else "NONREF"
            try:
                frames = self.stream.decode(packet)
            except av.error.InvalidDataError:
                self.failed_packets += 1
                continue
            for frame in frames:
                _check_size(frame.width, frame.height, self.max_pixels)
                self.decoded += 1
                if pts is None:
                    index, counter = counter, counter + 1
                elif frame.pts is None:
                    continue
                else:
                    index = max(bisect.bisect_right(pts, frame.pts) - 1, 0)
                yield index, frame


def _fetch(decoder: _Decoder, wanted: list[int], prepared: _Prepared) -> None:
    """Prepare each wanted frame: the frame itself, or the nearest earlier one when the decoder skipped it or
    the stream ended first. Seeks only when a keyframe lies between the decoder's position and the target."""
    timeline = decoder.timeline
    run, position = None, -1
    for target in sorted(set(wanted)):
        key = timeline.keyframe_before(target) if timeline.pts is not None else 0
        if run is None or key > position:
            run, position = decoder.run(key), -1
        previous = None
        for index, frame in run:
            position = index
            if index >= target:
                index, frame = (index, frame) if index == target or previous is None else previous
                prepared.add(target, index, _upright(frame))
                break
            previous = (index, frame)
        else:  # the stream ended before the target; later targets would end the same way
            if previous is not None:
                prepared.add(target, previous[0], _upright(previous[1]))
            return


def _declared_duration_s(container, stream) -> float | None:
    """The video's duration as its container states it: the stream's, Matroska's per-track tag, or the
    file's when the video is its only stream."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    tag = stream.metadata.get("DURATION", "")  # HH:MM:SS.fffffffff
    if tag.count(":") == 2:
        hours, minutes, seconds = tag.split(":")
        return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    if container.duration and len(container.streams) == 1:
        return container.duration / 1_000_000
    return None


def _check_complete(timeline: _Timeline, declared_s: float | None) -> None:
    """A file whose packets end well before its stated duration was cut short."""
    if declared_s is not None and declared_s - timeline.duration_s > max(TRUNCATED_MIN_S, TRUNCATED_SHARE * declared_s):
        raise VideoDecodeError("bad_video", f"truncated: the container states {declared_s:.3f} s, "
                                            f"its frames end at {timeline.duration_s:.3f} s")


def _decode_av(data: bytes, sampling: VideoSampling, size: tuple[int, int], resample: int, max_pixels: int,
               ) -> DecodedClip:
    av = _av()
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except av.FFmpegError as err:
        raise VideoDecodeError("bad_video", f"cannot open: {err}") from None
    if not container.streams.video:
        streams = ", ".join(s.type for s in container.streams) or "none"
        found = f"{container.format.name} file without video (streams: {streams})"
        container.close()
        raise VideoDecodeError("no_video_stream", found)
    decoder = None
    try:
        stream = container.streams.video[0]
        _check_size(stream.codec_context.width, stream.codec_context.height, max_pixels)
        stream.codec_context.thread_count = 1
        timeline = _scan(container, stream)
        _check_complete(timeline, _declared_duration_s(container, stream))
        indices = sample_indices(timeline.times_s, timeline.duration_s, sampling)
        decoder = _Decoder(data, container, timeline, max_pixels, indices)
        prepared = _Prepared(size, resample)
        _fetch(decoder, indices, prepared)
    finally:
        (decoder or container).close()
    if not prepared.frames:
        raise VideoDecodeError("no_frames", f"none of {len(timeline.times_s)} frames decoded "
                                            f"({decoder.failed_packets} packets failed)")
    return prepared.clip(indices, timeline, decoder.decoded)


# ------------------------------------------------------------------------------------------------ Pillow


def _decode_animation(data: bytes, sampling: VideoSampling, size: tuple[int, int], resample: int,
                      max_pixels: int) -> DecodedClip:
    img = Image.open(io.BytesIO(data), formats=("GIF", "WEBP"))
    _check_size(img.width, img.height, max_pixels)
    durations = []
    for k in range(getattr(img, "n_frames", 1)):
        img.seek(k)
        durations.append((img.info.get("duration") or 0) / 1000 or UNTIMED_FRAME_S)
    timeline = _Timeline(np.concatenate([[0.0], np.cumsum(durations)[:-1]]).tolist(), None, [0], float(sum(durations)))
    indices = sample_indices(timeline.times_s, timeline.duration_s, sampling)
    prepared = _Prepared(size, resample)
    for index in sorted(set(indices)):
        img.seek(index)
        img.load()
        prepared.add(index, index, img)
    return prepared.clip(indices, timeline, len(prepared.frames))


# ------------------------------------------------------------------------------------------------ entry


def decode_clip(data: bytes | None, sampling: VideoSampling, size: tuple[int, int],
                resample: int = Image.Resampling.BICUBIC, max_pixels: int = 89_478_485) -> DecodedClip:
    """Decode the sampled frames of ``data`` and resize each to ``size`` = (height, width).

    Raises :class:`VideoDecodeError` on bad input; ``max_pixels`` caps the decoded frame size and is checked on
    the stream header before decoding, and on every decoded frame.
    """
    if not data:
        raise VideoDecodeError("empty", "zero-byte video")
    decode = _decode_animation if _is_animated_image(data) else _decode_av
    try:
        return decode(data, sampling, size, resample, max_pixels)
    except VideoDecodeError:
        raise
    except Exception as err:  # FFmpeg and Pillow raise many types for corrupt data; all mean "cannot decode"
        raise VideoDecodeError("bad_video", f"{type(err).__name__}: {err}") from None
