#!/usr/bin/env bash
# One device call that checks a change on the card before anything is timed (staged by
# scripts/gpu/stage_run.sh; carry .dev/run, and .peers for `decode`):
#   native    every GPU suite as this card (kernels, whole step, demo, device/telemetry, generation)
#   diverge   issue 18's diverging run on CUDA and the CPU (scripts/gpu/diverge_probe.sh)
#   others    memory as the card really is, another process holding 10 GiB (scripts/gpu/others_check.sh)
#   decode    decode and prefill speed against transformers + bitsandbytes + PEFT (scripts/gpu/generate.sh)
#   profiles  every suite under every card profile, several profiles at a time
# PHASES picks them (default: native diverge others profiles). Profiles are skipped when less
# than 150 s is left of CALL_BUDGET seconds.
set -u
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s); BUDGET=${CALL_BUDGET:-570}
el() { echo "[$(( $(date +%s) - T0 ))s]"; }
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
for phase in ${PHASES:-native diverge others profiles}; do
  echo "$(el) $phase"
  case $phase in
    native) TEST_TIMEOUT=${TEST_TIMEOUT:-240} bash scripts/gpu/device_run.sh tests ;;
    diverge) bash scripts/gpu/diverge_probe.sh 2>&1 | tail -8 ;;
    others) bash scripts/gpu/others_check.sh 2>&1 | tail -14 ;;
    decode) bash scripts/gpu/generate.sh bench hf 2>&1 | tail -12 ;;
    profiles)
      if [ "$(left)" -gt 150 ]; then
        TEST_TIMEOUT=$(( $(left) - 20 )) PROFILE_JOBS=${PROFILE_JOBS:-6} timeout $(( $(left) - 10 )) bash scripts/gpu/device_run.sh profiles ${PROFILES:-}
      else
        echo "profiles skipped: $(left)s left"
      fi ;;
    *) echo "unknown phase $phase" ;;
  esac
done
echo "$(el) done"
