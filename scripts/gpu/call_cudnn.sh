#!/usr/bin/env bash
# One device call for cuDNN's fused attention (src/backend/cuda/cudnn.rs): the attention kernel
# checks against the CPU (both paths), the whole-step GPU suite, the attention sweep (ours and
# cuDNN's), then `bench` at the issue's caps (Unsloth's peak + 0.6 GiB; 24 GiB at 64K) with cuDNN,
# and our kernels (TUNESTUDIO_ATTENTION=own) at 8K and 32K as the same call's baseline. The
# library comes from torch's wheel (nvidia-cudnn) on the library path. Everything under $OUT is
# tarred into one file.
set -u
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s)
el() { echo "[$(( $(date +%s) - T0 ))s]"; }
. "$(dirname "$0")/cudnn_env.sh"
bash scripts/gpu/unpack.sh .dev/run
HERE=.dev/run
for t in gpu_kernels gpu_step; do
  filter=""; [ $t = gpu_kernels ] && filter=attention
  timeout 240 "$HERE/$t" --ignored --test-threads=1 --nocapture $filter >"$OUT/$t.log" 2>&1
  echo "$(el) $t: $(grep -E '^test result' "$OUT/$t.log" | tail -1) (exit $?)"
done
grep -E "RESULT.*cuDNN" "$OUT/gpu_kernels.log" | head -40
grep -E "FAIL|panicked|declined" "$OUT/gpu_kernels.log" "$OUT/gpu_step.log" | head -20
echo "$(el) sweep"; bash scripts/gpu/device_run.sh sweep 2>&1 | tail -20
echo "$(el) bench"
WARMUP=1 bash scripts/gpu/device_run.sh bench ${SPECS:-llama3-8b:2048:32:speed:auto:3:::7.84GiB llama3-8b:8192:32:speed:auto:3:::9.57GiB llama3-8b:32768:32:speed:auto:2:::16.19GiB llama3-8b:65536:32:speed:auto:2:::24GiB llama3-8b:2048:32:speed:auto:3 llama3-8b:8192:32:speed:auto:3} 2>&1 | grep -vE '^\|---|^\| system'
echo "$(el) baseline: our kernels"
TUNESTUDIO_ATTENTION=own WARMUP=1 bash scripts/gpu/device_run.sh bench ${OWN_SPECS:-llama3-8b:8192:32:speed:auto:3:::9.57GiB llama3-8b:32768:32:speed:auto:2:::16.19GiB} 2>&1 | grep -vE '^\|---|^\| system'
grep -iE "cudnn|declined|error" "$OUT/bench.log" | sort | uniq -c | head -10
echo "$(el) done"
tar czf /tmp/all.tgz -C "$OUT" . && find "$OUT" -mindepth 1 -delete && mv /tmp/all.tgz "$OUT/all.tgz"
