#!/usr/bin/env bash
# Build the release binary and the GPU test binaries here and stage them (stripped, gzipped) with
# device_run.sh in .dev/run/ for the device `run` tool:
#   run(command="bash scripts/gpu/device_run.sh tests bench llama3-8b:2048:32:speed", carry=[".dev/run"])
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=.dev/run
mkdir -p "$DEST"
cargo build --release
strip --strip-debug -o "$DEST/tunestudio" target/release/tunestudio && gzip -f "$DEST/tunestudio"
cargo test --release --no-run --test gpu_kernels --test gpu_step --test gpu_demo --test gpu_bench --test gpu_device --test gpu_generate --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["kind"]==["test"]:
        print(m["target"]["name"], m["executable"])' |
    while read -r name exe; do strip --strip-debug -o "$DEST/$name" "$exe" && gzip -f "$DEST/$name"; done
git rev-parse HEAD > "$DEST/commit"
ls -la "$DEST"
