"""The output root's lease: one job at a time, on a local folder and on the S3 test endpoint.

Holders that crash or pause are real processes (tests/lease_holder.py) stopped with SIGKILL or SIGSTOP.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from paligemma_batch.config import StorageOptions
from paligemma_batch.lease import LEASE_FILE, LeaseHeld, LeaseLost, LeaseRecord, acquire_lease
from paligemma_batch.storage import filesystem

REPO = Path(__file__).parents[1]
HOLDER = Path(__file__).with_name("lease_holder.py")

pytestmark = pytest.mark.timeout(90)


@dataclass
class Output:
    uri: str
    storage: StorageOptions
    endpoint: str | None = None

    def fs_root(self, sub: str = ""):
        return filesystem(self.uri + sub, self.storage)

    def acquire(self, holder: str = "job", sub: str = "", stale_after_s: float = 30.0, heartbeat_s: float = 1.0):
        fs, root = self.fs_root(sub)
        return acquire_lease(fs, root, holder, stale_after_s, heartbeat_s)

    def on_disk(self, sub: str = "") -> dict | None:
        """The lease file as stored, or None."""
        fs, root = self.fs_root(sub)
        fs.invalidate_cache()
        try:
            return json.loads(fs.cat_file(f"{root}/{LEASE_FILE}"))
        except FileNotFoundError:
            return None

    def seed(self, heartbeat_age_s: float, stale_after_s: float, sub: str = "") -> None:
        """A lease left by a crashed job whose last heartbeat was ``heartbeat_age_s`` ago."""
        fs, root = self.fs_root(sub)
        record = LeaseRecord(holder="crashed", token="dead", host="gone", pid=1, started_at=ago(heartbeat_age_s + 60),
                             heartbeat_at=ago(heartbeat_age_s), stale_after_s=stale_after_s)
        fs.makedirs(root, exist_ok=True)
        fs.pipe_file(f"{root}/{LEASE_FILE}", record.encode())

    def start(self, *args: str, sub: str = "") -> subprocess.Popen:
        """A job in its own process (tests/lease_holder.py)."""
        cmd = [sys.executable, str(HOLDER), self.uri + sub, *args]
        if self.endpoint:
            cmd += ["--endpoint", self.endpoint]
        return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": str(REPO)})


def ago(seconds: float) -> str:
    return dt.datetime.fromtimestamp(time.time() - seconds, dt.timezone.utc).isoformat()


def said(proc: subprocess.Popen) -> dict:
    line = proc.stdout.readline()
    assert line, f"the holder exited (rc {proc.wait()}) without answering"
    return json.loads(line)


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path) -> Output:
    if request.param == "local":
        return Output(str(tmp_path / "out"), StorageOptions())
    _, bucket = request.getfixturevalue("s3_bucket")
    endpoint = request.getfixturevalue("s3_endpoint")
    return Output(f"s3://{bucket}/out", StorageOptions(endpoint_url=endpoint, key="testing", secret="testing"),
                  endpoint)


def test_second_job_refused_at_once_with_one_line_naming_the_holder(output):
    first = output.acquire("run-A")
    on_disk = output.on_disk()
    assert on_disk["token"] == first.record.token and on_disk["holder"] == "run-A" and on_disk["pid"] == os.getpid()

    t0 = time.perf_counter()
    with pytest.raises(LeaseHeld) as refused:
        output.acquire("run-B")
    assert time.perf_counter() - t0 < 2
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"output.uri: another job holds {output.uri} (job run-A on host ")
    assert f"pid {os.getpid()}, started {first.record.started_at[:19]}Z, last heartbeat " in message
    assert refused.value.holder.token == first.record.token
    assert output.on_disk()["token"] == first.record.token  # the refused job left it alone

    first.release()
    assert output.on_disk() is None
    with output.acquire("run-C") as third:
        assert output.on_disk()["token"] == third.record.token
        assert third.lost is None
        third.check()
    assert output.on_disk() is None
    with pytest.raises(LeaseLost):
        third.check()


def test_racing_jobs_exactly_one_wins_each_round(output):
    """Three processes race for a fresh lease (even rounds) and to take over a stale one (odd rounds)."""
    rounds, racers = 4, 3
    for k in range(1, rounds, 2):
        output.seed(heartbeat_age_s=60, stale_after_s=5, sub=f"/round-{k}")
    procs = [output.start("--stale", "5", "--heartbeat", "1", "--rounds", str(rounds), "--period", "0.6")
             for _ in range(racers)]
    try:
        assert all(said(p) == {"ready": True} for p in procs)
        start = f"{time.time() + 0.3}\n"
        for p in procs:
            p.stdin.write(start)
            p.stdin.flush()
        results = [[said(p) for _ in range(rounds)] for p in procs]
        assert [p.wait(timeout=30) for p in procs] == [0] * racers
    finally:
        for p in procs:
            p.kill()
            p.wait()
    for k in range(rounds):
        outcomes = [r[k] for r in results]
        assert sum(o["won"] for o in outcomes) == 1, (k, outcomes)
        assert all(o["error"].startswith("output.uri: another job holds") for o in outcomes if not o["won"])
    assert all(output.on_disk(f"/round-{k}") is None for k in range(rounds))  # each winner released its lease


def test_killed_holder_on_this_host_is_taken_over_at_once(output):
    """A driver killed with SIGKILL leaves its lease behind; on its host the next job need not wait it out."""
    holder = output.start("--stale", "60", "--heartbeat", "0.2")
    try:
        assert said(holder)["acquired"]
        time.sleep(0.5)  # a few heartbeats
        with pytest.raises(LeaseHeld, match=r"last heartbeat \d s ago"):  # alive: refused
            output.acquire("next", stale_after_s=60)
    finally:
        holder.send_signal(signal.SIGKILL)
    for _ in range(100):  # SIGKILL lands asynchronously: wait until the process is a zombie (not reaped)
        if Path(f"/proc/{holder.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            break
        time.sleep(0.05)
    last_beat = LeaseRecord(**output.on_disk())
    assert last_beat.beats >= 1
    with output.acquire("next", stale_after_s=60) as taken:  # still a zombie (not reaped), long before 60 s
        assert output.on_disk()["token"] == taken.record.token != last_beat.token
    holder.wait()


def test_holder_on_another_host_is_taken_over_after_the_timeout_and_not_before(output):
    output.seed(heartbeat_age_s=1.0, stale_after_s=1.5)
    with pytest.raises(LeaseHeld, match="last heartbeat 1 s ago"):
        output.acquire("next", stale_after_s=1.5, heartbeat_s=0.3)
    time.sleep(0.7)
    with output.acquire("next", stale_after_s=1.5, heartbeat_s=0.3) as taken:
        assert output.on_disk()["token"] == taken.record.token


def test_stale_means_older_than_both_timeouts(output):
    """A taker's short timeout doesn't override the longer one the holder promised."""
    output.seed(heartbeat_age_s=20, stale_after_s=60)
    with pytest.raises(LeaseHeld, match=r"job crashed on host gone pid 1, .*last heartbeat 20 s ago"):
        output.acquire(stale_after_s=5)
    output.seed(heartbeat_age_s=20, stale_after_s=5)
    with pytest.raises(LeaseHeld):
        output.acquire(stale_after_s=30)
    with output.acquire(stale_after_s=10) as taken:
        assert output.on_disk()["token"] == taken.record.token


def test_heartbeat_keeps_a_live_lease(output):
    with output.acquire("live", stale_after_s=0.6, heartbeat_s=0.1) as live:
        time.sleep(1.2)  # twice the timeout
        with pytest.raises(LeaseHeld):
            output.acquire("other", stale_after_s=0.6, heartbeat_s=0.1)
        on_disk = LeaseRecord(**output.on_disk())
        assert on_disk.token == live.record.token and on_disk.beats >= 5
        assert time.time() - on_disk.heartbeat_unix < 0.5
        assert live.lost is None


def test_paused_holder_does_not_clobber_the_job_that_took_over(output):
    paused = output.start("--stale", "0.5", "--heartbeat", "0.1")
    try:
        assert said(paused)["acquired"]
        paused.send_signal(signal.SIGSTOP)
        time.sleep(0.9)
        successor = output.acquire("successor", stale_after_s=0.5, heartbeat_s=0.1)
        paused.send_signal(signal.SIGCONT)
        time.sleep(0.6)  # the paused job's heartbeats are due
        assert output.on_disk()["token"] == successor.record.token
        paused.stdin.write("\n")
        paused.stdin.flush()
        assert "the lease was taken over; it is now held by job successor" in said(paused)["lost"]
        assert paused.wait(timeout=30) == 0
        beats = successor.record.beats
        time.sleep(0.3)
        assert successor.lost is None and successor.record.beats > beats  # still renewing, never conflicted
        assert output.on_disk()["token"] == successor.record.token  # the paused job's release left it alone
        successor.release()
        assert output.on_disk() is None
    finally:
        paused.kill()
        paused.wait()


def test_release_never_removes_a_lease_another_job_holds(output):
    lease = output.acquire("first", stale_after_s=30, heartbeat_s=10)
    output.seed(heartbeat_age_s=0, stale_after_s=30)  # another job's lease replaced it between two heartbeats
    lease.release()
    assert output.on_disk()["token"] == "dead"
    assert "taken over" in lease.lost
    with pytest.raises(LeaseLost, match="taken over"):
        lease.check()


def test_unreadable_lease_is_refused_not_taken(output):
    fs, root = output.fs_root()
    fs.makedirs(root, exist_ok=True)
    fs.pipe_file(f"{root}/{LEASE_FILE}", b"{not json")
    with pytest.raises(LeaseHeld, match=f"another job may hold {output.uri} .*unreadable"):
        output.acquire()
    assert fs.cat_file(f"{root}/{LEASE_FILE}") == b"{not json"


def test_other_fsspec_stores_work_by_check_then_write():
    import fsspec

    fs = fsspec.filesystem("memory")
    with acquire_lease(fs, "/pgb-lease/out", "first", 30, 1) as first:
        with pytest.raises(LeaseHeld, match="^output.uri: another job holds memory:///pgb-lease/out "):
            acquire_lease(fs, "/pgb-lease/out", "second", 30, 1)
        assert json.loads(fs.cat_file("/pgb-lease/out/_LEASE.json"))["token"] == first.record.token
    assert not fs.exists("/pgb-lease/out/_LEASE.json")


def test_heartbeat_must_beat_within_the_timeout(tmp_path):
    fs, root = filesystem(str(tmp_path), StorageOptions())
    with pytest.raises(ValueError, match="heartbeat_s"):
        acquire_lease(fs, root, "job", stale_after_s=10, heartbeat_s=10)
    assert not (tmp_path / LEASE_FILE).exists()


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_jobs_started_together_on_one_root_exactly_one_runs(where, request, tmp_path, tiny_model_dir,
                                                                scene_shards):
    """Two ``paligemma-batch run`` started together: one finishes, the other exits 2 at once with one line."""
    import yaml

    from conftest import job_config
    from paligemma_batch.readers import iter_rows
    from paligemma_batch.results import read_results
    from paligemma_batch.store import OutputStore

    storage = StorageOptions()
    out = str(tmp_path / "out")
    if where == "s3":
        _, bucket = request.getfixturevalue("s3_bucket")
        storage = StorageOptions(endpoint_url=request.getfixturevalue("s3_endpoint"), key="testing", secret="testing")
        out = f"s3://{bucket}/out"
    config = job_config(tiny_model_dir, [str(p) for p in scene_shards[:1]], out,
                        tasks=[{"task": "caption", "lang": "en"}],
                        output={"uri": out, "storage_options": storage.model_dump(mode="json", exclude_none=True)
                                | ({"key": "testing", "secret": "testing"} if where == "s3" else {})})
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude_none=True)))
    cli = [str(Path(sys.executable).with_name("paligemma-batch")), "run", str(path)]
    jobs = [subprocess.Popen(cli, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    first = None
    for _ in range(600):
        done = [j for j in jobs if j.poll() is not None]
        if done:
            first = done[0]
            break
        time.sleep(0.1)
    assert first is not None, "neither job ended within 60 s"
    other = jobs[1 - jobs.index(first)]
    assert first.returncode == 2 and other.poll() is None  # the refused job ended while the other still ran
    err = first.stderr.read().strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: output.uri: another job holds") and " pid " in err
    assert other.wait(timeout=300) == 0, other.stderr.read()[-2000:]
    assert len(OutputStore(out, storage).read_index()) == 1
    ids = read_results(out, storage_options=storage)["image_id"].to_pylist()
    assert len(ids) == len(set(ids)) == sum(1 for _ in iter_rows(str(scene_shards[0]), config.input))
