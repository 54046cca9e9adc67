"""Shared pieces of the benchmark scripts: inputs, the three ways to annotate, timing, memory sampling.

The three ways, all on the same shards, model, prompts and generation length:

- (a) ``naive_loop``: the model card's loop, ``processor(text, image)`` + ``generate`` once per (image, prompt);
- (b) ``hand_loop``: what a careful user writes in one process: PIL decode, the processor on a whole batch,
  one batched ``generate``, parse ``<loc>`` output, one Parquet file at the end;
- (c) ``job``: ``paligemma_batch.pipeline.run`` on the Ray the caller started.

Benchmarks print ratios measured in one run; absolute numbers depend on the machine and its load.
"""

from __future__ import annotations

import io
import json
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

TASK_PRESETS = {
    "caption": {"task": "caption", "lang": "en"},
    "detect": {"task": "detect", "objects": ["circle", "square"]},
    "segment": {"task": "segment", "objects": ["circle"]},
    "answer": {"task": "answer", "lang": "en", "question": "what color is the shape?"},
    "ocr": {"task": "ocr"},
}


@dataclass(frozen=True)
class Workload:
    """What every way annotates, and how."""

    model_dir: Path
    shards: list[Path]
    images: int
    tasks: list[dict]  # TaskConfig fields, e.g. {"task": "caption", "lang": "en"}
    max_new_tokens: int
    min_new_tokens: int | None = None
    precision: str = "float32"
    device: str = "cpu"  # "cpu" or "cuda"
    batch_size: int = 32  # images per generate call in (b) and per actor call in (c)

    @property
    def prompts(self) -> list[str]:
        return [task_config(t).prompt_for() for t in self.tasks]

    @property
    def task_types(self) -> list[str]:
        return [t["task"] for t in self.tasks]


def task_config(fields: dict):
    from paligemma_batch.config import TaskConfig

    return TaskConfig(**fields)


def parse_tasks(names: str) -> list[dict]:
    """``"caption,detect"`` → task dicts from :data:`TASK_PRESETS`."""
    unknown = [n for n in names.split(",") if n not in TASK_PRESETS]
    if unknown:
        raise SystemExit(f"--tasks: unknown {unknown}; known: {', '.join(TASK_PRESETS)}")
    return [TASK_PRESETS[n] for n in names.split(",")]


# ----------------------------------------------------------------------------------------------- inputs


def tiny_model(workdir: Path, image_size: int = 64) -> Path:
    """The random tiny PaliGemma of ``fixtures/tiny.py`` (``image_size`` px input), built once into ``workdir``."""
    from paligemma_batch.fixtures.tiny import build_tiny_paligemma

    out = workdir / f"tiny-model-{image_size}"
    if not (out / "config.json").exists():
        build_tiny_paligemma(out, image_size=image_size)
    return out


