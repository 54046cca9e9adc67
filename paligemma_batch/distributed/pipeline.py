"""Running a planned job on Ray: start or join Ray, build the Dataset, stream it into the run's sink.

``execute`` is what :func:`paligemma_batch.pipeline.run` calls once the plan has work. The Ray Data settings
the job needs live in a copy of the current ``DataContext`` for the job's duration, so code that runs after
it sees the context as it was.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import psutil
import ray
from ray._private import ray_constants
from ray.data import ActorPoolStrategy, DataContext, TaskPoolStrategy

from paligemma_batch.config import JobConfig
from paligemma_batch.distributed.progress import CountedInferenceStage, ProgressCounter, poll
from paligemma_batch.distributed.sink import RunSink
from paligemma_batch.distributed.stages import InferenceStage, PreprocessPlan, preprocess, read_shards, wanted_fields
from paligemma_batch.engines import input_spec
from paligemma_batch.pipeline import RunFailed, RunPlan, ray_address
from paligemma_batch.progress import Progress, ProgressDisplay
from paligemma_batch.prompts import PromptEncoder
from paligemma_batch.readers import reader_for
from paligemma_batch.schema import with_metadata
from paligemma_batch.storage import is_local
from paligemma_batch.store import OutputStore, ShardLog, WriteStats


def init_ray(config: JobConfig) -> bool:
    """Connect to the configured cluster or start a local Ray; True when this call started it."""
    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True}
    address = ray_address(config)
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=config.ray.num_cpus, num_gpus=config.ray.num_gpus, **kwargs)
    return True


def shutdown_ray() -> None:
    """Disconnect from Ray; a local Ray this process started stops at once, leaving no process behind.

    The job's files are committed by now, so nothing waits on Ray's graceful teardown. ``ray.shutdown`` stops
    the GCS before the autoscaler monitor, whose SIGTERM handler then reports to the dead GCS until Ray's
    one-second grace runs out (about 1.0 s of its 1.2 s): the monitor is killed first. The raylet still gets its
    SIGTERM, on which it stops its agents (killed outright, it would leave them running). A worker that was
    already exiting on its own, such as a released model actor tearing down torch, is no longer tracked by the
    raylet and would outlive this process by a second or two: it is killed.
    """
    node = ray._private.worker._global_node  # None, or a connect-only node (no processes) when joined to a cluster
    started = node.all_processes if node else {}
    workers: list[psutil.Process] = []
    for info in started.get(ray_constants.PROCESS_TYPE_RAYLET, []):
        with contextlib.suppress(psutil.NoSuchProcess):  # a raylet that died with the job has none
            workers += psutil.Process(info.process.pid).children(recursive=True)
    for info in started.get(ray_constants.PROCESS_TYPE_MONITOR, []):
        info.process.kill()
    ray.shutdown()
    alive = [proc for proc in workers if not _exited(proc)]
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    deadline = time.monotonic() + 5
    while not all(_exited(proc) for proc in alive) and time.monotonic() < deadline:
        time.sleep(0.01)


def _exited(proc: psutil.Process) -> bool:
    """Gone, or a zombie: it has exited and waits only for its new parent (init, which may be slow) to reap it."""
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def connected_resources(config: JobConfig) -> dict[str, float]:
    """The resources of the addressed (or already connected) cluster; joins it if needed."""
    init_ray(config)
    return dict(ray.cluster_resources())


@contextlib.contextmanager
def job_context(config: JobConfig) -> Iterator[DataContext]:
    """A private copy of the current ``DataContext`` with the job's settings, restored on exit."""
    previous = DataContext.get_current()
    ctx = previous.copy()
    ctx.enable_progress_bars = config.ray.progress_bars
    ctx.execution_options.preserve_order = False
    # An actor whose model fails to load dies; Ray Data replaces it this many times, then fails with the cause.
    ctx.max_consecutive_actor_init_deaths = config.inference.model_load_retries
    DataContext._set_current(ctx)
    try:
        yield ctx
    finally:
        DataContext._set_current(previous)


