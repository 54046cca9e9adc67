"""The cheap checks behind ``validate``: what would turn every row into an error, found before any side effect.

Each check reads metadata only (a listing, a Parquet footer, tar member headers, a zip directory, a safetensors
header) and returns one line per problem, naming the config key. Also the run's own guard:
:func:`config_failure` tells a run whose rows all failed for a configuration reason. Ray-free, torch-free.
"""

from __future__ import annotations

import json
import os
import posixpath
import struct
import tarfile
import zipfile
from collections.abc import Iterable

import fsspec

from paligemma_batch.config import JobConfig, StorageOptions
from paligemma_batch.readers import ShardList
from paligemma_batch.storage import filesystem

# Samples of the first shards (at most FIELD_PROBE_SHARDS) in which a per-image field must appear at least once.
FIELD_PROBE_SAMPLES = 16
FIELD_PROBE_SHARDS = 4
# A run whose first rows (this many, or all of them when fewer) fail alike for a configuration reason stops.
CONFIG_FAILURE_ROWS = 32
# Per-request limits of the reachability probe: one quick try, not the job's retry budget.
PROBE_TIMEOUT_S = 5


def describe(err: BaseException, uri: str = "") -> str:
    """An exception as one line, with a hint when an ``s3://`` URI has no endpoint but the default (AWS)."""
    text = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    line = f"{type(err).__name__}: {text}" if text else type(err).__name__
    if uri.startswith(("s3://", "s3a://")) and "Endpoint" in line and not os.environ.get("AWS_ENDPOINT_URL"):
        line += " (no endpoint is set, so AWS is assumed; set storage_options.endpoint_url, --endpoint-url or " \
                "AWS_ENDPOINT_URL)"
    return line


