#!/usr/bin/env bash
# One device call: `tunestudio bench --card P` for every card profile on the smaller Llama shapes
# (llama3.2-1b and llama3.2-3b, seq 2048, r 32), speed and memory mode, one after the other so that
# no two timings share the card. Rows land in $OUT/bench.jsonl (bench/record.py adds them to
# bench/results.jsonl). Staged by scripts/gpu/stage_run.sh; carry .dev/run.
set -u
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s)
PROFILES=${PROFILES:-"rtx3060 rtx3090 a10 a6000 rtx4090 l4 l40s rtx5090 a100-40 a100-80 h100-80"}
specs=()
for shape in ${SHAPES:-llama3.2-1b llama3.2-3b}; do
  for p in $PROFILES; do
    for mode in speed memory; do specs+=("$shape:2048:32:$mode:auto:${STEPS:-2}::$p"); done
  done
done
WARMUP=1 BENCH_TIMEOUT=120 bash scripts/gpu/device_run.sh bench "${specs[@]}" 2>&1 | grep -vE '^\|---|^\| system' 
echo "[$(( $(date +%s) - T0 ))s] done"
