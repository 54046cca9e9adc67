"""One job per output root: a lease file, ``_LEASE.json``, taken before any work and kept alive by a heartbeat.

A job takes the lease with an exclusive create. While it runs, a daemon thread rewrites the lease every
``heartbeat_s`` seconds, each time only if the lease is still exactly the version this job last wrote. A
second job finds the lease live and stops at once with :class:`LeaseHeld`. A lease whose heartbeat is older
than the timeout belongs to a job that died: the next job replaces it with a compare-and-swap on the
version it read, so of two jobs racing to take it over one wins. A job whose lease was taken over (it
paused for longer than the timeout) learns it at its next heartbeat: :meth:`Lease.check` then raises
:class:`LeaseLost`, so call it before committing anything.

How each store makes those steps atomic:

- **Local folders**: the lease is written to a temporary file and hard-linked into place, which
  fails if a lease exists (an exclusive create whose content appears whole). Replacing and removing the
  lease happen under ``flock`` on ``_LEASE.lock``; the kernel releases that lock when its process dies.
- **S3**: ``PutObject`` with ``If-None-Match: *`` creates; ``PutObject`` and ``DeleteObject`` with
  ``If-Match: <ETag>`` replace and remove (AWS S3 has all three; conditional deletes since 2025-09).
  After each create or take-over the job reads the lease back and gives way if it holds another job's
  token, which also settles a request that a retry made ambiguous.
- **Other fsspec stores**: checked, then written (fsspec's ``mode="create"``), and read back. Racing jobs are
  refused reliably only when they start more than a request apart.

A lease whose holder ran on the taker's host and has exited (a killed driver) is stale at once: the next
scheduled run on that host need not wait out the timeout. Otherwise staleness compares the lease's heartbeat time (the holder's clock) with the reader's clock, so the clocks
of the machines that share an output root must agree to well within the timeout. The timeout is the longer
of the reader's ``stale_after_s`` and the one the holder wrote, so a job with a short timeout never takes a
lease from a job that promised to beat less often.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import hashlib
import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from typing import Any

import fsspec
import fsspec.asyn

logger = logging.getLogger(__name__)

LEASE_FILE = "_LEASE.json"
LOCK_FILE = "_LEASE.lock"  # local folders only
ATTEMPTS = 3  # create / take-over rounds before giving up on a lease that keeps changing under us


class LeaseHeld(RuntimeError):
    """Another live job holds the output root; ``str()`` is one line for the CLI."""

    def __init__(self, uri: str, holder: LeaseRecord | None, now: float):
        self.uri = uri
        self.holder = holder
        if holder is None:
            message = (f"output.uri: another job may hold {uri} (its {LEASE_FILE} is unreadable or keeps changing; "
                       "remove it if no job is running)")
        else:
            message = (f"output.uri: another job holds {uri} ({holder.describe(now)}); a lease whose heartbeat "
                       f"stops is taken over after {holder.stale_after_s:g} s")
        super().__init__(message)


class LeaseLost(RuntimeError):
    """This job's lease was taken over, or could not be renewed for longer than its timeout."""