def _probe_fs(uri: str, storage: StorageOptions) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem of ``uri`` for one quick request: no retries, short timeouts, a fresh client."""
    protocol = fsspec.core.split_protocol(uri)[0]
    if protocol not in ("s3", "s3a"):
        return filesystem(uri, storage)
    opts = storage.model_copy(update={"retries": 0}).to_fsspec()
    opts["config_kwargs"].update(connect_timeout=PROBE_TIMEOUT_S, read_timeout=PROBE_TIMEOUT_S)
    fs, path = fsspec.core.url_to_fs(uri, skip_instance_cache=True, **opts)
    fs.retries = 1  # s3fs's own retry loop, on top of botocore's
    return fs, path


def storage_problem(key: str, uri: str, storage: StorageOptions) -> str | None:
    """One line when the store holding ``uri`` cannot be reached (endpoint, credentials, permissions)."""
    if fsspec.core.split_protocol(uri)[0] in (None, "file", "local"):
        return None
    try:
        fs, path = _probe_fs(uri, storage)
        path = path.split("*", 1)[0].split("{", 1)[0].rstrip("/") or path
        fs.ls(path if "/" in path else path + "/", detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return None  # reachable; what is (or isn't) there is for the other checks
    except Exception as err:  # any client error (endpoint, credentials, permissions) means the store is unusable
        return f"{key}: cannot reach {uri}: {describe(err, uri)}"
    return None


def listing_problems(config: JobConfig, shards: ShardList) -> list[str]:
    """Named inputs that match nothing, and compressed shards nothing here can read."""
    uri = config.input.uri
    if not shards or len(shards.missing) == len(shards):
        why = f" ({shards.missing[0]} does not exist)" if len(shards.missing) == 1 else (
            f" (none of the {len(shards.missing)} paths named exists, e.g. {shards.missing[0]})" if shards.missing else "")
        return [f"input.uri: no {config.input.format} shards at {uri}{why}"]
    if any(s.lower().endswith(".zst") for s in shards):
        from paligemma_batch.readers.webdataset import zstd_missing

        if zstd_missing():
            return ["input.uri: .tar.zst shards need the zstandard package (pip install zstandard)"]
    return []


def field_names(config: JobConfig) -> list[tuple[str, str]]:
    """``(config key, field)`` of every per-image field the tasks read."""
    return [(f"tasks.{i}.question_key", t.question_key) for i, t in enumerate(config.tasks) if t.question_key]


def _open_first(config: JobConfig, shard: str):
    fs, path = filesystem(shard, config.input.storage_options)
    return fs.open(path, "rb")


def parquet_problems(config: JobConfig, shard: str) -> list[str]:
    """Columns the config names that the first file lacks, checked on its footer alone."""
    import pyarrow.parquet as pq

    from paligemma_batch.readers.parquet import check_schema

    cfg = config.input
    with _open_first(config, shard) as f:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        wanted = [("input.image_column", cfg.image_column), ("input.id_column", cfg.id_column), *field_names(config)]
        problems = [f"{key}: '{col}' is not a column of {shard} (its columns: {', '.join(names)})"
                    for key, col in wanted if col and col not in names]
        if not problems:
            try:
                check_schema(pf.schema_arrow, cfg.image_column, [])
            except TypeError as err:
                problems.append(f"input.image_column: {err} in {shard}")
        fields = [(key, col) for key, col in field_names(config) if col in names]
        if fields and not problems and pf.metadata.num_rows:
            batch = next(pf.iter_batches(batch_size=FIELD_PROBE_SAMPLES, columns=[c for _, c in fields]))
            problems += [f"{key}: '{col}' is null in the first {batch.num_rows} rows of {shard}"
                         for key, col in fields if batch.column(col).null_count == batch.num_rows]
    return problems


def _tar_fields(f, wanted: list[str], samples: int) -> tuple[set[str], int]:
    """The per-image fields found in the first ``samples`` samples of a tar, reading sidecar members only."""
    from paligemma_batch.readers.webdataset import sidecar_fields, split_member

    found: set[str] = set()
    keys: list[str] = []
    exts = {spec.split(".", 1)[0] if spec.startswith("json.") else spec for spec in wanted}
    with tarfile.open(fileobj=f, mode="r|*") as tar:
        for info in tar:
            tar.members = []
            key, ext = split_member(info.name)
            if not keys or keys[-1] != key:
                if len(keys) == samples:
                    break
                keys.append(key)
            if ext in exts and info.isfile():
                try:
                    found |= set(sidecar_fields({ext: tar.extractfile(info).read()}, wanted))
                except (ValueError, UnicodeDecodeError):
                    pass  # a bad sidecar spoils its own sample only
    return found, len(keys)


def tar_field_problems(config: JobConfig, shards: list[str]) -> list[str]:
    """Per-image fields found in none of the first ``FIELD_PROBE_SAMPLES`` samples (from the first shards, a
    few at most, until that many samples were seen)."""
    fields = field_names(config)
    if not fields:
        return []
    from paligemma_batch.readers.webdataset import _decompressed

    found: set[str] = set()
    seen = 0
    for shard in shards[:FIELD_PROBE_SHARDS]:
        if seen >= FIELD_PROBE_SAMPLES:
            break
        fs, path = filesystem(shard, config.input.storage_options)
        try:
            with fs.open(path, "rb") as raw, _decompressed(raw, path) as f:
                fields_here, samples = _tar_fields(f, [c for _, c in fields], FIELD_PROBE_SAMPLES - seen)
        except Exception:  # a shard gone or broken since the listing is an error row; the config may be fine
            continue
        found |= fields_here
        seen += samples
    where = f"the first {seen} samples of {shards[0]}" + (" and the next shards" if len(shards) > 1 else "")
    return [f"{key}: '{col}' is in none of {where}" for key, col in fields if col not in found and seen]


def input_problems(config: JobConfig, shards: ShardList) -> list[str]:
    """The listing, then the first existing shard's schema or sidecars."""
    problems = listing_problems(config, shards)
    if problems:
        return problems
    missing = set(shards.missing)
    present = [s for s in shards if s not in missing]
    first = present[0]
    try:
        if config.input.format == "parquet":
            return parquet_problems(config, first)
        if config.input.format == "webdataset":
            return tar_field_problems(config, present)
    except Exception:  # a first shard gone or broken since the listing is an error row; the config may be fine
        return []
    return []


