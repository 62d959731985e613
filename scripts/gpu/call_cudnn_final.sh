#!/usr/bin/env bash
# The check of cuDNN's attention before it lands: every GPU suite natively (kernels against the
# CPU on both attention paths, whole steps, the demo, generation), then `bench` at the lengths and
# caps the earlier calls left out: 16K at Unsloth's peak + 0.6 GiB, 8K and 32K under 24 GiB, and
# 128K under 24 GiB (the longest context). Everything under $OUT is tarred into one file.
set -u
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s)
el() { echo "[$(( $(date +%s) - T0 ))s]"; }
. "$(dirname "$0")/cudnn_env.sh"
bash scripts/gpu/unpack.sh .dev/run
timeout 200 .dev/run/gpu_kernels --ignored --test-threads=1 --nocapture attention >"$OUT/attention.log" 2>&1
echo "$(el) attention checks: $(grep -E '^test result' "$OUT/attention.log")"
echo "cuDNN checks: $(grep -E 'RESULT.*cuDNN' "$OUT/attention.log" | awk '{print $NF}' | sort | uniq -c | tr '\n' ' ')"
grep -E "RESULT.*FAIL" "$OUT/attention.log" | head
TEST_TIMEOUT=200 bash scripts/gpu/device_run.sh tests
grep -hE "FAIL|panicked|declined|do not fit" "$OUT"/gpu_*.native.log | head -20
echo "$(el) bench"
WARMUP=1 bash scripts/gpu/device_run.sh bench ${SPECS:-llama3-8b:16384:32:speed:auto:2:::11.87GiB llama3-8b:8192:32:speed:auto:3:::24GiB llama3-8b:32768:32:speed:auto:2:::24GiB llama3-8b:131072:32:speed:auto:1:::24GiB} 2>&1 | grep -vE '^\|---|^\| system'
grep -iE "declined|do not fit|error" "$OUT/bench.log" | sort | uniq -c | head -10
echo "$(el) done"
tar czf /tmp/all.tgz -C "$OUT" . && find "$OUT" -mindepth 1 -delete && mv /tmp/all.tgz "$OUT/all.tgz"
