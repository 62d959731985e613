#!/usr/bin/env python3
"""Extract version 2 of kernels/attention.cu (known good on H100/H200) for the emulator, minus the
inline-PTX helpers emu.h provides."""
import re, sys
src = open(sys.argv[1]).read()
start = src.index("template <int HD>\nstruct Att2 {")
end = src.index("#define ATT2_INSTANCES")
body = src[start:end]
for name in ["smem_u32", "ldsm_x4", "ldsm_x4_t", "mma16816", "pack2", "cp_async16", "cp_async_commit", "cp_async_wait_all", "quad_max", "quad_sum"]:
    m = re.search(r"^DEVI [^\n]*\b" + name + r"\(", body, re.M)
    assert m, name
    i = m.start()
    line_end = body.index("\n", i)
    if body[i:line_end].rstrip().endswith("}"):
        j = line_end + 1
    else:
        j = body.index("\n}\n", i) + 3
    body = body[:i] + body[j:]
n = body.count("extern __shared__ __align__(128) unsigned char smem[];")
assert n == 3, n
body = body.replace("extern __shared__ __align__(128) unsigned char smem[];", "unsigned char* smem = emu_smem();")
sys.stdout.write(body)
