"""transformers + bitsandbytes + PEFT decode speed, the peer of `tunestudio bench-generate`:
the random Llama-3-8B the peers kit builds (PEER_MODEL_DIR, default /tmp/llama3-8b-random), loaded
in 4-bit NF4 with double quantization (bf16 compute), a PEFT LoRA adapter r=16 on all seven
linears with non-zero B (unmerged, as a chat would run it), batch 1, greedy `generate` of
NEW_TOKENS tokens after a PROMPT_TOKENS prompt, end tokens not stopping it.

Prefill is one forward of the prompt with the cache on; decode rate = (new tokens - 1) / (time of
`generate` - prefill time). Median of RUNS runs after a warm-up. Writes one JSON line to OUT.
usage: hf_generate_bench.py OUT_JSON [PROMPT_TOKENS NEW_TOKENS RUNS]
"""
import json
import os
import statistics
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

out = sys.argv[1]
prompt_tokens, new_tokens, runs = (int(x) for x in (sys.argv[2:5] if len(sys.argv) > 4 else (512, 128, 3)))
model_dir = os.environ.get("PEER_MODEL_DIR", "/tmp/llama3-8b-random")
t0 = time.time()
q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                       bnb_4bit_compute_dtype=torch.bfloat16)
model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=q, dtype=torch.bfloat16, device_map={"": 0})
targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=targets))
with torch.no_grad():
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.uniform_(-0.01, 0.01)
model.eval()
load_s = time.time() - t0
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, 128000, (1, prompt_tokens), generator=g).cuda()
mask = torch.ones_like(ids)


def timed(f):
    torch.cuda.synchronize()
    t = time.perf_counter()
    r = f()
    torch.cuda.synchronize()
    return time.perf_counter() - t, r


def prefill():
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=True)


def gen():
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              eos_token_id=None, pad_token_id=0, top_k=None, top_p=None, temperature=None)


timed(prefill)
timed(lambda: model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0))
pre = [timed(prefill)[0] for _ in range(runs)]
tot = []
for _ in range(runs):
    dt, y = timed(gen)
    assert y.shape[1] == prompt_tokens + new_tokens, y.shape
    tot.append(dt)
p, t = statistics.median(pre), statistics.median(tot)
rec = {
    "system": "transformers+bitsandbytes+peft", "card": torch.cuda.get_device_name(0), "prompt_tokens": prompt_tokens,
    "new_tokens": new_tokens, "prefill_ms": p * 1e3, "prefill_tokens_per_s": prompt_tokens / p,
    "generate_s": t, "decode_tokens_per_s": (new_tokens - 1) / (t - p), "load_s": load_s,
    "max_memory_allocated_gib": torch.cuda.max_memory_allocated() / 2**30,
    "versions": {m: __import__(m).__version__ for m in ["torch", "transformers", "peft", "bitsandbytes"]},
}
print(json.dumps(rec))
with open(out, "a") as f:
    f.write(json.dumps(rec) + "\n")
