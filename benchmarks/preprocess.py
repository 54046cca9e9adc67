"""Decode + resize throughput per core on multi-megapixel JPEGs: ``images.decode_image`` against naive PIL.

Naive PIL is what the model card does before the processor: ``Image.open``, ``convert("RGB")``, then a bicubic
``resize`` to the model's input. ``decode_image`` lets the JPEG decoder scale by 1/2, 1/4 or 1/8 (draft mode)
while keeping at least twice the target size, then resizes. Both run here in one process and one thread,
interleaved image by image. The pixel difference to the naive result is reported against a stated tolerance.

Then the job's whole CPU side per core on the GPU check's input (640x480 JPEGs in tars, a 224 px model, a
caption prompt): the real ``read_shards`` and ``preprocess`` stages in this process, and the cores that
feeding a GPU at 300 images/s takes at that rate.

    .venv/bin/python benchmarks/preprocess.py [--images 12] [--size 224] [--repeats 3] [--feed-images 1024]
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

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


def cpu_stage_per_core(workdir: Path, images: int, target_ips: float = 300.0) -> dict:
    """Images/s of ``read_shards`` + ``preprocess`` on one core over 640x480 JPEG tars, and the cores for
    ``target_ips`` (Ray's scheduling and the write tasks come on top)."""
    import pyarrow as pa

    from gpu.support import write_jpeg_shards
    from paligemma_batch.config import parse_config
    from paligemma_batch.distributed.stages import PreprocessPlan, preprocess, read_shards
    from paligemma_batch.prompts import PromptEncoder

    shards = sorted((workdir / f"jpegs-{images}").glob("*.tar")) or write_jpeg_shards(
        workdir / f"jpegs-{images}", images, shards=max(1, images // 128))
    model = c.tiny_model(workdir, image_size=224)
    config = parse_config({"input": {"uri": [str(s) for s in shards]}, "tasks": [{"task": "caption"}],
                           "model": {"source": str(model)}, "output": {"uri": str(workdir / "unused")}})
    plan = PreprocessPlan.create(config, PromptEncoder.from_folder(model))
    done, t0 = 0, time.perf_counter()
    for shard in shards:
        for block in read_shards(pa.table({"shard_uri": [str(shard)]}), config.input, []):
            done += sum(preprocess(block.slice(k, 32), plan).num_rows for k in range(0, block.num_rows, 32))
    ips = done / (time.perf_counter() - t0)
    return {"feed_images": done, "feed_ips_per_core": round(ips, 1), "cores_for_300_ips": round(target_ips / ips, 1)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=12, help="JPEGs, cycling through 2, 5, 8 and 12 MP")
    parser.add_argument("--size", type=int, default=224, help="model input side")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes over all images")
    parser.add_argument("--feed-images", type=int, default=1024, help="640x480 JPEGs for the CPU-stage rate")
    parser.add_argument("--workdir", type=Path, default=Path("out/benchmarks/preprocess"))
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
    args.workdir.mkdir(parents=True, exist_ok=True)
    feed = cpu_stage_per_core(args.workdir, args.feed_images)
    print(f"the CPU stage (read_shards + preprocess) on 640x480 JPEG tars at 224 px: {feed['feed_ips_per_core']} "
          f"images/s on one core; 300 images/s takes {feed['cores_for_300_ips']} cores")
    result.update(feed)
    c.final_json(result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
