#!/usr/bin/env bash
# Issue 18's diverging run on the GPU host, with the divergence guard off so that the forward's
# own behaviour shows: the demo at lr 1.0, alpha 1e6, no warm-up, no clipping, on CUDA and on the
# CPU. Before the RMSNorm fix the CUDA run flattened to the uniform distribution (loss exactly
# ln(vocab), gradient norm 0 for many steps); bench/diverge_check.py fails if either run does.
# Uses the release binary staged in .dev/run (scripts/gpu/stage_run.sh). Logs under $OUT/diverge.
set -u
HERE=.dev/run
OUT=${OUT:-/tmp/out}; D=$OUT/diverge; mkdir -p "$D"
bash "$(dirname "$0")/unpack.sh" "$HERE"
. "$(dirname "$0")/cudnn_env.sh"
chmod +x "$HERE/tunestudio"
DEMO=$PWD/assets/demo
for dev in cuda cpu; do
  sed -e "s#^path = \"model\"#path = \"$DEMO/model\"#" -e "s#^path = \"data/train.jsonl\"#path = \"$DEMO/data/train.jsonl\"#" \
      -e "s#^dir = .*#dir = \"$D/runs-$dev\"\nrun_name = \"probe\"#" -e 's#^lr = .*#lr = 1.0\nmax_grad_norm = 0.0#' \
      -e 's#^alpha = .*#alpha = 1e6#' -e 's#^warmup_steps = .*#warmup_steps = 0#' \
      -e "s#^max_steps = .*#max_steps = 30\ndevice = \"$dev\"\nstop_on_divergence = false#" \
      "$DEMO/run.toml" >"$D/run-$dev.toml"
  timeout 240 "$HERE/tunestudio" train "$D/run-$dev.toml" >"$D/train-$dev.log" 2>&1
  echo "diverge probe $dev: exit $? ($(tail -n 1 "$D/train-$dev.log" | cut -c1-160))"
done
python3 bench/diverge_check.py "$D/runs-cuda" "$D/runs-cpu" "$DEMO/model/config.json" | tee "$D/check.txt"