def scene_shards(out_dir: Path, images: int, per_shard: int = 64, seed: int = 0) -> list[Path]:
    """Synthetic scenes (160–640 px JPEG and PNG) in WebDataset tars; ``images`` is rounded up to whole shards."""
    from paligemma_batch.fixtures.scenes import write_scene_shards

    per_shard = min(per_shard, images)
    return write_scene_shards(out_dir, shards=-(-images // per_shard), per_shard=per_shard, seed=seed)


def _write_scene_shard(job: tuple[str, int, int]) -> list[Path]:
    out, seed, images = job
    return scene_shards(Path(out), images, per_shard=images, seed=seed)


def parallel_scene_shards(out_dir: Path, images: int, per_shard: int = 64) -> list[Path]:
    """:func:`scene_shards` written by every core (one shard per job, each its own seed and folder); a
    complete earlier set in ``out_dir`` is reused."""
    import multiprocessing

    jobs = [(str(out_dir / f"part-{i:05d}"), i, min(per_shard, images - i * per_shard))
            for i in range(-(-images // per_shard))]
    existing = sorted(out_dir.glob("part-*/*.tar"))
    if len(existing) == len(jobs) and (out_dir / "_COMPLETE").exists():
        return existing
    with multiprocessing.get_context("spawn").Pool() as pool:
        paths = sorted(p for paths in pool.map(_write_scene_shard, jobs) for p in paths)
    (out_dir / "_COMPLETE").write_text(str(images))
    return paths


def small_jpeg_shards(out_dir: Path, images: int, per_shard: int = 500, side: int = 96, seed: int = 0) -> list[Path]:
    """Many small distinct JPEGs (smooth noise, ``side`` px) in WebDataset tars; fast to write in bulk."""
    rng = np.random.default_rng(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(-(-images // per_shard)):
        path = out_dir / f"small-{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(min(per_shard, images - s * per_shard)):
                coarse = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
                image = Image.fromarray(coarse).resize((side, side), Image.Resampling.BILINEAR)
                buf = io.BytesIO()
                image.save(buf, "JPEG", quality=85)
                info = tarfile.TarInfo(f"small-{s:05d}-{i:05d}.jpg")
                info.size = buf.tell()
                buf.seek(0)
                tar.addfile(info, buf)
        paths.append(path)
    return paths


def tar_images(shards: list[Path], limit: int | None = None) -> Iterator[tuple[str, bytes]]:
    """(image_id, image bytes) for every image of the tars, in order, read by the pipeline's own reader."""
    from paligemma_batch.config import InputConfig
    from paligemma_batch.readers import iter_rows

    count = 0
    for shard in shards:
        for row in iter_rows(str(shard), InputConfig(uri=str(shard))):
            if row.data is None:
                continue
            yield row.image_id, row.data
            count += 1
            if limit is not None and count >= limit:
                return


def count_images(shards: list[Path]) -> int:
    return sum(1 for _ in tar_images(shards))


# ----------------------------------------------------------------------------------------- model loading


def torch_dtype(precision: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[precision]


def load(w: Workload):
    """The processor (left padding) and the model on ``w.device``, as a user would load them."""
    from transformers import AutoProcessor, PaliGemmaForConditionalGeneration

    processor = AutoProcessor.from_pretrained(w.model_dir)
    processor.tokenizer.padding_side = "left"
    model = PaliGemmaForConditionalGeneration.from_pretrained(w.model_dir, dtype=torch_dtype(w.precision))
    return processor, model.to(w.device).eval()


def generate_kwargs(w: Workload, processor) -> dict:
    return {
        "max_new_tokens": w.max_new_tokens,
        "min_new_tokens": w.min_new_tokens,
        "do_sample": False,
        "pad_token_id": processor.tokenizer.pad_token_id,
    }


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------ the three ways


@dataclass
class Timing:
    seconds: float
    images: int
    output_tokens: int
    notes: dict = field(default_factory=dict)

    @property
    def ips(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


def naive_loop(w: Workload, processor, model, images: int) -> Timing:
    """(a) The model card's loop: per image and per prompt, ``processor`` + ``generate`` + ``decode``.

    It keeps the decoded text in a list and writes nothing, which only favours it.
    """
    import torch

    kwargs = generate_kwargs(w, processor)
    dtype = torch_dtype(w.precision)

    def one(data: bytes, prompt: str) -> int:
        image = Image.open(io.BytesIO(data)).convert("RGB")
        inputs = processor(text="<image>" + prompt, images=image, return_tensors="pt").to(dtype).to(w.device)
        inputs.pop("labels", None)
        input_len = inputs["input_ids"].shape[-1]
        with torch.inference_mode():
            generation = model.generate(**inputs, **kwargs)[0][input_len:]
        texts.append(processor.decode(generation, skip_special_tokens=True))
        return int(generation.shape[0])

    texts: list[str] = []
    _, first = next(tar_images(w.shards))
    one(first, w.prompts[0])  # warm-up, not timed
    texts.clear()
    synchronize(w.device)
    t0 = time.perf_counter()
    tokens = sum(one(data, prompt) for _, data in tar_images(w.shards, images) for prompt in w.prompts)
    synchronize(w.device)
    return Timing(time.perf_counter() - t0, images, tokens)


def hand_loop(w: Workload, processor, model, out_path: Path, limit: int | None = None,
              batch_size: int | None = None) -> Timing:
    """(b) One process, batched: PIL decode, the processor on the batch, one ``generate``, parse, Parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from paligemma_batch.parse import parse_objects

    kwargs = generate_kwargs(w, processor)
    dtype = torch_dtype(w.precision)
    batch_size = batch_size or w.batch_size
    prompts, kinds = w.prompts, w.task_types
    rows: list[dict] = []
    tokens = 0

    def flush(batch: list[tuple[str, bytes]]) -> None:
        nonlocal tokens
        images = [Image.open(io.BytesIO(data)).convert("RGB") for _, data in batch]
        inputs = processor(
            text=["<image>" + p for _ in images for p in prompts],
            images=[im for im in images for _ in prompts],
            return_tensors="pt",
            padding="longest",
        )
        inputs.pop("labels", None)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        inputs = inputs.to(w.device)
        with torch.inference_mode():
            out = model.generate(**inputs, **kwargs)[:, inputs["input_ids"].shape[1]:]
        texts = processor.batch_decode(out, skip_special_tokens=True)
        tokens += int((out != processor.tokenizer.pad_token_id).sum())
        for i, ((image_id, _), image) in enumerate(zip(batch, images)):
            for j, kind in enumerate(kinds):
                text = texts[i * len(prompts) + j].strip()
                row = {"image_id": image_id, "task": kind, "width": image.width, "height": image.height,
                       "text": text, "boxes": None}
                if kind in ("detect", "segment"):
                    row["boxes"] = [list(o.box_pixels(image.width, image.height)) for o in parse_objects(text).objects]
                rows.append(row)

    flush(list(tar_images(w.shards, 1)))  # warm-up, not timed
    rows.clear()
    tokens = 0
    synchronize(w.device)
    t0 = time.perf_counter()
    batch: list[tuple[str, bytes]] = []
    images = 0
    for item in tar_images(w.shards, limit):
        batch.append(item)
        images += 1
        if len(batch) == batch_size:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    pq.write_table(pa.Table.from_pylist(rows), out_path, compression="zstd")
    synchronize(w.device)
    return Timing(time.perf_counter() - t0, images, tokens)


def cold_hand_loop(w: Workload, threads: int, out_path: Path) -> Timing:
    """(b) as ``python my_loop.py`` runs it: a fresh process that imports torch and transformers, loads the
    model, then runs :func:`hand_loop`; timed from process start to exit."""
    spec = json.dumps({**w.__dict__, "model_dir": str(w.model_dir), "shards": [str(s) for s in w.shards]})
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, __file__, spec, str(threads), str(out_path)], check=True,
                         capture_output=True, text=True).stdout
    seconds = time.perf_counter() - t0
    inner = json.loads(out.strip().splitlines()[-1])
    return Timing(seconds, inner["images"], inner["output_tokens"], {"loop_s": inner["seconds"]})


def _cold_hand_loop_main(spec: str, threads: str, out_path: str) -> None:
    import torch

    torch.set_num_threads(int(threads))
    fields = json.loads(spec)
    w = Workload(**{**fields, "model_dir": Path(fields["model_dir"]), "shards": [Path(s) for s in fields["shards"]]})
    processor, model = load(w)
    timing = hand_loop(w, processor, model, Path(out_path))
    print(json.dumps({"images": timing.images, "output_tokens": timing.output_tokens, "seconds": timing.seconds}))


def pick_loop_threads(w: Workload, processor, model, choices: list[int]) -> tuple[int, dict[int, float]]:
    """The torch thread count that runs one batch of (b) fastest; the baselines get their best setting.

    On a busy shared CPU, more threads than free cores can be many times slower (OpenMP spinning).
    """
    import torch

    seconds = {}
    with tempfile.TemporaryDirectory() as tmp:
        for threads in choices:
            torch.set_num_threads(threads)
            best = min(
                hand_loop(w, processor, model, Path(tmp) / "probe.parquet", limit=w.batch_size).seconds
                for _ in range(2)
            )
            seconds[threads] = best
    chosen = min(seconds, key=seconds.get)
    torch.set_num_threads(chosen)
    return chosen, seconds


def job_config(w: Workload, output_uri: str, *, actors: int = 1, actor_cpus: float = 0.5,
               actor_threads: int | None = 1, num_gpus: float = 0, ray_cpus: int | None = None,
               preprocess_batch: int = 32, preprocess_cpus: float = 0.5, extra_model: dict | None = None):
    """The JobConfig for (c): the same shards, tasks and generation length as the loops."""
    from paligemma_batch.config import parse_config

    return parse_config({
        "input": {"uri": [str(s) for s in w.shards], "format": "webdataset"},
        "tasks": w.tasks,
        "model": {"source": str(w.model_dir), "precision": w.precision, "max_new_tokens": w.max_new_tokens,
                  **(extra_model or {})},
        "inference": {"batch_size": w.batch_size, "min_actors": actors, "max_actors": actors,
                      "num_cpus": actor_cpus, "num_threads": actor_threads, "num_gpus": num_gpus},
        "preprocess": {"num_cpus": preprocess_cpus, "batch_size": preprocess_batch},
        "output": {"uri": output_uri},
        "ray": {"num_cpus": ray_cpus, "progress_bars": False},
    })


def job(config) -> Timing:
    """(c) ``pipeline.run``, timed around the whole call (validation, actor start, model load, writing)."""
    from paligemma_batch.pipeline import run

    t0 = time.perf_counter()
    summary = run(config)
    seconds = time.perf_counter() - t0
    if summary["rows_error"]:
        raise RuntimeError(f"the job wrote {summary['rows_error']} error rows: {summary['top_error_reasons']}")
    return Timing(seconds, summary["inputs_seen"], summary["output_tokens"],
                  {"pipeline_wall_s": summary["wall_time_s"]})


def start_ray(num_cpus: int | None = None, num_gpus: int | None = None) -> float:
    """Start a local Ray in its own temp dir; return the seconds it took."""
    import ray
    from ray.data import DataContext

    t0 = time.perf_counter()
    ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, logging_level="WARNING",
             _temp_dir=tempfile.mkdtemp(prefix="pgb-bench-ray-", dir="/tmp"))
    DataContext.get_current().enable_progress_bars = False
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------- measurement


class PeakMemory:
    """Samples, in a thread, the summed RSS and PSS of this process and all its descendants (a local Ray's
    GCS, raylet and workers are all descendants of the driver that started it)."""

    def __init__(self, interval_s: float = 0.25):
        import psutil

        self._root = psutil.Process()
        self.interval_s = interval_s
        self.peak_rss = self.peak_pss = self.peak_driver_rss = 0
        self.peak_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> None:
        import psutil

        rss = pss = processes = 0
        for proc in [self._root, *self._root.children(recursive=True)]:
            try:
                info = proc.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
            processes += 1
        self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
        self.peak_processes = max(self.peak_processes, processes)
        self.peak_driver_rss = max(self.peak_driver_rss, self._root.memory_info().rss)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> PeakMemory:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def machine() -> dict:
    load1, load5, _ = os.getloadavg()
    return {"cpus": os.cpu_count(), "load1": round(load1, 2), "load5": round(load5, 2),
            "python": platform.python_version()}


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(0)
    return f"cpu ({os.cpu_count()} cores)"


def table(header: list[str], rows: list[list]) -> str:
    """A plain fixed-width table."""
    cells = [header] + [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(widths[i]) for i, c in enumerate(r)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def final_json(obj: dict) -> None:
    print(json.dumps(obj, sort_keys=True))


def decoded(w: Workload, processor, limit: int | None = None) -> list[np.ndarray]:
    """The workload's images at the model resolution, as the preprocess stage decodes them."""
    from paligemma_batch.engines.transformers_engine import model_input_size
    from paligemma_batch.images import decode_image

    size, resample = model_input_size(processor), processor.image_processor.resample
    return [decode_image(data, size, resample).pixels for _, data in tar_images(w.shards, limit)]


def requests_for(w: Workload, processor, images: int, grouped: bool = True):
    """One request per (image, prompt), as the inference stage builds them: each task its own kind and limit
    (``grouped=False``: one kind, the engine's limit, every task in one batch)."""
    from paligemma_batch.engines.transformers_engine import Request, prompt_ids
    from paligemma_batch.prompts import PromptEncoder
    from paligemma_batch.tasks import max_new_tokens

    count = PromptEncoder.from_folder(w.model_dir).count_tokens  # as the inference stage counts
    tasks = [task_config(t) for t in w.tasks]
    prompts = [(prompt_ids(processor, p), max_new_tokens(t, w.max_new_tokens, count) if grouped else None,
                t.output_name if grouped else "") for t, p in zip(tasks, w.prompts)]
    return [Request(i, ids, max_new_tokens=limit, kind=kind) for i in range(images) for ids, limit, kind in prompts]


def engine_sweep(engine, w: Workload, pixels: list[np.ndarray], batch_sizes: list[int], processor) -> list[list]:
    """Engine-only images/s (decode excluded) for each number of images per ``generate`` call."""
    rows = []
    for bs in batch_sizes:
        requests = requests_for(w, processor, bs)
        engine.generate(pixels[:bs], requests_for(w, processor, min(bs, len(pixels))))  # warm-up at this shape
        synchronize(w.device)
        t0 = time.perf_counter()
        done = 0
        for start in range(0, len(pixels) - bs + 1, bs):
            engine.generate(pixels[start:start + bs], requests)
            done += bs
        synchronize(w.device)
        seconds = time.perf_counter() - t0
        rows.append([bs, bs * len(w.prompts), done, seconds, done / seconds])
    return rows


if __name__ == "__main__":  # the child process of cold_hand_loop
    _cold_hand_loop_main(*sys.argv[1:])