def build(config: JobConfig, plan: RunPlan, encoder: PromptEncoder, progress_counter=None) -> ray.data.Dataset:
    """The Ray Dataset: shards → read → preprocess (CPU tasks) → PaliGemma (actor pool) → annotated rows."""
    pre, inf = config.preprocess, config.inference
    reader = reader_for(config.input)
    shards_per_read = 32 if reader.rows_known and not plan.members else 1  # an image-folder group is one read
    ds = ray.data.from_items(
        [{"shard_uri": s, "files": plan.members.get(s)} for s in plan.shards],
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
            "shard_log": None if reader.rows_known else ShardLog(
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
        InferenceStage if progress_counter is None else CountedInferenceStage,
        batch_size=inf.images_per_call,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(min_size=inf.min_actors, max_size=inf.max_actors),
        num_gpus=inf.num_gpus,
        num_cpus=inf.num_cpus,
        fn_constructor_kwargs={"config": config, "run_id": plan.run_id, "encoder": encoder,
                               **({} if progress_counter is None else {"progress_counter": progress_counter})},
    )


def log_path(store: OutputStore, run_id: str) -> str:
    """Where the driver's log lines go: the run's ``_logs/driver.log`` for a local root, else a local temp file."""
    if is_local(store.fs):
        path = Path(store.run_path(run_id, "_logs/driver.log"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return str(path)
    return tempfile.mkstemp(prefix=f"paligemma-batch-{run_id}-", suffix=".log")[1]


@contextlib.contextmanager
def routed_logs(path: str | None) -> Iterator[TextIO]:
    """Send everything written to this process's stderr (Ray's C++ and Python loggers, transformers, workers'
    forwarded lines) to ``path`` for the duration; yields a stream to the real stderr for the tool's own lines."""
    sys.stderr.flush()
    terminal = os.fdopen(os.dup(2), "w", buffering=1)
    if path is None:
        try:
            yield terminal
        finally:
            terminal.close()
        return
    sys.stdout.flush()
    log = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    saved = {fd: os.dup(fd) for fd in (1, 2)}  # Ray prints workers' lines to stdout and stderr
    for fd in saved:
        os.dup2(log, fd)
    try:
        yield terminal
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, copy in saved.items():
            os.dup2(copy, fd)
            os.close(copy)
        os.close(log)
        terminal.close()


# Log lines a user can act on, and what the tool says about them in plain words.
NOTICES = {
    "Token authentication is enabled": "Ray token authentication is on: every `ray` command and driver of a "
                                       "cluster needs RAY_AUTH_MODE=token and the same token.",
}


def log_notices(path: str) -> list[str]:
    """The plain-words notices for the actionable warnings in the log file at ``path``."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return []
    return [notice for marker, notice in NOTICES.items() if marker in text]


def execute(config: JobConfig, store: OutputStore, plan: RunPlan) -> WriteStats:
    """Stream the plan's shards through the Dataset into part files; the files this attempt committed.

    Starts a local Ray (or joins the configured cluster) when none is connected, and shuts down what it started.
    While the job runs, a progress display of the tool's own goes to stderr; Ray's log lines go to the run's
    log file (named first) unless ``ray.verbose``.
    """
    path = None if config.ray.verbose else log_path(store, plan.run_id)
    if path:
        print(f"run {plan.run_id}: {len(plan.shards)} shards; Ray and model logs: {path}", file=sys.stderr, flush=True)
    try:
        with routed_logs(path) as terminal:
            return _execute(config, store, plan, terminal)
    finally:
        for notice in log_notices(path) if path else []:
            print(f"note: {notice}", file=sys.stderr, flush=True)


def _execute(config: JobConfig, store: OutputStore, plan: RunPlan, terminal: TextIO) -> WriteStats:
    encoder = input_spec(config.model, config.model_storage)
    schema = with_metadata({"run_id": plan.run_id, "config_hash": config.fingerprint(),
                            "model_id": config.model.source, "precision": config.model.precision})
    started = init_ray(config)
    counter = ProgressCounter.remote()
    sink = RunSink(store, plan.run_id, plan.record.attempts, config.output.rows_per_file, schema)
    reader = reader_for(config.input)
    # A reader that knows its row counts (an image folder) holds one image per file of a shard's group; a video
    # file's frames are known only once it is decoded.
    known = reader.rows_known and config.input.media == "image"
    images = sum(len(plan.members.get(s, [s])) for s in plan.shards) if known else None
    progress = Progress(len(plan.shards), len(config.tasks), images_total=images)
    display = ProgressDisplay(terminal, config.ray.progress_interval_s)
    failure: list[BaseException] = []

    def write() -> None:
        try:
            with job_context(config):
                build(config, plan, encoder, counter).write_datasink(sink,
                                                            ray_remote_args={"num_cpus": config.preprocess.num_cpus})
        except BaseException as err:  # re-raised in the driver's thread below
            failure.append(err)

    try:
        job = threading.Thread(target=write, name="paligemma-batch-write", daemon=True)
        job.start()
        while job.is_alive():
            job.join(timeout=0.5)
            with contextlib.suppress(Exception):  # a slow poll only delays the display
                poll(counter, progress)
            display.update(progress)
        with contextlib.suppress(Exception):
            poll(counter, progress)
        display.close(progress)
        if failure:
            raise failure[0]
    except ray.exceptions.ActorDiedError as err:
        retries = config.inference.model_load_retries
        cause = next((line.strip() for line in reversed(str(err).splitlines()) if line.strip()), repr(err))
        raise RunFailed(
            f"inference: {retries + 1} actor(s) in a row died loading the model (inference.model_load_retries="
            f"{retries}); run {plan.run_id} stays resumable. Cause: {cause}"
        ) from err
    finally:
        if started:
            shutdown_ray()
    return sink.stats
