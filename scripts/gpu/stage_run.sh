#!/usr/bin/env bash
# Build the release binary and the GPU test binaries here and stage them (stripped, xz: the carried
# tree must stay under the device tool's 64 MiB) in .dev/run/ for the device `run` tool, where
# scripts/gpu/unpack.sh unpacks them:
#   run(command="bash scripts/gpu/device_run.sh tests bench llama3-8b:2048:32:speed", carry=[".dev/run"])
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=.dev/run
mkdir -p "$DEST"
cargo build --release
rm -f "$DEST"/*.gz "$DEST"/*.xz
pack() { strip --strip-all -o "$DEST/$1" "$2" && xz -9 -T2 -f "$DEST/$1"; }
# CARGO_TARGET_DIR moves the build (a private target per worktree, say); follow it.
pack tunestudio "${CARGO_TARGET_DIR:-target}/release/tunestudio"
cargo test --release --no-run --test gpu_kernels --test gpu_step --test gpu_demo --test gpu_bench --test gpu_device --test gpu_generate --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["kind"]==["test"]:
        print(m["target"]["name"], m["executable"])' |
    while read -r name exe; do pack "$name" "$exe"; done
git rev-parse HEAD > "$DEST/commit"
ls -la "$DEST"
