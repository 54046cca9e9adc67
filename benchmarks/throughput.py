"""Images/s of (a) the model card's per-image loop, (b) a hand-batched loop and (c) the paligemma-batch job.

One run, the same images, model, prompts and generation length for all three; then the ratios (c)/(a) and
(c)/(b) and one JSON line. Timing rules:

- (a) and (b) start with the model loaded and warmed up (one untimed call) and use the torch thread count
  that ran a probe batch fastest; (a) runs on the first ``--naive-images`` images (its per-image rate is flat).
  With ``--cold-loop``, "(b) cold" also runs the loop as ``python my_loop.py`` would: a fresh process timed
  from its start, so it pays the torch/transformers imports and the model load that (c)'s actor pays too.
- (c) is timed around ``pipeline.run``: validation, actor start, model load, reading, writing and summaries.
  Ray's own start-up is timed apart; ``job_ips`` excludes it (a cluster is already up when a job is
  submitted) and ``job_ips_with_ray_start`` includes it.

Default size: about 2 minutes on 2 cores once the inputs exist (the first run also writes 4096 scenes, reused
from ``--workdir`` afterwards). ``--images``, ``--model`` and the batch flags scale it.

    .venv/bin/python benchmarks/throughput.py [--images 1024] [--model PATH]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import _common as c


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4096, help="images for (b) and (c)")
    parser.add_argument("--naive-images", type=int, default=48, help="images for (a)")
    parser.add_argument("--model", type=Path, help="a PaliGemma folder (default: the random tiny model)")
    parser.add_argument("--tasks", default="caption,detect", help=f"comma-separated: {', '.join(c.TASK_PRESETS)}")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32, help="images per generate call in (b) and (c)")
    parser.add_argument("--actors", type=int, default=0,
                        help="(c) inference actors; 0 = one per core, each with --actor-threads torch threads")
    parser.add_argument("--actor-cpus", type=float, default=0.5, help="(c) CPUs reserved per actor")
    parser.add_argument("--actor-threads", type=int, default=1, help="(c) torch threads per actor")
    parser.add_argument("--preprocess-cpus", type=float, default=0.5, help="(c) CPUs per read/preprocess task")
    parser.add_argument("--loop-threads", type=int, default=0, help="(a)/(b) torch threads; 0 = fastest probe")
    parser.add_argument("--ray-cpus", type=int, default=None, help="local Ray CPUs (default: all)")
    parser.add_argument("--cold-loop", action="store_true", help="also time (b) in a fresh process")
    parser.add_argument("--workdir", type=Path, default=Path("out/benchmarks/throughput"),
                        help="the model, inputs (reused) and outputs")
    args = parser.parse_args(argv)

    import torch

    workdir = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model_dir = args.model or c.tiny_model(workdir)
    shards = c.parallel_scene_shards(workdir / f"scenes-{args.images}", args.images)
    print(f"inputs ready in {time.perf_counter() - t0:.1f} s")
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
    cold = c.cold_hand_loop(w, threads, workdir / "hand-loop-cold.parquet") if args.cold_loop else None

    ray_start = c.start_ray(num_cpus=args.ray_cpus)
    actors = args.actors or args.ray_cpus or os.cpu_count() or 1
    print(f"(c) {actors} inference actor(s), {args.actor_threads} torch thread(s) each")
    config = c.job_config(w, tempfile.mkdtemp(prefix="job-", dir=workdir), actors=actors,
                          actor_cpus=args.actor_cpus, actor_threads=args.actor_threads, ray_cpus=args.ray_cpus,
                          preprocess_cpus=args.preprocess_cpus)
    job = c.job(config)
    if job.images != w.images:
        raise RuntimeError(f"the job saw {job.images} images, expected {w.images}")
    job_with_start_ips = job.images / (job.seconds + ray_start)

    rows = [
        ["(a) model-card loop, per image", naive.images, naive.seconds, naive.ips, naive.output_tokens / naive.seconds],
        ["(b) hand-batched loop", loop.images, loop.seconds, loop.ips, loop.output_tokens / loop.seconds],
        *([["(b) cold: fresh process", cold.images, cold.seconds, cold.ips, None]] if cold else []),
        ["(c) paligemma-batch job", job.images, job.seconds, job.ips, job.output_tokens / job.seconds],
        ["(c) incl. Ray start", job.images, job.seconds + ray_start, job_with_start_ips, None],
    ]
    print()
    print(c.table(["way", "images", "seconds", "images/s", "tokens/s"],
                  [[x if x is not None else "-" for x in r] for r in rows]))
    print(f"Ray start: {ray_start:.2f} s (not in (c)); pipeline wall inside run(): {job.notes['pipeline_wall_s']} s")
    print(f"(c)/(a) = {job.ips / naive.ips:.2f}   (c)/(b) = {job.ips / loop.ips:.2f}   "
          + (f"(c)/(b cold) = {job.ips / cold.ips:.2f}   " if cold else "")
          + f"with Ray start: (c)/(a) = {job_with_start_ips / naive.ips:.2f}   "
          f"(c)/(b) = {job_with_start_ips / loop.ips:.2f}")
    print(f"machine after: {c.machine()}")
    result = {
        "naive_ips": round(naive.ips, 3),
        "loop_ips": round(loop.ips, 3),
        "job_ips": round(job.ips, 3),
        "job_vs_naive": round(job.ips / naive.ips, 3),
        "job_vs_loop": round(job.ips / loop.ips, 3),
        "job_ips_with_ray_start": round(job_with_start_ips, 3),
        "ray_start_s": round(ray_start, 3),
        "images": w.images,
        "device": c.device_name(w.device),
        "loop_threads": threads,
        "job_actors": actors,
    }
    if cold:
        result.update(loop_cold_ips=round(cold.ips, 3), job_vs_loop_cold=round(job.ips / cold.ips, 3))
    c.final_json(result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
