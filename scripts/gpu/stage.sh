#!/usr/bin/env bash
# Build the GPU test binaries here and stage them, stripped and gzipped, with gpu_check.sh in the
# lead checkout's ignored carry folder (/work/main/.dev/cuda) for the device `run` tool:
#   run(command="bash .dev/cuda/gpu_check.sh", carry=[".dev/cuda"])
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/target-helpers}
DEST=${DEST:-/work/main/.dev/cuda}
mkdir -p "$DEST"
cargo test --release --no-run --test gpu_kernels --test gpu_step --test gpu_bench --test ptx_fresh --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["kind"]==["test"]:
        print(m["target"]["name"], m["executable"])' |
    while read -r name exe; do
        strip --strip-debug -o "$DEST/$name" "$exe"
        gzip -f "$DEST/$name"
    done
cp scripts/gpu/gpu_check.sh "$DEST/"
ls -la "$DEST"
