"""Each engine speedup measured against the way without it, on the same images, in one run.

1. Vision tower once per image, shared by the image's prompts (``Engine.generate``), against once per
   (image, prompt) row, which is what ``generate(pixel_values=...)`` on processor output does.
2. Prompt-length bucketing: one left-padded batch against one ``generate`` per bucket of similar lengths.
3. Batch size: engine images/s per number of images per ``generate`` call (the guidance).
5. Task sub-batches: each task of a batch in its own ``generate`` call with its own limit (``tasks.max_new_tokens``),
   against every task in one call up to the cap, on the shipped fixture, which ends its outputs like a real model.
4. Overlap of CPU decode with inference in the Ray job: actors at ``num_cpus`` equal to the preprocess tasks'
   (Ray fuses read → preprocess → inference into the actor, so decode and inference take turns) against
   actors at a different ``num_cpus`` (no fusion: decode runs in separate tasks while the actor infers).

A/B pairs run interleaved, ``--repeats`` times, and report the median.

    .venv/bin/python benchmarks/speedups.py [--images 128] [--model PATH] [--skip-job]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import _common as c

LONG_QUESTION = {"task": "answer", "lang": "en",
                 "question": "which of the coloured shapes in this picture is closest to the top left corner of it?"}


def interleaved(repeats: int, ways: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Median seconds of each way, run A, B, A, B, ... after one untimed warm-up each."""
    for fn in ways.values():
        fn()
    seconds: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(repeats):
        for name, fn in ways.items():
            t0 = time.perf_counter()
            fn()
            seconds[name].append(time.perf_counter() - t0)
    return {name: statistics.median(s) for name, s in seconds.items()}


def vision_once(engine, w: c.Workload, processor, pixels, repeats: int, batch: int) -> list[list]:
    """Engine.generate (vision once per image) against vision once per row."""
    from paligemma_batch.engines.transformers_engine import Request

    batches = [pixels[s:s + batch] for s in range(0, len(pixels) - batch + 1, batch)]
    requests = c.requests_for(w, processor, batch, grouped=False)
    per_row = [Request(row, r.input_ids) for row, r in enumerate(requests)]

    def shared():
        for px in batches:
            engine.generate(px, requests)

    def each_row():
        for px in batches:
            engine.generate_from_features(engine.image_features([px[r.image_index] for r in requests]), per_row)

    s = interleaved(repeats, {"once": shared, "per row": each_row})
    images = len(batches) * batch
    return [["vision tower once per image", images / s["once"]],
            ["vision tower once per (image, prompt)", images / s["per row"]],
            ["gain", s["per row"] / s["once"]]]


def bucketing(engine, w: c.Workload, processor, pixels, repeats: int, batch: int) -> list[list]:
    """One padded batch against one generate per prompt length, vision features shared by both."""
    batches = [pixels[s:s + batch] for s in range(0, len(pixels) - batch + 1, batch)]
    requests = c.requests_for(w, processor, batch, grouped=False)
    lengths = sorted({len(r.input_ids) for r in requests})
    buckets = [[r for r in requests if len(r.input_ids) == n] for n in lengths]

    def padded():
        for px in batches:
            engine.generate_from_features(engine.image_features(px), requests)

    def bucketed():
        for px in batches:
            features = engine.image_features(px)
            for bucket in buckets:
                engine.generate_from_features(features, bucket)

    s = interleaved(repeats, {"padded": padded, "bucketed": bucketed})
    total = sum(len(r.input_ids) for r in requests)
    padding = len(requests) * lengths[-1] - total
    images = len(batches) * batch
    return [[f"one batch, {padding / (len(requests) * lengths[-1]):.0%} of prompt tokens are padding",
             images / s["padded"]],
            [f"{len(buckets)} buckets by prompt length {lengths}", images / s["bucketed"]],
            ["gain", s["padded"] / s["bucketed"]]]


def task_groups(shards: list[Path], images: int, repeats: int, batch: int) -> list[list]:
    """The shipped fixture (it stops at end-of-sequence like a real checkpoint) on the demo's four tasks: each task
    in its own sub-batch with its own limit, against all four in one batch up to the cap."""
    from paligemma_batch.engines.transformers_engine import TransformersEngine
    from paligemma_batch.fixtures.demo import SHAPES_MODEL

    objects = ["circle", "square", "triangle"]
    w = c.Workload(model_dir=SHAPES_MODEL, shards=shards, images=images, max_new_tokens=80, tasks=[
        c.TASK_PRESETS["caption"], {"task": "answer", "question": "what color is the circle?"},
        {"task": "detect", "objects": objects}, {"task": "segment", "objects": objects}])
    processor, model = c.load(w)
    engine = TransformersEngine(model, processor, w.max_new_tokens)
    pixels = c.decoded(w, processor, images)
    batches = [pixels[s:s + batch] for s in range(0, len(pixels) - batch + 1, batch)]
    ways = {"grouped": c.requests_for(w, processor, batch), "one batch": c.requests_for(w, processor, batch, False)}
    outputs: dict[str, list] = {}

    def run(name: str):
        outputs[name] = [g.token_ids for px in batches for g in engine.generate(px, ways[name])]

    s = interleaved(repeats, {name: (lambda name=name: run(name)) for name in ways})
    if outputs["grouped"] != outputs["one batch"]:
        raise SystemExit("task sub-batches changed the generated tokens")
    done = len(batches) * batch
    limits = sorted({r.max_new_tokens for r in ways["grouped"]})
    return [[f"one batch of every task, up to {w.max_new_tokens} new tokens", done / s["one batch"]],
            [f"one sub-batch per task, limits {limits}", done / s["grouped"]],
            ["gain (same tokens)", s["one batch"] / s["grouped"]]]


