"""The ``paligemma-batch`` command line."""

from __future__ import annotations

import atexit
import json
import os
import sys
import threading
from enum import Enum
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer
import yaml

from paligemma_batch.config import ConfigError, JobConfig, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Annotate image corpora with PaliGemma on Ray.")

VerboseOption = Annotated[
    bool, typer.Option("--verbose", help="Show Ray's and transformers' log lines here, not in the run's log file.")
]
SetOption = Annotated[
    Optional[list[str]], typer.Option("--set", help="Override a config key: --set output.uri=s3://b/out, "
                                      "--set tasks.0.lang=de (a number addresses a list item)")
]
DEBUG = {"on": False}


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="Show the traceback of a failure.")) -> None:
    DEBUG["on"] = debug


def _overrides(pairs: list[str] | None) -> dict:
    from paligemma_batch.config import parse_overrides

    return parse_overrides(pairs or [])


def _load(config: Path, pairs: list[str] | None) -> JobConfig:
    try:
        return load_config(config, _overrides(pairs))
    except ConfigError as err:
        _fail(err.problems)


def _fail(problems: list[str]) -> None:
    for line in problems:
        typer.echo(f"error: {line}", err=True)
    raise typer.Exit(2)


def print_report(summary: dict) -> None:
    """The end-of-run report: rows by task and status, top errors, throughput, where the output is."""
    from paligemma_batch.report import print_run_report

    print_run_report(summary)


@app.command()
def validate(
    config: Path,
    set_: SetOption = None,
    verbose: bool = typer.Option(False, "--verbose", help="List every shard, and every file the listing skipped."),
) -> None:
    """Check a config before any side effect: keys, inputs, output, model source, cluster resources."""
    from paligemma_batch.pipeline import validate as check

    job = _load(config, set_)
    problems, shards = check(job)
    if problems:
        _fail(problems)
    skipped = sum(shards.skipped.values())
    note = f", {skipped} files skipped ({_by_ext(shards.skipped)})" if skipped else ""
    typer.echo(f"ok: {len(shards)} shards, {len(job.tasks)} tasks, output {job.output.uri}{note}")
    if verbose:
        for shard in shards:
            typer.echo(f"  shard    {shard}" + ("  (missing: an error row)" if shard in shards.missing else ""))
        for path in shards.skipped_paths:
            typer.echo(f"  skipped  {path}")


def _by_ext(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} .{ext}" if ext != "(none)" else f"{n} without extension" for ext, n in sorted(counts.items()))


@app.command()
def run(config: Path, set_: SetOption = None, verbose: VerboseOption = False) -> None:
    """Run an annotation job (resumes this config's unfinished run if there is one)."""
    from paligemma_batch.lease import LeaseHeld
    from paligemma_batch.pipeline import RunFailed
    from paligemma_batch.pipeline import run as run_job

    job = _load(config, [*(set_ or []), *(["ray.verbose=true"] if verbose else [])])
    try:
        summary = run_job(job)
    except ConfigError as err:
        _fail(err.problems)
    except LeaseHeld as err:
        _fail([str(err)])
    except RunFailed as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    if summary.status == "nothing_to_do":
        typer.echo("nothing to do: every shard is covered by a finished run")
        return
    print_report(summary)


@app.command()
def demo(
    config: Path = typer.Option(Path("configs/demo.yaml"), help="The demo job config."),
    workdir: Path = typer.Option(Path("out/demo"), help="Where the demo shards and output go."),
    verbose: VerboseOption = False,
    video: bool = typer.Option(False, "--video", help="The video demo: synthetic clips, configs/demo-video.yaml "
                               "(per-frame detect and caption), in out/demo-video."),
) -> None:
    """Write synthetic shards, run the demo job with the shipped shapes fixture on a local Ray, print where the Parquet is."""
    from paligemma_batch.fixtures.demo import prepare_demo, prepare_video_demo
    from paligemma_batch.pipeline import run as run_job

    if video:
        config = Path("configs/demo-video.yaml") if config == Path("configs/demo.yaml") else config
        workdir = Path("out/demo-video") if workdir == Path("out/demo") else workdir
    job = _load(config, ["ray.verbose=true"] if verbose else None)  # stops before the old output is cleared
    (prepare_video_demo if video else prepare_demo)(workdir)
    try:
        summary = run_job(job)
    except ConfigError as err:
        _fail(err.problems)
    print_report(summary)


ConfigOption = Annotated[
    Optional[Path],
    typer.Option("--config", help="A job config: its input section tells how to read the shards, and its storage "
                 "options how to reach the output (default: storage from the environment, format from extensions)."),
]
EndpointOption = Annotated[
    Optional[str],
    typer.Option("--endpoint-url", help="S3-compatible endpoint (default: the config's, else the environment's); "
                 "credentials come from the config or the usual AWS chain."),
]
RunOption = Annotated[Optional[str], typer.Option("--run", help="One run id (default: every finished run).")]


