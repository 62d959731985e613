#!/usr/bin/env python3
"""Extract the version-3 section of kernels/attention.cu for the host emulator: from the
'Version 3' banner to '#define ATT3_INSTANCES', minus the functions written in inline PTX
(ex2, red_add2), which emu.h provides; the dynamic shared memory declaration becomes a pointer
to the emulated block's buffer."""
import re, sys
src = open(sys.argv[1]).read()
start = src.index("// Version 3 (head_dim 64 and 128)")
start = src.rindex("// =====", 0, start)
end = src.index("#define ATT3_INSTANCES")
body = src[start:end]
def drop_fn(text, sig):
    i = text.index(sig)
    j = text.index("\n}\n", i) + 3
    return text[:i] + text[j:]
body = drop_fn(body, "DEVI float ex2(float x)")
body = drop_fn(body, "DEVI void red_add2(float* p, float a, float b)")
decl = "extern __shared__ __align__(128) unsigned char smem[];"
n = body.count(decl)
assert n == 2, n
body = body.replace(decl, "unsigned char* smem = emu_smem();")
sys.stdout.write(body)
