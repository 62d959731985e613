"""One causal GQA attention forward and backward through torch's cuDNN backend, with cuDNN's own
API log on (the caller sets CUDNN_LOGLEVEL_DBG=3 and CUDNN_LOGDEST_DBG), so that the log shows the
backend graph cuDNN's fused attention engine accepts for our layout: token-major Q/K/V (B, S, H, D
in memory, viewed as B, H, S, D), bf16, 32 query heads over 8 kv heads of 128. Why: the engine
calls cuDNN's backend API directly, and which graph the fused engine matches is not documented
beyond the frontend's source. Also prints where torch's cuDNN lives and its version.

usage: cudnn_trace.py [SEQ]     (default 256)
"""
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

S = int(sys.argv[1]) if len(sys.argv) > 1 else 256
H, KVH, D = 32, 8, 128
print("torch", torch.__version__, "cudnn", torch.backends.cudnn.version(), torch.cuda.get_device_name(0))
try:
    import nvidia.cudnn as nc

    base = os.path.dirname(nc.__file__) if nc.__file__ else list(nc.__path__)[0]
    print("cudnn dir", base, sorted(os.listdir(os.path.join(base, "lib"))))
except Exception as e:  # noqa: BLE001
    print("nvidia.cudnn not importable:", e)
q = torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
k = torch.randn(1, S, KVH, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
v = torch.randn(1, S, KVH, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    o.backward(torch.randn_like(o))
torch.cuda.synchronize()
print("ok", o.shape, o.stride(), q.grad.stride(), k.grad.stride())