@dataclass(frozen=True)
class LeaseRecord:
    """What ``_LEASE.json`` holds."""

    holder: str  # the caller's name for the job (a run or job id)
    token: str  # unique to one acquisition: tells this job's lease from any other
    host: str
    pid: int
    started_at: str  # ISO 8601 UTC
    heartbeat_at: str
    stale_after_s: float
    beats: int = 0

    @property
    def heartbeat_unix(self) -> float:
        return dt.datetime.fromisoformat(self.heartbeat_at).timestamp()

    def is_stale(self, now: float, stale_after_s: float) -> bool:
        """Its heartbeat is older than both timeouts, or its holder ran on this host and has exited."""
        return now - self.heartbeat_unix > max(stale_after_s, self.stale_after_s) or self.holder_exited()

    def holder_exited(self) -> bool:
        """Whether the holder ran on this host and its process is gone (a killed driver), or a zombie."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except (OSError, IndexError):
            return False

    def describe(self, now: float) -> str:
        return (f"job {self.holder} on host {self.host} pid {self.pid}, started {self.started_at[:19]}Z, "
                f"last heartbeat {max(0.0, now - self.heartbeat_unix):.0f} s ago")

    def beat(self, now: float) -> LeaseRecord:
        return replace(self, heartbeat_at=_iso(now), beats=self.beats + 1)

    def encode(self) -> bytes:
        return json.dumps(asdict(self), indent=2).encode()

    @classmethod
    def decode(cls, data: bytes) -> LeaseRecord | None:
        """The record, or None for a file that is not one."""
        try:
            record = cls(**json.loads(data))
            dt.datetime.fromisoformat(record.heartbeat_at)
        except (ValueError, TypeError):
            return None
        return record


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class _Conflict(Exception):
    """The lease is no longer the version the caller expected (or is gone)."""


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _LocalStore:
    """The lease file in a local folder; versions are content digests."""

    verify_writes = False

    def __init__(self, root: str):
        self.root = root
        self.path = os.path.join(root, LEASE_FILE)

    def _write_tmp(self, data: bytes) -> str:
        tmp = os.path.join(self.root, f".tmp-lease-{uuid.uuid4().hex}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    def create(self, data: bytes) -> str:
        os.makedirs(self.root, exist_ok=True)
        tmp = self._write_tmp(data)
        try:
            os.link(tmp, self.path)  # FileExistsError when a lease exists
        finally:
            os.unlink(tmp)
        return _digest(data)

    def read(self) -> tuple[bytes, str] | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data, _digest(data)

    @contextmanager
    def _locked(self, expected: str) -> Iterator[None]:
        with open(os.path.join(self.root, LOCK_FILE), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = self.read()
            if current is None or current[1] != expected:
                raise _Conflict
            yield

    def replace(self, data: bytes, expected: str) -> str:
        with self._locked(expected):
            os.replace(self._write_tmp(data), self.path)
        return _digest(data)

    def delete(self, expected: str) -> None:
        with self._locked(expected):
            os.unlink(self.path)


class _ObjectStore:
    """The lease as an object on any fsspec store, checked then written; versions are content digests."""

    verify_writes = True

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str):
        self.fs = fs
        self.path = posixpath.join(root, LEASE_FILE)

    def create(self, data: bytes) -> str:
        self.fs.pipe_file(self.path, data, mode="create")
        return _digest(data)

    def read(self) -> tuple[bytes, str] | None:
        self.fs.invalidate_cache(self.path)
        try:
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        return data, _digest(data)

    def _check(self, expected: str) -> None:
        current = self.read()
        if current is None or current[1] != expected:
            raise _Conflict

    def replace(self, data: bytes, expected: str) -> str:
        self._check(expected)
        self.fs.pipe_file(self.path, data)
        return _digest(data)

    def delete(self, expected: str) -> None:
        self._check(expected)
        self.fs.rm_file(self.path)


def _precondition_failed(err: OSError) -> bool:
    """Whether s3fs's error is S3's answer to a failed condition (412, or 409 for a concurrent one)."""
    code = getattr(err.__cause__, "response", {}).get("Error", {}).get("Code")
    return code in ("PreconditionFailed", "ConditionalRequestConflict")


@contextmanager
def _conditional() -> Iterator[None]:
    """Turn S3's "not the version you named" (or "gone") into :class:`_Conflict`."""
    try:
        yield
    except OSError as err:
        if isinstance(err, FileNotFoundError) or _precondition_failed(err):
            raise _Conflict from err
        raise


class _S3Store(_ObjectStore):
    """The lease as an S3 object, written with conditional requests; versions are ETags."""

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str):
        super().__init__(fs, root)
        self.bucket, self.key, _ = fs.split_path(self.path)

    def create(self, data: bytes) -> str:
        try:
            return self.fs.pipe_file(self.path, data, mode="create")["ETag"]
        except OSError as err:
            if not isinstance(err, FileExistsError) and _precondition_failed(err):
                raise FileExistsError(errno.EEXIST, str(err)) from err
            raise

    def read(self) -> tuple[bytes, str] | None:
        async def get() -> tuple[bytes, str]:
            resp = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            try:
                return await resp["Body"].read(), resp["ETag"]
            finally:
                resp["Body"].close()

        try:
            return fsspec.asyn.sync(self.fs.loop, get)
        except FileNotFoundError:
            return None

    def replace(self, data: bytes, expected: str) -> str:
        with _conditional():
            return self.fs.pipe_file(self.path, data, IfMatch=expected)["ETag"]

    def delete(self, expected: str) -> None:
        self.fs.invalidate_cache(self.path)
        with _conditional():
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=expected)


def _protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    return fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)


def _store_for(fs: fsspec.AbstractFileSystem, root: str) -> _LocalStore | _ObjectStore:
    protocols = _protocols(fs)
    if "file" in protocols:
        return _LocalStore(root)
    if "s3" in protocols:
        return _S3Store(fs, root)
    return _ObjectStore(fs, root)


