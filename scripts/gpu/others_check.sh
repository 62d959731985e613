#!/usr/bin/env bash
# Memory as the card really is, on the GPU host (issue 11 item 5): while a second process (python3
# with torch) holds 10 GiB on the card, the plan's own terms must equal those of the idle card, the
# other process must show as a term of its own, and the CUDA context measured and cached by a bench
# must stay within 64 MiB of the idle measurement, also with the cache removed first.
#
# Staged binaries in .dev/run (scripts/gpu/stage_run.sh, which also stages gpu_device). Steps:
#   1. idle:  bench (measures and caches the context), then plan --json
#   2. busy:  a python3/torch process allocates 10 GiB and waits; plan --json, bench --json,
#             plan --json again (after the busy bench re-measured the context)
#   3. busy:  the cache removed, bench --json again, and the cache file read back
#   4. the gpu_device test binary (NVML telemetry, a cap, a run's target), idle
# Then bench/others_check.py compares; exit 1 if any check fails. Everything is logged under $OUT.
set -u
HERE=.dev/run
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
bash "$(dirname "$0")/unpack.sh" "$HERE"
. "$(dirname "$0")/cudnn_env.sh"
chmod +x "$HERE"/tunestudio "$HERE"/gpu_* 2>/dev/null
BIN=$HERE/tunestudio
PY=${PYTHON:-python3}
HOLD_GIB=${HOLD_GIB:-10}
# A cache of our own, so the user's measurements are neither used nor overwritten.
export XDG_CACHE_HOME="$OUT/others-cache"
rm -rf "$XDG_CACHE_HOME"; mkdir -p "$XDG_CACHE_HOME"
CACHE="$XDG_CACHE_HOME/tunestudio/cuda_context.json"
PLAN=(plan --shape llama3-8b --seq 2048 --rank 32 --json)
BENCH=(bench --json --shape llama3.2-1b --seq 2048 --rank 16 --steps 2 --warmup 1)
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader | tee "$OUT/others.card.txt"

step() { # name, then the command; stdout to $OUT/others.NAME.json, stderr to its .log
  local name=$1; shift
  "$@" >"$OUT/others.$name.json" 2>"$OUT/others.$name.log" || echo "FAILED $name (see $OUT/others.$name.log)"
}

step bench_idle "$BIN" "${BENCH[@]}"
step plan_idle "$BIN" "${PLAN[@]}"
cp "$CACHE" "$OUT/others.cache_idle.json" 2>/dev/null

READY="$OUT/others.holder.ready"; rm -f "$READY"
HOLD_GIB=$HOLD_GIB READY=$READY "$PY" - >"$OUT/others.holder.log" 2>&1 <<'EOF' &
import os, time, torch
held = torch.empty(int(os.environ["HOLD_GIB"]) << 30, dtype=torch.uint8, device="cuda")
held.fill_(1)
torch.cuda.synchronize()
open(os.environ["READY"], "w").write(str(held.numel()))
time.sleep(900)
EOF
HOLDER=$!
for _ in $(seq 120); do [ -e "$READY" ] && break; sleep 1; done
if [ ! -e "$READY" ]; then
  echo "FAILED: the holder process did not allocate ${HOLD_GIB} GiB (see $OUT/others.holder.log)"; kill "$HOLDER" 2>/dev/null; exit 1
fi
nvidia-smi --query-gpu=memory.used --format=csv,noheader | sed 's/^/busy card: /'

step plan_busy "$BIN" "${PLAN[@]}"
step bench_busy "$BIN" "${BENCH[@]}"
step plan_busy_remeasured "$BIN" "${PLAN[@]}"
rm -f "$CACHE"
step bench_nocache "$BIN" "${BENCH[@]}"
cp "$CACHE" "$OUT/others.cache_nocache.json" 2>/dev/null
kill "$HOLDER" 2>/dev/null; wait "$HOLDER" 2>/dev/null

if [ -x "$HERE/gpu_device" ]; then
  timeout 300 "$HERE/gpu_device" --ignored --test-threads=1 >"$OUT/gpu_device.log" 2>&1
  rc=$?
  echo "gpu_device: $(grep -E '^test result' "$OUT/gpu_device.log" | tail -1) (exit $rc)"
  grep -E "^test .* FAILED|panicked" "$OUT/gpu_device.log" | head -5 | cut -c1-250
fi

"$PY" "$(dirname "$0")/../../bench/others_check.py" "$OUT" "$HOLD_GIB" | tee "$OUT/others_check.txt"
exit "${PIPESTATUS[0]}"
