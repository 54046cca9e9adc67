"""A job that takes the lease on an output root, run as its own process by tests/test_lease.py.

    python tests/lease_holder.py URI --stale S --heartbeat H [--endpoint URL] [--rounds N --period P]

Hold mode (no ``--rounds``): take the lease on URI, print ``{"acquired": ..., "token": ...}``, wait for a line
on stdin, print ``{"lost": ...}`` and release.

Race mode: print ``{"ready": true}``, read a start time (Unix seconds) from stdin, then for each round k at
``start + k * period`` try to take the lease on ``URI/round-k``, print ``{"round": k, "won": ..., "error": ...}``
and, having won, hold it for half a period before releasing it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from paligemma_batch.config import StorageOptions
from paligemma_batch.lease import LeaseHeld, acquire_lease
from paligemma_batch.storage import filesystem


def _say(**fields) -> None:
    print(json.dumps(fields), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("uri")
    parser.add_argument("--stale", type=float, required=True)
    parser.add_argument("--heartbeat", type=float, required=True)
    parser.add_argument("--endpoint")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--period", type=float, default=1.0)
    args = parser.parse_args()
    storage = StorageOptions(endpoint_url=args.endpoint, key="testing", secret="testing") if args.endpoint \
        else StorageOptions()
    fs, root = filesystem(args.uri, storage)
    if args.rounds is None:
        try:
            lease = acquire_lease(fs, root, "holder", args.stale, args.heartbeat)
        except LeaseHeld as err:
            _say(acquired=False, error=str(err))
            return
        _say(acquired=True, token=lease.record.token)
        sys.stdin.readline()
        _say(lost=lease.lost)
        lease.release()
        return
    fs.exists(root)  # opens the S3 client before the race, so that racers start level
    _say(ready=True)
    start = float(sys.stdin.readline())
    for k in range(args.rounds):
        time.sleep(max(0.0, start + k * args.period - time.time()))
        try:
            lease = acquire_lease(fs, f"{root}/round-{k}", "racer", args.stale, args.heartbeat)
        except LeaseHeld as err:
            _say(round=k, won=False, error=str(err))
            continue
        _say(round=k, won=True, error=None)
        time.sleep(args.period / 2)
        lease.release()


if __name__ == "__main__":
    main()
