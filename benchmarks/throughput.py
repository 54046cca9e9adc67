"""Images/s of (a) the model card's per-image loop, (b) a hand-batched loop and (c) the paligemma-batch job.

One run, the same images, model, prompts and generation length for all three; then the ratios (c)/(a) and
(c)/(b) and one JSON line. Timing rules:

- (a) and (b) start with the model loaded and warmed up (one untimed call) and use the torch thread count
  that ran a probe batch fastest; (a) runs on the first ``--naive-images`` images (its per-image rate is flat).
- (c) is timed around ``pipeline.run``: validation, actor start, model load, reading, writing and summaries.
  Ray's own start-up is timed apart; ``job_ips`` excludes it (a cluster is already up when a job is
  submitted) and ``job_ips_with_ray_start`` includes it.

Default size: under 3 minutes on 2 cores. ``--images``, ``--model`` and the batch flags scale it.

    .venv/bin/python benchmarks/throughput.py [--images 1024] [--model PATH]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import _common as c


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1024, help="images for (b) and (c)")
    parser.add_argument("--naive-images", type=int, default=48, help="images for (a)")
    parser.add_argument("--model", type=Path, help="a PaliGemma folder (default: the random tiny model)")
    parser.add_argument("--tasks", default="caption,detect", help=f"comma-separated: {', '.join(c.TASK_PRESETS)}")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32, help="images per generate call in (b) and (c)")
    parser.add_argument("--actors", type=int, default=1, help="(c) inference actors")
    parser.add_argument("--actor-threads", type=int, default=1, help="(c) torch threads per actor")
    parser.add_argument("--loop-threads", type=int, default=0, help="(a)/(b) torch threads; 0 = fastest probe")
    parser.add_argument("--ray-cpus", type=int, default=None, help="local Ray CPUs (default: all)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep inputs and outputs here")
    args = parser.parse_args(argv)

    import torch

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="pgb-throughput-"))
    model_dir = args.model or c.tiny_model(workdir)
    shards = c.scene_shards(workdir / f"scenes-{args.images}", args.images)
    w = c.Workload(model_dir=model_dir, shards=shards, images=c.count_images(shards), tasks=c.parse_tasks(args.tasks),
                   max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    print(f"{w.images} images, prompts {w.prompts}, max_new_tokens {w.max_new_tokens}, model {model_dir}")
    print(f"machine before: {c.machine()}")

    processor, model = c.load(w)
    cores = torch.get_num_threads()
    choices = [args.loop_threads] if args.loop_threads else sorted({1, cores})
    threads, probe = c.pick_loop_threads(w, processor, model, choices)
    print(f"(a)/(b) torch threads: {threads} (probe batch seconds by threads: "
          f"{ {k: round(v, 3) for k, v in probe.items()} })")

    naive = c.naive_loop(w, processor, model, min(args.naive_images, w.images))
    loop = c.hand_loop(w, processor, model, workdir / "hand-loop.parquet")
    del model

    ray_start = c.start_ray(num_cpus=args.ray_cpus)
    config = c.job_config(w, str(workdir / f"job-{len(list(workdir.glob('job-*')))}"), actors=args.actors,
                          actor_threads=args.actor_threads, ray_cpus=args.ray_cpus)
    job = c.job(config)
    if job.images != w.images:
        raise RuntimeError(f"the job saw {job.images} images, expected {w.images}")
    job_cold_ips = job.images / (job.seconds + ray_start)

    rows = [
        ["(a) model-card loop, per image", naive.images, naive.seconds, naive.ips, naive.output_tokens / naive.seconds],
        ["(b) hand-batched loop", loop.images, loop.seconds, loop.ips, loop.output_tokens / loop.seconds],
        ["(c) paligemma-batch job", job.images, job.seconds, job.ips, job.output_tokens / job.seconds],
        ["(c) incl. Ray start", job.images, job.seconds + ray_start, job_cold_ips, None],
    ]
    print()
    print(c.table(["way", "images", "seconds", "images/s", "tokens/s"],
                  [[x if x is not None else "-" for x in r] for r in rows]))
    print(f"Ray start: {ray_start:.2f} s (not in (c)); pipeline wall inside run(): {job.notes['pipeline_wall_s']} s")
    print(f"(c)/(a) = {job.ips / naive.ips:.2f}   (c)/(b) = {job.ips / loop.ips:.2f}   "
          f"with Ray start: (c)/(a) = {job_cold_ips / naive.ips:.2f}   (c)/(b) = {job_cold_ips / loop.ips:.2f}")
    print(f"machine after: {c.machine()}")
    result = {
        "naive_ips": round(naive.ips, 3),
        "loop_ips": round(loop.ips, 3),
        "job_ips": round(job.ips, 3),
        "job_vs_naive": round(job.ips / naive.ips, 3),
        "job_vs_loop": round(job.ips / loop.ips, 3),
        "job_ips_with_ray_start": round(job_cold_ips, 3),
        "ray_start_s": round(ray_start, 3),
        "images": w.images,
        "device": c.device_name(w.device),
        "loop_threads": threads,
    }
    c.final_json(result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