def _result_sources(output: str, config: Path | None, endpoint_url: str | None = None):
    """The input section and output storage options of ``--config`` and ``--endpoint-url``, or (None, defaults);
    fails with one line when the output's store cannot be reached."""
    from paligemma_batch.checks import storage_problem
    from paligemma_batch.config import StorageOptions

    job = None if config is None else _load(config, None)
    input_config, storage = (None, StorageOptions()) if job is None else (job.input, job.output_storage)
    if endpoint_url:
        try:
            StorageOptions(endpoint_url=endpoint_url)
        except ValueError as err:
            _fail([f"--endpoint-url: {err.errors()[0]['msg'].removeprefix('Value error, ')}"])
        storage = storage.model_copy(update={"endpoint_url": endpoint_url})
        if input_config is not None:
            input_config = input_config.model_copy(update={"storage_options": input_config.storage_options.model_copy(
                update={"endpoint_url": endpoint_url})})
    problem = storage_problem(output, output, storage)
    if problem:
        _fail([problem.replace(f"{output}: cannot reach {output}", f"{output}: cannot reach it", 1)])
    return input_config, storage


@app.command()
def runs(
    output: str = typer.Argument(help="The output root of a job (local folder or s3://...)."),
    config: ConfigOption = None,
    endpoint_url: EndpointOption = None,
    shards: bool = typer.Option(False, "--shards", help="List each run's shards under it."),
    as_json: bool = typer.Option(False, "--json", help="Print the run index as JSON."),
) -> None:
    """List the runs under an output root (the run index): status, attempts, shards, rows, times."""
    from dataclasses import asdict

    from paligemma_batch.store import OutputStore

    _, storage = _result_sources(output, config, endpoint_url)
    records = OutputStore(output, storage).read_index(with_shards=shards or as_json)
    if not records:
        _fail([f"no runs at {output} (no _RUNS.json)"])
    if as_json:
        typer.echo(json.dumps({"runs": [asdict(r) for r in records]}, indent=2, ensure_ascii=False))
        return
    for r in records:
        rows = "-" if r.rows is None else r.rows
        count = len(r.shards) if r.num_shards is None else r.num_shards
        typer.echo(f"{r.run_id}  {r.status:8}  attempts={r.attempts}  shards={count:<6} rows={rows:<8}  "
                   f"started={r.started_at}  finished={r.finished_at or '-'}")
        if shards:
            for shard in r.shards:
                typer.echo(f"    {shard}")


@app.command()
def inspect(
    output: str = typer.Argument(help="The output root of a job."),
    report: Optional[str] = typer.Option(None, "--output", help="Where the HTML goes (default OUTPUT/report.html)."),
    sample: int = typer.Option(48, min=1, help="Images in the report, drawn at random with --seed."),
    task: Optional[str] = typer.Option(None, help="Only rows of this task (its name in the config)."),
    where: Optional[list[str]] = typer.Option(None, help="COLUMN=VALUE, COLUMN!=VALUE or COLUMN~TEXT; repeatable."),
    run_id: RunOption = None,
    seed: int = typer.Option(0, help="Seed of the sample."),
    config: ConfigOption = None,
    endpoint_url: EndpointOption = None,
) -> None:
    """Write a self-contained HTML report: sampled images with their boxes, masks, answers and errors."""
    from paligemma_batch.report import write_report

    input_config, storage = _result_sources(output, config, endpoint_url)
    try:
        result = write_report(output, report, sample=sample, task=task, where=where or [], run_id=run_id, seed=seed,
                              input_config=input_config, storage_options=storage)
    except (FileNotFoundError, ValueError) as err:
        _fail([str(err)])
    typer.echo(f"report: {result.path} ({result.images} of {result.matching_images} matching images, "
               f"{result.rows} rows)")


class ExportFormat(str, Enum):
    coco = "coco"


