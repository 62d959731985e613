#!/usr/bin/env bash
# Render the PNG icons from tunestudio.svg (needs rsvg-convert: apt-get install librsvg2-bin;
# ImageMagick's built-in SVG reader drops the gradient and fills open paths).
set -euo pipefail
cd "$(dirname "$0")"
for s in 256 128 64 48; do
  rsvg-convert -w "$s" -h "$s" tunestudio.svg -o "tunestudio-$s.png"
done
