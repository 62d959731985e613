"""torch's fused attention on this card, the peer of gpu_bench's `attention_seq_sweep`: causal,
32 query heads and 8 kv heads of 128 (the Llama-3-8B shape), batch 1, bf16, forward and backward
timed apart, for each backend torch offers (FlashAttention-2, cuDNN, memory-efficient) and the one
it picks by default. Same FLOP counts as the sweep: forward 4 * S^2/2 * heads * head_dim, backward
2.5 times that. Why: at long context the step is bound by attention, and whether a peer's whole
step can be shorter than our attention alone depends on which kernel it runs and how fast.

usage: sdpa_bench.py OUT_JSON [SEQ ...]      (default 2048 8192 32768 65536)
"""
import contextlib
import json
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

out = sys.argv[1]
seqs = [int(s) for s in sys.argv[2:]] or [2048, 8192, 32768, 65536]
H, KVH, D = 32, 8, 128
rows = []


def median_ms(fn, reps):
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


for S in seqs:
    q = torch.randn(1, H, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, KVH, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, KVH, S, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dout = torch.randn(1, H, S, D, device="cuda", dtype=torch.bfloat16)
    flops = 4.0 * S * S / 2 * H * D
    reps = 10 if S <= 8192 else 3
    for name, backend in [("default", None), ("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)]:
        row = {"system": "torch_sdpa", "backend": name, "seq": S, "heads": H, "kv_heads": KVH, "head_dim": D,
               "card": torch.cuda.get_device_name(0), "torch": torch.__version__}
        try:
            ctx = sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext()
            with ctx:
                fwd = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
                o = fwd()
                o.backward(dout)
                row["fwd_ms"] = median_ms(fwd, reps)

                def both():
                    q.grad = k.grad = v.grad = None
                    F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).backward(dout)

                row["bwd_ms"] = max(median_ms(both, reps) - row["fwd_ms"], 1e-6)
            row["fwd_tflops"] = flops / row["fwd_ms"] / 1e9
            row["bwd_tflops"] = 2.5 * flops / row["bwd_ms"] / 1e9
        except Exception as e:  # noqa: BLE001 (a backend that refuses the shape is a result too)
            row["error"] = str(e).splitlines()[0][:160]
        q.grad = k.grad = v.grad = None
        rows.append(row)
        print(json.dumps(row), flush=True)
    del q, k, v, dout
    torch.cuda.empty_cache()
with open(out, "a") as f:
    for r in rows:
        f.write(json.dumps(r) + "\n")
