"""The one GPU check: full-size PaliGemma through the project on one GPU, results written as they are measured.

Sections, in order of value, each with its own time budget (the whole check fits in about 7 minutes):

1. ``model``: PaliGemma-3B-224 with random bf16 weights made on the GPU, saved, loaded through ``load_model``;
2. ``job``: ``pipeline.run`` on 4,096 640x480 JPEGs in 32 tars, caption en, 20 forced new tokens, one GPU
   actor and CPU tasks on the other cores: ``job_images_per_s``, ``job_gpu_util``, rows == images once each;
3. ``sweep``: engine images/s and prefill MFU per batch size (dynamic KV cache, then static at the best size),
   and the requests per call that ``inference.batch_size: auto``'s memory probe picks;
4. ``precisions``: bf16, fp16, int8, int4: images/s, peak GPU memory, greedy agreement with bf16;
5. ``pg2_448``: PaliGemma 2 3B at 448 px, attention eager vs sdpa vs flex_attention: images/s, logit difference;
6. ``mix``: caption + detect (3 objects) + segment (1 object) through the job: rows/s.

Every result is one JSON line in ``OUT/results.jsonl``; a failing or overrunning section writes a line with
its error and the check moves on. The two Ray sections (``job``, ``mix``) each run in a process of their own,
in a session of their own, with a Ray of their own: on overrun the check kills that session and whatever Ray
started in it, and nothing of that Ray is left to the later sections. Generation length is forced by
suppressing ``<eos>`` in the random checkpoint's generation config (random weights stop at random places), so
every row gets ``max_new_tokens``. The work folder (checkpoint, inputs, job outputs) goes at the end unless
``--keep-workdir``.

    bash benchmarks/gpu/run.sh --out "$OUT"     # on the GPU machine
    bash benchmarks/gpu/run.sh --tiny           # every section on CPU with the tiny random model
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
logging.getLogger("bitsandbytes.autograd._functions").addFilter(  # it logs this on every int8 call
    lambda record: not record.getMessage().startswith("MatMul8bitLt"))

from support import (  # noqa: E402
    PEAK_BF16_TFLOPS,
    Deadline,
    GpuSampler,
    PartFileWatcher,
    Results,
    SectionTimeout,
    build_random,
    expected_keys,
    hard_limit,
    kill_session,
    paligemma2_3b_448_config,
    paligemma_3b_224_config,
    prefill_flops,
    prompt_ids,
    wait_unreaped,
    write_jpeg_shards,
)

NEW_TOKENS = 20
MIX_NEW_TOKENS = 24  # detect with 3 objects and segment with 1 both need about 20
CAPTION = {"task": "caption", "lang": "en"}
MIX_TASKS = [CAPTION, {"task": "detect", "objects": ["circle", "square", "triangle"]},
             {"task": "segment", "objects": ["circle"]}]
MASK_DECODER = Path(__file__).resolve().parents[2] / "paligemma_batch/fixtures/assets/shapes-paligemma/vae-oid.npz"

# name -> (GPU budget s, tiny budget s). The GPU budgets add up to the check's 445 s. The tiny ones allow for a
# loaded, shared 2-core machine, where a Ray section's process start and Ray's start took up to a minute.
BUDGETS = {"model": (60, 60), "job": (110, 240), "sweep": (45, 60), "precisions": (100, 90), "pg2_448": (50, 45),
           "mix": (80, 180)}  # mix starts its own process and Ray too
CHECKPOINT_USERS = {"job", "sweep", "precisions", "mix"}  # ``--only`` adds ``model`` to any of these
RAY_JOBS = {"job": ([CAPTION], NEW_TOKENS), "mix": (MIX_TASKS, MIX_NEW_TOKENS)}  # section -> tasks, new tokens
CUT_SHORT_SIGNAL = signal.SIGUSR1  # to a Ray section's process: the budget is spent, write what you measured
CUT_SHORT_GRACE_S = 5.0
REPORTED_ERROR = 3  # a Ray section's process exits with this once it has written its own error line
# GPU / tiny sizes
SIZES = {
    "images": (4096, 256), "tars": (32, 8), "mix_images": (1024, 64), "job_batch": (128, 16),
    "sweep": ((32, 64, 128, 256), (4, 16)), "precision_batch": (64, 4), "pg2_batch": (16, 4), "repeats": (3, 2),
}


class Check:
    """State shared by the sections: the device, the work folder, the saved checkpoint, the inputs.

    ``argv`` is the check's command line, which a Ray section's process is started with.
    """

    def __init__(self, args: argparse.Namespace, results: Results, workdir: Path, argv: list[str] = ()):
        import torch

        self.args, self.results, self.workdir, self.argv = args, results, workdir, list(argv)
        self.tiny = args.tiny
        self.cuda = not args.tiny
        if self.cuda and not torch.cuda.is_available():
            raise SystemExit("no CUDA device: run with --tiny to check the script on CPU")
        self.device = "cuda" if self.cuda else "cpu"
        self.num_gpus = 1 if self.cuda else 0
        self.model_dir: Path | None = None
        self.model = self.processor = None
        self.shards: list[Path] = []
        self.images = 0
        if self.tiny:
            torch.set_num_threads(1)  # the actor's setting; more threads than free cores spin on a shared CPU

    def size(self, key: str):
        return SIZES[key][1 if self.tiny else 0]

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            import torch

            torch.cuda.empty_cache()

    def timed(self, fn, repeats: int) -> tuple[float, float, object]:
        """(seconds of the untimed first call, mean seconds of ``repeats`` further calls, last result)."""
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(repeats):
            out = fn()
        self.sync()
        return first, (time.perf_counter() - t0) / repeats, out

    def loaded(self):
        """The bf16 model and processor of section 1, loaded again if that section's copy is gone."""
        from paligemma_batch.config import ModelConfig, StorageOptions
        from paligemma_batch.model import load_model, load_processor

        if self.model_dir is None:
            raise RuntimeError("no checkpoint: the model section did not finish")
        if self.model is None:
            cfg = ModelConfig(source=str(self.model_dir), precision="bfloat16")
            self.processor = load_processor(cfg, StorageOptions())
            self.model = load_model(cfg, StorageOptions(), num_gpus=self.num_gpus)
        return self.model, self.processor

    def inputs(self) -> list[Path]:
        """The job's JPEG tars, written on first use (by ``job``, or by ``mix`` when ``job`` did not write them)."""
        if not self.shards:
            images = self.args.images or self.size("images")
            t0 = time.perf_counter()
            shards = write_jpeg_shards(self.workdir / "jpegs", images, self.size("tars"))
            self.results.emit("inputs_s", time.perf_counter() - t0, "s", images=images, tars=len(shards),
                              size="640x480", mib=sum(s.stat().st_size for s in shards) / 1024**2)
            self.shards, self.images = shards, images
        return self.shards

    def run_ray_section(self, name: str, shards: list[Path]) -> None:
        """Ray section ``name`` on ``shards`` in a process of its own (:func:`ray_section`), in a session of its own.

        However it ends, every process left in that session (its Ray) is killed. An exception while waiting
        (SectionTimeout: the budget is spent) first sends it CUT_SHORT_SIGNAL and waits CUT_SHORT_GRACE_S for it
        to write the rate of what its job committed.
        """
        if self.model_dir is None:
            raise RuntimeError("no checkpoint: the model section did not finish")
        spec = {"section": name, "workdir": str(self.workdir), "model_dir": str(self.model_dir),
                "shards": [str(s) for s in shards], "t0": self.results.t0, "spawned_at": time.perf_counter()}
        child = subprocess.Popen([sys.executable, __file__, *self.argv, "--ray-section", json.dumps(spec)],
                                 start_new_session=True)
        try:
            wait_unreaped(child.pid)
        except BaseException:
            os.kill(child.pid, CUT_SHORT_SIGNAL)
            wait_unreaped(child.pid, CUT_SHORT_GRACE_S)
            raise
        finally:
            mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})  # a budget ending now waits for this
            try:
                killed = kill_session(child.pid)
                child.wait()
                self.results.emit("ray_section_exit", child.returncode, None, section=name, killed_after=killed)
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if child.returncode not in (0, REPORTED_ERROR):
            raise RuntimeError(f"its process exited with status {child.returncode}")

    def start_ray(self, name: str, process_ready_s: float) -> None:
        """This process's own Ray, its files under the work folder; its start is a line of its own."""
        import ray

        t0 = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), num_gpus=self.num_gpus, include_dashboard=False, logging_level="WARNING",
                 object_store_memory=(512 if self.tiny else 8192) * 1024**2,
                 _temp_dir=str(self.workdir / f"ray-{name}"))
        self.results.emit("ray_start_s", time.perf_counter() - t0, "s", section=name, cpus=os.cpu_count(),
                          gpus=self.num_gpus, process_ready_s=process_ready_s)

    def job_config(self, shards: list, tasks: list[dict], out: Path, max_new_tokens: int):
        from paligemma_batch.config import parse_config

        return parse_config({
            "input": {"uri": [str(s) for s in shards], "format": "webdataset"},
            "tasks": tasks,
            "model": {"source": str(self.model_dir), "precision": "bfloat16", "max_new_tokens": max_new_tokens,
                      "mask_decoder": str(MASK_DECODER)},
            "inference": {"batch_size": self.args.job_batch or self.size("job_batch"), "min_actors": 1,
                          "max_actors": 1, "num_gpus": self.num_gpus, "num_cpus": 1, "num_threads": 1},
            "preprocess": {"num_cpus": 0.5 if self.tiny else 1, "batch_size": 32},
            "output": {"uri": str(out), "rows_per_file": 32 if self.tiny else 512},
            "ray": {"progress_bars": False},
        })

    def run_job(self, name: str, shards: list, tasks: list[dict], max_new_tokens: int) -> None:
        """``pipeline.run`` with part-file and GPU sampling: the rate lines (for a job cut short too, from the part
        files it committed), then whether every row came exactly once."""
        import pyarrow.parquet as pq

        from paligemma_batch.pipeline import run

        out = self.workdir / name
        config = self.job_config(shards, tasks, out, max_new_tokens)
        sampler = GpuSampler() if self.cuda else None
        watcher = PartFileWatcher(out)
        summary = None
        t0 = time.perf_counter()
        try:
            with ExitStack() as stack:
                if sampler is not None:
                    stack.enter_context(sampler)
                stack.enter_context(watcher)
                summary = run(config)
        finally:
            self.emit_rates(name, tasks, config, watcher, sampler, t0, summary)
        table = pq.ParquetDataset(sorted(str(p) for p in (out / "runs" / summary["run_id"]).glob("part-*.parquet")))
        table = table.read(columns=["image_id", "task", "status", "num_output_tokens"])
        keys = {k.rsplit("::", 1)[-1] for k in table["image_id"].to_pylist()}
        pairs = set(zip(table["image_id"].to_pylist(), table["task"].to_pylist()))
        wanted = expected_keys(shards)
        ok = (table.num_rows == len(wanted) * len(tasks) and len(pairs) == table.num_rows and keys == wanted
              and summary["rows_error"] == 0)
        tokens = table["num_output_tokens"].to_numpy()
        self.results.emit(f"{name}_rows_exactly_once", ok, None, rows=table.num_rows, images=len(wanted),
                          tasks=len(tasks), distinct_pairs=len(pairs), missing_images=len(wanted - keys),
                          rows_error=summary["rows_error"], new_tokens_mean=float(tokens.mean()),
                          new_tokens_min=int(tokens.min()))

    def emit_rates(self, name: str, tasks: list[dict], config, watcher: PartFileWatcher, sampler: GpuSampler | None,
                   t0: float, summary: dict | None) -> None:
        """The job's steady rate and GPU utilisation; ``summary`` is None when the job did not finish."""
        t1 = time.perf_counter()
        steady = watcher.steady()
        window = sorted(t for t, _ in watcher.seen.values())
        per = "images" if len(tasks) == 1 else "rows"
        rows = summary["rows_written"] if summary else sum(rows for _, rows in watcher.seen.values())
        self.results.emit(
            f"{name}_{per}_per_s", steady[0] if steady else None, f"{per}/s",
            basis="part files committed after the first, per second", finished=summary is not None,
            whole_run=rows / (t1 - t0) if summary else None, run_s=t1 - t0,
            pipeline_wall_s=summary["wall_time_s"] if summary else None,
            first_file_s=window[0] - t0 if window else None, last_file_s=window[-1] - t0 if window else None,
            steady_not_measured=None if steady else "fewer than 3 part files, or all within 1 s",
            files=len(watcher.seen), rows=rows,
            tasks=[t["task"] for t in tasks], max_new_tokens=config.model.max_new_tokens,
            batch_size=config.inference.batch_size, cpus=os.cpu_count(), preprocess_cpus=config.preprocess.num_cpus)
        if sampler is None:
            self.results.skipped(f"{name}_gpu_util", "no GPU: nvidia-smi is not sampled on the CPU run")
            return
        span = (steady[1], steady[2]) if steady else sampler.busy_window()
        util, samples = sampler.utilisation(*span) if span else (None, 0)
        busy = sampler.busy_window()
        self.results.emit(f"{name}_gpu_util", util, "%", basis="nvidia-smi samples between the first and last "
                          "part file", samples=samples, all_samples=len(sampler.samples),
                          busy_window_util=sampler.utilisation(*busy)[0] if busy else None,
                          max_memory_mib=sampler.max_memory_mib)


