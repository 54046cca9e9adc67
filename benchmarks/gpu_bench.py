"""One prepared GPU run (under 8 minutes): (a), (b) and (c) of ``throughput.py`` on the full-size
PaliGemma-3B-224 architecture with random bf16 weights (nothing is downloaded), plus the batch-size sweep,
an optional static-KV-cache (+ compiled decode) row, and GPU utilisation sampled during (c).

Every prompt gets exactly ``--new-tokens`` new tokens (``min_new_tokens`` = ``max_new_tokens``) in (a) and (b);
the job (c) has no ``min_new_tokens`` setting yet, so its mean output length is printed beside it.
Sections print as they finish, so a run cut short still leaves figures.

    .venv/bin/python benchmarks/gpu_bench.py                 # on a GPU machine
    .venv/bin/python benchmarks/gpu_bench.py --tiny          # checks the script on CPU with the tiny model
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import _common as c
import speedups

IMAGE_SIZE, PATCH_SIZE = 224, 14


def full_size_config(vocab_size: int = 257216):
    """PaliGemma-3B-224: SigLIP So400m/14 (27 layers, 1152 wide) + Gemma-2B (18 layers, 2048 wide, MQA)."""
    from transformers import GemmaConfig, PaliGemmaConfig, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                                image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=2048,
                                vision_use_head=False)
    text = GemmaConfig(vocab_size=vocab_size, hidden_size=2048, intermediate_size=16384, num_hidden_layers=18,
                       num_attention_heads=8, num_key_value_heads=1, head_dim=256, max_position_embeddings=8192,
                       pad_token_id=0, eos_token_id=1, bos_token_id=2, hidden_activation="gelu_pytorch_tanh")
    return PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=4, projection_dim=2048,
                           hidden_size=2048)


def build_full_size(out: Path, device: str):
    """Random-weight PaliGemma-3B-224 in bf16 on ``device``, saved with its processor into ``out``."""
    import torch
    from transformers import PaliGemmaForConditionalGeneration

    from paligemma_batch.fixtures.tiny import build_processor, build_tokenizer

    processor = build_processor(build_tokenizer(), IMAGE_SIZE, PATCH_SIZE)
    processor.tokenizer.padding_side = "left"
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = PaliGemmaForConditionalGeneration(full_size_config()).eval()
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    return processor, model


class GpuSampler:
    """``nvidia-smi`` utilisation and memory samples every ``interval_ms`` while inside the ``with``."""

    def __init__(self, interval_ms: int = 500):
        self.interval_ms = interval_ms
        self.samples: list[tuple[float, float]] = []  # (utilisation %, memory MiB)

    def __enter__(self) -> GpuSampler:
        self._proc = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader,nounits",
             f"--loop-ms={self.interval_ms}", "--id=0"], stdout=subprocess.PIPE, text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        for line in self._proc.stdout:
            fields = [x.strip() for x in line.split(",")]
            if len(fields) == 2 and all(f.replace(".", "", 1).isdigit() for f in fields):  # skips "[N/A]"
                self.samples.append((float(fields[0]), float(fields[1])))

    def __exit__(self, *exc) -> None:
        self._proc.terminate()
        self._proc.wait()
        self._thread.join(timeout=2)

    def summary(self) -> dict:
        utils = [u for u, _ in self.samples]
        busy = utils[next((i for i, u in enumerate(utils) if u > 0), len(utils)):]  # from the first busy sample
        return {"samples": len(utils), "mean_util": round(statistics.mean(utils), 1) if utils else None,
                "mean_util_after_first_busy": round(statistics.mean(busy), 1) if busy else None,
                "max_memory_mib": max((m for _, m in self.samples), default=None)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny model on CPU, small counts: checks the script")
    parser.add_argument("--images", type=int, default=None, help="images for (c) (default 8192; tiny 128)")
    parser.add_argument("--loop-images", type=int, default=None, help="images for (b) (default 1024; tiny 64)")
    parser.add_argument("--naive-images", type=int, default=None, help="images for (a) (default 24; tiny 8)")
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=0, help="images per generate in (b)/(c); 0 = best of sweep")
    parser.add_argument("--sweep", default=None, help="images per call to sweep (default 16,32,64,128,256; tiny 4,16)")
    parser.add_argument("--static-cache", action="store_true", help="also measure the engine with a static KV cache "
                        "(transformers compiles the decode step on GPU)")
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args(argv)

    import torch

    from paligemma_batch.engines.transformers_engine import TransformersEngine

    device = "cpu" if args.tiny else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --tiny to check the script on CPU")
    if args.tiny:
        torch.set_num_threads(1)  # the actor's setting; more threads than free cores spin on a shared CPU
    images = args.images or (128 if args.tiny else 8192)
    loop_images = args.loop_images or (64 if args.tiny else 1024)
    naive_images = args.naive_images or (8 if args.tiny else 24)
    sweep_sizes = [int(b) for b in (args.sweep or ("4,16" if args.tiny else "16,32,64,128,256")).split(",")]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="pgb-gpu-bench-"))
    t_start = time.perf_counter()

    t0 = time.perf_counter()
    if args.tiny:
        model_dir = c.tiny_model(workdir)
        precision = "float32"
    else:
        model_dir = workdir / "paligemma-3b-224-random"
        precision = "bfloat16"
        processor, model = build_full_size(model_dir, device)
    w = c.Workload(model_dir=model_dir, shards=[], images=images, tasks=[c.TASK_PRESETS["caption"]],
                   max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, precision=precision, device=device)
    if args.tiny:
        processor, model = c.load(w)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e9:.2f} B parameters, {precision}, on {c.device_name(device)}; "
          f"built and saved in {time.perf_counter() - t0:.1f} s", flush=True)

    t0 = time.perf_counter()
    shards = c.parallel_scene_shards(workdir / "scenes", images)
    w = c.Workload(**{**w.__dict__, "shards": shards, "images": c.count_images(shards)})
    print(f"{w.images} scene images (160–640 px) written in {time.perf_counter() - t0:.1f} s; "
          f"machine {c.machine()}", flush=True)

    engine = TransformersEngine(model, processor, w.max_new_tokens, w.min_new_tokens)
    pixels = c.decoded(w, processor, max(sweep_sizes) * 2)
    sweep = c.engine_sweep(engine, w, pixels, sweep_sizes, processor)
    print("\nbatch size sweep (engine only, decode excluded)\n"
          + c.table(["images/call", "rows/call", "images", "seconds", "images/s"], sweep), flush=True)
    batch = args.batch_size or max(sweep, key=lambda r: r[4])[0]
    w = c.Workload(**{**w.__dict__, "batch_size": batch})
    result: dict = {"sweep": {row[0]: round(row[4], 1) for row in sweep}, "batch_size": batch}

    naive = c.naive_loop(w, processor, model, naive_images)
    print(f"(a) model-card loop: {naive.ips:.2f} images/s ({naive.images} images)", flush=True)
    loop = c.hand_loop(w, processor, model, workdir / "hand-loop.parquet", limit=loop_images)
    print(f"(b) hand-batched loop: {loop.ips:.1f} images/s ({loop.images} images, batch {batch})", flush=True)

    ray_start = c.start_ray(num_gpus=0 if args.tiny else 1)
    config = c.job_config(w, str(workdir / "job"), actor_cpus=1 if args.tiny else 2, actor_threads=1,
                          num_gpus=0 if args.tiny else 1)
    if args.tiny:
        job = c.job(config)
        gpu = {}
    else:
        with GpuSampler() as sampler:
            job = c.job(config)
        gpu = sampler.summary()
    rows = [
        ["(a) model-card loop, per image", naive.images, naive.seconds, naive.ips, naive.output_tokens / naive.images],
        ["(b) hand-batched loop", loop.images, loop.seconds, loop.ips, loop.output_tokens / loop.images],
        ["(c) paligemma-batch job", job.images, job.seconds, job.ips, job.output_tokens / job.images],
    ]
    print("\n" + c.table(["way", "images", "seconds", "images/s", "new tokens/image"], rows))
    print(f"Ray start {ray_start:.1f} s (not in (c)); GPU during (c): {gpu or 'not sampled (--tiny)'}")
    print(f"(c)/(a) = {job.ips / naive.ips:.2f}   (c)/(b) = {job.ips / loop.ips:.2f}   "
          f"target >= 250 images/s per H100: {job.ips:.0f}; whole script {time.perf_counter() - t_start:.0f} s")
    result.update({
        "naive_ips": round(naive.ips, 3), "loop_ips": round(loop.ips, 3), "job_ips": round(job.ips, 3),
        "job_vs_naive": round(job.ips / naive.ips, 3), "job_vs_loop": round(job.ips / loop.ips, 3),
        "images": job.images, "device": c.device_name(device), "gpu": gpu, "ray_start_s": round(ray_start, 2),
        "job_new_tokens_per_image": round(job.output_tokens / job.images, 2),
    })

    # Extras after the main figures, so that a failure or a slow compile here cannot cost them.
    two = c.Workload(**{**w.__dict__, "tasks": [c.TASK_PRESETS["caption"], c.TASK_PRESETS["detect"]]})
    rows = speedups.vision_once(engine, two, processor, pixels, repeats=2, batch=min(batch, len(pixels) // 2))
    print("\nvision tower, 2 prompts per image\n" + c.table(["way", "images/s"], rows), flush=True)
    result["vision_once_gain"] = round(rows[-1][1], 3)
    if args.static_cache:
        static = TransformersEngine(model, processor, w.max_new_tokens, w.min_new_tokens, cache_implementation="static")
        t0 = time.perf_counter()
        static.generate(pixels[:batch], c.requests_for(w, processor, batch))  # compiles
        compile_s = time.perf_counter() - t0
        row = c.engine_sweep(static, w, pixels, [batch], processor)[0]
        print(f"static KV cache at {batch} images/call: {row[4]:.1f} images/s against {result['sweep'][batch]} "
              f"dynamic (first call, compiling: {compile_s:.1f} s)", flush=True)
        result["static_cache_ips"] = round(row[4], 1)

    c.final_json(result)
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