class Lease:
    """A held lease: heartbeats in a daemon thread until :meth:`release` (or the end of a ``with`` block)."""

    def __init__(self, uri: str, store: _LocalStore | _ObjectStore, record: LeaseRecord, version: str,
                 heartbeat_s: float):
        self.uri = uri
        self.record = record
        self.heartbeat_s = heartbeat_s
        self._store = store
        self._version = version
        self._renewed = time.monotonic()
        self._lost: str | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()  # one write at a time: a heartbeat, or the release
        self._thread = threading.Thread(target=self._heartbeat_loop, name="pgb-lease-heartbeat", daemon=True)
        self._thread.start()

    @property
    def lost(self) -> str | None:
        """Why the lease is no longer this job's, or None while it is."""
        return self._lost

    def check(self) -> None:
        """Raise :class:`LeaseLost` unless this job still holds the lease (call it before committing)."""
        if self._lost:
            raise LeaseLost(f"output.uri: {self.uri}: {self._lost}")

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with self._lock:
                if self._stop.is_set() or self._lost:
                    return
                self._heartbeat()

    def _heartbeat(self) -> None:
        record = self.record.beat(time.time())
        try:
            try:
                version = self._store.replace(record.encode(), self._version)
            except _Conflict:
                current = self._store.read()
                other = LeaseRecord.decode(current[0]) if current else None
                if other != record:  # unless a retried request had gone through
                    who = f"job {other.holder} on host {other.host} pid {other.pid}" if other else "nobody"
                    self._lose(f"the lease was taken over; it is now held by {who}")
                    return
                version = current[1]
        except OSError as err:
            silent = time.monotonic() - self._renewed
            logger.warning("lease on %s: heartbeat failed (%s: %s), %.0f s since the last one", self.uri,
                           type(err).__name__, err, silent)
            if silent > self.record.stale_after_s:
                self._lose(f"no heartbeat for {silent:.0f} s ({type(err).__name__}: {err}); another job may "
                           "have taken the lease over")
            return
        self._version, self.record, self._renewed = version, record, time.monotonic()

    def _lose(self, reason: str) -> None:
        self._lost = reason
        logger.error("lease on %s lost: %s", self.uri, reason)

    def release(self) -> None:
        """Stop the heartbeat and remove the lease, unless another job holds it by now. Idempotent."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
        with self._lock:
            if self._lost:
                return
            try:
                self._store.delete(self._version)
            except _Conflict:
                self._lose("the lease was taken over before its release")
                return
            self._lost = "released"

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def acquire_lease(fs: fsspec.AbstractFileSystem, root: str, holder: str, stale_after_s: float = 300.0,
                  heartbeat_s: float | None = None) -> Lease:
    """Take the lease on the output root ``root`` of ``fs``, or raise :class:`LeaseHeld` at once.

    ``holder`` names this job in the lease (and in the other job's error). A lease whose heartbeat is older
    than ``stale_after_s`` (or the longer timeout its holder wrote) is taken over. ``heartbeat_s`` defaults
    to a fifth of ``stale_after_s``.
    """
    heartbeat_s = stale_after_s / 5 if heartbeat_s is None else heartbeat_s
    if not 0 < heartbeat_s < stale_after_s:
        raise ValueError(f"heartbeat_s ({heartbeat_s:g}) must be above 0 and below stale_after_s ({stale_after_s:g})")
    root = root.rstrip("/")
    uri = root if "file" in _protocols(fs) else fs.unstrip_protocol(root)
    store = _store_for(fs, root)
    now = time.time()
    record = LeaseRecord(holder=holder, token=uuid.uuid4().hex, host=socket.gethostname(), pid=os.getpid(),
                         started_at=_iso(now), heartbeat_at=_iso(now), stale_after_s=stale_after_s)
    data = record.encode()
    for _ in range(ATTEMPTS):
        try:
            version = store.create(data)
            break
        except FileExistsError:
            pass
        current = store.read()
        if current is None:
            continue  # released meanwhile: create again
        other = LeaseRecord.decode(current[0])
        if other is not None and other.token == record.token:
            version = current[1]  # our own create, retried after it had gone through
            break
        if other is None or not other.is_stale(time.time(), stale_after_s):
            raise LeaseHeld(uri, other, time.time())
        try:
            version = store.replace(data, current[1])
        except _Conflict:
            continue  # someone else changed it first: look again
        logger.warning("output %s: took over the stale lease of job %s (host %s pid %d, last heartbeat %s)",
                       uri, other.holder, other.host, other.pid, other.heartbeat_at)
        break
    else:
        raise LeaseHeld(uri, None, time.time())
    if store.verify_writes:
        current = store.read()
        other = LeaseRecord.decode(current[0]) if current else None
        if other != record:
            raise LeaseHeld(uri, other, time.time())
        version = current[1]
    return Lease(uri, store, record, version, heartbeat_s)
