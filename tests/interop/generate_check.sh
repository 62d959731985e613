#!/usr/bin/env bash
# Check TuneStudio's generation and GGUF export against transformers and llama.cpp, and refresh
# tests/fixtures/generate (tests/interop_generate.rs re-checks them in CI without either tool).
# Runs on the CPU (no GPU needed) or on a GPU host. Needs:
#   TORCH_PY   a Python with torch, transformers, peft, safetensors   (default python3)
#   LLAMA_PY   a Python with llama-cpp-python, gguf, numpy, safetensors (default python3)
#   BIN        the tunestudio binary (default target/release/tunestudio)
# Usage: tests/interop/generate_check.sh [FIXTURE_DIR]    (default tests/fixtures/generate)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
FX=${1:-$ROOT/tests/fixtures/generate}
TORCH_PY=${TORCH_PY:-python3}
LLAMA_PY=${LLAMA_PY:-python3}
BIN=${BIN:-$ROOT/target/release/tunestudio}
PY=$ROOT/tests/interop/make_generate_fixtures.py
DEMO=$ROOT/assets/demo
GG=$(mktemp -d)
trap 'rm -rf "$GG"' EXIT
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$FX"

echo "== random Llama-3-, Qwen2-, Qwen3- and Gemma-3-shaped models with PEFT adapters (transformers)"
"$TORCH_PY" "$PY" models "$FX" "$DEMO"
echo "== prompt ids and greedy generation (transformers + PEFT, f32)"
"$TORCH_PY" "$PY" hf "$FX" "$DEMO"

echo "== tunestudio: merged f32 weights and GGUF exports (f16, q8_0, q4_k_m) of every model + adapter"
# The cases of GGUF_CASES in make_generate_fixtures.py.
for c in demo llama3_gen qwen2_gen qwen3_gen; do
  if [ $c = demo ]; then model=$DEMO/model adapter=$ROOT/tests/fixtures/interop/demo_adapter
  else model=$FX/$c adapter=$FX/${c}_adapter; fi
  "$BIN" export merged --model "$model" --adapter "$adapter" --dtype f32 --to "$GG/$c-f32" >/dev/null
  for q in f16 q8_0 q4_k_m; do
    "$BIN" export gguf --model "$model" --adapter "$adapter" --quant $q --to "$GG/$c-$q.gguf" --temperature 0.6
  done
done
echo "== llama.cpp loads the files, every tensor dequantizes to the merged weights, greedy generation"
"$LLAMA_PY" "$PY" llamacpp "$FX" "$DEMO" "$GG"

echo "== tunestudio greedy decode against transformers and llama.cpp (the CI test on the fresh fixtures)"
TUNESTUDIO_GENERATE_FIXTURES=$FX cargo test --release --test interop_generate -- --nocapture 2>&1 | grep -E "RESULT|test result|panicked" || true
