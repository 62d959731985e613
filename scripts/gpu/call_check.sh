#!/usr/bin/env bash
# One device call that checks a change on the card before anything is timed (staged by
# scripts/gpu/stage_run.sh; carry .dev/run):
#   1. every GPU suite as this card (kernels, whole step, demo, device/telemetry, generation)
#   2. issue 18's diverging run on CUDA and the CPU (scripts/gpu/diverge_probe.sh)
#   3. memory as the card really is, with another process holding 10 GiB (scripts/gpu/others_check.sh)
#   4. every suite under every card profile, several profiles at a time
# Each phase is skipped when less than its usual time is left of CALL_BUDGET seconds.
set -u
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s); BUDGET=${CALL_BUDGET:-570}
el() { echo "[$(( $(date +%s) - T0 ))s]"; }
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
echo "$(el) native suites"
TEST_TIMEOUT=240 bash scripts/gpu/device_run.sh tests
echo "$(el) diverge probe"
bash scripts/gpu/diverge_probe.sh 2>&1 | tail -8
echo "$(el) others check"
bash scripts/gpu/others_check.sh 2>&1 | tail -14
if [ "$(left)" -gt 150 ]; then
  echo "$(el) profiles"
  TEST_TIMEOUT=$(( $(left) - 20 )) PROFILE_JOBS=${PROFILE_JOBS:-6} timeout $(( $(left) - 10 )) bash scripts/gpu/device_run.sh profiles ${PROFILES:-}
else
  echo "$(el) profiles skipped: $(left)s left"
fi
echo "$(el) done"
