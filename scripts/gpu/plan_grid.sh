#!/usr/bin/env bash
# The memory plan against the driver, on the GPU host: `tunestudio bench` over a grid of configs
# (Llama-3-8B and Llama-3.2-3B shapes, seq 512…32768, r 8…128, the three checkpointing policies),
# then bench/plan_check.py: every point's plan peak must be within 3% (or 256 MiB) of the
# driver-measured peak. Staged binary in .dev/run (scripts/gpu/stage_run.sh).
#   bash scripts/gpu/plan_grid.sh            # the whole grid
#   bash scripts/gpu/plan_grid.sh SPEC...    # only these (shape:seq:rank:mode:policy:steps)
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
GRID=(
  llama3-8b:512:8:speed:layer:1
  llama3-8b:2048:32:speed:none:1
  llama3-8b:2048:32:memory:offload:1
  llama3-8b:4096:128:speed:layer:1
  llama3-8b:8192:32:speed:none:1
  llama3-8b:8192:32:memory:offload:1
  llama3-8b:16384:16:speed:layer:1
  llama3-8b:32768:32:memory:offload:1
  llama3.2-3b:512:128:speed:none:1
  llama3.2-3b:1024:8:memory:offload:1
  llama3.2-3b:4096:64:speed:none:1
  llama3.2-3b:8192:32:speed:layer:1
  llama3.2-3b:32768:16:memory:offload:1
)
[ $# -gt 0 ] && GRID=("$@")
WARMUP=${WARMUP:-0} OUT=$OUT bash "$(dirname "$0")/device_run.sh" bench "${GRID[@]}"
python3 "$(dirname "$0")/../../bench/plan_check.py" "$OUT/bench.jsonl" | tee "$OUT/plan_check.txt"
