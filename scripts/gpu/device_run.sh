#!/usr/bin/env bash
# Runs on the GPU host (no Rust there): the release binary and test binaries staged by
# scripts/gpu/stage_run.sh in .dev/run/, then phases given as arguments:
#   tests          GPU kernel and whole-step tests against the CPU reference
#   bench SPEC...  `tunestudio bench --json` for each SPEC =
#                  shape:seq:rank:mode[:policy|auto[:steps[:profile[:attention version]]]]
# Everything is logged under $OUT; a short table is printed last.
set -u
HERE=.dev/run
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
for f in "$HERE"/*.gz; do [ -e "$f" ] && gunzip -kf "$f"; done
chmod +x "$HERE"/tunestudio "$HERE"/gpu_* 2>/dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
phase=""
for a in "$@"; do
  case "$a" in
    tests|bench) phase=$a; [ "$a" = tests ] || continue ;;
  esac
  case "$phase" in
    tests)
      for t in gpu_kernels gpu_step gpu_demo; do
        echo "=== $t"; timeout "${TEST_TIMEOUT:-300}" "$HERE/$t" --ignored --test-threads=1 2>&1 | tee "$OUT/$t.log" | grep -E "^test |test result|panicked|error" | tail -40
      done ;;
    bench)
      IFS=: read -r shape seq rank mode policy steps prof attn <<<"$a"
      args=(bench --json --shape "$shape" --seq "$seq" --rank "$rank" --mode "$mode" --steps "${steps:-3}" --warmup "${WARMUP:-1}")
      [ -n "${policy:-}" ] && [ "$policy" != auto ] && args+=(--checkpointing "$policy")
      [ "${prof:-}" = profile ] && args+=(--profile)
      echo "=== bench $a"
      echo "=== bench $a" >>"$OUT/bench.log"
      TUNESTUDIO_ATTENTION=${attn:-} timeout "${BENCH_TIMEOUT:-400}" "$HERE/tunestudio" "${args[@]}" >>"$OUT/bench.jsonl" 2>>"$OUT/bench.log" || echo "FAILED $a (see bench.log)"
      tail -n 1 "$OUT/bench.jsonl" | python3 bench/table.py
      ;;
  esac
done