def overlap(w: c.Workload, workdir: Path) -> list[list]:
    """The job with decode fused into the actor against decode in separate, overlapping tasks."""
    c.start_ray()
    rows = []
    for label, actor_cpus in [("fused: actor num_cpus 0.5 = preprocess's", 0.5),
                              ("apart: actor num_cpus 1.0, preprocess 0.5", 1.0)]:
        config = c.job_config(w, tempfile.mkdtemp(prefix="job-", dir=workdir), actor_cpus=actor_cpus)
        timing = c.job(config)
        rows.append([label, timing.seconds, timing.ips])
    rows.append(["gain", rows[0][1] / rows[1][1], None])
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128, help="images for the engine measurements")
    parser.add_argument("--job-images", type=int, default=512, help="images for the overlap measurement")
    parser.add_argument("--model", type=Path)
    parser.add_argument("--tasks", default="caption,detect", help="prompts sharing each image")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16, help="images per generate call in 1 and 2")
    parser.add_argument("--sweep", default="1,4,8,16,32,64", help="images per generate call in 3")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the actor's default)")
    parser.add_argument("--skip-job", action="store_true", help="leave out 4 (it starts Ray)")
    parser.add_argument("--workdir", type=Path, default=Path("out/benchmarks/speedups"),
                        help="the model, inputs (reused) and outputs")
    args = parser.parse_args(argv)

    import torch

    from paligemma_batch.engines.transformers_engine import TransformersEngine

    torch.set_num_threads(args.threads)
    workdir = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = args.model or c.tiny_model(workdir)
    shards = c.parallel_scene_shards(workdir / f"scenes-{max(args.images, args.job_images)}",
                                     max(args.images, args.job_images))
    w = c.Workload(model_dir=model_dir, shards=shards, images=args.images, tasks=c.parse_tasks(args.tasks),
                   max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    processor, model = c.load(w)
    engine = TransformersEngine(model, processor, w.max_new_tokens)
    pixels = c.decoded(w, processor, args.images)
    print(f"model {model_dir}, {args.images} images, prompts {w.prompts}, max_new_tokens {w.max_new_tokens}, "
          f"torch threads {args.threads}; machine {c.machine()}")
    result: dict = {}

    rows = vision_once(engine, w, processor, pixels, args.repeats, args.batch_size)
    print("\n1. vision tower\n" + c.table(["way", "images/s"], rows))
    result["vision_once_gain"] = round(rows[-1][1], 3)

    mixed = c.Workload(**{**w.__dict__, "tasks": [c.TASK_PRESETS["caption"], LONG_QUESTION]})
    rows = bucketing(engine, mixed, processor, pixels, args.repeats, args.batch_size)
    print(f"\n2. prompt-length bucketing (prompts {mixed.prompts})\n" + c.table(["way", "images/s"], rows))
    result["bucketing_gain"] = round(rows[-1][1], 3)

    sweep = c.engine_sweep(engine, w, pixels, [int(b) for b in args.sweep.split(",")], processor)
    print("\n3. batch size (engine only, decode excluded)\n"
          + c.table(["images/call", "rows/call", "images", "seconds", "images/s"], sweep))
    result["sweep"] = {row[0]: round(row[4], 2) for row in sweep}

    rows = task_groups(shards, args.images, args.repeats, args.batch_size)
    print("\n5. task sub-batches (shipped fixture: caption, answer, detect and segment 3 objects)\n"
          + c.table(["way", "images/s"], rows))
    result["task_groups_gain"] = round(rows[-1][1], 3)

    if not args.skip_job:
        job_w = c.Workload(**{**w.__dict__, "images": args.job_images, "batch_size": 32})
        job_w = c.Workload(**{**job_w.__dict__, "images": c.count_images(job_w.shards)})
        rows = overlap(job_w, workdir)
        print(f"\n4. overlap of decode and inference in the job ({job_w.images} images, 2 CPUs, 1 actor)\n"
              + c.table(["way", "seconds", "images/s"], [[x if x is not None else "-" for x in r] for r in rows]))
        result["overlap_gain"] = round(rows[-1][1], 3)
    print(f"\nmachine after: {c.machine()}")
    c.final_json(result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
