"""Running a planned job on Ray: start or join Ray, build the Dataset, stream it into the run's sink.

``execute`` is what :func:`paligemma_batch.pipeline.run` calls once the plan has work. The Ray Data settings
the job needs live in a copy of the current ``DataContext`` for the job's duration, so code that runs after
it sees the context as it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import ray
from ray.data import ActorPoolStrategy, DataContext, TaskPoolStrategy

from paligemma_batch.config import JobConfig
from paligemma_batch.distributed.sink import RunSink
from paligemma_batch.distributed.stages import InferenceStage, PreprocessPlan, preprocess, read_shards, wanted_fields
from paligemma_batch.engines import input_spec
from paligemma_batch.pipeline import RunFailed, RunPlan, ray_address
from paligemma_batch.prompts import PromptEncoder
from paligemma_batch.readers import reader_for
from paligemma_batch.schema import with_metadata
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


def build(config: JobConfig, plan: RunPlan, encoder: PromptEncoder) -> ray.data.Dataset:
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
        InferenceStage,
        batch_size=inf.batch_size,
        batch_format="pyarrow",
        compute=ActorPoolStrategy(min_size=inf.min_actors, max_size=inf.max_actors),
        num_gpus=inf.num_gpus,
        num_cpus=inf.num_cpus,
        fn_constructor_kwargs={"config": config, "run_id": plan.run_id, "input_size": encoder.size},
    )


def execute(config: JobConfig, store: OutputStore, plan: RunPlan) -> WriteStats:
    """Stream the plan's shards through the Dataset into part files; the files this attempt committed.

    Starts a local Ray (or joins the configured cluster) when none is connected, and shuts down what it started.
    """
    encoder = input_spec(config.model, config.model_storage)
    schema = with_metadata({"run_id": plan.run_id, "config_hash": config.fingerprint(),
                            "model_id": config.model.source, "precision": config.model.precision})
    sink = RunSink(store, plan.run_id, plan.record.attempts, config.output.rows_per_file, schema)
    started = init_ray(config)
    try:
        with job_context(config):
            build(config, plan, encoder).write_datasink(sink, ray_remote_args={"num_cpus": config.preprocess.num_cpus})
    except ray.exceptions.ActorDiedError as err:
        retries = config.inference.model_load_retries
        cause = next((line.strip() for line in reversed(str(err).splitlines()) if line.strip()), repr(err))
        raise RunFailed(
            f"inference: {retries + 1} actor(s) in a row died loading the model (inference.model_load_retries="
            f"{retries}); run {plan.run_id} stays resumable. Cause: {cause}"
        ) from err
    finally:
        if started:
            ray.shutdown()
    return sink.stats