@app.command()
def export(
    output: str = typer.Argument(help="The output root of a job."),
    format_: ExportFormat = typer.Option(ExportFormat.coco, "--format", help="Export format."),
    to: Optional[str] = typer.Option(None, "--output", help="Where the file goes (default OUTPUT/coco.json)."),
    task: Optional[list[str]] = typer.Option(None, help="Tasks to export (default: the tasks with masks, else "
                                             "those with boxes); repeatable."),
    categories: Optional[str] = typer.Option(None, help="Comma-separated category names, in id order; objects "
                                             "with other labels are left out (default: every label, sorted)."),
    images: Optional[str] = typer.Option(None, "--images", help="Also write the source images to this folder "
                                         "(local or s3://), named as the JSON's file_name; the id stays in "
                                         "paligemma_image_id."),
    run_id: RunOption = None,
    config: ConfigOption = None,
    endpoint_url: EndpointOption = None,
) -> None:
    """Export boxes and masks as COCO detection + segmentation JSON (and the source images, with --images)."""
    from paligemma_batch.export import write_coco

    input_config, storage = _result_sources(output, config, endpoint_url)
    names = [c.strip() for c in categories.split(",") if c.strip()] if categories else None
    try:
        path, coco = write_coco(output, to, task, names, run_id, storage, images, input_config)
    except (FileNotFoundError, ValueError) as err:
        _fail([str(err)])
    typer.echo(f"coco: {path} ({len(coco['images'])} images, {len(coco['categories'])} categories, "
               f"{len(coco['annotations'])} annotations from {', '.join(coco['info']['tasks']) or 'no task'})")
    if images:
        unreadable = coco["info"]["images_unreadable"]
        typer.echo(f"images: {len(coco['images']) - len(unreadable)} written to {images}"
                   + (f"; {len(unreadable)} could not be read from their shards" if unreadable else ""))


@app.command()
def evaluate(
    model: Optional[str] = typer.Option(None, help="Model folder or URI (default: the shipped shapes fixture)."),
    mask_decoder: Optional[str] = typer.Option(None, help="vae-oid.npz (default: the model folder's)."),
    shards: Optional[str] = typer.Option(None, help="Folder for the held-out shards, local or s3:// "
                                         "(default: a temporary folder)."),
    existing: bool = typer.Option(False, "--existing", help="Score the shards already in --shards (scene shards "
                                  "with KEY.json ground truth) instead of writing fresh ones."),
    images: int = typer.Option(64, min=1, help="Held-out scenes to write (rounded up to whole shards)."),
    seed: Optional[int] = typer.Option(None, help="Seed of the held-out scenes (default: the evaluation seed)."),
    output: Optional[str] = typer.Option(None, help="Output root for the job (default: a temporary folder)."),
    endpoint_url: Optional[str] = typer.Option(None, help="S3 endpoint for s3:// shards; credentials come from "
                                               "the usual AWS chain."),
) -> None:
    """Score a model on seeded held-out scenes through the full job: a table, then one JSON line."""
    from paligemma_batch.config import StorageOptions
    from paligemma_batch.evaluate import FIXTURE_MODEL, HELDOUT_SEED
    from paligemma_batch.evaluate import evaluate as score_model

    if existing and not shards:
        _fail(["--existing needs --shards"])
    metrics = score_model(model or FIXTURE_MODEL, mask_decoder, shards, generate=not existing, images=images,
                          seed=HELDOUT_SEED if seed is None else seed, output=output,
                          storage=StorageOptions(endpoint_url=endpoint_url))
    typer.echo(metrics.table())
    typer.echo(metrics.json_line())


def _error_line(err: Exception) -> tuple[str, int]:
    """A failure as ``<key or path>: <reason>`` and its exit status: 2 for an expected failure, 1 for a bug."""
    from paligemma_batch.checks import describe

    if isinstance(err, ConfigError):
        return "\n".join(f"error: {line}" for line in err.problems), 2
    if isinstance(err, (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)) and err.filename:
        return f"error: {err.filename}: {err.strerror or describe(err)}", 2
    if isinstance(err, (OSError, ValueError, KeyError, yaml.YAMLError)) or type(err).__module__.startswith(
            ("botocore", "aiobotocore", "s3fs", "fsspec", "pyarrow")):
        text = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        return f"error: {text if isinstance(err, (FileNotFoundError, ValueError)) else describe(err)}", 2
    return f"error: internal: {describe(err)} (rerun with --debug for the traceback)", 1


def main() -> None:
    """The console entry point: expected failures print one ``error:`` line (exit 2); ``--debug`` shows tracebacks."""
    try:
        app()
    except SystemExit as done:  # how every command ends
        _exit(done.code)
    except Exception as err:
        if DEBUG["on"]:
            raise
        line, status = _error_line(err)
        typer.echo(line, err=True)
        _exit(status)


def _exit(code: int | str | None) -> NoReturn:
    """End the process without the interpreter's teardown of every module it loaded (about 0.5 s once Ray and
    pyarrow are in): the output is flushed and the exit hooks (logging, temporary files, a Ray connection's
    shutdown) run first. A thread that is still running gets the normal exit, which waits for it."""
    if not isinstance(code, int) or any(t.is_alive() and not t.daemon for t in threading.enumerate()
                                        if t is not threading.main_thread()):
        raise SystemExit(code)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
