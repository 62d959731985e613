#!/usr/bin/env bash
# Generation on the GPU in one device call: the CUDA generation tests against the CPU reference,
# then decode and prefill speed of the Llama-3-8B shape (NF4 base + LoRA r 16 on all seven linears,
# batch 1) for TuneStudio and for transformers + bitsandbytes + PEFT on the same card.
# Stage here first (builds the binary and the test binaries into .dev/run, copies the peers kit):
#   bash scripts/gpu/stage_run.sh && cp -r ../shared/peers .peers && bash .peers/build_site.sh
# then with the device tool, carry [".dev/run", ".peers"]:
#   bash scripts/gpu/generate.sh            (phases: tests bench hf; or name some of them)
# $OUT gets gpu_generate.log, bench_generate.jsonl, hf_generate.jsonl and a summary at the end.
set -u
HERE=.dev/run
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
bash "$(dirname "$0")/unpack.sh" "$HERE"
. "$(dirname "$0")/cudnn_env.sh"
chmod +x "$HERE"/tunestudio "$HERE"/gpu_* 2>/dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/card.txt"
phases=("$@"); [ ${#phases[@]} -eq 0 ] && phases=(tests bench hf)
for ph in "${phases[@]}"; do
  case $ph in
    tests)
      # Kernels against the CPU, a random NF4 model with an adapter, greedy demo answers token for token.
      timeout "${TEST_TIMEOUT:-420}" "$HERE/gpu_generate" --ignored --test-threads=1 --nocapture >"$OUT/gpu_generate.log" 2>&1
      echo "gpu_generate: $(grep -E '^test result' "$OUT/gpu_generate.log" | tail -1)"
      grep -E "RESULT .*FAIL|^test .* FAILED|panicked" "$OUT/gpu_generate.log" | head -10 | cut -c1-240
      grep -E "RESULT greedy" "$OUT/gpu_generate.log" | cut -c1-160 ;;
    bench)
      for spec in ${BENCH_SPECS:-512:128}; do
        IFS=: read -r p n <<<"$spec"
        timeout 300 "$HERE/tunestudio" bench-generate --shape llama3-8b --rank 16 --prompt-tokens "$p" --new-tokens "$n" --json \
          >>"$OUT/bench_generate.jsonl" 2>>"$OUT/bench_generate.log" || echo "bench-generate $spec FAILED (see bench_generate.log)"
        tail -n 1 "$OUT/bench_generate.jsonl" | python3 -c 'import json,sys; r=json.loads(sys.stdin.read()); print("tunestudio:", r["card"], "prefill", round(r["prefill_tokens_per_s"]), "tok/s, decode", round(r["decode_tokens_per_s"], 1), "tok/s")'
      done ;;
    hf)
      # bitsandbytes from the peers kit, alone on the path (the kit's other packages would shadow the host's).
      SITE=/tmp/site; [ -d $SITE/bitsandbytes ] || { mkdir -p $SITE && tar xzf .peers/site.tgz -C $SITE; }
      mkdir -p /tmp/bnb_only && ln -sfn $SITE/bitsandbytes /tmp/bnb_only/bitsandbytes
      ( cd .peers && timeout 240 python3 make_model.py >"$OUT/peer_model.log" 2>&1 ) || echo "peer model build failed (see peer_model.log)"
      for spec in ${BENCH_SPECS:-512:128}; do
        IFS=: read -r p n <<<"$spec"
        PYTHONPATH=/tmp/bnb_only timeout 300 python3 scripts/gpu/hf_generate_bench.py "$OUT/hf_generate.jsonl" "$p" "$n" 3 >>"$OUT/hf_generate.log" 2>&1 \
          || echo "hf generate $spec FAILED (see hf_generate.log)"
        tail -n 1 "$OUT/hf_generate.jsonl" 2>/dev/null | python3 -c 'import json,sys; r=json.loads(sys.stdin.read()); print("transformers+bnb+peft:", r["card"], "prefill", round(r["prefill_tokens_per_s"]), "tok/s, decode", round(r["decode_tokens_per_s"], 1), "tok/s")'
      done ;;
    *) echo "unknown phase $ph (tests bench hf)" ;;
  esac
done
