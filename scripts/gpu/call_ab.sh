#!/usr/bin/env bash
# One device call that checks a change and times it against earlier builds, and against Unsloth
# where PEER_SEQS is set (carry .dev/run, .dev/ab and, for Unsloth, .peers):
#   - the peers' model builds in the background (with PEER_SEQS) while the GPU suites ($SUITES, as
#     device_run.sh) run natively (SKIP_TESTS=1 skips them);
#   - `tunestudio bench` of each of $SPECS with this build and with each earlier build carried as
#     .dev/ab/NAME.xz (xz of a stripped release binary; a headless build is about 4 MB), the builds
#     taking turns per spec so that the card's drift falls on all of them;
#   - Unsloth (PEER_SEQS) right after, then $MORE_SPECS with this build while the call's budget
#     (CALL_BUDGET s) leaves 70 s for each.
# JSON lines land in $OUT/ab_NAME/bench.jsonl; everything comes back in $OUT/all.tgz.
set -u
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s); BUDGET=${CALL_BUDGET:-560}
el() { echo "[$(( $(date +%s) - T0 ))s]"; }
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
[ -n "${PEER_SEQS:-}" ] && ( OUT=$OUT/peers bash .peers/run.sh 300 model > "$OUT/peers_model.log" 2>&1 ) &
if [ -z "${SKIP_TESTS:-}" ]; then
  echo "$(el) native tests"
  TEST_TIMEOUT=${TEST_TIMEOUT:-240} bash scripts/gpu/device_run.sh tests
fi
wait
[ -n "${PEER_SEQS:-}" ] && echo "$(el) peer model: $(tail -1 "$OUT/peers_model.log")"
bash scripts/gpu/unpack.sh .dev/run >/dev/null
bash scripts/gpu/unpack.sh .dev/ab >/dev/null
bench() {  # NAME BIN SPEC
  mkdir -p "$OUT/ab_$1"
  echo "$(el) $1 $3"
  OUT=$OUT/ab_$1 BENCH_BIN=$2 WARMUP=1 BENCH_TIMEOUT=${BENCH_TIMEOUT:-150} bash scripts/gpu/device_run.sh bench "$3" 2>&1 |
    grep -vE '^\|---|^\| system|^NVIDIA'
}
for spec in ${SPECS:-}; do
  bench new "$PWD/.dev/run/tunestudio" "$spec"
  for f in .dev/ab/*.xz; do
    [ -e "$f" ] || continue
    n=$(basename "$f" .xz); bench "$n" "$PWD/.dev/ab/$n" "$spec"
  done
done
if [ -n "${PEER_SEQS:-}" ]; then
  echo "$(el) Unsloth (PEER_SEQS=$PEER_SEQS)"
  OUT=$OUT/peers timeout $(( $(left) - 20 )) bash .peers/run.sh "${PEER_BUDGET:-240}" C 2>&1 | grep -vE "^\s*$" | tail -12
fi
for spec in ${MORE_SPECS:-}; do
  [ "$(left)" -gt 70 ] || { echo "skipped $spec: $(left)s left"; continue; }
  bench new "$PWD/.dev/run/tunestudio" "$spec"
done
echo "$(el) done"
tar czf /tmp/all.tgz -C "$OUT" . && mv /tmp/all.tgz "$OUT/all.tgz"
find "$OUT" -mindepth 1 ! -name all.tgz -delete
