"""Peak memory of the whole job (driver + local Ray: GCS, raylet, every worker and actor) at two corpus sizes.

Each size runs in a fresh child process with its own local Ray, so neither run inherits the other's caches.
A sampler thread in the child sums RSS and PSS over the driver and all its descendant processes every
0.25 s. Streaming should keep the peak flat as the corpus grows: target peak(10k) <= 1.1 x peak(1k).

RSS counts pages shared between processes (libraries, the object store) once per process; PSS divides
them among the processes sharing them, so its sum is the machine's real footprint.

    .venv/bin/python benchmarks/memory.py [--counts 1000,10000] [--image-size 224] [--side 256]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import _common as c

MB = 1024 * 1024


def one_run(args) -> dict:
    """Child: run the job on ``args.one`` images while sampling memory; print one JSON line."""
    workdir = Path(args.workdir)
    shards = sorted((workdir / f"small-{args.one}").glob("*.tar"))
    w = c.Workload(model_dir=c.tiny_model(workdir, args.image_size), shards=shards, images=args.one,
                   tasks=c.parse_tasks(args.tasks), max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    with c.PeakMemory() as memory:
        ray_start = c.start_ray(num_cpus=args.ray_cpus)
        timing = c.job(c.job_config(w, tempfile.mkdtemp(prefix=f"out-{args.one}-", dir=workdir), ray_cpus=args.ray_cpus))
    return {"images": timing.images, "seconds": round(timing.seconds, 2), "ray_start_s": round(ray_start, 2),
            "peak_rss_mb": round(memory.peak_rss / MB), "peak_pss_mb": round(memory.peak_pss / MB),
            "peak_driver_rss_mb": round(memory.peak_driver_rss / MB), "processes": memory.peak_processes}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", default="1000,10000", help="comma-separated corpus sizes; the first is the base")
    parser.add_argument("--side", type=int, default=256, help="side of the synthetic JPEGs")
    parser.add_argument("--image-size", type=int, default=224, help="input size of the tiny model")
    parser.add_argument("--tasks", default="caption")
    parser.add_argument("--max-new-tokens", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--ray-cpus", type=int, default=None)
    parser.add_argument("--workdir", default="out/benchmarks/memory", help="the model, inputs and outputs")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # internal: the child's size
    args = parser.parse_args(argv)
    if args.one is not None:
        print(json.dumps(one_run(args)))
        return {}

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    c.tiny_model(workdir, args.image_size)
    counts = [int(n) for n in args.counts.split(",")]
    print(f"corpus sizes {counts}, {args.side}px JPEGs, tiny model at {args.image_size}px, tasks {args.tasks}, "
          f"max_new_tokens {args.max_new_tokens}; machine {c.machine()}")
    results = []
    for count in counts:
        c.small_jpeg_shards(workdir / f"small-{count}", count, side=args.side)
        child = [sys.executable, __file__, "--one", str(count), "--workdir", str(workdir),
                 "--image-size", str(args.image_size), "--tasks", args.tasks,
                 "--max-new-tokens", str(args.max_new_tokens), "--batch-size", str(args.batch_size)]
        if args.ray_cpus:
            child += ["--ray-cpus", str(args.ray_cpus)]
        out = subprocess.run(child, check=True, capture_output=True, text=True).stdout
        results.append(json.loads(out.strip().splitlines()[-1]))
        print(f"  {count} images done: {results[-1]}", flush=True)

    pixels_mb = args.image_size * args.image_size * 3 / MB
    rows = [[r["images"], r["seconds"], r["images"] / r["seconds"], r["peak_rss_mb"], r["peak_pss_mb"],
             r["peak_driver_rss_mb"], r["processes"], r["images"] * pixels_mb] for r in results]
    print(c.table(["images", "seconds", "images/s", "peak RSS MB", "peak PSS MB", "driver RSS MB", "processes",
                   "decoded pixels MB"], rows))
    base, top = results[0], results[-1]
    rss_ratio, pss_ratio = top["peak_rss_mb"] / base["peak_rss_mb"], top["peak_pss_mb"] / base["peak_pss_mb"]
    print(f"peak {top['images']} / peak {base['images']}: RSS {rss_ratio:.3f}, PSS {pss_ratio:.3f} (target <= 1.1); "
          f"the decoded pixels alone of {top['images']} images would be {top['images'] * pixels_mb:.0f} MB")
    result = {"runs": results, "rss_ratio": round(rss_ratio, 3), "pss_ratio": round(pss_ratio, 3)}
    c.final_json(result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