def _npz_problem(data_head: bytes, f) -> str | None:
    if not data_head.startswith(b"PK"):
        return "is not a .npz file (not a zip archive)"
    try:
        names = zipfile.ZipFile(f).namelist()
    except zipfile.BadZipFile as err:
        return f"is not a valid .npz file ({err})"
    if not names or not all(n.endswith(".npy") for n in names):
        return "is not a .npz file of arrays (its members: " + ", ".join(names[:5]) + ")"
    return None


def mask_decoder_problems(config: JobConfig) -> list[str]:
    """``model.mask_decoder``: exists, and is a zip of ``.npy`` arrays (the directory is read, not the arrays)."""
    uri = config.model.mask_decoder
    if not uri:
        return []
    unreachable = storage_problem("model.mask_decoder", uri, config.model_storage)
    if unreachable:
        return [unreachable]
    try:
        fs, path = filesystem(uri, config.model_storage)
        with fs.open(path, "rb") as f:
            problem = _npz_problem(f.read(4), f)
    except FileNotFoundError:
        problem = "does not exist"
    except IsADirectoryError:
        problem = "is a folder, not a .npz file"
    except Exception as err:
        problem = f"cannot be read ({describe(err, uri)})"
    return [f"model.mask_decoder: {uri} {problem}"] if problem else []


def safetensors_problem(f) -> str | None:
    """Why an open file is not a safetensors file (its 8-byte header length and JSON header), or None."""
    head = f.read(8)
    if len(head) < 8:
        return "is too short for a safetensors file"
    (size,) = struct.unpack("<Q", head)
    if not 2 <= size <= 100_000_000:
        return f"is not a safetensors file (header length {size})"
    try:
        header = json.loads(f.read(size))
    except ValueError:
        return "is not a safetensors file (its header is not JSON)"
    return None if isinstance(header, dict) else "is not a safetensors file (its header is not an object)"


def model_file_problems(config: JobConfig) -> list[str]:
    """The safetensors files of a local model folder, each checked on its header.

    A bucket folder is left to the per-node download, which fetches each file once; reading headers here would
    fetch them twice.
    """
    from paligemma_batch.model import classify_source

    try:
        source = classify_source(config.model.source)
    except Exception:
        return []  # model.source_problems reports it
    if source.kind != "local":
        return []
    fs, root = filesystem(source.location)
    try:
        names = [p for p in fs.ls(root, detail=False) if p.endswith(".safetensors")]
    except (FileNotFoundError, NotADirectoryError):
        return []
    problems = []
    for path in sorted(names):
        try:
            with fs.open(path, "rb") as f:
                problem = safetensors_problem(f)
        except Exception as err:
            problem = f"cannot be read ({describe(err)})"
        if problem:
            problems.append(f"model.source: {posixpath.basename(path)} in {config.model.source} {problem}")
    return problems


# Row errors that say the configuration is wrong (not that one input is bad): kind -> how to recognise it.
CONFIG_ERROR_KINDS = {
    "missing column": ("missing column(s)",),
    "unreachable storage": ("NoCredentialsError", "EndpointConnectionError", "InvalidAccessKeyId",
                            "SignatureDoesNotMatch", "AccessDenied", "PermissionError", "ConnectTimeoutError",
                            "ClientConnectorError", "NoSuchBucket"),
    "missing shard": ("missing_shard:",),
}


def config_error_kind(error: str | None) -> str | None:
    """The configuration-class kind of a row error, or None for an error of the input itself."""
    for kind, marks in CONFIG_ERROR_KINDS.items():
        if error and any(mark in error for mark in marks):
            return kind
    return None


def config_failure(errors: Iterable[str | None]) -> str | None:
    """One line when the first rows (``CONFIG_FAILURE_ROWS``, or all if fewer) all failed alike for a
    configuration reason; None when any of them is ok or failed for a reason of its own."""
    first = [e for _, e in zip(range(CONFIG_FAILURE_ROWS), errors)]
    kinds = {config_error_kind(e) for e in first}
    if not first or len(kinds) != 1 or None in kinds:
        return None
    key = {"missing column": "input.image_column/id_column", "unreachable storage": "input.storage_options",
           "missing shard": "input.uri"}[kinds.pop()]
    return f"{key}: the first {len(first)} rows all failed alike, so the run stopped uncommitted: {first[0]}"
