"""Entry point for ``ray job submit``: run one annotation job on the cluster it was submitted to.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- python pipelines/annotate.py --config configs/job.yaml

``--working-dir .`` uploads the checkout, and the entry point runs on the head node inside that copy, so the
relative paths are the submitter's files. Ray sets ``RAY_ADDRESS`` for the entrypoint, so the job joins that
cluster (a ``ray.address`` in the config wins). Rerunning the same command resumes the config's unfinished
run. Exit status: 0 finished or nothing to do, 1 the job failed (the cause is printed), 2 the config has
problems (one line per problem).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from paligemma_batch.cli import app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run a paligemma-batch job on the current Ray cluster.")
    parser.add_argument("--config", type=Path, required=True, help="The job's YAML config.")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="Override a config key, e.g. --set output.uri=s3://bucket/out (repeatable).")
    args = parser.parse_args(argv)
    app(["run", str(args.config), *(arg for pair in args.set for arg in ("--set", pair))], prog_name="annotate.py")


if __name__ == "__main__":
    main()
