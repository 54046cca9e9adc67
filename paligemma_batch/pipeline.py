"""Building and running the job: ``validate(config)``, ``build(config, plan)`` and ``run(config)``.

``run`` validates everything before its first side effect, decides whether this is a new, resumed or
incremental run, streams the Dataset into the run's Parquet files, then commits the run's manifest, the
summary and the index.

Exactly once: a rerun of the same config resumes the unfinished run. It skips the shards whose every row is
committed (each shard's row count is recorded when it is read to the end), reads the rest again and skips
their committed ``(image_id, task)`` pairs. The run's output is the key-disjoint set of part files from
earlier attempts plus the files this attempt's write tasks returned; the manifest written at the end names
exactly those, so files from writers that outlived a crash are never part of it.
"""

from __future__ import annotations

import os
import posixpath
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from paligemma_batch.config import ConfigError, JobConfig
from paligemma_batch.model import source_problems
from paligemma_batch.sink import (
    OutputStore,
    RunRecord,
    RunSink,
    SUMMARY_FILE,
    ShardLog,
    WriteStats,
    new_run_id,
    now_iso,
    summarize_rows,
)
from paligemma_batch.sources import _is_local, list_shards

# GPUs without bfloat16 support, as Ray names them in accelerator_type resources.
NO_BF16_GPUS = {"V100", "T4", "P100", "P4", "K80", "M60", "P40"}


class RunFailed(RuntimeError):
    """The job stopped on a fatal error (such as a model that cannot load); its run stays resumable."""


@dataclass
class RunPlan:
    """What one invocation will do."""

    record: RunRecord  # the run in the index, attempts already counted
    shards: list[str]  # shards this invocation reads
    resumed: bool = False
    done_keys: set[str] = field(default_factory=set)  # row keys of those shards already committed
    committed: dict[str, int] = field(default_factory=dict)  # earlier attempts' part files (path -> rows)

    @property
    def run_id(self) -> str:
        return self.record.run_id


def _check_output(config: JobConfig) -> list[str]:
    store = OutputStore(config.output.uri, config.output_storage)
    fs, root = store.fs, store.root
    if _is_local(fs):
        path = Path(root)
        ancestor = path
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if path.exists() and not path.is_dir():
            return [f"output.uri: {config.output.uri} is a file, not a folder"]
        if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
            return [f"output.uri: {config.output.uri} is not writable ({ancestor} is not a writable folder)"]
    else:
        probe = posixpath.join(root, f"_WRITE_PROBE-{uuid.uuid4().hex}")
        try:
            fs.pipe_file(probe, b"")
            fs.rm_file(probe)
        except Exception as err:
            return [f"output.uri: {config.output.uri} is not writable ({type(err).__name__}: {err})"]
    fingerprint = config.fingerprint()
    for record in store.read_index():
        if record.status == "finished" and config.output.mode == "new":
            return [f"output.uri: holds a finished run ({record.run_id}); use a new output.uri or "
                    "output.mode: incremental"]
        if record.status == "finished" and record.config_hash != fingerprint:
            return [f"output.mode: incremental adds to runs of the same config, but {record.run_id} ran another "
                    "one (model, tasks, input or preprocessing differ); use a new output.uri"]
        if record.status == "running" and record.config_hash != fingerprint:
            return [f"output.uri: holds an unfinished run ({record.run_id}) with a different config; rerun its "
                    "config to resume it, or use a new output.uri"]
    return []


def _check_model(config: JobConfig) -> list[str]:
    """The model source, and whether its precision and GPU count can run as configured."""
    import importlib.util

    model, inf = config.model, config.inference
    problems = source_problems(model, config.model_storage)
    if model.precision in ("int8", "int4") and importlib.util.find_spec("bitsandbytes") is None:
        problems.append(f"model.precision: {model.precision} needs bitsandbytes (pip install bitsandbytes)")
    if inf.num_gpus > 1 and inf.num_gpus != int(inf.num_gpus):
        problems.append(f"inference.num_gpus: {inf.num_gpus:g} can't be placed; Ray shares a GPU only in "
                        "fractions of one, so above 1 use a whole number")
    return problems


def cluster_resources(config: JobConfig) -> dict[str, float]:
    """The resources the job will run on: the connected cluster's, or what a local Ray would get."""
    import ray

    if ray.is_initialized() or _ray_address(config):
        _init_ray(config)
        return dict(ray.cluster_resources())
    cpus = config.ray.num_cpus or os.cpu_count() or 1
    if config.ray.num_gpus is not None:
        gpus = config.ray.num_gpus
    else:
        import torch

        gpus = torch.cuda.device_count()
    return {"CPU": float(cpus), "GPU": float(gpus)}


