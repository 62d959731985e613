#!/usr/bin/env bash
# Unpacks the binaries scripts/gpu/stage_run.sh staged in .dev/run (xz, which keeps the carried
# tree under the device tool's 64 MiB; .gz from older stagings too), each once. Decompresses with
# python3's lzma, which every GPU host has, rather than an xz binary it may lack.
HERE=${1:-.dev/run}
for f in "$HERE"/*.xz "$HERE"/*.gz; do
  [ -e "$f" ] || continue
  b=${f%.*}
  [ -x "$b" ] && [ "$b" -nt "$f" ] && continue
  python3 -c 'import gzip, lzma, shutil, sys
src = sys.argv[1]
with (lzma.open if src.endswith(".xz") else gzip.open)(src) as i, open(sys.argv[2], "wb") as o:
    shutil.copyfileobj(i, o)' "$f" "$b" && chmod +x "$b"
done
