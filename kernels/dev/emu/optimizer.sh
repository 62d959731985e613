#!/usr/bin/env bash
# Build and run the host emulation of kernels/adamw.cu and kernels/reduce.cu (optimizer_main.cpp:
# each kernel against plain host arithmetic; no GPU needed). EMU_ASAN=1 runs an ASan build instead.
# Usage: kernels/dev/emu/optimizer.sh     Output folder: $EMU_OUT (default $TMPDIR/tunestudio-emu).
# cuda_bf16.h as for build.sh (cuda_include.sh).
set -euo pipefail
. "$(dirname "$0")/cuda_include.sh"
run_emulator optimizer
