#!/usr/bin/env bash
# Refresh tests/fixtures/interop on a GPU host (torch, transformers, peft, bitsandbytes; no Rust)
# and check TuneStudio against those tools on the way. Stage first, on the build machine:
#
#   D=.dev/interop                                     # any folder the GPU host receives
#   cargo build --release && cargo test --release --no-run --test interop_fixtures
#   cp target/release/tunestudio $D/ ; cp <the interop_fixtures test binary> $D/interop_fixtures
#   cp tests/interop/*.py tests/interop/*.sh $D/ ; cp -r assets/demo $D/demo
#   cp -r tests/fixtures/interop/demo_fix $D/demo_fix
#
# then on the GPU host: `OUT=<results folder> bash $D/run_on_gpu.sh $D`. $OUT receives the log,
# summary lines and fixtures.tar (unpack into tests/fixtures/interop and commit).
set -euo pipefail
D=$(cd "${1:-.dev/interop}" && pwd)
OUT=${OUT:-/tmp/interop-out}
FX=/tmp/interop-fx
M=/tmp/interop-merged
R=/tmp/interop-runs
rm -rf "$FX" "$M" "$R"
mkdir -p "$FX" "$M" "$R" "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
BIN="$D/tunestudio"
PY="$D/make_interop_fixtures.py"

python3 -c 'import torch, transformers, peft, bitsandbytes; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__, "bitsandbytes", bitsandbytes.__version__, "cuda", torch.cuda.is_available())'

echo "== random models, PEFT adapters, HF and PEFT losses"
python3 "$PY" models "$FX"
echo "== bnb-4bit checkpoint"
python3 "$PY" bnb "$FX"

echo "== tunestudio trains adapters on the Qwen3 and Gemma 3 models; PEFT scores them"
INTEROP_FIXTURES="$FX" "$D/interop_fixtures" --ignored write_trained_adapters --nocapture
python3 "$PY" trained "$FX" | tee "$OUT/trained.json"

echo "== tunestudio merges the PEFT adapters"
for m in llama_gqa llama_tied qwen2_bias qwen3_tied gemma3_text gemma3_mm; do
  "$BIN" export merged --model "$FX/$m" --adapter "$FX/${m}_adapter" --dtype f32 --to "$M/$m-f32"
  "$BIN" export merged --model "$FX/$m" --adapter "$FX/${m}_adapter" --dtype bf16 --max-shard-size 40000 --to "$M/$m-bf16"
done
# A destination that exists is refused.
if "$BIN" export merged --model "$FX/llama_gqa" --adapter "$FX/llama_gqa_adapter" --to "$M/llama_gqa-f32" 2>"$OUT/refused.txt"; then
  echo "FAIL: an existing destination was overwritten"; exit 1
fi
echo "refused as expected: $(tail -1 "$OUT/refused.txt")"
python3 "$PY" merged "$FX" "$M" llama_gqa llama_tied qwen2_bias qwen3_tied gemma3_text gemma3_mm | tee "$OUT/merged.json"

echo "== demo run with the untrained-token fix, exported for PEFT"
mkdir -p "$FX/demo_fix"
cp "$D/demo_fix/train.jsonl" "$D/demo_fix/eval.jsonl" "$D/demo_fix/run.toml" "$FX/demo_fix/"
sed -e "s|^path = \"../../../../assets/demo/model\"|path = \"$D/demo/model\"|" \
    -e "s|^dir = \"../../../../runs\"|dir = \"$R\"|" "$D/demo_fix/run.toml" > "$R/run.toml"
cp "$FX/demo_fix/train.jsonl" "$R/train.jsonl"
"$BIN" train "$R/run.toml" --device cpu
cat "$R/demo_fix/token_fix.json"
"$BIN" export adapter "$R/demo_fix" --to "$FX/demo_adapter"
# The export names the base model by the path the run was given, a path of the machine that ran it;
# the committed fixture names the demo by its place in the repository instead.
sed -i 's|"base_model_name_or_path": ".*"|"base_model_name_or_path": "assets/demo/model"|' "$FX/demo_adapter/adapter_config.json"
"$BIN" export merged "$R/demo_fix" --dtype f32 --to "$M/demo-f32"
"$BIN" export merged "$R/demo_fix" --dtype bf16 --to "$M/demo-bf16" --json
for q in nf4 bf16; do
  "$BIN" eval "$D/demo/model" --adapter "$FX/demo_adapter" --data "$FX/demo_fix/eval.jsonl" --quantization $q --max-seq-len 256 --json --per-example > "$FX/demo_eval_$q.json"
  "$BIN" eval "$D/demo/model" --adapter "$FX/demo_adapter" --data "$FX/demo_fix/eval.jsonl" --quantization $q --max-seq-len 256
done
python3 "$PY" demo "$FX" "$M" "$D/demo" | tee "$OUT/demo.json"

echo "== the Rust fixture tests against the fresh fixtures"
INTEROP_FIXTURES="$FX" INTEROP_DEMO="$D/demo" "$D/interop_fixtures" --test-threads 4 --nocapture 2>&1 | tee "$OUT/rust_tests.txt"

rm -f "$FX"/demo_eval_*.json
tar cf "$OUT/fixtures.tar" -C "$FX" .
cp "$FX/expected.json" "$OUT/"
echo "ALL INTEROP CHECKS PASSED"
