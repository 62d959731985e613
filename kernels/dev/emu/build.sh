#!/usr/bin/env bash
# Build and run the host emulator of kernels/attention.cu (no GPU needed; see kernels/NOTES.md,
# "Checking attention without a GPU"). main.cpp includes attention.cu itself (compiled with
# TUNESTUDIO_EMU, emu.h standing in for the warp collectives and inline PTX), so what runs here is the
# shipped source. Builds an -O2 binary and an AddressSanitizer one into $EMU_OUT (default
# $TMPDIR/tunestudio-emu), then runs the given modes, each a line of `emu MODE [CASE [SEED]]`:
#   MODE  late | early (cp.async lands at the wait / at issue), optionally with -rand (random fiber
#         schedule)
#   CASE  a letter of main.cpp's cases, or all
# Usage: kernels/dev/emu/build.sh [MODE ...]   (default: late early-rand)   EMU_ASAN=1 runs the ASan build.
# cuda_bf16.h comes from the CUDA runtime headers: set CUDA_INCLUDE, or have python3 find the pip
# package nvidia-cuda-runtime (kernels/build.sh lists the packages).
set -euo pipefail
. "$(dirname "$0")/cuda_include.sh"
g++ "${flags[@]}" -O2 "$here/main.cpp" -o "$out/emu"
g++ "${flags[@]}" -O1 -fsanitize=address,undefined "$here/main.cpp" -o "$out/emu_asan"
bin=$out/emu
[[ "${EMU_ASAN:-0}" == 1 ]] && bin=$out/emu_asan
modes=("$@")
[[ ${#modes[@]} -eq 0 ]] && modes=(late early-rand)
status=0
for m in "${modes[@]}"; do
    # shellcheck disable=SC2086
    ASAN_OPTIONS=detect_leaks=0 "$bin" $m | grep -Ev "^ok " || status=1
done
exit $status
