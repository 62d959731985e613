#!/usr/bin/env bash
# Check TuneStudio's generation and GGUF export against transformers and llama.cpp, and refresh
# tests/fixtures/generate (tests/interop_generate.rs re-checks them in CI without either tool).
# Runs on the CPU (no GPU needed) or on a GPU host.
#
# Two Python environments (one can serve both):
#   TORCH_PY  torch, transformers, peft, safetensors (default python3), for the phases `models`
#             and `hf`; not needed with ONLY=llamacpp, which keeps the committed models and
#             transformers' tokens.
#   LLAMA_PY  llama-cpp-python, gguf, numpy, safetensors (default python3). llama-cpp-python
#             builds llama.cpp from its sdist (a C++ compiler is needed; cmake comes from pip;
#             about 15 minutes on 2 cores):
#               python3 -m venv venv-llama
#               CMAKE_BUILD_PARALLEL_LEVEL=2 CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_EXAMPLES=OFF \
#                 -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAVA_BUILD=OFF" \
#                 venv-llama/bin/pip install llama-cpp-python gguf numpy safetensors
#             The recorded fixtures were made with llama-cpp-python 0.3.36 and gguf 0.19.
#   BIN       the tunestudio binary (default: built here with `cargo build --release`)
#   ONLY      `llamacpp`: skip the transformers phases
# Usage: [LLAMA_PY=venv-llama/bin/python] [ONLY=llamacpp] tests/interop/generate_check.sh [FIXTURE_DIR]
#        (default FIXTURE_DIR: tests/fixtures/generate)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
FX=${1:-$ROOT/tests/fixtures/generate}
TORCH_PY=${TORCH_PY:-python3}
LLAMA_PY=${LLAMA_PY:-python3}
ONLY=${ONLY:-}
if [ -z "${BIN:-}" ]; then
  (cd "$ROOT" && cargo build --release --bin tunestudio)
  BIN=${CARGO_TARGET_DIR:-$ROOT/target}/release/tunestudio
fi
PY=$ROOT/tests/interop/make_generate_fixtures.py
DEMO=$ROOT/assets/demo
GG=$(mktemp -d)
trap 'rm -rf "$GG"' EXIT
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$FX"

if [ "$ONLY" != llamacpp ]; then
  echo "== random Llama-3-, Qwen2-, Qwen3- and Gemma-3-shaped models with PEFT adapters (transformers)"
  "$TORCH_PY" "$PY" models "$FX" "$DEMO"
  echo "== prompt ids and greedy generation (transformers + PEFT, f32)"
  "$TORCH_PY" "$PY" hf "$FX" "$DEMO"
fi

echo "== tunestudio: merged f32 weights and GGUF exports (f16, q8_0, q4_k_m) of every model + adapter"
# The cases of GGUF_CASES in make_generate_fixtures.py.
for c in $("$LLAMA_PY" -c "import sys; sys.path.insert(0, '$ROOT/tests/interop'); import make_generate_fixtures as m; print(' '.join(m.GGUF_CASES))"); do
  if [ "$c" = demo ]; then model=$DEMO/model adapter=$ROOT/tests/fixtures/interop/demo_adapter
  else model=$FX/$c adapter=$FX/${c}_adapter; fi
  "$BIN" export merged --model "$model" --adapter "$adapter" --dtype f32 --to "$GG/$c-f32" >/dev/null
  for q in f16 q8_0 q4_k_m; do
    "$BIN" export gguf --model "$model" --adapter "$adapter" --quant $q --to "$GG/$c-$q.gguf" --temperature 0.6 >/dev/null
  done
done
echo "== llama.cpp loads the files, every tensor dequantizes to the merged weights, greedy generation"
"$LLAMA_PY" "$PY" llamacpp "$FX" "$DEMO" "$GG"

echo "== tunestudio greedy decode against transformers and llama.cpp (the CI test on the fresh fixtures)"
(cd "$ROOT" && TUNESTUDIO_GENERATE_FIXTURES=$FX cargo test --release --test interop_generate -- --nocapture 2>&1) |
  grep -E "RESULT|test result|panicked"
