#!/usr/bin/env bash
# Build and run the host emulator of the attention kernels (no GPU needed; see kernels/NOTES.md,
# "Checking attention without a GPU"). Extracts version 3 and version 2 from kernels/attention.cu,
# builds an -O2 binary and an AddressSanitizer one into $EMU_OUT (default /tmp/tunestudio-emu), then
# runs the given modes (default: late early-rand v2-late), each a line of `emu MODE [CASE [SEED]]`:
#   MODE  late | early, optionally with -rand (random fiber schedule) and v2- (version 2 instead)
#   CASE  a..h or all (see main.cpp)
# Usage: kernels/emu/build.sh [MODE ...]        EMU_ASAN=1 runs the ASan binary instead.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${EMU_OUT:-/tmp/tunestudio-emu}
mkdir -p "$out"
inc=""
for py in /work/.nvcc-venv/bin/python3 python3; do
    command -v "$py" >/dev/null 2>&1 || continue
    for d in $("$py" -c 'import site; print("\n".join(site.getsitepackages()))' 2>/dev/null); do
        for c in "$d/nvidia/cu13/include" "$d/nvidia/cuda_runtime/include"; do
            if [[ -z "$inc" && -f "$c/cuda_bf16.h" ]]; then inc=$c; fi
        done
    done
done
[[ -n "$inc" ]] || { echo "cuda_bf16.h not found: install the pip packages listed in kernels/build.sh" >&2; exit 1; }
python3 "$here/extract.py" "$here/../attention.cu" >"$out/v3.inc"
python3 "$here/extract_v2.py" "$here/../attention.cu" >"$out/v2.inc"
# The kernels type-pun through pointers (fine under nvcc): no strict aliasing on the host.
flags=(-std=c++20 -g -fno-strict-aliasing -I"$inc" -I"$here/.." -I"$out")
g++ "${flags[@]}" -O2 "$here/main.cpp" -o "$out/emu"
g++ "${flags[@]}" -O1 -fsanitize=address,undefined "$here/main.cpp" -o "$out/emu_asan"
bin=$out/emu
[[ "${EMU_ASAN:-0}" == 1 ]] && bin=$out/emu_asan
modes=("$@")
[[ ${#modes[@]} -eq 0 ]] && modes=(late early-rand v2-late)
status=0
for m in "${modes[@]}"; do
    # shellcheck disable=SC2086
    ASAN_OPTIONS=detect_leaks=0 "$bin" $m | grep -Ev "^ok " || status=1
done
exit $status
