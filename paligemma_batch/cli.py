"""The ``paligemma-batch`` command line."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
import yaml

from paligemma_batch.config import ConfigError, JobConfig, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Annotate image corpora with PaliGemma on Ray.")

SetOption = Annotated[
    Optional[list[str]], typer.Option("--set", help="Override a config key: --set output.uri=s3://b/out")
]


def _overrides(pairs: list[str] | None) -> dict:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep:
            raise typer.BadParameter(f"--set {pair}: expected KEY=VALUE")
        out[key] = yaml.safe_load(value)
    return out


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
def validate(config: Path, set_: SetOption = None) -> None:
    """Check a config before any side effect: keys, inputs, output, model source, cluster resources."""
    from paligemma_batch.pipeline import validate as check

    job = _load(config, set_)
    problems, shards = check(job)
    if problems:
        _fail(problems)
    typer.echo(f"ok: {len(shards)} shards, {len(job.tasks)} tasks, output {job.output.uri}")


@app.command()
def run(config: Path, set_: SetOption = None) -> None:
    """Run an annotation job (resumes this config's unfinished run if there is one)."""
    from paligemma_batch.pipeline import RunFailed
    from paligemma_batch.pipeline import run as run_job

    job = _load(config, set_)
    try:
        summary = run_job(job)
    except ConfigError as err:
        _fail(err.problems)
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
    video: bool = typer.Option(False, "--video", help="The video demo: synthetic clips, configs/demo-video.yaml "
                               "(per-frame detect and caption), in out/demo-video."),
) -> None:
    """Write synthetic shards, run the demo job with the shipped shapes fixture on a local Ray, print where the Parquet is."""
    from paligemma_batch.fixtures.demo import prepare_demo, prepare_video_demo
    from paligemma_batch.pipeline import run as run_job

    if video:
        config = Path("configs/demo-video.yaml") if config == Path("configs/demo.yaml") else config
        workdir = Path("out/demo-video") if workdir == Path("out/demo") else workdir
    job = _load(config, None)  # a broken config stops before the old demo output is cleared
    (prepare_video_demo if video else prepare_demo)(workdir)
    try:
        summary = run_job(job)
    except ConfigError as err:
        _fail(err.problems)
    typer.echo(json.dumps({k: summary[k] for k in ("inputs_seen", "rows_written", "rows_by_task", "errors_by_kind")}))
    print_report(summary)


ConfigOption = Annotated[
    Optional[Path],
    typer.Option("--config", help="A job config: its input section tells how to read the shards, and its storage "
                 "options how to reach the output (default: storage from the environment, format from extensions)."),
]
RunOption = Annotated[Optional[str], typer.Option("--run", help="One run id (default: every finished run).")]


def _result_sources(config: Path | None):
    """The input section and output storage options of ``--config``, or (None, defaults)."""
    from paligemma_batch.config import StorageOptions

    if config is None:
        return None, StorageOptions()
    job = _load(config, None)
    return job.input, job.output_storage


@app.command()
def runs(
    output: str = typer.Argument(help="The output root of a job (local folder or s3://...)."),
    config: ConfigOption = None,
    endpoint_url: Optional[str] = typer.Option(None, help="S3-compatible endpoint (default: the config's, else "
                                               "the environment's); credentials come from the usual AWS chain."),
    shards: bool = typer.Option(False, "--shards", help="List each run's shards under it."),
    as_json: bool = typer.Option(False, "--json", help="Print the run index as JSON."),
) -> None:
    """List the runs under an output root (the run index): status, attempts, shards, rows, times."""
    from dataclasses import asdict

    from paligemma_batch.store import OutputStore

    _, storage = _result_sources(config)
    if endpoint_url:
        storage = storage.model_copy(update={"endpoint_url": endpoint_url})
    records = OutputStore(output, storage).read_index()
    if not records:
        _fail([f"no runs at {output} (no _RUNS.json)"])
    if as_json:
        typer.echo(json.dumps({"runs": [asdict(r) for r in records]}, indent=2, ensure_ascii=False))
        return
    for r in records:
        rows = "-" if r.rows is None else r.rows
        typer.echo(f"{r.run_id}  {r.status:8}  attempts={r.attempts}  shards={len(r.shards):<6} rows={rows:<8}  "
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
) -> None:
    """Write a self-contained HTML report: sampled images with their boxes, masks, answers and errors."""
    from paligemma_batch.report import write_report

    input_config, storage = _result_sources(config)
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
    run_id: RunOption = None,
    config: ConfigOption = None,
) -> None:
    """Export boxes and masks as COCO detection + segmentation JSON."""
    from paligemma_batch.export import write_coco

    _, storage = _result_sources(config)
    names = [c.strip() for c in categories.split(",") if c.strip()] if categories else None
    try:
        path, coco = write_coco(output, to, task, names, run_id, storage)
    except (FileNotFoundError, ValueError) as err:
        _fail([str(err)])
    typer.echo(f"coco: {path} ({len(coco['images'])} images, {len(coco['categories'])} categories, "
               f"{len(coco['annotations'])} annotations from {', '.join(coco['info']['tasks']) or 'no task'})")


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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
