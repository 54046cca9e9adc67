"""The job config: typed, documented field by field, validated before any side effect.

A YAML file maps one-to-one onto :class:`JobConfig`. Unknown keys are errors that name the key.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (BaseModel, ConfigDict, Field, SecretStr, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from paligemma_batch.tasks import TASKS, build_prompt, task_issues

Precision = Literal["float32", "bfloat16", "float16", "int8", "int4"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)


class StorageOptions(_Strict):
    """Credentials and endpoint for object storage. Secrets never appear in logs, metadata or summaries."""

    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    endpoint_url: str | None = Field(None, description="S3-compatible endpoint, e.g. http://127.0.0.1:9000.")
    key: SecretStr | None = Field(None, description="Access key id; default: the usual AWS credential chain.")
    secret: SecretStr | None = Field(None, description="Secret access key; default: the usual AWS credential chain.")
    anon: bool = Field(False, description="Anonymous access to public buckets.")
    region: str | None = Field(None, description="Bucket region.")
    retries: int = Field(
        10, ge=0, le=100,
        description="Retries per storage request after the first attempt, for 5xx answers, throttling and dropped "
        "connections (botocore; s3fs also retries dropped connections and SlowDown itself).",
    )
    retry_mode: Literal["standard", "adaptive"] = Field(
        "standard",
        description="botocore retry mode: standard (jittered exponential backoff) or adaptive (also slows the "
        "request rate when the store throttles).",
    )

    @field_validator("endpoint_url")
    @classmethod
    def _plain_endpoint(cls, url: str | None) -> str | None:
        if url is None:
            return url
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if parts.username or parts.password:
            raise ValueError("must not hold credentials; use key and secret")
        if parts.query or parts.fragment:
            raise ValueError("must not have a query or fragment")
        return url

    def to_fsspec(self) -> dict[str, Any]:
        """Keyword arguments for an fsspec filesystem (s3fs understands all of them)."""
        opts: dict[str, Any] = {"anon": self.anon}
        if self.endpoint_url:
            opts["endpoint_url"] = self.endpoint_url
        if self.key:
            opts["key"] = self.key.get_secret_value()
        if self.secret:
            opts["secret"] = self.secret.get_secret_value()
        if self.region:
            opts["client_kwargs"] = {"region_name": self.region}
        opts["config_kwargs"] = {"retries": {"max_attempts": self.retries, "mode": self.retry_mode}}
        return opts


class VideoConfig(_Strict):
    """How frames are sampled from each video (input.media: video)."""

    frames: int = Field(8, ge=1, description="Frames spread uniformly over the window (centres of equal segments); "
                        "a shorter video repeats its last frame. Used when fps is not set.")
    fps: float | None = Field(None, gt=0, description="Sample every 1/fps seconds from start_s instead, at most "
                              "max_frames.")
    max_frames: int = Field(16, ge=1, description="With fps: the most frames taken from one video.")
    start_s: float = Field(0.0, ge=0, description="Start of the sampling window, seconds from the first frame.")
    end_s: float | None = Field(None, gt=0, description="End of the sampling window; default: the end of the video.")

    @model_validator(mode="after")
    def _window(self) -> VideoConfig:
        if self.end_s is not None and self.end_s <= self.start_s:
            raise ValueError("end_s must be greater than start_s")
        return self

    def sampling(self):
        """The :class:`paligemma_batch.video.VideoSampling` of this section."""
        from paligemma_batch.video import VideoSampling

        return VideoSampling(self.frames, self.fps, self.max_frames, self.start_s, self.end_s)


class InputConfig(_Strict):
    """Where the images are and how they are stored."""

    uri: str | list[str] = Field(
        description="fsspec URI, glob or list of them: s3://b/shards/*.tar, gs://..., or a local path."
    )
    format: Literal["webdataset", "images", "parquet"] = Field(
        "webdataset", description="webdataset tars, a folder of image files, or Parquet files with image bytes."
    )
    image_exts: list[str] = Field(
        default_factory=list,
        description="Extra image extensions of folder files and tar members, added to the defaults (every extension "
        "Pillow registers for a format it decodes itself: jpg, png, webp, avif, tiff, jp2, ...; any case).",
    )
    image_column: str = Field(
        "image", description="parquet: the image-bytes column (a struct with a 'bytes' field works)."
    )
    id_column: str | None = Field(
        None, description="parquet: the column with a stable per-row key (default: the row number in its file)."
    )
    files_per_shard: int = Field(
        1000, ge=1, description="images: files per shard. The sorted listing is cut into groups of this many "
        "files, the unit of reading, resume and incremental runs; files added later form new groups.",
    )
    media: Literal["image", "video"] = Field(
        "image",
        description="image, or video: files and tar members with video extensions (mp4 webm mkv mov avi m4v) and "
        "animated GIF/WebP are decoded as clips (needs the video extra: PyAV).",
    )
    video: VideoConfig = Field(default_factory=VideoConfig, description="Frame sampling, for media: video.")
    storage_options: StorageOptions = Field(default_factory=StorageOptions, description="Storage credentials.")

    @model_validator(mode="after")
    def _video_decoder(self) -> InputConfig:
        if self.media == "video":
            import importlib.util

            if importlib.util.find_spec("av") is None:
                raise ValueError("media: video needs PyAV: install paligemma-batch[video]")
        return self

    @model_validator(mode="before")
    @classmethod
    def _deprecated_image_key(cls, data: Any) -> Any:
        """``image_key`` (before 0.2) meant extensions for files and members, and the column for Parquet."""
        if not isinstance(data, dict) or "image_key" not in data:
            return data
        data = dict(data)
        value = data.pop("image_key")
        if value is not None:
            new = "image_column" if data.get("format") == "parquet" else "image_exts"
            warnings.warn(f"input.image_key is deprecated; use input.{new}", FutureWarning, stacklevel=2)
            data.setdefault(new, value if new == "image_column" else [e for e in str(value).split(";") if e])
        return data


class TaskConfig(_Strict):
    """One prompt to run on every image. Each task yields one output row per image."""

    task: str = Field(description=f"One of: {', '.join(TASKS)}.")
    name: str | None = Field(None, description="Value of the output `task` column; default: the task name.")
    lang: str = Field("en", description="Language code for caption, describe, answer and question.")
    prompt: str | None = Field(None, description="The full prompt text, for task 'prompt'.")
    question: str | None = Field(None, description="For 'answer': the question asked of every image.")
    question_key: str | None = Field(
        None,
        description="For 'answer': per-image question. parquet: a column. webdataset: a sidecar member extension "
        "('txt', 'question.txt'), or 'json.FIELD' for a field of the '.json' sidecar.",
    )
    answer: str | None = Field(None, description="For 'question': the answer to generate a question for.")
    objects: list[str] = Field(default_factory=list, description="For 'detect' and 'segment': object names.")
    max_new_tokens: int | None = Field(
        None, ge=1, le=2048,
        description="This task's generation limit, at most model.max_new_tokens. Default: the task's own budget "
        "(answer, question: 32; detect: 8 and segment: 4 found objects per name, each 4 loc tokens (+16 seg), its "
        "name and a separator), or model.max_new_tokens for free text and whenever that is lower.",
    )
    per: Literal["frame", "clip"] = Field(
        "frame",
        description="Videos only: frame annotates each sampled frame like an image (one row per frame); clip puts "
        "all sampled frames before one prompt (one row per video). detect and segment are frame-only.",
    )

    @model_validator(mode="after")
    def _check(self) -> TaskConfig:
        problems = task_issues(self)
        if self.per == "clip" and self.task in ("detect", "segment"):
            problems.append(f"per: clip is not supported for {self.task} (boxes and masks are per frame)")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def output_name(self) -> str:
        return self.name or self.task

    def prompt_for(self, question: str | None = None) -> str:
        """The prompt text for one image (``question`` comes from the image's own data when configured)."""
        return build_prompt(self, question)

    def prompt_from(self, fields: dict[str, str]) -> tuple[str, str | None]:
        """The prompt for an image with these per-image ``fields``, and why the task can't run on it (its
        ``question_key`` is missing there), or None."""
        question = fields.get(self.question_key) if self.question_key else None
        missing = self.question_key is not None and question is None
        return self.prompt_for(question), f"input: no '{self.question_key}' for task {self.output_name}" if missing else None


class ModelConfig(_Strict):
    """Which checkpoint to load and how."""

    source: str = Field(
        description="HF hub id (google/paligemma2-3b-mix-224), a local folder, or an fsspec URI of a folder "
        "(s3://bucket/models/paligemma-3b-mix-224/), downloaded once per node."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit); hub ids only.")
    engine: Literal["transformers"] = Field(
        "transformers", description="The runtime that generates: transformers (the PaliGemma classes, batched greedy)."
    )
    precision: Precision = Field(
        "bfloat16", description="float32, bfloat16, float16, int8 or int4 (bitsandbytes nf4)."
    )
    max_new_tokens: int = Field(64, ge=1, le=2048, description="Generation length cap of every task (see "
                                "tasks[].max_new_tokens for each task's own limit).")
    attn_implementation: Literal["sdpa", "eager"] = Field("sdpa", description="Attention kernel (a Gemma 2 decoder, which soft-caps, runs eager attention under sdpa).")
    mask_decoder: str | None = Field(
        None,
        description="Path or fsspec URI of the VQ-VAE mask decoder (vae-oid.npz). Without it, segment rows keep "
        "boxes and codes but no masks.",
    )
    cache_dir: str | None = Field(
        None, description="Node-local cache for fsspec sources (default $PALIGEMMA_BATCH_CACHE or ~/.cache/paligemma_batch/models)."
    )
    storage_options: StorageOptions | None = Field(
        None, description="Credentials for an fsspec source; default: input.storage_options."
    )


AUTO_CPU_IMAGES = 16
AUTO_GPU_IMAGES = 256  # split by the engine into model calls that fit (engines.base.Engine.probe_max_rows)


class InferenceConfig(_Strict):
    """The PaliGemma actor pool: one model per actor."""

    batch_size: int | Literal["auto"] = Field(
        16,
        description="Images per actor call; every task of an image runs in it, each task in its own model call. "
        f"auto: {AUTO_CPU_IMAGES} on CPU; on GPUs {AUTO_GPU_IMAGES}, with model calls of as many requests as a "
        "memory probe at actor start finds room for.",
    )
    min_actors: int = Field(1, ge=1, description="Smallest actor pool size.")
    max_actors: int = Field(1, ge=1, description="Largest actor pool size (autoscales between min and max).")
    num_gpus: float = Field(0, ge=0, description="GPUs per actor; 0 runs on CPU. >1 spreads a model over GPUs.")
    num_cpus: float = Field(1, gt=0, description="CPUs reserved per actor; leave CPU for reading and writing.")
    num_threads: int | None = Field(None, ge=1, description="torch threads per actor (default: num_cpus, >=1).")
    model_load_retries: int = Field(
        2, ge=0, le=20,
        description="Fresh actors started after one fails to load the model, before the job fails with the cause.",
    )

    @field_validator("batch_size", mode="before")
    @classmethod
    def _images_or_auto(cls, value: Any) -> int | str:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError(f"expected a whole number of images (1 or more) or auto, not {value!r}")

    @model_validator(mode="after")
    def _pool(self) -> InferenceConfig:
        if self.max_actors < self.min_actors:
            raise ValueError("max_actors must be >= min_actors")
        return self

    @property
    def images_per_call(self) -> int:
        """``batch_size``, with auto resolved for the actor's device."""
        if self.batch_size != "auto":
            return self.batch_size
        return AUTO_GPU_IMAGES if self.num_gpus > 0 else AUTO_CPU_IMAGES


class PreprocessConfig(_Strict):
    """The CPU stage: read, decode, resize, tokenize."""

    num_cpus: float = Field(0.5, gt=0, description="CPUs per read/preprocess task.")
    batch_size: int = Field(32, ge=1, description="Images per preprocess batch.")
    max_image_pixels: int = Field(
        89_478_485, ge=1, description="Images with more pixels are error rows (decompression-bomb guard)."
    )
    jpeg_draft: bool = Field(True, description="Let JPEG decode at reduced scale when the image is far larger.")


class OutputConfig(_Strict):
    """Where the Parquet goes."""

    uri: str = Field(description="Output root: local folder or fsspec URI. Each run writes under runs/RUN_ID/.")
    rows_per_file: int = Field(10_000, ge=1, description="Most rows in one Parquet file. The sink gathers this many rows "
                               "before a write, so it is also how often progress is committed.")
    mode: Literal["new", "incremental"] = Field(
        "new",
        description="new: the output must hold no finished run. incremental: process only shards that no "
        "finished run covered, as a new run.",
    )
    lease_timeout_s: float = Field(
        300, gt=1,
        description="One job per output root: a job holds _LEASE.json and refreshes it every fifth of this. A second "
        "job refuses at once; a lease not refreshed for this long (its job died) is taken over, at once when its "
        "holder ran on the same host and exited.",
    )
    storage_options: StorageOptions | None = Field(
        None, description="Credentials for the output; default: input.storage_options."
    )


class RayConfig(_Strict):
    """Where the job runs."""

    address: str | None = Field(None, description="Ray cluster address ('auto', ray://...); none starts a local Ray.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the local Ray (default: all); ignored with address.")
    num_gpus: int | None = Field(None, ge=0, description="GPUs of the local Ray (default: detected).")
    progress_bars: bool = Field(False, description="Show Ray Data's own progress bars (the tool shows its own).")
    progress_interval_s: float = Field(10.0, gt=0, description="Seconds between plain progress lines when "
                                       "output is not a terminal.")
    verbose: bool = Field(False, description="Ray's and transformers' log lines on the terminal, not in the run's "
                          "log file (_logs/driver.log).")


class JobConfig(_Strict):
    """One annotation job."""

    input: InputConfig = Field(description="The images to annotate.")
    tasks: list[TaskConfig] = Field(min_length=1, description="Prompts run on every image.")
    model: ModelConfig = Field(description="The checkpoint and its precision.")
    inference: InferenceConfig = Field(default_factory=InferenceConfig, description="The GPU actor pool.")
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig, description="The CPU stage.")
    output: OutputConfig = Field(description="Where the Parquet goes.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Local Ray or a cluster address.")

    @field_validator("tasks")
    @classmethod
    def _unique_names(cls, tasks: list[TaskConfig]) -> list[TaskConfig]:
        seen: set[str] = set()
        for task in tasks:
            if task.output_name in seen:
                raise ValueError(f"duplicate task name '{task.output_name}'; set name: to tell them apart")
            seen.add(task.output_name)
        return tasks

    @field_validator("model")
    @classmethod
    def _caps_task_limits(cls, model: ModelConfig, info: ValidationInfo) -> ModelConfig:
        for i, task in enumerate(info.data.get("tasks") or []):
            if (task.max_new_tokens or 0) > model.max_new_tokens:
                raise ValueError(f"max_new_tokens ({model.max_new_tokens}) caps every task, but tasks.{i}.max_new_tokens "
                                 f"is {task.max_new_tokens}; raise the cap or lower the task's limit")
        return model

    @property
    def output_storage(self) -> StorageOptions:
        return self.output.storage_options or self.input.storage_options

    @property
    def model_storage(self) -> StorageOptions:
        return self.model.storage_options or self.input.storage_options

    def fingerprint(self) -> str:
        """A hash of everything that changes the output rows (no secrets, no pool sizes)."""
        payload = self.model_dump(
            mode="json",
            include={"input": {"uri", "format", "image_exts", "image_column", "id_column"}, "tasks": True, "model": True,
                     "preprocess": {"max_image_pixels", "jpeg_draft"}},
        )
        payload["model"].pop("storage_options", None)
        payload["model"].pop("cache_dir", None)
        if self.input.media == "video":  # image jobs keep the fingerprints they had before videos
            payload["input"].update(self.input.model_dump(mode="json", include={"media", "video"}))
        else:
            for task in payload["tasks"]:
                task.pop("per")
        for task in payload["tasks"]:  # configs without per-task limits keep their fingerprints
            if task["max_new_tokens"] is None:
                task.pop("max_new_tokens")
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


