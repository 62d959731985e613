#!/usr/bin/env bash
# Device-side check of the CUDA backend: runs the prebuilt GPU test binaries (built on the dev
# machine with `cargo test --release --no-run --test gpu_kernels --test gpu_step --test gpu_bench`,
# stripped and copied next to this script by scripts/gpu/stage.sh) and writes logs to $OUT.
# Usage on the device: bash .dev/cuda/gpu_check.sh [kernels] [step] [bench] [memcheck]
# (no arguments: kernels step bench).
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
what=("$@")
[[ ${#what[@]} -eq 0 ]] && what=(kernels step bench)
cd "$HERE"
for f in *.gz; do [[ -e "$f" ]] && gunzip -f "$f"; done
chmod +x gpu_kernels gpu_step gpu_bench ptx_fresh 2>/dev/null
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,utilization.gpu --format=csv
    nvidia-smi -L
} 2>&1 | tee "$OUT/device.txt"
rc=0
# One process per test: a kernel fault poisons the CUDA context of its whole process.
each() {
    local bin=$1 log=$2 limit=$3
    : >"$log"
    for t in $(./"$bin" --ignored --list 2>/dev/null | sed -n 's/: test$//p'); do
        TUNESTUDIO_CUDA_SYNC=${SYNC:-0} timeout "$limit" ./"$bin" --ignored --exact "$t" --nocapture >>"$log" 2>&1 || { rc=1; echo "FAILED $bin::$t" >>"$log"; }
    done
}
# Matching lines, plus the three lines after each panic (the assertion message).
show() {
    awk -v pat="$1" '$0 ~ pat {print; next} /panicked at/ {print; n = 3; next} n > 0 {print; n--}' "$2" | cut -c1-230
}
for w in "${what[@]}"; do
    case $w in
        kernels)
            SYNC=1 each gpu_kernels "$OUT/kernels.log" 120
            show "^(RESULT|DEVICE|MEMORY|NF4|FAILED)" "$OUT/kernels.log" ;;
        step)
            each gpu_step "$OUT/step.log" 120
            show "^(RESULT|MEMORY|FAILED)" "$OUT/step.log" ;;
        bench)
            each gpu_bench "$OUT/bench.log" 150
            show "^(BENCH|DEVICE|MEMORY|FAILED)" "$OUT/bench.log" ;;
        sm80)
            # The compute_80 PTX (Ampere/Ada build) JIT-compiled on this card, every kernel test.
            export TUNESTUDIO_PTX=sm80
            SYNC=1 each gpu_kernels "$OUT/kernels_sm80.log" 120
            unset TUNESTUDIO_PTX
            show "^(DEVICE|FAILED)|FAIL$" "$OUT/kernels_sm80.log"
            grep -c " ok$" "$OUT/kernels_sm80.log" | sed 's/^/sm80 checks ok: /' ;;
        ncu)
            # Nsight Compute on one launch of each attention v2 kernel at the Llama-3-8B shape.
            for k in attn2_fwd_128 attn2_bwd_dkdv_128 attn2_bwd_dq_128; do
                timeout 120 ncu -k "$k" -s 2 -c 1 --section SpeedOfLight --section Occupancy --section LaunchStats \
                    --section WarpStateStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
                    ./gpu_bench --ignored --exact ops_at_llama3_8b_shapes >"$OUT/ncu_$k.txt" 2>&1 || rc=1
                echo "== $k"
                grep -E "Duration|Compute \(SM\) Throughput|Memory Throughput|Achieved Occupancy|Theoretical Occupancy|Registers Per|Block Limit (Registers|Shared Mem)|Issue Slots Busy|Stall|L1/TEX Hit|Bank" "$OUT/ncu_$k.txt" | head -24
            done ;;
        memcheck)
            timeout 200 compute-sanitizer --tool memcheck --print-limit 20 ./gpu_kernels --ignored --test-threads=1 attention lm_head nf4 >"$OUT/memcheck.log" 2>&1 || rc=1
            tail -n 25 "$OUT/memcheck.log" ;;
    esac
done
exit $rc