def _check_resources(config: JobConfig, resources: dict[str, float]) -> list[str]:
    inf, pre = config.inference, config.preprocess
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    problems = []
    if inf.num_gpus and inf.min_actors * inf.num_gpus > gpus:
        problems.append(f"inference.num_gpus: {inf.min_actors} actor(s) x {inf.num_gpus} GPU need more than the "
                        f"cluster's {gpus:g} GPU")
    if inf.min_actors * inf.num_cpus + pre.num_cpus > cpus:
        problems.append(f"inference.num_cpus: {inf.min_actors} actor(s) x {inf.num_cpus} CPU leave no room for a "
                        f"{pre.num_cpus}-CPU read task on the cluster's {cpus:g} CPU (Ray would hang); lower it")
    accelerators = {k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:")}
    old = sorted(accelerators & NO_BF16_GPUS)
    if inf.num_gpus and old and config.model.precision in ("bfloat16", "int4", "int8"):
        problems.append(f"model.precision: {config.model.precision} computes in bfloat16, which the cluster's "
                        f"{', '.join(old)} GPUs lack; use float16 or float32")
    return problems


def validate(config: JobConfig, check_resources: bool = True) -> tuple[list[str], list[str]]:
    """Every problem with ``config`` as one line naming its key, and the shards found. Writes nothing."""
    problems: list[str] = []
    try:
        shards = list_shards(config.input)
    except Exception as err:
        shards = []
        problems.append(f"input.uri: cannot list {config.input.uri}: {type(err).__name__}: {err}")
    else:
        if not shards:
            problems.append(f"input.uri: no {config.input.format} shards at {config.input.uri}")
    if config.input.format == "images" and any(t.question_key for t in config.tasks):
        problems.append("tasks: question_key needs webdataset or parquet input")
    problems += _check_output(config)
    problems += _check_model(config)
    if check_resources:
        problems += _check_resources(config, cluster_resources(config))
    return problems, shards


def plan_run(config: JobConfig, store: OutputStore, shards: list[str]) -> RunPlan:
    """Resume this config's unfinished run if there is one; otherwise start a new (or incremental) run."""
    fingerprint = config.fingerprint()
    index = store.read_index()
    unfinished = [r for r in index if r.status == "running" and r.config_hash == fingerprint]
    if unfinished:
        return _resume_plan(config, store, unfinished[-1])
    if config.output.mode == "incremental":
        covered = {s for r in index if r.status == "finished" for s in r.shards}
        shards = [s for s in shards if s not in covered]
    run_id = new_run_id()
    return RunPlan(RunRecord(run_id, "running", fingerprint, now_iso(), shards), shards)


def _resume_plan(config: JobConfig, store: OutputStore, record: RunRecord) -> RunPlan:
    """Continue ``record``: skip its finished shards, and the committed rows of the others."""
    progress = store.progress(record.run_id)
    # An image file yields one row; tars and Parquet files record their row count when read to the end.
    sizes = dict.fromkeys(record.shards, 1) if config.input.format == "images" else store.shard_sizes(record.run_id)
    finished = progress.complete_shards(sizes, len(config.tasks))
    todo = [s for s in record.shards if s not in finished]
    todo_set = set(todo)
    done_keys = {key for key, shard in progress.keys.items() if shard in todo_set}
    record.attempts += 1
    return RunPlan(record, todo, True, done_keys, progress.files)


def _ray_address(config: JobConfig) -> str | None:
    """The cluster to join: ``ray.address``, else ``RAY_ADDRESS`` (set by ``ray job submit``); None: local."""
    return config.ray.address or os.environ.get("RAY_ADDRESS") or None


def _init_ray(config: JobConfig) -> bool:
    """Connect to the configured cluster or start a local Ray; True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    address = _ray_address(config)
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=config.ray.num_cpus, num_gpus=config.ray.num_gpus, **kwargs)
    return True


def build(config: JobConfig, plan: RunPlan, encoder):
    """The Ray Dataset: shards → read → preprocess (CPU tasks) → PaliGemma (actor pool) → annotated rows."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext, TaskPoolStrategy

    from paligemma_batch.stages import InferenceStage, PreprocessPlan, preprocess, read_shards, wanted_fields

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = config.ray.progress_bars
    ctx.execution_options.preserve_order = False
    # An actor whose model fails to load dies; Ray Data replaces it this many times, then fails with the cause.
    ctx.max_consecutive_actor_init_deaths = config.inference.model_load_retries
    pre, inf = config.preprocess, config.inference
    shards_per_read = 32 if config.input.format == "images" else 1
    ds = ray.data.from_items(
        [{"shard_uri": s} for s in plan.shards],
        override_num_blocks=max(1, min(len(plan.shards) // shards_per_read or 1, 10_000)),
    )
    ds = ds.map_batches(
        read_shards,
        batch_size=shards_per_read,
        batch_format="pyarrow",
        num_cpus=pre.num_cpus,
        fn_kwargs={
            "input_cfg": config.input,
            "fields": wanted_fields(config.tasks),
            "shard_log": None if config.input.format == "images" else ShardLog(
                OutputStore(config.output.uri, config.output_storage), plan.run_id
            ),
        },
        # A sized pool (no real cap: one task per shard at most) keeps the read out of Ray's operator fusion.
        # Fused into the stages below, their batch_size would count shard rows: up to 32 shards read one after
        # another in one task. Apart, each shard is its own read task, running while the actors start.
        compute=TaskPoolStrategy(size=max(1, len(plan.shards))),
    )
    ds = ds.map_batches(
        preprocess,
        batch_size=pre.batch_size,
        batch_format="pyarrow",
        num_cpus=pre.num_cpus,
        fn_kwargs={"plan": PreprocessPlan.create(config, encoder, plan.done_keys)},
    )
    return ds.map_batches(
        InferenceStage,
        batch_size=inf.batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(min_size=inf.min_actors, max_size=inf.max_actors),
        num_gpus=inf.num_gpus,
        num_cpus=inf.num_cpus,
        fn_constructor_kwargs={"config": config, "run_id": plan.run_id},
    )


def _write(config: JobConfig, store: OutputStore, plan: RunPlan) -> WriteStats:
    """Stream the plan's shards through the Dataset into part files; the files this attempt committed."""
    import ray

    from paligemma_batch.prompts import load_prompt_encoder
    from paligemma_batch.schema import with_metadata

    encoder = load_prompt_encoder(config.model, config.model_storage)
    schema = with_metadata({"run_id": plan.run_id, "config_hash": config.fingerprint(),
                            "model_id": config.model.source, "precision": config.model.precision})
    sink = RunSink(store, plan.run_id, plan.record.attempts, config.output.rows_per_file, schema)
    try:
        build(config, plan, encoder).write_datasink(sink, ray_remote_args={"num_cpus": config.preprocess.num_cpus})
    except ray.exceptions.ActorDiedError as err:
        retries = config.inference.model_load_retries
        cause = next((line.strip() for line in reversed(str(err).splitlines()) if line.strip()), repr(err))
        raise RunFailed(
            f"inference: {retries + 1} actor(s) in a row died loading the model (inference.model_load_retries="
            f"{retries}); run {plan.run_id} stays resumable. Cause: {cause}"
        ) from err
    return sink.stats


def run(config: JobConfig) -> dict[str, Any]:
    """Run the whole job and return its summary (also written as ``_SUMMARY.json``)."""
    import ray

    problems, shards = validate(config)
    if problems:
        raise ConfigError(problems)
    started_ray = _init_ray(config)
    try:
        store = OutputStore(config.output.uri, config.output_storage)
        plan = plan_run(config, store, shards)
        summary_base = {"run_id": plan.run_id, "output": store.run_uri(plan.run_id), "resumed": plan.resumed}
        if not plan.shards and not plan.resumed:
            return {**summary_base, "status": "nothing_to_do", "inputs_seen": 0, "rows_written": 0}
        store.upsert_run(plan.record)
        t0 = time.perf_counter()
        written = _write(config, store, plan) if plan.shards else WriteStats()
        wall = time.perf_counter() - t0
        discarded = store.finish_run(plan.run_id, {**plan.committed, **written.files})
        table = store.read_run(plan.run_id, ["image_id", "task", "status", "error", "num_output_tokens",
                                             "invalid_objects"])
        summary = {
            **summary_base,
            "status": "finished",
            "config_hash": config.fingerprint(),
            "model": {"source": config.model.source, "revision": config.model.revision,
                      "precision": config.model.precision},
            "masks_decoded": bool(config.model.mask_decoder),
            "shards": len(plan.record.shards),
            "shards_read": len(plan.shards),
            "attempts": plan.record.attempts,
            **summarize_rows(table),
            "rows_this_invocation": written.rows,
            "uncommitted_files_removed": discarded,
            "wall_time_s": round(wall, 3),
            "images_per_second": round(written.rows / max(len(config.tasks), 1) / wall, 3) if wall else 0.0,
            "output_tokens_per_second": None,
            "files": len(store.data_files(plan.run_id)),
            "started_at": plan.record.started_at,
            "finished_at": now_iso(),
        }
        summary["output_tokens_per_second"] = round(summary["output_tokens"] / wall, 1) if wall else 0.0
        store.write_json(store.run_path(plan.run_id, SUMMARY_FILE), summary)
        store.write_json(store.path(SUMMARY_FILE), summary)
        plan.record.status, plan.record.finished_at, plan.record.rows = "finished", summary["finished_at"], table.num_rows
        store.upsert_run(plan.record)
        return summary
    finally:
        if started_ray:
            ray.shutdown()
