"""Sampled video frames per second per core: ``video.decode_clip`` (seek, decode forward) against decoding every frame.

Inputs: 30 s 1280x720 H.264 clips at 30 fps with a keyframe every 2 s (``--gop``), a panning noisy background
and a moving shape, written once under ``out/benchmarks/video/``. Both ways run in this process with one decoder
thread, interleaved clip by clip, and produce the same frames at 224x224 (checked):

- seek: ``decode_clip`` with ``frames=N``: one pass over the packets, then seek + decode forward per frame;
- every frame: PyAV's ``container.decode`` over the whole clip, keeping the same N frames.

Figures are frames per CPU second of this process (one thread, so per core), which other load on the machine
barely changes; wall-clock figures are printed too.

    .venv/bin/python benchmarks/video.py [--clips 2] [--seconds 30] [--gop 60] [--frames 8,16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

import _common as c
from paligemma_batch.fixtures.scenes import COLORS, _background
from paligemma_batch.images import to_model_input
from paligemma_batch.video import VideoSampling, decode_clip

WIDTH, HEIGHT, FPS = 1280, 720, 30
PAN_PX = 3  # background motion per frame, like a slow camera pan
SIZE = (224, 224)


def panning_frames(seed: int, count: int):
    """RGB frames: a noisy background panning back and forth, a disc crossing it, cycled sensor noise."""
    rng = random.Random(seed)
    margin = PAN_PX * 120
    background = np.asarray(_background(rng, WIDTH + margin, HEIGHT), np.int16)
    noise = np.random.default_rng(seed).normal(0, 3, (6, HEIGHT, WIDTH, 1)).astype(np.int16)
    radius = HEIGHT // 6
    y, x = np.ogrid[-radius:radius, -radius:radius]
    disc = x * x + y * y < radius * radius
    color = np.asarray(COLORS[rng.choice(list(COLORS))], np.int16)
    for i in range(count):
        offset = abs((i * PAN_PX) % (2 * margin) - margin)
        frame = background[:, offset:offset + WIDTH] + noise[i % len(noise)]
        cx = radius + int((WIDTH - 2 * radius) * i / count)
        cy = HEIGHT // 2 + int(HEIGHT / 4 * np.sin(i / 20))
        patch = frame[cy - radius:cy + radius, cx - radius:cx + radius]
        patch[disc] = color
        yield np.clip(frame, 0, 255).astype(np.uint8)


def write_clip(path: Path, seed: int, seconds: float, gop: int) -> None:
    import av

    partial = path.with_suffix(".part")
    with av.open(str(partial), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.codec_context.gop_size = gop
        stream.options = {"preset": "veryfast", "crf": "23"}
        for pixels in panning_frames(seed, int(seconds * FPS)):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")))
        container.mux(stream.encode())
    partial.rename(path)


def every_frame(data: bytes, indices: list[int]) -> tuple[list[np.ndarray], int]:
    """The frames at ``indices`` (presentation order) by decoding the whole clip, and the frames decoded."""
    import av

    wanted, found, decoded = set(indices), {}, 0
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        for frame in container.decode(stream):
            if decoded in wanted:
                found[decoded] = to_model_input(frame.to_image(), SIZE, Image.Resampling.BICUBIC)
            decoded += 1
    return [found[i] for i in indices], decoded


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clips", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--gop", type=int, default=60, help="frames between keyframes (60 = 2 s)")
    parser.add_argument("--frames", default="8,16", help="frames sampled per clip, comma-separated")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over all clips")
    parser.add_argument("--out", type=Path, default=Path("out/benchmarks/video"))
    args = parser.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    paths = [args.out / f"clip-{i}-{args.seconds:g}s-gop{args.gop}.mp4" for i in range(args.clips)]
    for i, path in enumerate(paths):
        if not path.exists():
            _, wall, _ = timed(lambda: write_clip(path, i, args.seconds, args.gop))
            print(f"wrote {path} in {wall:.1f} s")
    clips = [p.read_bytes() for p in paths]
    print(f"{args.clips} clips of {args.seconds:g} s {WIDTH}x{HEIGHT} H.264 at {FPS} fps, keyframe every "
          f"{args.gop} frames, {np.mean([len(d) for d in clips]) / 1e6:.1f} MB each → {SIZE[0]}x{SIZE[1]}; "
          f"machine {c.machine()}")

    rows, results = [], {}
    for n in [int(f) for f in args.frames.split(",")]:
        sampling = VideoSampling(frames=n)
        totals = {"seek": [0.0, 0.0, 0], "every frame": [0.0, 0.0, 0]}  # wall s, cpu s, frames decoded
        for repeat in range(args.repeats + 1):  # the first pass warms up and checks equality, untimed
            for data in clips:
                clip, wall, cpu = timed(lambda: decode_clip(data, sampling, SIZE, Image.Resampling.BICUBIC))
                (frames, decoded), full_wall, full_cpu = timed(lambda: every_frame(data, clip.frame_indices))
                if repeat == 0:
                    assert all(np.array_equal(a, b) for a, b in zip(clip.frames, frames)), "frames differ"
                    continue
                for way, w, cp, d in (("seek", wall, cpu, clip.decoded_frames), ("every frame", full_wall,
                                                                                  full_cpu, decoded)):
                    totals[way][0] += w
                    totals[way][1] += cp
                    totals[way][2] += d
        sampled = n * len(clips) * args.repeats
        figures = {way: {"sampled_fps_per_core": sampled / cpu, "sampled_fps_wall": sampled / wall,
                         "decoded_per_clip": d / (len(clips) * args.repeats)}
                   for way, (wall, cpu, d) in totals.items()}
        ratio = figures["seek"]["sampled_fps_per_core"] / figures["every frame"]["sampled_fps_per_core"]
        for way, f in figures.items():
            rows.append([n, way, f["sampled_fps_per_core"], f["sampled_fps_wall"], f["decoded_per_clip"],
                         ratio if way == "seek" else 1.0])
        results[str(n)] = {"seek_fps_per_core": round(figures["seek"]["sampled_fps_per_core"], 2),
                           "every_frame_fps_per_core": round(figures["every frame"]["sampled_fps_per_core"], 2),
                           "ratio": round(ratio, 2),
                           "seek_decoded_per_clip": round(figures["seek"]["decoded_per_clip"], 1),
                           "every_frame_decoded_per_clip": round(figures["every frame"]["decoded_per_clip"], 1)}
    print(c.table(["frames", "way", "sampled frames/s/core", "frames/s wall", "decoded/clip", "vs every frame"],
                  rows))
    result = {"clips": args.clips, "seconds": args.seconds, "resolution": f"{WIDTH}x{HEIGHT}", "fps": FPS,
              "gop": args.gop, "by_frames": results}
    c.final_json(result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
