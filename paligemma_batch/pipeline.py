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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from paligemma_batch import checks
from paligemma_batch.config import ConfigError, JobConfig
from paligemma_batch.lease import acquire_lease
from paligemma_batch.model import source_problems
from paligemma_batch.readers import ShardList, list_shards, reader_for
from paligemma_batch.storage import is_local
from paligemma_batch.stats import FileStats
from paligemma_batch.store import INDEX_FILE, SUMMARY_FILE, OutputStore, RunRecord, WriteStats, new_run_id, now_iso
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
    committed_stats: dict[str, FileStats] = field(default_factory=dict)  # and their statistics
    members: dict[str, list[str]] = field(default_factory=dict)  # image-folder groups: group id -> files

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
    for record in store.read_index(with_shards=False):
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
    problems = source_problems(model, config.model_storage)  # one listing; an unreachable bucket is one line
    if not problems:
        problems += checks.model_file_problems(config)
    problems += checks.mask_decoder_problems(config)
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


def validate(config: JobConfig, check_resources: bool = True) -> tuple[list[str], ShardList]:
    """Every problem with ``config`` as one line naming its key, and the shards found. Writes nothing.

    Cheap: a listing, one Parquet footer or a few tar member headers, file headers of the model; no image is read.
    """
    problems: list[str] = []
    shards = ShardList()
    unreachable = checks.storage_problem("input.uri", _first_uri(config.input.uri), config.input.storage_options)
    if unreachable:
        problems.append(unreachable)
    else:
        try:
            listed = list_shards(config.input)
            shards = listed if isinstance(listed, ShardList) else ShardList(listed)
        except Exception as err:
            problems.append(f"input.uri: cannot list {config.input.uri}: {checks.describe(err, _first_uri(config.input.uri))}")
        else:
            problems += checks.input_problems(config, shards)
    if not reader_for(config.input).has_fields and any(t.question_key for t in config.tasks):
        problems.append(f"tasks: question_key needs per-image fields, which {config.input.format} input lacks")
    unreachable = checks.storage_problem("output.uri", config.output.uri, config.output_storage)
    problems += [unreachable] if unreachable else _check_output(config)
    problems += _check_model(config)
    if check_resources:
        problems += _check_resources(config, cluster_resources(config))
    return problems, shards


def _first_uri(uri: str | list[str]) -> str:
    return uri if isinstance(uri, str) else (uri[0] if uri else "")


def plan_run(config: JobConfig, store: OutputStore, shards: list[str]) -> RunPlan:
    """Resume this config's unfinished run if there is one; otherwise start a new (or incremental) run.

    ``shards`` is the listing; a reader that groups files (image folders) turns the files no finished run
    covered into groups, and those are the run's shards.
    """
    fingerprint = config.fingerprint()
    index = store.read_index(with_shards=False)
    unfinished = [r for r in index if r.status == "running" and r.config_hash == fingerprint]
    if unfinished:
        return _resume_plan(config, store, unfinished[-1])
    if config.output.mode == "incremental":
        shards = store.uncovered([r for r in index if r.status == "finished"], shards)
    members = reader_for(config.input).group(shards)
    if members:
        shards = list(members)
    run_id = new_run_id()
    return RunPlan(RunRecord(run_id, "running", fingerprint, now_iso(), shards), shards, members=members)


def _resume_plan(config: JobConfig, store: OutputStore, record: RunRecord) -> RunPlan:
    """Continue ``record``: skip its finished shards, and the committed rows of the others.

    Finished shards are told from the part files' footers and the shards' recorded sizes; committed keys are
    read only for the shards that are not finished (see :meth:`OutputStore.progress`).
    """
    record.shards = record.shards or store.run_shards(record.run_id)
    tasks = [t.output_name for t in config.tasks]
    # A video's rows per task are frames, not source rows: no video shard is proven by counts, so every
    # shard's committed keys are read and its rows skipped by key.
    marks = {} if config.input.media == "video" else store.shard_marks(record.run_id)
    progress = store.progress(record.run_id, marks, tasks)
    finished = progress.complete_shards({s: m.rows for s, m in marks.items()}, len(tasks))
    todo = [s for s in record.shards if s not in finished]
    todo_set = set(todo)
    done_keys = {key for key, shard in progress.keys.items() if shard in todo_set}
    members = store.run_members(record.run_id, todo_set)
    record.attempts += 1
    return RunPlan(record, todo, True, done_keys, progress.files, progress.stats, members)


