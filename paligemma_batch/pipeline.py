"""Checking, planning and running the job: ``validate(config)``, ``plan_run(...)`` and ``run(config)``.

Ray-free: the Dataset is built and executed by :mod:`paligemma_batch.distributed.pipeline`, which ``run``
imports only when the plan has work.

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
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from paligemma_batch.config import ConfigError, JobConfig
from paligemma_batch.model import source_problems
from paligemma_batch.readers import list_shards, reader_for
from paligemma_batch.storage import is_local
from paligemma_batch.store import SUMMARY_FILE, OutputStore, RunRecord, WriteStats, new_run_id, now_iso, summarize_rows
from paligemma_batch.summary import RunSummary

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
    if is_local(fs):
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


def ray_address(config: JobConfig) -> str | None:
    """The cluster to join: ``ray.address``, else ``RAY_ADDRESS`` (set by ``ray job submit``); None: local."""
    return config.ray.address or os.environ.get("RAY_ADDRESS") or None


def local_gpus() -> int:
    """GPUs on this machine as ``nvidia-smi -L`` lists them (0 without the tool); never imports torch."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def cluster_resources(config: JobConfig) -> dict[str, float]:
    """The resources the job will run on: the addressed or running cluster's, or what a local Ray would get.

    Only an addressed (or already connected) cluster is asked; a local run starts no Ray to find out.
    """
    ray = sys.modules.get("ray")
    if ray_address(config) or (ray is not None and ray.is_initialized()):
        from paligemma_batch.distributed.pipeline import connected_resources

        return connected_resources(config)
    cpus = config.ray.num_cpus or os.cpu_count() or 1
    gpus = config.ray.num_gpus if config.ray.num_gpus is not None else local_gpus()
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
    if not reader_for(config.input).has_fields and any(t.question_key for t in config.tasks):
        problems.append(f"tasks: question_key needs per-image fields, which {config.input.format} input lacks")
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
    # Shards whose row count the reader knows (an image file: 1); others record it when read to the end.
    reader = reader_for(config.input)
    sizes = dict.fromkeys(record.shards, 1) if reader.rows_known else store.shard_sizes(record.run_id)
    finished = progress.complete_shards(sizes, len(config.tasks))
    if config.input.media == "video":  # a video's row count is known only after decoding: rows are skipped by key
        finished = set()
    todo = [s for s in record.shards if s not in finished]
    todo_set = set(todo)
    done_keys = {key for key, shard in progress.keys.items() if shard in todo_set}
    record.attempts += 1
    return RunPlan(record, todo, True, done_keys, progress.files)


def run(config: JobConfig) -> RunSummary:
    """Run the whole job and return its summary (also written as ``_SUMMARY.json``).

    Ray starts (or is joined) only once the plan shows work; a run with nothing to do never touches it.
    """
    problems, shards = validate(config)
    if problems:
        raise ConfigError(problems)
    store = OutputStore(config.output.uri, config.output_storage)
    plan = plan_run(config, store, shards)
    if not plan.shards and not plan.resumed:
        return RunSummary(plan.run_id, store.run_uri(plan.run_id), "nothing_to_do")
    store.upsert_run(plan.record)
    t0 = time.perf_counter()
    if plan.shards:
        from paligemma_batch.distributed.pipeline import execute

        written = execute(config, store, plan)
    else:
        written = WriteStats()
    wall = time.perf_counter() - t0
    return _finish(config, store, plan, written, wall)


def _finish(config: JobConfig, store: OutputStore, plan: RunPlan, written: WriteStats, wall: float) -> RunSummary:
    """Commit the run's manifest, summary and index record."""
    discarded = store.finish_run(plan.run_id, {**plan.committed, **written.files})
    table = store.read_run(plan.run_id, ["image_id", "task", "status", "error", "num_output_tokens",
                                         "invalid_objects"])
    counts = summarize_rows(table)
    summary = RunSummary(
        run_id=plan.run_id,
        output=store.run_uri(plan.run_id),
        status="finished",
        resumed=plan.resumed,
        config_hash=config.fingerprint(),
        model={"source": config.model.source, "revision": config.model.revision, "precision": config.model.precision},
        masks_decoded=bool(config.model.mask_decoder),
        shards=len(plan.record.shards),
        shards_read=len(plan.shards),
        attempts=plan.record.attempts,
        **counts,
        rows_this_invocation=written.rows,
        uncommitted_files_removed=discarded,
        wall_time_s=round(wall, 3),
        images_per_second=round(written.rows / max(len(config.tasks), 1) / wall, 3) if wall else 0.0,
        output_tokens_per_second=round(counts["output_tokens"] / wall, 1) if wall else 0.0,
        files=len(store.data_files(plan.run_id)),
        started_at=plan.record.started_at,
        finished_at=now_iso(),
    )
    store.write_bytes(store.run_path(plan.run_id, SUMMARY_FILE), summary.to_json())
    store.write_bytes(store.path(SUMMARY_FILE), summary.to_json())
    plan.record.status, plan.record.finished_at, plan.record.rows = "finished", summary.finished_at, table.num_rows
    store.upsert_run(plan.record)
    return summary
