#!/usr/bin/env bash
# Build and run the host emulation of kernels/generate.cu (generate_main.cpp: every kernel against
# a double-precision reference; no GPU needed). EMU_ASAN=1 runs an AddressSanitizer build instead.
# Usage: kernels/dev/emu/generate.sh     Output folder: $EMU_OUT (default $TMPDIR/tunestudio-emu).
# cuda_bf16.h as for build.sh (cuda_include.sh).
set -euo pipefail
. "$(dirname "$0")/cuda_include.sh"
run_emulator generate