# --------------------------------------------------------------------------------------------- sections


def section_model(ck: Check, soft: Deadline) -> None:
    import torch

    from paligemma_batch.config import ModelConfig, StorageOptions
    from paligemma_batch.fixtures.tiny import build_config, build_processor, build_tokenizer
    from paligemma_batch.model import load_model, load_processor

    tokenizer = build_tokenizer()
    if ck.tiny:
        processor, config = build_processor(tokenizer, 64, 16), build_config(len(tokenizer))
    else:
        processor, config = build_processor(tokenizer, 224, 14), paligemma_3b_224_config()
    t0 = time.perf_counter()
    model = build_random(config, ck.device)
    ck.sync()
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    model.generation_config.suppress_tokens = [processor.tokenizer.eos_token_id]  # forces max_new_tokens
    folder = ck.workdir / "paligemma-random"
    t0 = time.perf_counter()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    save_s = time.perf_counter() - t0
    del model
    ck.free()
    cfg = ModelConfig(source=str(folder), precision="bfloat16")
    t0 = time.perf_counter()
    ck.processor = load_processor(cfg, StorageOptions())
    ck.model = load_model(cfg, StorageOptions(), num_gpus=ck.num_gpus)
    ck.sync()
    load_s = time.perf_counter() - t0
    ck.model_dir = folder
    on = {str(p.device) for p in ck.model.parameters()} | {str(p.dtype) for p in ck.model.parameters()}
    ck.results.emit("model_load_s", load_s, "s", params=params, build_s=build_s, save_s=save_s,
                    checkpoint_gib=sum(f.stat().st_size for f in folder.iterdir()) / 1024**3,
                    loaded_on=sorted(on), built_on=ck.device,
                    architecture="tiny random PaliGemma" if ck.tiny else "PaliGemma-3B-224 (random weights)",
                    gpu_memory_gib=torch.cuda.memory_allocated() / 1024**3 if ck.cuda else None)