class ConfigError(Exception):
    """A config problem; ``problems`` holds one line per problem, each naming its key."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def _format_errors(err: ValidationError) -> list[str]:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{key}: {msg}")
    return lines


def parse_config(data: dict[str, Any]) -> JobConfig:
    """Validate a config mapping; raise :class:`ConfigError` with one line per problem."""
    try:
        return JobConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(err)) from None


def _yaml_error(where: str, err: yaml.YAMLError) -> str:
    """A YAML error as one line with its line and column (1-based)."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    context = getattr(err, "context", None)
    at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}: invalid YAML at {at}{problem}" + (f" ({context})" if context else "")


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` strings (``--set``) as dotted keys and YAML values; :class:`ConfigError` names a bad one."""
    out: dict[str, Any] = {}
    problems = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            problems.append(f"--set {pair}: expected KEY=VALUE")
            continue
        try:
            out[key] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            problems.append(_yaml_error(f"{key} (--set)", err))
    if problems:
        raise ConfigError(problems)
    return out


def apply_override(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``dotted`` (``output.uri``, ``tasks.0.lang``: a number addresses a list item) in ``data``."""
    node: Any = data
    *parents, leaf = dotted.split(".")
    for depth, part in enumerate([*parents, leaf]):
        where = ".".join([*parents, leaf][:depth + 1])
        last = depth == len(parents)
        if isinstance(node, list):
            if not part.lstrip("-").isdigit():
                raise ConfigError([f"{where}: {'.'.join(parents[:depth]) or 'it'} is a list; address an item by number"])
            index = int(part)
            if not -len(node) <= index < len(node):
                raise ConfigError([f"{where}: no item {index}; the list has {len(node)}"])
            if last:
                node[index] = value
            else:
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ConfigError([f"{where}: its parent is a {type(node).__name__}, not a mapping or a list"])


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> JobConfig:
    """Load a YAML config file, apply dotted-key ``overrides`` (``{"output.uri": ..., "tasks.0.lang": ...}``)
    and validate it. Every problem is a :class:`ConfigError` line: YAML errors with their line and column."""
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as err:
        raise ConfigError([f"{path}: cannot read ({err.strerror or err})"]) from None
    except yaml.YAMLError as err:
        raise ConfigError([_yaml_error(str(path), err)]) from None
    if not isinstance(data, dict):
        raise ConfigError([f"{path}: the top level must be a mapping"])
    for dotted, value in (overrides or {}).items():
        apply_override(data, dotted, value)
    return parse_config(data)
