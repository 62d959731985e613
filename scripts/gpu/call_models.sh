#!/usr/bin/env bash
# One device call: the Qwen3-8B and Gemma-3-4B shapes at 2048 tokens, r 32, batch 1, TuneStudio
# (speed and memory mode) and then Unsloth from ../shared/peers (staged in .peers), in the same
# call. Carry .dev/run (scripts/gpu/stage_run.sh) and .peers. PEER_BUDGET is Unsloth's time per shape.
set -u
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 ))s]"; }
echo "$(el) ours"
WARMUP=1 bash scripts/gpu/device_run.sh bench qwen3-8b:2048:32:speed:auto:3 qwen3-8b:2048:32:memory:auto:3 \
  gemma3-4b:2048:32:speed:auto:3 gemma3-4b:2048:32:memory:auto:3 2>&1 | grep -vE '^\|---|^\| system'
for shape in ${PEER_SHAPES:-qwen3-8b gemma3-4b}; do
  echo "$(el) unsloth $shape"
  PEER_SHAPE=$shape PEER_SEQS=2048:5:2 OUT=$OUT/peers bash .peers/run.sh "${PEER_BUDGET:-250}" model C 2>&1 |
    grep -E "===|tok/s|Error|error|peak|done" | tail -8
  rm -rf "/tmp/$shape-random"
done
echo "$(el) done"
