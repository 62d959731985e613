#!/usr/bin/env bash
# Stage everything a device run needs into ignored folders of this checkout (no Rust there):
#   .dev/run      release binary + GPU test binaries (scripts/gpu/stage_run.sh)
#   .dev/interop  binary, interop_fixtures test binary, tests/interop scripts, demo, demo_fix
# then on the device: bash scripts/gpu/device_all.sh ... with carry [".dev", ".peers"].
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/gpu/stage_run.sh >/dev/null
D=.dev/interop
rm -rf "$D" && mkdir -p "$D"
exe=$(cargo test --release --no-run --test interop_fixtures --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["kind"]==["test"]: print(m["executable"])')
strip --strip-debug -o "$D/interop_fixtures" "$exe" && gzip -f "$D/interop_fixtures"
cp tests/interop/*.py tests/interop/*.sh "$D/"
cp -r assets/demo "$D/demo"
cp -r tests/fixtures/interop/demo_fix "$D/demo_fix"
git rev-parse HEAD > .dev/commit
du -sh .dev/* .peers
