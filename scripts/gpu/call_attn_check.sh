#!/usr/bin/env bash
# One device call: cuDNN's attention graph traced through torch (scripts/gpu/cudnn_trace.py), the
# attention sweep, then scripts/gpu/call_check.sh's phases; everything under $OUT tarred into one
# file (the device tool returns few files).
set -u
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=$(date +%s)
CUDNN_LOGLEVEL_DBG=3 CUDNN_LOGDEST_DBG="$OUT/cudnn_api.log" CUDNN_FRONTEND_LOG_INFO=1 CUDNN_FRONTEND_LOG_FILE="$OUT/cudnn_fe.log" \
  timeout 120 python3 scripts/gpu/cudnn_trace.py 256 2>&1 | tail -5
python3 - <<'PY' 2>&1 | tail -5
import os, nvidia.cudnn as nc
b = list(nc.__path__)[0]
for sub in ("include", "lib"):
    p = os.path.join(b, sub)
    print(sub, sorted(os.listdir(p)) if os.path.isdir(p) else "absent")
PY
bash scripts/gpu/device_run.sh sweep 2>&1 | tail -20
CALL_BUDGET=$(( ${CALL_BUDGET:-560} - ($(date +%s) - T0) )) bash scripts/gpu/call_check.sh
tar czf /tmp/all.tgz -C "$OUT" . && find "$OUT" -mindepth 1 -delete && mv /tmp/all.tgz "$OUT/all.tgz"
