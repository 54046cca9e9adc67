"""The ``paligemma-batch`` command line."""

from __future__ import annotations

import json
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
    """The end-of-run lines: counts, throughput and where the output is."""
    typer.echo(
        f"run {summary['run_id']}: {summary.get('inputs_seen', 0)} images, {summary.get('rows_written', 0)} rows "
        f"({summary.get('rows_ok', 0)} ok, {summary.get('rows_error', 0)} error), "
        f"{summary.get('images_per_second', 0)} images/s, {summary.get('wall_time_s', 0)} s"
    )
    typer.echo(f"parquet: {summary['output']}/")
    typer.echo(f"summary: {summary['output']}/_SUMMARY.json")


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
    from paligemma_batch.pipeline import run as run_job

    job = _load(config, set_)
    try:
        summary = run_job(job)
    except ConfigError as err:
        _fail(err.problems)
    if summary["status"] == "nothing_to_do":
        typer.echo("nothing to do: every shard is covered by a finished run")
        return
    print_report(summary)


@app.command()
def demo(
    config: Path = typer.Option(Path("configs/demo.yaml"), help="The demo job config."),
    workdir: Path = typer.Option(Path("out/demo"), help="Where the demo model, shards and output go."),
) -> None:
    """Build the tiny model and synthetic shards, run the demo job on a local Ray, print where the Parquet is."""
    from paligemma_batch.fixtures.demo import prepare_demo
    from paligemma_batch.pipeline import run as run_job

    prepare_demo(workdir)
    job = _load(config, None)
    try:
        summary = run_job(job)
    except ConfigError as err:
        _fail(err.problems)
    typer.echo(json.dumps({k: summary[k] for k in ("inputs_seen", "rows_written", "rows_by_task", "errors_by_kind")}))
    print_report(summary)


@app.command()
def runs(output: str) -> None:
    """List the runs under an output root (the run index)."""
    from paligemma_batch.config import StorageOptions
    from paligemma_batch.sink import OutputStore

    for r in OutputStore(output, StorageOptions()).read_index():
        typer.echo(f"{r.run_id}  {r.status:8}  shards={len(r.shards):<6} rows={r.rows}  started={r.started_at}"
                   f"  finished={r.finished_at or '-'}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
