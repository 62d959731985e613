#!/usr/bin/env bash
# Runs on the GPU host (no Rust there): the release binary and test binaries staged by
# scripts/gpu/stage_run.sh in .dev/run/, then phases given as arguments:
#   tests          GPU kernel and whole-step tests against the CPU reference
#   bench SPEC...  `tunestudio bench --json` for each SPEC = shape:seq:rank:mode[:policy[:steps]]
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
      for t in gpu_kernels gpu_step; do
        echo "=== $t"; timeout 300 "$HERE/$t" --ignored --test-threads=1 2>&1 | tee "$OUT/$t.log" | grep -E "^test |test result|panicked|error" | tail -40
      done ;;
    bench)
      IFS=: read -r shape seq rank mode policy steps <<<"$a"
      args=(bench --json --shape "$shape" --seq "$seq" --rank "$rank" --mode "$mode" --steps "${steps:-3}" --warmup 1)
      [ -n "${policy:-}" ] && args+=(--checkpointing "$policy")
      echo "=== bench $a"
      timeout 400 "$HERE/tunestudio" "${args[@]}" >>"$OUT/bench.jsonl" 2>>"$OUT/bench.log" || echo "FAILED $a (see bench.log)"
      tail -n 1 "$OUT/bench.jsonl" | python3 -c 'import json,sys
r=json.loads(sys.stdin.read()); g=2**30
print(f"{r[\"shape\"]:12} seq {r[\"seq\"]:6} r {r[\"rank\"]:3} {r[\"checkpointing\"]:8} {r[\"tokens_per_s\"]:8.0f} tok/s  driver {r[\"peak_driver_bytes\"]/g:6.2f}  plan {r[\"plan_peak_bytes\"]/g:6.2f} GiB  ({100*(r[\"plan_peak_bytes\"]-r[\"peak_driver_bytes\"])/r[\"peak_driver_bytes\"]:+.1f}%)  arena {r[\"peak_arena_bytes\"]/g:6.2f}  ctx {r[\"context_bytes\"]/g:4.2f}  MFU {100*r[\"mfu\"]:4.1f}%  first {r[\"first_step_s\"]:4.1f}s")' 2>/dev/null
      ;;
  esac
done
