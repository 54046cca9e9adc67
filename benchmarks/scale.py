"""Bookkeeping at scale: resume planning and finishing on a committed run of 1M and 10M rows; one JSON line.

    python benchmarks/scale.py                      # 1M and 10M rows (a few minutes to build)
    python benchmarks/scale.py --rows 100000000     # 1M and 100M rows
    python benchmarks/scale.py --mode listing       # Reader.list_shards over 100k objects on moto
    python benchmarks/scale.py --mode plan          # an incremental image-folder run's plan over 1M earlier files
    python benchmarks/scale.py --mode job           # the real job on 100k tiny images, driver killed half way

The run is built in the real layout through the store's own functions (``upsert_run``, ``write_part``,
``mark_shard``): 10k-row part files, 2 tasks, shards of 1,000 images, 60-character image ids. Each
measurement runs in a fresh interpreter, so its peak RSS is the driver's: resume is
``pipeline._resume_plan``, finishing is ``pipeline._finish`` after reading every file's footer statistics
(what a driver holds after a resume). The crash variant adds partial shards (half committed) and one zombie file
repeating part of a finished shard, which the overlap rule must reject.

``--mode plan`` records a finished image-folder run of ``--files`` files through ``plan_run`` and ``upsert_run``,
then times ``plan_run`` of an incremental run over it (the listing plus 1,000 new files) in a fresh interpreter,
and prints the size of each bookkeeping object.

``--mode job`` runs ``paligemma-batch run`` in a subprocess on ``--images`` 32 px JPEGs in ``--tars`` tars (the
random tiny model, one task, one 1-thread actor per core as the README sizes a CPU job), SIGKILLs the driver once
half of the rows are in committed part files, reruns the command to resume, and checks through the store that
every (image, task) key is in the output exactly once. The driver's peak RSS is its own (VmHWM, polled), and the
Ray processes each invocation left behind are killed after it (they stay in the driver's session).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa

ROWS_PER_FILE = 10_000
IMAGES_PER_SHARD = 1_000
TASKS = ("caption", "ocr")
RUN = "20260101T000000Z-bench0"
PARTIAL_SHARDS = 3


def shard_uri(s: int) -> str:
    return f"s3://corpus-bucket/laion/shards/{s:06d}.tar"


def image_ids(s: int, images: range) -> list[str]:
    prefix = shard_uri(s) + "::"
    return [prefix + f"{i:0{60 - len(prefix)}d}" for i in images]  # 60 characters, like real ids


def _config(root: str):
    from paligemma_batch.config import JobConfig

    return JobConfig(input={"uri": "s3://corpus-bucket/laion/shards/*.tar"}, output={"uri": root},
                     model={"source": "google/paligemma-3b-pt-224"}, tasks=[{"task": t} for t in TASKS])


def _table(pairs: list[tuple[int, list[str]]]) -> pa.Table:
    from paligemma_batch.schema import ANNOTATIONS

    ids = [i for _, chunk in pairs for i in chunk for _ in TASKS]
    n = len(ids)
    columns = {
        "image_id": ids,
        "source_uri": [shard_uri(s) for s, chunk in pairs for _ in chunk for _ in TASKS],
        "task": [t for _, chunk in pairs for _ in chunk for t in TASKS],
        "status": ["ok"] * n,
        "num_output_tokens": pa.array([7] * n, pa.int32()),
        "invalid_objects": pa.array([0] * n, pa.int32()),
    }
    return pa.table({f.name: columns.get(f.name, pa.nulls(n, f.type)) for f in ANNOTATIONS}, schema=ANNOTATIONS)


def build(root: str, rows: int, crash: bool) -> None:
    """A committed, unfinished run of ``rows`` rows (plus the crash's partial shards and zombie file)."""
    from paligemma_batch.stats import keysum
    from paligemma_batch.store import OutputStore, RunRecord

    store = OutputStore(root, _config(root).output_storage)
    shards = rows // (IMAGES_PER_SHARD * len(TASKS))
    extra = PARTIAL_SHARDS if crash else 0
    store.upsert_run(RunRecord(RUN, "running", _config(root).fingerprint(), "2026-01-01T00:00:00Z",
                               [shard_uri(s) for s in range(shards + extra)]))
    per_file = ROWS_PER_FILE // len(TASKS)
    for first in range(0, shards, per_file // IMAGES_PER_SHARD):
        group = range(first, min(shards, first + per_file // IMAGES_PER_SHARD))
        store.write_part(RUN, 1, _table([(s, image_ids(s, range(IMAGES_PER_SHARD))) for s in group]))
    for s in range(shards + extra):
        store.mark_shard(RUN, shard_uri(s), IMAGES_PER_SHARD, keysum(image_ids(s, range(IMAGES_PER_SHARD))))
    if crash:
        half = range(IMAGES_PER_SHARD // 2)
        store.write_part(RUN, 1, _table([(s, image_ids(s, half)) for s in range(shards, shards + extra)]))
        store.write_part(RUN, 1, _table([(0, image_ids(0, range(10)))]))  # a zombie writer's duplicate rows


def measure(root: str, what: str, files: int = 0) -> dict:
    """In this (fresh) interpreter: time and peak RSS of resume planning, finishing, or an incremental plan."""
    from paligemma_batch.pipeline import RunPlan, _finish, _resume_plan, plan_run
    from paligemma_batch.store import OutputStore, WriteStats

    config = _folder_config(root) if what == "plan" else _config(root)
    store = OutputStore(root, config.output_storage)
    listing = folder_listing(files + NEW_FILES) if what == "plan" else []
    # VmHWM, not ru_maxrss: after fork + exec, ru_maxrss still counts the parent's pages at the fork.
    peak_before = _status_mb("VmHWM")
    Path("/proc/self/clear_refs").write_text("5")  # the peak RSS (VmHWM) starts again from the current RSS
    base = _status_mb("VmRSS")
    t0 = time.perf_counter()
    out: dict = {}
    [record] = store.read_index(with_shards=False)
    if what == "plan":
        plan = plan_run(config, store, listing)
        out.update(shards_planned=len(plan.shards), files_planned=sum(map(len, plan.members.values())))
    elif what == "resume":
        plan = _resume_plan(config, store, record)
        progress_note = {"shards_todo": len(plan.shards), "done_keys": len(plan.done_keys),
                         "files_accepted": len(plan.committed)}
        out.update(progress_note)
    else:
        written = WriteStats()
        for path in store.part_files(RUN):
            written.add(path, store.file_stats(path))
        record.shards = store.run_shards(RUN)
        summary = _finish(config, store, RunPlan(record, []), written, 1.0)
        out.update(rows_written=summary.rows_written, inputs_seen=summary.inputs_seen, files=summary.files)
    out["seconds"] = round(time.perf_counter() - t0, 2)
    peak = _status_mb("VmHWM")
    out["peak_rss_mb"], out["rss_growth_mb"] = round(max(peak, peak_before), 1), round(peak - base, 1)
    return out


def _status_mb(field: str, pid: int | str = "self") -> float:
    """A memory figure of ``/proc/PID/status`` (VmRSS, VmHWM: the peak RSS) in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def _fresh(root: str, what: str, files: int = 0) -> dict:
    done = subprocess.run([sys.executable, __file__, "--measure", what, "--root", root, "--files", str(files)],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _label(rows: int) -> str:
    return f"{rows / 1_000_000:g}m"


def bookkeeping(sizes: list[int]) -> dict:
    result: dict = {"mode": "bookkeeping", "rows_per_file": ROWS_PER_FILE, "tasks": len(TASKS)}
    for rows in sizes:
        for crash in (False, True):
            with tempfile.TemporaryDirectory(prefix="pgb-scale-") as tmp:
                root = str(Path(tmp) / "out")
                t0 = time.perf_counter()
                build(root, rows, crash)
                entry = {"build_s": round(time.perf_counter() - t0, 1), "resume": _fresh(root, "resume")}
                if not crash:
                    entry["finish"] = _fresh(root, "finish")
                result[f"{_label(rows)}{'_crash' if crash else ''}"] = entry
    small, big = map(_label, sizes)
    for step in ("resume", "finish"):
        result[f"peak_rss_ratio_{big}_vs_{small}_{step}"] = round(
            result[big][step]["peak_rss_mb"] / result[small][step]["peak_rss_mb"], 3)
        result[f"seconds_ratio_{big}_vs_{small}_{step}"] = round(
            result[big][step]["seconds"] / max(result[small][step]["seconds"], 0.01), 2)
    result[f"peak_rss_ratio_{big}_vs_{small}"] = max(result[f"peak_rss_ratio_{big}_vs_{small}_{s}"]
                                                     for s in ("resume", "finish"))
    result[f"seconds_ratio_{big}_vs_{small}"] = max(result[f"seconds_ratio_{big}_vs_{small}_{s}"]
                                                    for s in ("resume", "finish"))
    return result


NEW_FILES = 1_000  # files added since the earlier run, in --mode plan


def folder_listing(files: int) -> list[str]:
    """A sorted image-folder listing of ``files`` URIs of 60 characters."""
    return [f"s3://corpus-bucket/photos/2026/{i // 100_000:04d}/{i:07d}/image-{i:09d}.jpg" for i in range(files)]


def _folder_config(root: str):
    from paligemma_batch.config import JobConfig

    return JobConfig(input={"uri": "s3://corpus-bucket/photos/", "format": "images"},
                     output={"uri": root, "mode": "incremental"}, model={"source": "google/paligemma-3b-pt-224"},
                     tasks=[{"task": "caption"}])


def incremental_plan(files: int) -> dict:
    """The plan of an incremental image-folder run over an earlier finished run of ``files`` files."""
    from paligemma_batch.pipeline import plan_run
    from paligemma_batch.store import OutputStore

    with tempfile.TemporaryDirectory(prefix="pgb-scale-") as tmp:
        root = str(Path(tmp) / "out")
        config = _folder_config(root)
        store = OutputStore(root, config.output_storage)
        t0 = time.perf_counter()
        plan = plan_run(config, store, folder_listing(files))
        store.upsert_run(plan.record, plan.members)
        plan.record.status, plan.record.finished_at, plan.record.rows = "finished", "2026-01-02T00:00:00Z", files
        store.upsert_run(plan.record)
        build_s = time.perf_counter() - t0
        sizes = {str(p.relative_to(root)): p.stat().st_size for p in sorted(Path(root).rglob("*")) if p.is_file()}
        result = {"mode": "plan", "earlier_files": files, "new_files": NEW_FILES, "build_s": round(build_s, 1),
                  "bookkeeping_bytes": sizes, "plan": _fresh(root, "plan", files)}
    result["plan_found_only_new_files"] = result["plan"]["files_planned"] == NEW_FILES
    return result


def _job_shards(folder: Path, images: int, tars: int) -> list[Path]:
    """``images`` 32 px JPEGs in ``tars`` tars, written once into ``folder`` and reused."""
    import _common

    if (folder / "_COMPLETE").exists():
        return sorted(folder.glob("*.tar"))
    shards = _common.small_jpeg_shards(folder, images, per_shard=-(-images // tars), side=32)
    (folder / "_COMPLETE").write_text(str(images))
    return shards


def _committed_rows(output: Path) -> int:
    """Rows in the part files committed so far (a footer each), as the kill point's probe."""
    import pyarrow.parquet as pq

    rows = 0
    for path in output.glob("runs/*/part-*.parquet"):
        with contextlib.suppress(OSError):
            rows += pq.read_metadata(path).num_rows
    return rows


def _invoke(command: list[str], env: dict[str, str], log: Path, output: Path, kill_at_rows: int | None = None) -> dict:
    """Run the driver in a session of its own to its end (or SIGKILL it once ``kill_at_rows`` rows are committed):
    wall time, exit status, its peak RSS (polled from /proc) and the processes of its Ray left behind, then killed
    (they stay in its session: ``gpu.support.kill_session``)."""
    from gpu.support import kill_session

    t0 = time.perf_counter()
    with open(log, "ab") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    peak, rows, next_probe = 0.0, 0, 0.0
    while proc.poll() is None:
        with contextlib.suppress(OSError, KeyError):
            peak = max(peak, _status_mb("VmHWM", proc.pid))
        if kill_at_rows is not None and time.monotonic() >= next_probe:
            rows, next_probe = _committed_rows(output), time.monotonic() + 1.0
            if rows >= kill_at_rows:
                os.kill(proc.pid, signal.SIGKILL)
                break
        time.sleep(0.1)
    # The driver's session id stays taken while a process of the session lives, reaped leader or not.
    left = kill_session(proc.pid)
    proc.wait()
    if kill_at_rows is not None and proc.returncode != -signal.SIGKILL:
        raise SystemExit(f"the job ended (rc={proc.returncode}) before {kill_at_rows} rows were committed; see {log}")
    result = {"wall_s": round(time.perf_counter() - t0, 1), "rc": proc.returncode, "driver_peak_rss_mb": round(peak, 1),
              "ray_processes_left": left}
    return result | ({"rows_committed_at_kill": rows} if kill_at_rows is not None else {})


def job(images: int, tars: int, workdir: Path) -> dict:
    """The real job, its driver killed half way and resumed: images/s, driver peak RSS, exactly-once."""
    import shutil

    import yaml

    import _common
    from paligemma_batch.config import StorageOptions
    from paligemma_batch.store import OutputStore

    shards = _job_shards(workdir / f"jpeg-{images}x{tars}", images, tars)
    w = _common.Workload(model_dir=_common.tiny_model(workdir), shards=shards, images=images,
                         tasks=[_common.TASK_PRESETS["caption"]], max_new_tokens=16)
    output = workdir / "out"
    shutil.rmtree(output, ignore_errors=True)
    actors = os.cpu_count() or 1
    config = _common.job_config(w, str(output), actors=actors)
    rows_per_file = min(config.output.rows_per_file, max(1, images // 10))  # a small run writes several files too
    config_path, log = workdir / "job.yaml", workdir / "job.log"
    settings = config.model_dump(mode="json", exclude_defaults=True)
    settings["output"]["rows_per_file"] = rows_per_file
    config_path.write_text(yaml.safe_dump(settings))
    log.unlink(missing_ok=True)
    command = [str(Path(sys.executable).parent / "paligemma-batch"), "run", str(config_path)]
    rows = images * len(config.tasks)
    with tempfile.TemporaryDirectory(prefix="pgb-scale-1-", dir="/tmp") as first_tmp, \
            tempfile.TemporaryDirectory(prefix="pgb-scale-2-", dir="/tmp") as second_tmp:  # short: Ray's sockets
        first = _invoke(command, {**os.environ, "RAY_TMPDIR": first_tmp}, log, output, kill_at_rows=rows // 2)
        first["rows_committed_before_resume"] = _committed_rows(output)  # a writer may outlive the driver
        second = _invoke(command, {**os.environ, "RAY_TMPDIR": second_tmp}, log, output)
    if second["rc"] != 0:
        raise SystemExit(f"the resumed job failed (rc={second['rc']}); see {log}")
    summary = json.loads((output / "_SUMMARY.json").read_text())
    store = OutputStore(str(output), StorageOptions())
    [record] = store.read_index(with_shards=False)
    table = store.read_run(record.run_id, columns=["image_id", "task"])
    got = Counter(zip(table["image_id"].to_pylist(), table["task"].to_pylist()))
    expected = {(image_id, t.output_name) for image_id, _ in _common.tar_images(shards) for t in config.tasks}
    first["images_per_s"] = round(first["rows_committed_at_kill"] / len(config.tasks) / first["wall_s"], 1)
    second.update(images_per_s=round(summary["rows_this_invocation"] / len(config.tasks) / second["wall_s"], 1),
                  rows_written=summary["rows_this_invocation"], shards_read=summary["shards_read"],
                  job_images_per_s=summary["images_per_second"],
                  uncommitted_files_removed=summary["uncommitted_files_removed"])
    return {
        "mode": "job", "images": images, "tars": len(shards), "tasks": len(config.tasks), "actors": actors,
        "rows_per_file": rows_per_file, "kill_at_rows": rows // 2, "first": first, "second": second,
        "images_per_s": round(images / (first["wall_s"] + second["wall_s"]), 1),
        "attempts": record.attempts, "keys": len(got), "duplicate_rows": sum(n - 1 for n in got.values()),
        "missing_keys": len(expected - got.keys()), "unexpected_keys": len(got.keys() - expected),
        "exactly_once": got.keys() == expected and all(n == 1 for n in got.values()),
        "machine": _common.machine(),
    }


def serve_objects(objects: int) -> None:
    """Serve S3 (moto) on 127.0.0.1 holding ``objects`` empty tars under ``corpus/shards/``, put straight into
    moto's backend (a PUT over HTTP takes about 9 ms here); print the endpoint, serve until stdin closes."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["global"]
    backend.create_bucket("corpus", "us-east-1")
    for i in range(objects):
        backend.put_object("corpus", f"shards/{i:07d}.tar", b"")
    host, port = server.get_host_and_port()
    print(f"http://{host}:{port}", flush=True)
    sys.stdin.read()
    server.stop()


def listing(objects: int) -> dict:
    """``Reader.list_shards`` of a glob and of a folder over ``objects`` tars on moto (served by another process,
    so this one's time and memory are the client's), against a bare ``fs.find`` of the same prefix."""
    import tracemalloc

    import _common
    from paligemma_batch.config import InputConfig, StorageOptions
    from paligemma_batch.readers import reader_for
    from paligemma_batch.storage import filesystem

    t0 = time.perf_counter()
    server = subprocess.Popen([sys.executable, __file__, "--serve-objects", str(objects)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        endpoint = server.stdout.readline().strip()
        fill_s = time.perf_counter() - t0
        storage = StorageOptions(endpoint_url=endpoint, key="testing", secret="testing")
        fs, _ = filesystem("s3://corpus/shards/", storage)  # the instance the reader gets too
        fs.info("corpus/shards/0000000.tar")  # untimed: the client's start and the server's first request
        runs = {
            "find": lambda: fs.find("corpus/shards"),
            "glob": reader_for(InputConfig(uri="s3://corpus/shards/*.tar", storage_options=storage)).list_shards,
            "folder": reader_for(InputConfig(uri="s3://corpus/shards/", storage_options=storage)).list_shards,
        }
        result: dict = {"mode": "listing", "objects": objects, "fill_s": round(fill_s, 1)}
        for name, list_them in runs.items():
            wall, cpu = time.perf_counter(), time.process_time()
            listed = list_them()
            result[name] = {"listed": len(listed), "seconds": round(time.perf_counter() - wall, 2),
                            "client_cpu_s": round(time.process_time() - cpu, 2)}
        uri_bytes = sum(sys.getsizeof(u) for u in listed) + sys.getsizeof(listed)
        del listed
        result["uris_mb"] = round(uri_bytes / 2**20, 2)
        for name in ("glob", "folder"):
            tracemalloc.start()
            listed = runs[name]()
            held, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            del listed
            result[name].update(peak_mb=round(peak / 2**20, 2), peak_vs_uris=round(peak / uri_bytes, 2),
                                held_after_vs_uris=round(held / uri_bytes, 2))
            for what in ("seconds", "client_cpu_s"):
                result[f"{what}_ratio_{name}_vs_find"] = round(result[name][what] / max(result["find"][what], 0.01), 2)
    finally:
        server.stdin.close()
        server.wait()
    return result | {"machine": _common.machine()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["bookkeeping", "listing", "plan", "job"], default="bookkeeping")
    parser.add_argument("--rows", type=int, default=10_000_000, help="the larger run")
    parser.add_argument("--base", type=int, default=1_000_000, help="the smaller run, the ratios' base")
    parser.add_argument("--objects", type=int, default=100_000, help="listing: objects in the bucket")
    parser.add_argument("--files", type=int, default=1_000_000, help="plan: files of the earlier run")
    parser.add_argument("--images", type=int, default=100_000, help="job: images")
    parser.add_argument("--tars", type=int, default=100, help="job: tars holding them")
    parser.add_argument("--workdir", type=Path, default=Path("out/benchmarks/scale"), help="job: inputs and output")
    parser.add_argument("--measure", choices=["resume", "finish", "plan"], help=argparse.SUPPRESS)
    parser.add_argument("--serve-objects", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.root, args.measure, args.files)))
    elif args.serve_objects is not None:
        serve_objects(args.serve_objects)
    elif args.mode == "listing":
        print(json.dumps(listing(args.objects)))
    elif args.mode == "plan":
        print(json.dumps(incremental_plan(args.files)))
    elif args.mode == "job":
        print(json.dumps(job(args.images, args.tars, args.workdir.resolve())))
    else:
        print(json.dumps(bookkeeping([args.base, args.rows])))


if __name__ == "__main__":
    main()
