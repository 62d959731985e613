#!/bin/bash
# Orchestrates the peer benchmarks on the device machine.
# usage (from the repo root on the device):  bash bench_peers/run.sh BUDGET_S PHASE...
# PHASE in: env model A B Bmax C Cmax   (each system runs in its own process; per-phase timeouts
# are clipped to what is left of BUDGET_S; scripts stop starting new max-seq tries at the deadline)
set -u
START=$(date +%s); BUDGET=$1; shift
END=$((START + BUDGET))
OUT=${OUT:-/tmp/peer_out}; mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 \
       UNSLOTH_DISABLE_STATISTICS=1 UNSLOTH_OFFLINE=1 UNSLOTH_LLAMA_CPP_OFFLINE=1 DO_NOT_TRACK=1 \
       PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONDONTWRITEBYTECODE=1
HERE=$(cd "$(dirname "$0")" && pwd)
SITE=/tmp/site
if [ ! -d $SITE/unsloth ]; then
  mkdir -p $SITE && tar xzf "${PEER_SITE_TGZ:-$HERE/site.tgz}" -C $SITE && echo "unpacked site ($(du -sh $SITE | cut -f1))"
fi
mkdir -p /tmp/uwork
# Results of another shape than the default get its name (C-gemma3-4b.json), so one $OUT can hold
# several shapes' rows; bench/record.py reads the shape from inside each file.
SFX=""; [ "${PEER_SHAPE:-llama3-8b}" != llama3-8b ] && SFX="-$PEER_SHAPE"
left() { echo $((END - $(date +%s))); }
runphase() {  # name cap_s cmd...   (exports PHASE_DEADLINE)
  local name=$1 cap=$2; shift 2
  local l; l=$(left)
  local t=$(( cap < l - 5 ? cap : l - 5 ))
  if [ "$t" -lt 20 ]; then echo "=== SKIP $name (only ${l}s left)"; return; fi
  export PHASE_DEADLINE=$(( $(date +%s) + t - 15 ))
  echo "=== $name (timeout ${t}s) $(date -u +%FT%TZ)"
  timeout -k 5 "$t" "$@"
  echo "=== $name rc=$? at $(( $(date +%s) - START ))s"
}
for ph in "$@"; do
  case $ph in
    env)   nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1; cat "$OUT/nvidia-smi.txt"
           runphase env 60 env PYTHONPATH=$SITE python3 "$HERE/env_info.py" "$OUT/env.json" ;;
    model) runphase model 240 python3 "$HERE/make_model.py" ;;
    A)     runphase A 180 bash -c "python3 '$HERE/bench_hf.py' lora '$OUT/A$SFX.json' \$PHASE_DEADLINE" ;;
    B)     runphase B 200 bash -c "PYTHONPATH=$SITE python3 '$HERE/bench_hf.py' qlora '$OUT/B$SFX.json' \$PHASE_DEADLINE" ;;
    Bmax)  runphase Bmax 220 bash -c "PYTHONPATH=$SITE python3 '$HERE/bench_hf.py' qlora '$OUT/B$SFX.json' \$PHASE_DEADLINE 16384 131072 1024" ;;
    C)     runphase C 600 bash -c "cd /tmp/uwork && PYTHONPATH=$SITE python3 '$HERE/bench_unsloth.py' '$OUT/C$SFX.json' \$PHASE_DEADLINE" ;;
    Cmax)  runphase Cmax 520 bash -c "cd /tmp/uwork && PEER_SEQS=${PEER_SEQS_C:-${PEER_SEQS:-}} PYTHONPATH=$SITE python3 '$HERE/bench_unsloth.py' '$OUT/C$SFX.json' \$PHASE_DEADLINE ${PEER_CMAX:-32768 131072 8192}" ;;
    *) echo "unknown phase $ph" ;;
  esac
done
echo "=== all done at $(( $(date +%s) - START ))s"
