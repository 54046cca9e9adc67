#!/usr/bin/env bash
# Build the dependency bundle for the GPU machine: the cp312 manylinux x86-64 wheels of exactly what that
# machine lacks and the project needs at run time, unpacked into one site folder and packed with xz.
#
#   bash benchmarks/gpu/bundle.sh          # -> benchmarks/gpu/.bundle/site.tar.xz (git-ignored, carried)
#
# Refuses (exit 1, one line) when the tree that travels to the GPU machine plus the bundle exceeds 60 MiB.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
work=$here/.bundle
limit_mib=60

# What the GPU machine lacks (benchmarks/gpu/README.md): Ray and the project's own needs that are missing there.
# typing-extensions is there, in a version nobody has read; pydantic needs >= 4.16, so it travels too.
# transformers 5.17 is there, but the engine passes mm_encoder_outputs to generate(), which 5.17 rejects
# ("model_kwargs are not used by the model"); 5.24.0 is the version the project's tests run on.
wheels=(
  ray==2.60.0
  transformers==5.24.0
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
  bitsandbytes==0.50.2
  pycocotools==2.0.11
)
platform=(--python-version 3.12 --implementation cp --only-binary=:all:)
for n in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  platform+=(--platform "${n}_x86_64")
done

mkdir -p "$work/wheels"
quiet() { grep -v -e "^WARNING: Location" -e "^WARNING: Running pip as" >&2 || true; }
python3 -m pip download -q --no-deps "${platform[@]}" -d "$work/wheels" "${wheels[@]}" 2> >(quiet)

site=$work/site
rm -rf "$site"
python3 -m pip install -q --no-deps --no-index --no-compile --no-warn-script-location "${platform[@]}" \
  --find-links "$work/wheels" --target "$site" "${wheels[@]}" 2> >(quiet)

# Ray without what a Ray Data job never imports; bitsandbytes with only the CUDA 13 library (and the 63 kB CPU
# one, so the CPU check of this bundle exercises int8/int4 too).
rm -rf "$site"/ray/{jars,rllib,tune,train,serve,llm} "$site"/ray/dashboard/client
find "$site"/bitsandbytes -maxdepth 1 -name 'libbitsandbytes_*.so' \
  ! -name libbitsandbytes_cuda130.so ! -name libbitsandbytes_cpu.so -delete
find "$site" -name __pycache__ -type d -prune -exec rm -rf {} +

echo "site folder: $(du -sm "$site" | cut -f1) MiB unpacked; packing with xz (minutes)"
tar -C "$site" -cf - . | xz -6 -T0 > "$work/site.tar.xz.tmp"
mv "$work/site.tar.xz.tmp" "$work/site.tar.xz"

bundle_bytes=$(stat -c %s "$work/site.tar.xz")
tree_bytes=$(cd "$root" && git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null \
  | awk '{s += $1} END {print s + 0}')
mib() { awk -v b="$1" 'BEGIN {printf "%.1f", b / 1048576}'; }
total=$((bundle_bytes + tree_bytes))
if (( total > limit_mib * 1048576 )); then
  rm -f "$work/site.tar.xz"
  echo "refused: tree $(mib "$tree_bytes") MiB + bundle $(mib "$bundle_bytes") MiB = $(mib "$total") MiB > ${limit_mib} MiB" >&2
  exit 1
fi
echo "bundle: $work/site.tar.xz $(mib "$bundle_bytes") MiB; tree $(mib "$tree_bytes") MiB; together $(mib "$total") of ${limit_mib} MiB"