def section_job(ck: Check, soft: Deadline) -> None:
    ck.run_ray_section("job", ck.inputs())


def section_sweep(ck: Check, soft: Deadline) -> None:
    from paligemma_batch.engines.transformers_engine import Request, TransformersEngine

    model, processor = ck.loaded()
    sizes = ck.size("sweep")
    side = processor.image_processor.size["height"]
    pixels = list(np.random.default_rng(0).integers(0, 256, (max(sizes), side, side, 3), dtype=np.uint8))
    ids = prompt_ids(processor, "caption en")
    flops = prefill_flops(model.config, len(ids))
    prefill = TransformersEngine(model, processor, 1, 1)
    generate = TransformersEngine(model, processor, NEW_TOKENS, NEW_TOKENS)
    repeats = ck.size("repeats")
    best: tuple[float, int] | None = None
    for batch in sizes:
        if soft.passed():
            ck.results.skipped("engine_images_per_s", f"batch {batch} and up: the section's time is spent")
            break
        requests = [Request(i, ids) for i in range(batch)]
        _, prefill_s, _ = ck.timed(lambda: prefill.generate(pixels[:batch], requests), repeats)
        _, generate_s, out = ck.timed(lambda: generate.generate(pixels[:batch], requests), repeats)
        tflops = batch * flops / prefill_s / 1e12
        ips = batch / generate_s
        ck.results.emit("engine_images_per_s", ips, "images/s", batch=batch, cache="dynamic", prefill_ms=prefill_s * 1e3,
                        prefill_tflops=tflops, prefill_mfu=tflops / PEAK_BF16_TFLOPS if ck.cuda else None,
                        decode_ms_per_step=(generate_s - prefill_s) / (NEW_TOKENS - 1) * 1e3, prefix_tokens=len(ids),
                        new_tokens=float(np.mean([g.num_output_tokens for g in out])))
        best = max(best or (ips, batch), (ips, batch))
    if best is None or soft.passed():
        ck.results.skipped("engine_images_per_s_static", "the section's time is spent")
        return
    batch = best[1]
    requests = [Request(i, ids) for i in range(batch)]
    static = TransformersEngine(model, processor, NEW_TOKENS, NEW_TOKENS, cache_implementation="static")
    first_s, generate_s, _ = ck.timed(lambda: static.generate(pixels[:batch], requests), repeats)
    ck.results.emit("engine_images_per_s", batch / generate_s, "images/s", batch=batch, cache="static",
                    first_call_s=first_s, dynamic_images_per_s=best[0])
    t0 = time.perf_counter()
    rows = generate.probe_max_rows(len(ids), NEW_TOKENS)
    if rows is None:
        ck.results.skipped("batch_probe_rows", "no memory probe on CPU (inference.batch_size: auto is 16 there)")
    else:
        ck.results.emit("batch_probe_rows", rows, "requests/call", probe_s=time.perf_counter() - t0,
                        prefix_tokens=len(ids), new_tokens=NEW_TOKENS, best_swept_batch=batch)


