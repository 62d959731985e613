#!/usr/bin/env bash
# One device call that checks a change and times it against earlier builds: every GPU suite
# natively (SUITES, as device_run.sh), then `tunestudio bench` of each SPEC with this build and
# with each earlier build carried as .dev/ab/NAME.xz (xz of a stripped release binary), the
# builds taking turns per SPEC so that the card's drift falls on all of them. JSON lines land in
# $OUT/ab_NAME/bench.jsonl; everything in $OUT/all.tgz.
set -u
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s)
el() { echo "[$(( $(date +%s) - T0 ))s]"; }
if [ -z "${SKIP_TESTS:-}" ]; then
  echo "$(el) native tests"
  TEST_TIMEOUT=${TEST_TIMEOUT:-240} bash scripts/gpu/device_run.sh tests
fi
bash scripts/gpu/unpack.sh .dev/run >/dev/null
bash scripts/gpu/unpack.sh .dev/ab >/dev/null
names=(new)
for f in .dev/ab/*.xz; do
  [ -e "$f" ] && names+=("$(basename "$f" .xz)")
done
# shellcheck disable=SC2086
for spec in $SPECS; do
  for n in "${names[@]}"; do
    bin=$PWD/.dev/run/tunestudio; [ "$n" = new ] || bin=$PWD/.dev/ab/$n
    echo "$(el) $n $spec"
    mkdir -p "$OUT/ab_$n"
    OUT=$OUT/ab_$n BENCH_BIN=$bin WARMUP=1 BENCH_TIMEOUT=${BENCH_TIMEOUT:-150} bash scripts/gpu/device_run.sh bench "$spec" 2>&1 |
      grep -vE '^\|---|^\| system|^NVIDIA'
  done
done
echo "$(el) done"
tar czf /tmp/all.tgz -C "$OUT" . && mv /tmp/all.tgz "$OUT/all.tgz"
find "$OUT" -mindepth 1 ! -name all.tgz -delete
