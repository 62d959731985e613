#!/usr/bin/env bash
# One device call that checks a change and then times it (staged by scripts/gpu/stage_run.sh;
# carry .dev/run): every GPU suite natively, then `tunestudio bench` for each of $SPECS
# (device_run.sh's bench SPEC), then as many card profiles ($PROFILES, suites $PROFILE_SUITES)
# as the call's budget (CALL_BUDGET seconds) leaves time for. Everything lands in $OUT/all.tgz,
# one file, since a call brings back at most eight.
set -u
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s); BUDGET=${CALL_BUDGET:-560}
el() { echo "[$(( $(date +%s) - T0 ))s]"; }
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
echo "$(el) native"
TEST_TIMEOUT=${TEST_TIMEOUT:-240} bash scripts/gpu/device_run.sh tests
if [ -n "${SPECS:-}" ]; then
  echo "$(el) bench"
  # shellcheck disable=SC2086
  WARMUP=1 BENCH_TIMEOUT=${BENCH_TIMEOUT:-150} bash scripts/gpu/device_run.sh bench $SPECS 2>&1 | grep -vE '^\|---|^\| system'
fi
if [ "$(left)" -gt 120 ] && [ -n "${PROFILES:-}" ]; then
  echo "$(el) profiles $PROFILES"
  # shellcheck disable=SC2086
  SUITES=${PROFILE_SUITES:-"gpu_kernels gpu_step"} TEST_TIMEOUT=$(( $(left) - 20 )) PROFILE_JOBS=${PROFILE_JOBS:-4} \
    timeout $(( $(left) - 10 )) bash scripts/gpu/device_run.sh profiles $PROFILES
else
  echo "profiles skipped: $(left)s left"
fi
echo "$(el) done"
tar czf /tmp/all.tgz -C "$OUT" . && mv /tmp/all.tgz "$OUT/all.tgz"
find "$OUT" -mindepth 1 ! -name all.tgz -delete