def section_precisions(ck: Check, soft: Deadline) -> None:
    import torch

    from paligemma_batch.config import ModelConfig, StorageOptions
    from paligemma_batch.engines.transformers_engine import Request, TransformersEngine
    from paligemma_batch.model import load_model

    _, processor = ck.loaded()
    batch, repeats, first = ck.size("precision_batch"), ck.size("repeats"), 8
    side = processor.image_processor.size["height"]
    pixels = list(np.random.default_rng(1).integers(0, 256, (batch, side, side, 3), dtype=np.uint8))
    requests = [Request(i, prompt_ids(processor, "caption en")) for i in range(batch)]
    reference: list[list[int]] | None = None
    for precision in ("bfloat16", "float16", "int8", "int4"):
        name = f"precision_{precision}"
        if soft.passed():
            ck.results.skipped(name, "the section's time is spent")
            continue
        model = None
        try:
            t0 = time.perf_counter()
            if precision == "bfloat16":
                model, _ = ck.loaded()
            else:
                model = load_model(ModelConfig(source=str(ck.model_dir), precision=precision), StorageOptions(),
                                   num_gpus=ck.num_gpus)
            load_s = time.perf_counter() - t0
            engine = TransformersEngine(model, processor, NEW_TOKENS, NEW_TOKENS)
            engine.generate(pixels[:2], requests[:2])  # kernels, allocator, bitsandbytes state
            if ck.cuda:
                torch.cuda.reset_peak_memory_stats()
            _, seconds, out = ck.timed(lambda: engine.generate(pixels, requests), repeats - 1)
            tokens = [g.token_ids[:first] for g in out]
            reference = tokens if precision == "bfloat16" else reference
            agree = None if reference is None else float(np.mean([a == b for a, b in zip(tokens, reference)]))
            same = None if reference is None else float(np.mean(
                [x == y for a, b in zip(tokens, reference) for x, y in zip(a, b)]))
            ck.results.emit("precision_images_per_s", batch / seconds, "images/s", precision=precision, batch=batch,
                            load_s=load_s, reused_section_1_model=precision == "bfloat16", weights_gib=model.get_memory_footprint() / 1024**3,
                            peak_gpu_gib=torch.cuda.max_memory_allocated() / 1024**3 if ck.cuda else None,
                            first_tokens=first, prompts_agreeing_with_bf16=agree, tokens_agreeing_with_bf16=same,
                            note="random weights: near-tied logits make agreement a lower bound")
        except Exception as err:  # one precision failing (a missing kernel, say) keeps the others
            ck.results.error(name, err)
        finally:
            if precision == "bfloat16":
                ck.model = None  # frees the driver's bf16 copy for the later sections
            del model
            ck.free()


