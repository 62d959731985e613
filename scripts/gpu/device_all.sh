#!/usr/bin/env bash
# One device call that does several things (staged by scripts/gpu/stage_all.sh; carry .dev and
# .peers). Phases, in the order given:
#   interop        tests/interop/run_on_gpu.sh in the background (PEFT/transformers/bitsandbytes
#                  checks, fresh interop fixtures into $OUT/interop/fixtures.tar)
#   peermodel      the peers' random Llama-3-8B model, built in the background
#   tests          GPU kernel and whole-step tests against the CPU reference
#   wait           wait for the background phases
#   bench SPEC...  `tunestudio bench` per SPEC = shape:seq:rank:mode[:policy[:steps[:profile]]]
#   unsloth        the Unsloth peer (PEER_SEQS), right after our benches, same card
# Logs and JSON lines land in $OUT; the card is in $OUT/card.txt.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s)
say() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
specs=()
flush_bench() {
  [ ${#specs[@]} -eq 0 ] && return
  OUT=$OUT bash scripts/gpu/device_run.sh bench "${specs[@]}"
  specs=()
}
phase=""
for a in "$@"; do
  case "$a" in
    interop|peermodel|tests|wait|unsloth|bench) flush_bench; phase=$a ;;
    *) [ "$phase" = bench ] && specs+=("$a"); continue ;;
  esac
  case "$phase" in
    interop)
      say "interop (background)"
      ( export PYTHONPATH=$PWD/.dev/pysite; mkdir -p "$OUT/interop"
        gunzip -kf .dev/interop/interop_fixtures.gz; chmod +x .dev/interop/interop_fixtures
        cp .dev/run/tunestudio.gz .dev/interop/ && gunzip -f .dev/interop/tunestudio.gz && chmod +x .dev/interop/tunestudio
        OUT=$OUT/interop timeout 420 bash .dev/interop/run_on_gpu.sh .dev/interop > "$OUT/interop/log.txt" 2>&1
        echo "interop rc=$?" >> "$OUT/interop/log.txt" ) &
      ;;
    peermodel)
      say "peer model (background)"
      ( OUT=$OUT/peers bash .peers/run.sh 300 model > "$OUT/peers_model.log" 2>&1 ) & ;;
    tests)
      say "GPU tests"; OUT=$OUT bash scripts/gpu/device_run.sh tests ;;
    wait)
      say "waiting for background phases"; wait; say "background done"
      tail -3 "$OUT/interop/log.txt" 2>/dev/null; tail -2 "$OUT/peers_model.log" 2>/dev/null ;;
    unsloth)
      say "Unsloth (PEER_SEQS=${PEER_SEQS:-default})"
      OUT=$OUT/peers bash .peers/run.sh "${PEER_BUDGET:-240}" C 2>&1 | grep -vE "^\s*$" | tail -25 ;;
  esac
done
flush_bench
say "done"
