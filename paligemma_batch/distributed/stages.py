"""The Ray Data adapters: thin wrappers turning the plain modules into pipeline stages.

Every stage takes and returns pyarrow tables, so the explicit schemas survive the trip through Ray.
The same callables run outside Ray (tests call them directly on tables).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from paligemma_batch.config import InputConfig, JobConfig, TaskConfig
from paligemma_batch.images import ImageDecodeError, decode_image
from paligemma_batch.media import prepare_video
from paligemma_batch.prompts import PromptEncoder
from paligemma_batch.readers import SourceRow, reader_for
from paligemma_batch.schema import ANNOTATIONS, default_row
from paligemma_batch.stats import KEYSUM_MOD, key_hash
from paligemma_batch.store import ShardLog, row_key
from paligemma_batch.tasks import max_new_tokens
from paligemma_batch.video import VideoSampling

SOURCE_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("source_uri", pa.string()),
        ("data", pa.binary()),
        ("fields", pa.string()),  # JSON: per-image values such as questions
        ("error", pa.string()),
    ]
)

PREPARED_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("source_uri", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("pixels", pa.binary()),  # uint8 [H, W, 3] at the model resolution
        ("tasks", pa.list_(pa.string())),  # the task names still to run on this image
        ("prompts", pa.list_(pa.string())),
        ("input_ids", pa.list_(pa.list_(pa.int32()))),
        ("task_errors", pa.list_(pa.string())),  # per task: why that task alone can't run (a missing field)
        ("error", pa.string()),  # why no task of the image can run (an unreadable image)
        # videos (null for images): pixels then hold num_frames images for a clip row, one for a frame row
        ("frame_index", pa.int32()),
        ("timestamp_s", pa.float64()),
        ("num_frames", pa.int32()),
    ]
)

READ_ROWS_PER_BLOCK = 64
PROMPT_TOKENS_MARGIN = 64  # prompt text tokens (bos, task words, a question) the batch-size probe allows for

logger = logging.getLogger(__name__)


def row_to_dict(row: SourceRow) -> dict:
    """A source row in :data:`SOURCE_SCHEMA`'s layout."""
    return {
        "image_id": row.image_id,
        "source_uri": row.source_uri,
        "data": row.data,
        "fields": json.dumps(row.fields, ensure_ascii=False),
        "error": row.error,
    }


def images_per_prompt(config: JobConfig) -> int:
    """The most images one prompt holds: a clip task's frames, else one."""
    if config.input.media != "video" or all(t.per == "frame" for t in config.tasks):
        return 1
    video = config.input.video
    return video.max_frames if video.fps else video.frames


def wanted_fields(tasks: list[TaskConfig]) -> list[str]:
    """The sidecar members / columns the reader must fetch for per-image prompts."""
    return sorted({t.question_key for t in tasks if t.question_key})


def read_shards(
    batch: pa.Table, input_cfg: InputConfig, fields: list[str], shard_log: ShardLog | None = None
) -> Iterator[pa.Table]:
    """Ray stage: shard URIs → source rows, streamed in blocks of at most ``READ_ROWS_PER_BLOCK`` rows.

    A row with ``files`` is an image-folder group: its files are read in order, each row keyed by its file
    and attributed to the group. With a ``shard_log``, each shard read to its end records how many rows it
    yielded and their key sum, so that a resumed run can tell finished shards from unfinished ones without
    reading them, or their committed keys, again.
    """
    rows: list[dict] = []
    reader = reader_for(input_cfg)
    groups = batch["files"].to_pylist() if "files" in batch.column_names else [None] * batch.num_rows
    for uri, files in zip(batch["shard_uri"].to_pylist(), groups):
        count, ks = 0, 0
        source = reader.iter_group(uri, files, fields) if files is not None else reader.iter_rows(uri, fields)
        for row in source:
            count += 1
            ks = (ks + key_hash(row.image_id)) % KEYSUM_MOD
            rows.append(row_to_dict(row))
            if len(rows) >= READ_ROWS_PER_BLOCK:
                yield pa.Table.from_pylist(rows, schema=SOURCE_SCHEMA)
                rows = []
        if shard_log is not None:
            shard_log.record(uri, count, ks)
    if rows:
        yield pa.Table.from_pylist(rows, schema=SOURCE_SCHEMA)


@dataclass(frozen=True)
class PreprocessPlan:
    """Everything the CPU stage needs; pickled once and shipped to the workers."""

    tasks: list[TaskConfig]
    encoder: PromptEncoder  # the checkpoint's tokenizer and input size, without transformers
    max_image_pixels: int
    jpeg_draft: bool
    done_keys: frozenset[str] = field(default_factory=frozenset)  # row keys (sink.row_key) already committed
    video: VideoSampling | None = None  # input.media: video (rows are clips, see media.prepare_video)

    @classmethod
    def create(cls, config: JobConfig, encoder: PromptEncoder, done_keys: set[str] | None = None) -> PreprocessPlan:
        return cls(
            tasks=list(config.tasks),
            encoder=encoder,
            max_image_pixels=config.preprocess.max_image_pixels,
            jpeg_draft=config.preprocess.jpeg_draft,
            done_keys=frozenset(done_keys or ()),
            video=config.input.video.sampling() if config.input.media == "video" else None,
        )