def run(config: JobConfig) -> RunSummary:
    """Run the whole job and return its summary (also written as ``_SUMMARY.json``).

    Ray starts (or is joined) only once the plan shows work; a run with nothing to do never touches it. The
    output root's lease (:mod:`paligemma_batch.lease`) is held from before planning to after the commit; another
    job holding it raises :class:`~paligemma_batch.lease.LeaseHeld` before anything is written.
    """
    problems, shards = validate(config)
    if problems:
        raise ConfigError(problems)
    store = OutputStore(config.output.uri, config.output_storage)
    root_existed = store.fs.exists(store.root)
    with acquire_lease(store.fs, store.root, f"pid {os.getpid()}", config.output.lease_timeout_s) as lease:
        plan = plan_run(config, store, shards)
        if not plan.shards and not plan.resumed:
            return RunSummary(plan.run_id, store.run_uri(plan.run_id), "nothing_to_do")
        store.upsert_run(plan.record, plan.members)
        t0 = time.perf_counter()
        if plan.shards:
            from paligemma_batch.distributed.pipeline import execute

            written = execute(config, store, plan)
        else:
            written = WriteStats()
        wall = time.perf_counter() - t0
        failure = None if plan.resumed else checks.config_failure(_first_errors(store, written))
        if not failure:
            lease.check()  # a job that lost its lease (it stalled past the timeout) must not commit
            return _finish(config, store, plan, written, wall,
                           shards.skipped if isinstance(shards, ShardList) else {})
        _discard_run(store, plan.run_id)
    if not root_existed:  # the run created the output root: leave none behind (the lease is released by now)
        store.fs.rm(store.root, recursive=True)
    raise ConfigError([failure])


def _first_errors(store: OutputStore, written: WriteStats) -> Iterator[str | None]:
    """The ``error`` of the run's rows (None for an ok row), file by file, reading only as far as asked."""
    import pyarrow.parquet as pq

    for path in sorted(written.files):
        with store.fs.open(path, "rb") as f:
            yield from pq.read_table(f, columns=["error"])["error"].to_pylist()


def _discard_run(store: OutputStore, run_id: str) -> None:
    """Remove a run that stopped on a configuration failure: its files and its index record."""
    if store.fs.exists(store.run_path(run_id)):
        store.fs.rm(store.run_path(run_id), recursive=True)
    others = [r for r in store.read_index(with_shards=False) if r.run_id != run_id]
    if others:
        store.write_index(others)
    else:
        store.fs.rm_file(store.path(INDEX_FILE))


def _finish(config: JobConfig, store: OutputStore, plan: RunPlan, written: WriteStats, wall: float,
            skipped: dict[str, int] | None = None) -> RunSummary:
    """Commit the run's manifest, summary and index record; the summary merges per-file statistics, no row read."""
    files = {**plan.committed, **written.files}
    discarded = store.finish_run(plan.run_id, files)
    total = FileStats()
    for path in files:
        stats = written.file_stats.get(path) or plan.committed_stats.get(path)
        total.merge(stats if stats is not None else store.file_stats(path))
    counts = total.summary_counts()
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
        skipped_files=dict(skipped or {}),
        attempts=plan.record.attempts,
        **counts,
        rows_this_invocation=written.rows,
        uncommitted_files_removed=discarded,
        wall_time_s=round(wall, 3),
        images_per_second=round(written.rows / max(len(config.tasks), 1) / wall, 3) if wall else 0.0,
        output_tokens_per_second=round(counts["output_tokens"] / wall, 1) if wall else 0.0,
        files=len(files),
        started_at=plan.record.started_at,
        finished_at=now_iso(),
    )
    store.write_bytes(store.run_path(plan.run_id, SUMMARY_FILE), summary.to_json())
    store.write_bytes(store.path(SUMMARY_FILE), summary.to_json())
    plan.record.status, plan.record.finished_at, plan.record.rows = "finished", summary.finished_at, total.rows
    store.upsert_run(plan.record)
    return summary
