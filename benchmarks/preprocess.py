"""Decode + resize throughput per core on multi-megapixel JPEGs: ``images.decode_image`` against naive PIL.

Naive PIL is what the model card does before the processor: ``Image.open``, ``convert("RGB")``, then a bicubic
``resize`` to the model's input. ``decode_image`` lets the JPEG decoder scale by 1/2, 1/4 or 1/8 (draft mode)
while keeping at least twice the target size, then resizes. Both run here in one process and one thread,
interleaved image by image. The pixel difference to the naive result is reported against a stated tolerance.

    .venv/bin/python benchmarks/preprocess.py [--images 12] [--size 224] [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import sys
import time

import numpy as np
from PIL import Image

import _common as c
from paligemma_batch.images import decode_image

# Megapixel sizes of common cameras and phones: 2, 5, 8 and 12 MP.
SIZES = [(1632, 1224), (2592, 1944), (3264, 2448), (4000, 3000)]
# The stated tolerance of the draft path against naive PIL, in 8-bit levels.
MEAN_TOLERANCE = 1.0
P99_TOLERANCE = 4.0


def photo_like_jpeg(width: int, height: int, seed: int, quality: int = 90) -> bytes:
    """A JPEG with smooth regions, sharp edges and sensor-like noise (so decode cost is realistic)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (9, 12, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), np.int16)
    y, x = np.ogrid[:height, :width]
    for _ in range(6):  # a few hard-edged discs
        cy, cx, r = rng.integers(0, height), rng.integers(0, width), rng.integers(height // 20, height // 5)
        base[(y - cy) ** 2 + (x - cx) ** 2 < r * r] = rng.integers(0, 256, 3)
    noisy = base + rng.normal(0, 4, (height, width, 1)).astype(np.int16)
    buf = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def naive_pil(data: bytes, size: int) -> np.ndarray:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    return np.asarray(image.resize((size, size), Image.Resampling.BICUBIC))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=12, help="JPEGs, cycling through 2, 5, 8 and 12 MP")
    parser.add_argument("--size", type=int, default=224, help="model input side")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over all images")
    args = parser.parse_args(argv)

    jpegs = [photo_like_jpeg(*SIZES[i % len(SIZES)], seed=i) for i in range(args.images)]
    megapixels = [SIZES[i % len(SIZES)][0] * SIZES[i % len(SIZES)][1] / 1e6 for i in range(args.images)]
    ways = {
        "naive PIL (open, convert, resize)": lambda d: naive_pil(d, args.size),
        "decode_image, draft off": lambda d: decode_image(d, (args.size, args.size), draft=False).pixels,
        "decode_image (JPEG draft)": lambda d: decode_image(d, (args.size, args.size), draft=True).pixels,
    }
    print(f"{args.images} JPEGs, {min(megapixels):.1f}–{max(megapixels):.1f} MP "
          f"(mean {np.mean(megapixels):.1f} MP) → {args.size}x{args.size}; machine {c.machine()}")
    seconds = {name: 0.0 for name in ways}
    for data in jpegs:  # warm-up, and the pixel comparison
        for fn in ways.values():
            fn(data)
    for _ in range(args.repeats):
        for data in jpegs:  # interleaved, so load changes hit every way alike
            for name, fn in ways.items():
                t0 = time.perf_counter()
                fn(data)
                seconds[name] += time.perf_counter() - t0
    n = args.images * args.repeats
    naive_ips = n / seconds["naive PIL (open, convert, resize)"]

    diffs = {name: np.concatenate([np.abs(fn(d).astype(np.int16) - naive_pil(d, args.size)).ravel() for d in jpegs])
             for name, fn in ways.items()}
    rows = [[name, n / s, (n / s) / naive_ips, int(diffs[name].max()), float(diffs[name].mean()),
             float(np.percentile(diffs[name], 99))] for name, s in seconds.items()]
    print(c.table(["way", "images/s/core", "vs naive", "max |diff|", "mean |diff|", "p99 |diff|"], rows))
    draft = rows[-1]
    within = draft[4] <= MEAN_TOLERANCE and draft[5] <= P99_TOLERANCE
    print(f"draft vs naive: {draft[2]:.2f}x (target >= 3x); pixel difference mean {draft[4]:.2f}, "
          f"p99 {draft[5]:.0f}, max {draft[3]} levels: {'within' if within else 'OUTSIDE'} the tolerance "
          f"(mean <= {MEAN_TOLERANCE}, p99 <= {P99_TOLERANCE})")
    result = {"naive_ips": round(naive_ips, 2), "draft_ips": round(draft[1], 2), "speedup": round(draft[2], 2),
              "max_diff": draft[3], "mean_diff": round(draft[4], 3), "p99_diff": draft[5], "within_tolerance": within,
              "images": args.images, "mean_megapixels": round(float(np.mean(megapixels)), 2)}
    c.final_json(result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
