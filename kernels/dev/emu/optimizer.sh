#!/usr/bin/env bash
# Build and run the host emulation of kernels/adamw.cu and kernels/reduce.cu (optimizer_main.cpp:
# each kernel against plain host arithmetic; no GPU needed). EMU_ASAN=1 runs an ASan build instead.
# Usage: kernels/dev/emu/optimizer.sh     Output folder: $EMU_OUT (default $TMPDIR/tunestudio-emu).
# cuda_bf16.h as for build.sh (cuda_include.sh).
set -euo pipefail
. "$(dirname "$0")/cuda_include.sh"
if [[ "${EMU_ASAN:-0}" == 1 ]]; then
    g++ "${flags[@]}" -O1 -fsanitize=address,undefined "$here/optimizer_main.cpp" -o "$out/emu_optimizer_asan"
    ASAN_OPTIONS=detect_leaks=0 "$out/emu_optimizer_asan"
else
    g++ "${flags[@]}" -O2 "$here/optimizer_main.cpp" -o "$out/emu_optimizer"
    "$out/emu_optimizer"
fi