def section_pg2_448(ck: Check, soft: Deadline) -> None:
    import torch

    from paligemma_batch.engines.transformers_engine import Request, TransformersEngine
    from paligemma_batch.fixtures.tiny import build_config, build_processor, build_tokenizer
    from paligemma_batch.model import attention_implementation

    tokenizer = build_tokenizer()
    if ck.tiny:
        processor, config = build_processor(tokenizer, 64, 16), build_config(len(tokenizer), version=2)
    else:
        processor, config = build_processor(tokenizer, 448, 14), paligemma2_3b_448_config()
    model = build_random(config, ck.device, seed=2)
    model.generation_config.suppress_tokens = [tokenizer.eos_token_id]
    batch, repeats = ck.size("pg2_batch"), ck.size("repeats") - 1
    side = processor.image_processor.size["height"]
    pixels = list(np.random.default_rng(2).integers(0, 256, (batch, side, side, 3), dtype=np.uint8))
    ids = prompt_ids(processor, "caption en")
    requests = [Request(i, ids) for i in range(batch)]
    engine = TransformersEngine(model, processor, NEW_TOKENS, NEW_TOKENS)
    logit_rows = min(batch, 4)
    inputs = {"input_ids": torch.tensor([ids] * logit_rows, device=ck.device),
              "pixel_values": engine.pixel_values(pixels[:logit_rows]),
              "token_type_ids": torch.zeros(logit_rows, len(ids), dtype=torch.long, device=ck.device)}
    inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
    reference = None
    # "sdpa" as the project resolves it: SDPA where the part supports it, eager elsewhere.
    variants = {"eager": "eager", "sdpa": attention_implementation(config, "sdpa"), "flex_attention": "flex_attention"}
    for attention, implementation in variants.items():
        name = f"pg2_448_{attention}"
        if attention == "flex_attention" and not ck.cuda:
            model.set_attn_implementation(implementation)  # that the model takes it, at least
            ck.results.skipped(name, "flex_attention is measured on CUDA only (on CPU it needs an inductor compile); "
                               f"the model accepted it: {model.config.text_config._attn_implementation}")
            continue
        if soft.passed():
            ck.results.skipped(name, "the section's time is spent")
            continue
        try:
            model.set_attn_implementation(implementation)
            with torch.inference_mode():
                logits = model(**inputs, logits_to_keep=1).logits[:, -1].float()
            reference = logits if attention == "eager" else reference
            diff = (logits - reference).abs()
            first_s, seconds, _ = ck.timed(lambda: engine.generate(pixels, requests), repeats)
            ck.results.emit("pg2_448_images_per_s", batch / seconds, "images/s", attention=attention, batch=batch,
                            first_call_s=first_s, logit_max_abs_diff=float(diff.max()),
                            logit_mean_abs_diff=float(diff.mean()),
                            top1_agree=float((logits.argmax(-1) == reference.argmax(-1)).float().mean()),
                            text_attention=model.config.text_config._attn_implementation,
                            vision_attention=model.config.vision_config._attn_implementation,
                            image_tokens=processor.image_seq_length)
        except Exception as err:
            ck.results.error(name, err)