def preprocess(batch: pa.Table, plan: PreprocessPlan) -> pa.Table:
    """Ray stage: decode, orient, resize and tokenize; a bad image becomes a row with ``error`` set."""
    encoder = plan.encoder
    out = []
    for row in batch.to_pylist():
        if plan.video is not None:
            out.extend(prepare_video(row, plan))
            continue
        todo = [t for t in plan.tasks if row_key(row["image_id"], t.output_name) not in plan.done_keys]
        if not todo:
            continue
        prepared = {
            "image_id": row["image_id"],
            "source_uri": row["source_uri"],
            "width": None,
            "height": None,
            "pixels": None,
            "tasks": [t.output_name for t in todo],
            "prompts": [],
            "input_ids": [],
            "task_errors": [],
            "error": row["error"],
        }
        fields = json.loads(row["fields"] or "{}")
        if prepared["error"] is None:
            try:
                image = decode_image(row["data"], encoder.size, encoder.resample, plan.max_image_pixels, plan.jpeg_draft)
                prepared.update(pixels=image.pixels.tobytes(), width=image.width, height=image.height)
            except ImageDecodeError as err:
                prepared["error"] = str(err)
        for task in todo:
            prompt, task_error = task.prompt_from(fields)
            prepared["prompts"].append(prompt)
            prepared["task_errors"].append(task_error)
            runs = prepared["error"] is None and task_error is None
            prepared["input_ids"].append(encoder.ids(prompt) if runs else [])
        out.append(prepared)
    return pa.Table.from_pylist(out, schema=PREPARED_SCHEMA)


class InferenceStage:
    """Ray actor stage: one model per actor, loaded when Ray constructs the actor; a batch of images in,
    one annotated row per (image, task) out."""

    def __init__(self, config: JobConfig, run_id: str, encoder: PromptEncoder | None = None):
        import torch

        from paligemma_batch.engines import engine_class, input_spec
        from paligemma_batch.masks import MaskDecoder

        inf = config.inference
        if inf.num_gpus == 0:
            torch.set_num_threads(inf.num_threads or max(1, int(inf.num_cpus)))
        self.config = config
        self.run_id = run_id
        # The CPU stage's encoder (engines.input_spec): the one source of the input size, passed in by the pipeline.
        encoder = encoder or input_spec(config.model, config.model_storage)
        self.input_size = encoder.size
        self.limits = {t.output_name: max_new_tokens(t, config.model.max_new_tokens, encoder.count_tokens)
                       for t in config.tasks}
        self.engine = engine_class(config.model).load(config.model, config.model_storage, inf.num_gpus)
        if inf.batch_size == "auto":
            self.engine.max_rows = self.engine.probe_max_rows(
                encoder.image_seq_length * images_per_prompt(config) + PROMPT_TOKENS_MARGIN, max(self.limits.values()))
            logger.info("inference.batch_size auto: %s requests per model call", self.engine.max_rows or "all")
        self.decoder = None
        if config.model.mask_decoder:
            self.decoder = MaskDecoder.from_npz(config.model.mask_decoder, config.model_storage.to_fsspec())
            self.decoder = self.decoder.to(self.engine.device).eval()
        self.task_types = {t.output_name: t.task for t in config.tasks}

    def __call__(self, batch: pa.Table) -> pa.Table:
        from paligemma_batch.annotate import Item, annotate
        from paligemma_batch.engines import Request

        rows = batch.to_pylist()
        ok = [r for r in rows if r["error"] is None]
        pixels, requests = [], []
        for r in ok:  # a video's clip row holds all its frames: its prompts span them (Request.image_indices)
            first = len(pixels)
            pixels.extend(np.frombuffer(r["pixels"], np.uint8).reshape(-1, *self.input_size, 3))
            frames = tuple(range(first, len(pixels))) if len(pixels) - first > 1 else None
            requests += [Request(first, ids, frames, self.limits[task], kind=task)
                         for task, ids, task_error in zip(r["tasks"], r["input_ids"], r["task_errors"])
                         if task_error is None]
        generated = iter(self.engine.generate(pixels, requests))
        out, items = [], []
        for row in rows:
            for task, prompt, task_error in zip(row["tasks"], row["prompts"], row["task_errors"]):
                record = self._base(row, task, prompt, row["error"] or task_error)
                if record["status"] == "ok":
                    gen = next(generated)
                    record.update(text=gen.text, num_input_tokens=gen.num_input_tokens,
                                  num_output_tokens=gen.num_output_tokens)
                    items.append((record, gen.text))
                out.append(record)
        fields = annotate(
            [Item(self.task_types[r["task"]], text, r["width"], r["height"]) for r, text in items], self.decoder
        )
        for (record, _), extra in zip(items, fields):
            record.update(extra)
        return pa.Table.from_pylist(out, schema=ANNOTATIONS)

    def _base(self, row: dict, task: str, prompt: str, error: str | None) -> dict:
        """The row's common columns; the task's own columns keep the schema's defaults until parsed."""
        model = self.config.model
        return {
            **default_row(),
            "image_id": row["image_id"],
            "source_uri": row["source_uri"],
            "width": row["width"],
            "height": row["height"],
            "task": task,
            "prompt": prompt,
            "status": "ok" if error is None else "error",
            "error": error,
            "model_id": model.source,
            "model_revision": model.revision,
            "precision": model.precision,
            "run_id": self.run_id,
            "frame_index": row.get("frame_index"),
            "timestamp_s": row.get("timestamp_s"),
            "num_frames": row.get("num_frames"),
        }
