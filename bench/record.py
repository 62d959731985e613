"""Append one device run's measurements to bench/results.jsonl and print them as a Markdown table.

    python3 bench/record.py OUT_DIR RUN_ID [COMMIT]

OUT_DIR is what scripts/gpu/device_all.sh wrote ($OUT): card.txt, bench.jsonl (ours) and
peers/C.json (Unsloth), peers/B.json (HF+PEFT QLoRA), peers/A.json (HF+PEFT) when they ran, and
bench_generate.jsonl / hf_generate.jsonl (decode and prefill speed, scripts/gpu/generate.sh).
Every line carries date, commit, card, system, shape, seq, mode, tokens_per_s, peak_gib and run_id,
so rows measured in the same device call pair up."""
import datetime
import glob
import json
import os
import subprocess
import sys

from bench_lines import read

out, run_id = sys.argv[1], sys.argv[2]
commit = sys.argv[3] if len(sys.argv) > 3 else subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
card = open(os.path.join(out, "card.txt")).read().strip().splitlines()[0].split(",")[0].strip()
date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
G = 2 ** 30


def policy_mix(r):
    """What each layer did, in one string: "offload: 32 recomputed (attention output in host memory)"."""
    kept = r.get("kept_layers") or 0
    mix = f"{r['checkpointing']}: {kept} kept"
    if r.get("saved_attention") not in (None, "off"):
        mix += f", the rest recomputed with attention output kept ({r['saved_attention']})"
    elif r["checkpointing"] != "none":
        mix += ", the rest recomputed"
    if r.get("cached_weight_layers"):
        mix += f"; weights of {r['cached_weight_layers']} layers dequantized once"
    if r.get("hold_mlp_weights"):
        mix += "; MLP weights dequantized once per pass"
    return mix


rows = []
path = os.path.join(out, "bench.jsonl")
if os.path.exists(path):
    for r in read([path]):
        rows.append({
            "date": date, "commit": commit, "card": card, "system": "tunestudio", "shape": r["shape"], "seq": r["seq"],
            "rank": r["rank"], "mode": r["mode"], "checkpointing": r["checkpointing"], "kept_layers": r.get("kept_layers"), "tokens_per_s": round(r["tokens_per_s"], 1),
            "peak_gib": round(r["peak_driver_bytes"] / G, 3), "peak_arena_gib": round(r["peak_arena_bytes"] / G, 3),
            "plan_gib": round(r["plan_peak_bytes"] / G, 3), "mfu": round(r["mfu"], 4), "first_step_s": round(r["first_step_s"], 2),
            "attention": r.get("attention"), "card_profile": r.get("card_profile"), "card_memory_gib": r.get("card_memory_gib"),
            "gpu_mem_cap_gib": r.get("gpu_mem_cap_gib"), "saved_attention": r.get("saved_attention"),
            "cached_weight_layers": r.get("cached_weight_layers"),
            "hold_mlp_weights": r.get("hold_mlp_weights"),
            "policy_mix": policy_mix(r), "run_id": run_id,
        })
names = {"A": "hf_peft", "B": "hf_peft_qlora", "C": "unsloth"}
for key, system in names.items():
    # A.json for the default shape, A-qwen3-8b.json for another (PEER_SHAPE); each file names its shape.
    paths = glob.glob(os.path.join(out, "peers", f"{key}.json")) + glob.glob(os.path.join(out, "peers", f"{key}-*.json"))
    for p in sorted(paths):
        d = json.load(open(p))
        for k, v in d.items():
            if (k == "tp" or k.startswith("tp_")) and isinstance(v, dict) and "tokens_per_s" in v:
                rows.append({
                    "date": date, "commit": commit, "card": card, "system": system, "shape": d.get("shape", "llama3-8b"), "seq": v["seq"],
                    "rank": 32, "mode": "memory" if system == "unsloth" else "speed", "checkpointing": "peer default",
                    "tokens_per_s": round(v["tokens_per_s"], 1), "peak_gib": round(v["max_reserved_GiB"], 3),
                    "peak_alloc_gib": round(v["max_alloc_GiB"], 3), "run_id": run_id,
                })
# Generation: decode and prefill speed, batch 1 (ours: `tunestudio bench-generate`; the peer:
# scripts/gpu/hf_generate_bench.py). These rows have no seq/mode; `kind` tells them apart.
gen_rows = []
for name, system in (("bench_generate.jsonl", "tunestudio"), ("hf_generate.jsonl", "hf_bnb_peft")):
    path = os.path.join(out, name)
    if not os.path.exists(path):
        continue
    for line in open(path):
        if not line.strip().startswith("{"):
            continue
        r = json.loads(line)
        mem = r["memory_bytes"] / G if "memory_bytes" in r else r.get("max_memory_allocated_gib")
        gen_rows.append({
            "date": date, "commit": commit, "card": card, "system": system, "kind": "generate", "shape": r.get("shape", "llama3-8b"),
            "rank": r.get("rank", 16), "prompt_tokens": r["prompt_tokens"], "new_tokens": r["new_tokens"],
            "prefill_tokens_per_s": round(r["prefill_tokens_per_s"], 1), "decode_tokens_per_s": round(r["decode_tokens_per_s"], 2),
            "memory_gib": round(mem, 3) if mem is not None else None, "run_id": run_id,
        })
with open(os.path.join(os.path.dirname(__file__), "results.jsonl"), "a") as f:
    for r in gen_rows:
        f.write(json.dumps(r) + "\n")
    for r in rows:
        f.write(json.dumps(r) + "\n")
print(f"{len(rows)} rows appended (run {run_id}, {card}, commit {commit})\n")
print("| system | card profile | shape | seq | r | mode / policy | tokens/s | peak GiB (ours: driver, peers: torch reserved) | ours: arena / peers: allocated |")
print("|---|---|---|---|---|---|---|---|---|")
for r in rows:
    second = r.get("peak_arena_gib", r.get("peak_alloc_gib"))
    profile = r.get("card_profile") or "—"
    print(f'| {r["system"]} | {profile} | {r["shape"]} | {r["seq"]} | {r["rank"]} | {r["mode"]} / {r["checkpointing"]} | {r["tokens_per_s"]:,.0f} | {r["peak_gib"]:.2f} | {second:.2f} |')
if gen_rows:
    print(f"\n{len(gen_rows)} generation rows\n")
    print("| system | shape | r | prompt | new | prefill tokens/s | decode tokens/s | memory GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in gen_rows:
        print(f'| {r["system"]} | {r["shape"]} | {r["rank"]} | {r["prompt_tokens"]} | {r["new_tokens"]} | {r["prefill_tokens_per_s"]:,.0f} | {r["decode_tokens_per_s"]:.1f} | {r["memory_gib"]} |')
