#!/usr/bin/env bash
# Regenerates docs/report.png: the `inspect` report of the demo run as headless Chromium draws it.
# Run `make demo` first; needs Debian's chromium (apt-get install -y chromium).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/paligemma-batch inspect out/demo/output --sample 8 --output out/demo/report.html
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --force-device-scale-factor=1 \
  --force-color-profile=srgb --window-size=1200,1100 --screenshot=docs/report.png \
  "file://$PWD/out/demo/report.html" 2>/dev/null
# 256 colours keep the PNG small in the repository.
.venv/bin/python -c "from PIL import Image; Image.open('docs/report.png').convert('RGB').quantize(256, dither=0).save('docs/report.png', optimize=True)"
