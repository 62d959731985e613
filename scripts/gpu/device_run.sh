#!/usr/bin/env bash
# Runs on the GPU host (no Rust there): the release binary and test binaries staged by
# scripts/gpu/stage_run.sh in .dev/run/, then phases given as arguments:
#   tests              GPU kernel, whole-step and demo tests against the CPU reference, as this card
#   profiles [NAME..]  the same suites once per card profile (TUNESTUDIO_CARD), several at a time;
#                      no names: every profile the engine runs on
#   memcheck|racecheck compute-sanitizer over the attention and loss tests (short cases)
#   sweep              the attention-only timing sweep (gpu_bench attention_seq_sweep)
#   bench SPEC...      `tunestudio bench --json` for each SPEC (BENCH_BIN: another build) =
#                      shape:seq:rank:mode[:policy|auto[:steps[:profile[:card[:gpu_mem]]]]]
# Everything is logged under $OUT; short summaries are printed as it goes.
set -u
HERE=.dev/run
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
bash "$(dirname "$0")/unpack.sh" "$HERE"
. "$(dirname "$0")/cudnn_env.sh"
chmod +x "$HERE"/tunestudio "$HERE"/gpu_* 2>/dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
ALL_PROFILES="rtx3060 rtx3090 a10 a6000 rtx4090 l4 l40s rtx5090 a100-40 a100-80 h100-80"
SUITES=${SUITES:-"gpu_kernels gpu_step gpu_demo gpu_device gpu_generate"}

# One profile (or none: "native"): every suite, one log per suite, a line per suite.
suites_as() {
  local p=$1 rc=0
  for t in $SUITES; do
    local log="$OUT/$t.$p.log"
    TUNESTUDIO_CARD=$([ "$p" = native ] || echo "$p") timeout "${TEST_TIMEOUT:-600}" "$HERE/$t" --ignored --test-threads=1 >"$log" 2>&1
    local r=$?
    [ $r -ne 0 ] && rc=1
    echo "$p $t: $(grep -E '^test result' "$log" | tail -1) (exit $r)"
    grep -E "^test .* FAILED|panicked" "$log" | head -5 | cut -c1-250
  done
  return $rc
}

# Several profiles at a time: the suites spend most of their time in the CPU reference, and the
# host has 16 cores. Each profile's summary is printed when all are done.
run_profiles() {
  local profs=("$@") rc=0
  [ ${#profs[@]} -eq 0 ] && profs=($ALL_PROFILES)
  local jobs=${PROFILE_JOBS:-6}
  for p in "${profs[@]}"; do
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do sleep 1; done
    ( suites_as "$p" >"$OUT/summary.$p.txt" 2>&1 ) &
  done
  wait
  for p in "${profs[@]}"; do cat "$OUT/summary.$p.txt"; done
  grep -l "FAILED\|panicked" "$OUT"/gpu_*.log >/dev/null 2>&1 && rc=1
  return $rc
}

run_phase() {
  local phase=$1; shift
  case "$phase" in
    tests) suites_as native; grep -hE "^DEVICE" "$OUT"/gpu_kernels.native.log | head -8 ;;
    profiles) run_profiles "$@" ;;
    memcheck|racecheck)
      TUNESTUDIO_TEST_SHORT=1 timeout 300 compute-sanitizer --tool "$phase" --print-limit 20 "$HERE/gpu_kernels" --ignored --test-threads=1 attention lm_head >"$OUT/$phase.log" 2>&1
      echo "== $phase (exit $?)"; tail -n 6 "$OUT/$phase.log" ;;
    sweep)
      timeout 300 "$HERE/gpu_bench" --ignored --exact attention_seq_sweep --nocapture >"$OUT/sweep.log" 2>&1
      grep -E "^BENCH|DEVICE" "$OUT/sweep.log" ;;
    bench)
      for spec in "$@"; do
        IFS=: read -r shape seq rank mode policy steps prof card gmem <<<"$spec"
        args=(bench --json --shape "$shape" --seq "$seq" --rank "$rank" --mode "$mode" --steps "${steps:-3}" --warmup "${WARMUP:-1}")
        [ -n "${policy:-}" ] && [ "$policy" != auto ] && args+=(--checkpointing "$policy")
        [ "${prof:-}" = profile ] && args+=(--profile)
        [ -n "${card:-}" ] && args+=(--card "$card")
        [ -n "${gmem:-}" ] && args+=(--gpu-mem "$gmem")
        echo "=== bench $spec" >>"$OUT/bench.log"
        timeout "${BENCH_TIMEOUT:-400}" "${BENCH_BIN:-$HERE/tunestudio}" "${args[@]}" >>"$OUT/bench.jsonl" 2>>"$OUT/bench.log" || echo "FAILED bench $spec (see bench.log)"
        tail -n 1 "$OUT/bench.jsonl" | python3 bench/table.py
      done ;;
    *) echo "unknown phase $phase" ;;
  esac
}

# Arguments: phases, each followed by its own parameters.
phase=""; params=()
for a in "$@"; do
  case "$a" in
    tests|profiles|memcheck|racecheck|sweep|bench)
      [ -n "$phase" ] && run_phase "$phase" "${params[@]}"
      phase=$a; params=() ;;
    *) params+=("$a") ;;
  esac
done
[ -n "$phase" ] && run_phase "$phase" "${params[@]}"
