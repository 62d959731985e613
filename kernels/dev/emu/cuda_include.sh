# Sourced by the emulator scripts: finds cuda_bf16.h (CUDA_INCLUDE, or the pip package
# nvidia-cuda-runtime found by NVCC_PYTHON / python3; kernels/build.sh lists the packages) and
# sets `here`, `kernels`, `out` and the host compiler's `flags`; `run_emulator NAME` builds and
# runs one.
here=$(cd "$(dirname "${BASH_SOURCE[1]}")" && pwd)
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
# The kernels type-pun through pointers (fine under nvcc): no strict aliasing on the host.
flags=(-std=c++20 -g -fno-strict-aliasing -I"$inc" -I"$kernels" -I"$here")

# Build `$here/NAME_main.cpp` and run it: optimized, or with AddressSanitizer and UBSan where
# EMU_ASAN=1.
run_emulator() {
    local name=$1
    if [[ "${EMU_ASAN:-0}" == 1 ]]; then
        g++ "${flags[@]}" -O1 -fsanitize=address,undefined "$here/${name}_main.cpp" -o "$out/emu_${name}_asan"
        ASAN_OPTIONS=detect_leaks=0 "$out/emu_${name}_asan"
    else
        g++ "${flags[@]}" -O2 "$here/${name}_main.cpp" -o "$out/emu_${name}"
        "$out/emu_${name}"
    fi
}