def section_mix(ck: Check, soft: Deadline) -> None:
    shards = ck.inputs()
    per_tar = math.ceil(ck.images / len(shards))
    ck.run_ray_section("mix", shards[: max(1, ck.size("mix_images") // per_tar)])


SECTIONS = [("model", section_model), ("job", section_job), ("sweep", section_sweep),
            ("precisions", section_precisions), ("pg2_448", section_pg2_448), ("mix", section_mix)]


def ray_section(args: argparse.Namespace) -> int:
    """The process of one Ray section (``--ray-section SPEC``, from :meth:`Check.run_ray_section`): a Ray of its
    own, the job, its lines appended to the check's results file.

    Cut short (CUT_SHORT_SIGNAL) or failing, it writes what it has and leaves at once with ``os._exit``: Ray Data's
    write thread may still be using Ray, and the parent kills the session anyway.
    """

    def cut_short(signum, frame):
        raise SectionTimeout("cut short: the section's budget is spent")

    signal.signal(CUT_SHORT_SIGNAL, cut_short)
    spec = json.loads(args.ray_section)
    name = spec["section"]
    results = Results(args.out, t0=spec["t0"])
    try:
        ck = Check(args, results, Path(spec["workdir"]))
        ck.model_dir = Path(spec["model_dir"])
        ck.start_ray(name, process_ready_s=time.perf_counter() - spec["spawned_at"])
        ck.run_job(name, [Path(s) for s in spec["shards"]], *RAY_JOBS[name])
    except SectionTimeout:
        os._exit(1)  # the parent writes the section's error line
    except Exception as err:
        results.error(name, err)
        os._exit(REPORTED_ERROR)
    import ray

    ray.shutdown()
    return 0


def environment(ck: Check, sections: list[str]) -> None:
    import platform
    from importlib.metadata import version

    import torch
    import transformers

    try:
        import bitsandbytes

        bnb = bitsandbytes.__version__
    except Exception as err:  # reported, not fatal: only int8/int4 need it
        bnb = f"unavailable: {type(err).__name__}: {err}"
    ck.results.emit("environment", torch.cuda.get_device_name(0) if ck.cuda else "cpu", None, tiny=ck.tiny,
                    python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                    transformers=transformers.__version__, ray=version("ray"), bitsandbytes=bnb,
                    cpus=os.cpu_count(), workdir=str(ck.workdir), budget_s=ck.args.budget_s, sections=sections)


def section_budget(text: str) -> tuple[str, float]:
    """``NAME=SECONDS`` of ``--section-budget``."""
    name, _, seconds = text.partition("=")
    if name not in BUDGETS:
        raise argparse.ArgumentTypeError(f"{name!r} is not a section ({', '.join(BUDGETS)})")
    try:
        return name, float(seconds)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{seconds!r} is not a number of seconds") from None


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="every section on CPU with the tiny random model")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "out/gpu-check"),
                        help="folder for results.jsonl (default $OUT, else out/gpu-check)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="the whole check's time (default: the sections' budgets added up, 445 s on the GPU)")
    parser.add_argument("--section-budget", type=section_budget, action="append", default=[],
                        metavar="NAME=SECONDS", help="one section's budget, e.g. job=30 (repeatable)")
    parser.add_argument("--only", default=None, help="comma-separated sections to run, in the check's order; "
                        f"model comes too with any of {', '.join(sorted(CHECKPOINT_USERS))}")
    parser.add_argument("--images", type=int, default=None, help="images in the job (default 4096; tiny 256)")
    parser.add_argument("--job-batch", type=lambda v: v if v == "auto" else int(v), default=None,
                        help="images per actor call, or auto (default 128; tiny 16)")
    parser.add_argument("--workdir", default=None, help="where the work folder goes (default: the temp dir)")
    parser.add_argument("--keep-workdir", action="store_true",
                        help="keep the work folder (checkpoint, inputs, job outputs, Ray logs); default: delete it")
    parser.add_argument("--ray-section", default=None, help=argparse.SUPPRESS)  # see ray_section()
    args = parser.parse_args(argv)
    names = [name for name, _ in SECTIONS]
    args.budgets = {name: b[1 if args.tiny else 0] for name, b in BUDGETS.items()} | dict(args.section_budget)
    args.budget_s = args.budget_s or float(sum(args.budgets.values()))
    wanted = set(args.only.split(",")) if args.only else set(names)
    if wanted - set(names):
        parser.error(f"--only: unknown {', '.join(sorted(wanted - set(names)))}; sections: {', '.join(names)}")
    if wanted & CHECKPOINT_USERS:
        wanted.add("model")
    args.sections = [name for name in names if name in wanted]
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.ray_section:
        return ray_section(args)
    t_start = time.perf_counter()
    whole = Deadline(args.budget_s)
    results = Results(args.out)
    workdir = Path(tempfile.mkdtemp(prefix="pgb-gpu-check-", dir=args.workdir))
    try:
        ck = Check(args, results, workdir, argv)
        environment(ck, args.sections)
        for name, section in SECTIONS:
            if name not in args.sections:
                continue
            budget = min(args.budgets[name], whole.left)
            if budget < 10:
                results.skipped(name, f"the check's {args.budget_s:.0f} s are spent")
                continue
            t0 = time.perf_counter()
            try:
                with hard_limit(budget):
                    section(ck, Deadline(0.7 * budget))
            except (Exception, SectionTimeout) as err:
                results.error(name, err)
            finally:
                ck.free()
            results.emit("section_s", time.perf_counter() - t0, "s", section=name, budget_s=budget)
    finally:
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    results.emit("check_s", time.perf_counter() - t_start, "s", results=str(results.path),
                 workdir=str(workdir) if args.keep_workdir else "deleted")
    return 0


if __name__ == "__main__":
    sys.exit(main())
