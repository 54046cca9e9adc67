#!/usr/bin/env bash
# Run the GPU check against the dependency bundle: needs only the machine's python3 (no venv, no network).
#
#   bash benchmarks/gpu/run.sh [--tiny] [--out DIR] [check.py options]
#
# The bundle (benchmarks/gpu/bundle.sh) is unpacked into a temporary site folder that goes first on
# PYTHONPATH, then the repository root; Ray's workers inherit both.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
bundle=${PGB_GPU_BUNDLE:-$here/.bundle/site.tar.xz}
if [[ ! -f $bundle ]]; then
  echo "no bundle at $bundle: run benchmarks/gpu/bundle.sh first" >&2
  exit 2
fi

site=$(mktemp -d "${TMPDIR:-/tmp}/pgb-gpu-site-XXXXXX")
trap 'rm -rf "$site"' EXIT
start=$SECONDS
tar -C "$site" -xJf "$bundle"
echo "bundle unpacked into $site in $((SECONDS - start)) s; python3 is $(command -v python3)"

export PYTHONPATH="$site:$root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 RAY_DEDUP_LOGS=0
cd "$root"
python3 "$here/check.py" "$@"
