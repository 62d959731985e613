#!/usr/bin/env bash
# Build and run the host emulation of kernels/generate.cu (optimizer_main.cpp: every kernel against
# plain host arithmetic; no GPU needed). EMU_ASAN=1 runs an AddressSanitizer build instead.
# Usage: kernels/dev/emu/optimizer.sh     Output folder: $EMU_OUT (default $TMPDIR/tunestudio-emu).
# cuda_bf16.h as for build.sh: CUDA_INCLUDE, or the pip package found by NVCC_PYTHON / python3.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
kernels=$(cd "$here/../.." && pwd)
out=${EMU_OUT:-${TMPDIR:-/tmp}/tunestudio-emu}
mkdir -p "$out"
inc=${CUDA_INCLUDE:-}
if [[ -z "$inc" ]]; then
    for py in ${NVCC_PYTHON:-} python3; do
        command -v "$py" >/dev/null 2>&1 || continue
        for d in $("$py" -c 'import site; print("\n".join(site.getsitepackages()))' 2>/dev/null); do
            for c in "$d/nvidia/cu13/include" "$d/nvidia/cuda_runtime/include"; do
                if [[ -z "$inc" && -f "$c/cuda_bf16.h" ]]; then inc=$c; fi
            done
        done
    done
fi
[[ -n "$inc" ]] || { echo "cuda_bf16.h not found: set CUDA_INCLUDE or NVCC_PYTHON (see kernels/build.sh)" >&2; exit 1; }
flags=(-std=c++20 -g -fno-strict-aliasing -I"$inc" -I"$kernels" -I"$here")
if [[ "${EMU_ASAN:-0}" == 1 ]]; then
    g++ "${flags[@]}" -O1 -fsanitize=address,undefined "$here/optimizer_main.cpp" -o "$out/emu_optimizer_asan"
    ASAN_OPTIONS=detect_leaks=0 "$out/emu_optimizer_asan"
else
    g++ "${flags[@]}" -O2 "$here/optimizer_main.cpp" -o "$out/emu_optimizer"
    "$out/emu_optimizer"
fi
