#!/usr/bin/env bash
# Compile every kernels/*.cu to PTX: <name>.sm90.ptx (Hopper, what the H100/H200 load) and
# <name>.sm80.ptx (compute_80, which the driver JIT-compiles for any Ampere/Ada/Hopper card).
# Each PTX starts with a line holding the SHA-256 of its source followed by common.cuh, so a
# CPU test can tell a stale PTX (tests/ptx_fresh.rs). Then ptxas -v reports registers and spills
# for the sm_90 code, which is the first thing to read after a kernel change.
#
# nvcc can come from NVIDIA's pip packages, in a virtual environment of your choosing:
#   python3 -m venv VENV && VENV/bin/pip install "nvidia-cuda-nvcc~=13.0.0" \
#     "nvidia-nvvm~=13.0.0" "nvidia-cuda-crt~=13.0.0" "nvidia-cuda-runtime~=13.0.0" "nvidia-cuda-cccl~=13.0.0"
# then NVCC_PYTHON=VENV/bin/python3 kernels/build.sh. NVCC=/path/to/nvcc overrides the search; a
# CUDA toolkit's nvcc on PATH is used last. The committed PTX was built with CUDA 13.0.
#
# Usage: kernels/build.sh [name ...]   (no names: every .cu)
set -euo pipefail
cd "$(dirname "$0")"

find_nvcc() {
    if [[ -n "${NVCC:-}" ]]; then echo "$NVCC"; return; fi
    for py in ${NVCC_PYTHON:-} python3; do
        if command -v "$py" >/dev/null 2>&1; then
            local sp
            sp=$("$py" -c 'import site,sys; print("\n".join(site.getsitepackages()))' 2>/dev/null || true)
            for d in $sp; do
                for c in "$d/nvidia/cu13/bin/nvcc" "$d/nvidia/cuda_nvcc/bin/nvcc"; do
                    if [[ -x "$c" ]]; then echo "$c"; return; fi
                done
            done
        fi
    done
    if command -v nvcc >/dev/null 2>&1; then command -v nvcc; return; fi
    echo "nvcc not found: install the pip packages listed at the top of kernels/build.sh or set NVCC" >&2
    exit 1
}

NVCC=$(find_nvcc)
PTXAS="$(dirname "$NVCC")/ptxas"
echo "nvcc: $NVCC ($("$NVCC" --version | tail -n 2 | head -n 1))"

flags_for() {
    case "$1" in
        nf4) echo "-ftz=true" ;;  # bitsandbytes' kernels flush subnormals; do the same
        *) echo "" ;;
    esac
}

names=("$@")
if [[ ${#names[@]} -eq 0 ]]; then
    for f in *.cu; do names+=("${f%.cu}"); done
fi

status=0
for name in "${names[@]}"; do
    src="$name.cu"
    hash=$(cat "$src" common.cuh | sha256sum | cut -d' ' -f1)
    header="// source-sha256 $hash kernels/$src+kernels/common.cuh"
    for target in sm90 sm80; do
        case $target in
            sm90) arch="-arch=sm_90" ;;
            sm80) arch="-arch=compute_80" ;;
        esac
        tmp=$(mktemp)
        # shellcheck disable=SC2046
        "$NVCC" $arch -O3 -std=c++17 -ptx $(flags_for "$name") -o "$tmp" "$src"
        { echo "$header"; cat "$tmp"; } >"$name.$target.ptx"
        rm -f "$tmp"
    done
    report=$("$PTXAS" -arch=sm_90 -v "$name.sm90.ptx" -o /dev/null 2>&1 |
        awk '/Compiling entry function/ {gsub(/\x27/, "", $7); fn=$7}
             /bytes stack frame/ {spill=$5 "+" $9}
             /Used [0-9]+ registers/ {printf "  %-22s regs %4s  spill st+ld %s\n", fn, $5, spill}')
    echo "$name:"
    echo "$report"
    if echo "$report" | grep -qv "spill st+ld 0+0"; then
        echo "  note: $name has spills (see above)"
    fi
done
exit $status
