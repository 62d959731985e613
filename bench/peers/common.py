"""Shared helpers for the peer benchmarks (HF+PEFT LoRA, HF+PEFT QLoRA, Unsloth QLoRA).

Every system script does: build its model, then
  1. throughput at seq 2048, bsz 1: 3 warm-up steps + N timed steps, median step time;
  2. optionally a max-sequence-length search (one full training step per try, OOM caught).
Results are written incrementally to a JSON file so a timeout still leaves data behind.
"""
import gc
import json
import math
import os
import resource
import statistics
import time

import torch

# The model shape every system trains, as `tunestudio bench --shape` names it (PEER_SHAPE):
# layers, hidden, heads, kv heads, head_dim, intermediate, vocab, tied embeddings, norms per layer
# (hidden-size ones; Qwen3 and Gemma 3 also norm q and k per head), from the published config.json.
SHAPES = {
    "llama3-8b": dict(L=32, D=4096, H=32, KV=8, HD=128, FF=14336, VOCAB=128256, TIED=False, NORMS=2, QK_NORM=False),
    "qwen3-8b": dict(L=36, D=4096, H=32, KV=8, HD=128, FF=12288, VOCAB=151936, TIED=False, NORMS=2, QK_NORM=True),
    # Gemma-3-4B's text model; 5 of every 6 layers attend through a 1024-key window.
    "gemma3-4b": dict(L=34, D=2560, H=8, KV=4, HD=256, FF=10240, VOCAB=262208, TIED=True, NORMS=4, QK_NORM=True),
}
SHAPE = os.environ.get("PEER_SHAPE", "llama3-8b")
if SHAPE not in SHAPES:
    raise SystemExit(f"PEER_SHAPE={SHAPE}: one of {', '.join(SHAPES)}")
_S = SHAPES[SHAPE]
MODEL_DIR = os.environ.get("PEER_MODEL_DIR", f"/tmp/{SHAPE}-random")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = _S["VOCAB"]
GIB = 1024 ** 3

# Shape numbers used for the FLOP model.
L, D, H, KV, FF, HD = _S["L"], _S["D"], _S["H"], _S["KV"], _S["FF"], _S["HD"]
N_LINEAR_DECODER = L * (2 * D * (H * HD) + 2 * D * (KV * HD) + 3 * D * FF)  # q,o + k,v + gate,up,down
N_HEAD = D * VOCAB
N_EMBED = 0 if _S["TIED"] else D * VOCAB
N_TOTAL = N_LINEAR_DECODER + N_HEAD + N_EMBED + L * _S["NORMS"] * D + (L * 2 * HD if _S["QK_NORM"] else 0) + D
R = 32
N_LORA = L * R * ((D + H * HD) * 2 + (D + KV * HD) * 2 + (D + FF) * 3)


def flops_per_token(seq):
    """Return dict of FLOP/token estimates for a bsz-1 sequence of length `seq`.

    simple_6N  : 6 * N_total (N = 8.03e9 for Llama-3-8B)  -- the brief's simple estimate, no attention.
    simple_6N_attn: 6 * N_total + 6 * (causal attention fwd flops / token)  [PaLM-style, causal]
    lora_model : LoRA-aware *model* FLOPs (no recompute), as in unsloth/utils/mfu.py:
                 fwd 2n + input-grad 2n for every linear (incl. lm_head), weight-grad 2n only for
                 LoRA matrices; attention 4*L*H*hd per causal (q,k) pair, x3 for fwd+bwd.
    lora_hw    : lora_model + checkpoint recompute (2n for every decoder linear incl. LoRA,
                 + one more attention forward): the FLOPs the GPU actually executes.
    """
    pairs_per_tok = (seq + 1) / 2.0  # causal (q,k) pairs per query token
    attn_fwd = 4 * L * H * HD * pairs_per_tok
    lin = N_LINEAR_DECODER + N_HEAD
    lora_model = 4 * lin + 6 * N_LORA + 3 * attn_fwd
    lora_hw = lora_model + 2 * (N_LINEAR_DECODER + N_LORA) + attn_fwd
    return {
        "simple_6N": 6 * N_TOTAL,
        "simple_6N_attn": 6 * N_TOTAL + 3 * attn_fwd,
        "lora_model": lora_model,
        "lora_hw": lora_hw,
    }


class Recorder:
    def __init__(self, path, system):
        self.path = path
        self.data = {"system": system, "shape": SHAPE, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        self.flush()

    def set(self, key, value):
        self.data[key] = value
        self.flush()

    def flush(self):
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, self.path)


def mem_stats():
    return {
        "alloc_GiB": torch.cuda.memory_allocated() / GIB,
        "max_alloc_GiB": torch.cuda.max_memory_allocated() / GIB,
        "max_reserved_GiB": torch.cuda.max_memory_reserved() / GIB,
        "host_maxrss_GiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
    }


def count_params(model):
    tot = sum(p.numel() for p in model.parameters())
    tr = sum(p.numel() for p in model.parameters() if p.requires_grad)
    dtypes = {}
    for p in model.parameters():
        if p.requires_grad:
            dtypes[str(p.dtype)] = dtypes.get(str(p.dtype), 0) + p.numel()
    return {"param_elems_reported": tot, "trainable": tr, "trainable_dtypes": dtypes}


def make_step(model, opt, autocast=True):
    def step(seq):
        ids = torch.randint(0, VOCAB, (1, seq), device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
            out = model(input_ids=ids, labels=ids)
        loss = out.loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        v = float(loss.detach())
        del out, loss, ids
        return v
    return step


def seq_specs():
    """PEER_SEQS='2048:30:3,8192:6:2' -> [(seq, iters, warmup)]; default 2048 x PEER_ITERS (10), 3 warm-up."""
    spec = os.environ.get("PEER_SEQS")
    if not spec:
        return [(2048, int(os.environ.get("PEER_ITERS", "10")), 3)]
    out = []
    for item in spec.split(","):
        a = [int(x) for x in item.split(":")]
        out.append((a[0], a[1] if len(a) > 1 else 10, a[2] if len(a) > 2 else 3))
    return out


def throughput_all(step, rec):
    res = {}
    for seq, iters, warmup in seq_specs():
        res[seq] = throughput(step, rec, seq=seq, warmup=warmup, iters=iters,
                              prefix="tp" if seq == 2048 else f"tp_{seq}")
    return res


def throughput(step, rec, seq=2048, warmup=3, iters=None, prefix="tp"):
    iters = iters or int(os.environ.get("PEER_ITERS", "10"))
    t_start = time.time()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    rec.set(prefix + "_mem_before", mem_stats())
    times, losses, all_times = [], [], []
    for i in range(warmup + iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        lv = step(seq)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        losses.append(lv)
        all_times.append(dt)
        if i >= warmup:
            times.append(dt)
        print(f"[{rec.data['system']}] step {i} seq={seq} {dt*1000:.1f} ms loss={lv:.4f}", flush=True)
    med = statistics.median(times)
    mn = min(times)
    tps = seq / med
    f = flops_per_token(seq)
    res = {
        "seq": seq,
        "t_start": t_start,
        "t_end": time.time(),
        "warmup": warmup,
        "step_times_s": times,
        "all_step_times_s": all_times,
        "median_step_s": med,
        "tokens_per_s": tps,
        "tokens_per_s_best_step": seq / mn,
        "losses": losses,
        "tflops_per_s": {k: v * tps / 1e12 for k, v in f.items()},
        "flops_per_token": f,
        **mem_stats(),
    }
    rec.set(prefix, res)
    print(f"[{rec.data['system']}] RESULT seq={seq} median {med*1000:.1f} ms  {tps:.0f} tok/s  "
          f"max_alloc {res['max_alloc_GiB']:.2f} GiB  max_reserved {res['max_reserved_GiB']:.2f} GiB", flush=True)
    return res


def is_oom(e):
    s = str(e).lower()
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in s or "alloc" in s and "fail" in s


def max_seq_search(step, rec, start, cap, gran, deadline, opt=None, prefix="maxseq"):
    """Doubling from `start` until failure or `cap`, then bisection to `gran`. One step per try."""
    tries = []
    last_fit_t = None
    last_fit_s = None

    def est_time(S):
        if last_fit_t is None:
            return 0.0
        return last_fit_t * (S / last_fit_s) ** 2 * 1.1 + 5

    def attempt(S):
        nonlocal last_fit_t, last_fit_s
        if time.time() + est_time(S) > deadline:
            print(f"[{rec.data['system']}] skip S={S}: would pass deadline", flush=True)
            return None
        gc.collect(); torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        ok, err = False, None
        try:
            step(S)
            torch.cuda.synchronize()
            ok = True
        except Exception as e:  # noqa: BLE001
            err = f"{type(e).__name__}: {str(e)[:300]}"
            if not is_oom(e):
                err = "NON-OOM " + err
        dt = time.perf_counter() - t0
        if opt is not None:
            opt.zero_grad(set_to_none=True)
        ms = mem_stats()
        gc.collect(); torch.cuda.empty_cache()
        tries.append({"seq": S, "fit": ok, "time_s": dt, "err": err, **ms})
        rec.set(prefix + "_tries", tries)
        print(f"[{rec.data['system']}] maxseq try S={S} fit={ok} {dt:.1f}s max_alloc {ms['max_alloc_GiB']:.1f} GiB "
              f"max_res {ms['max_reserved_GiB']:.1f} {err or ''}", flush=True)
        if ok:
            last_fit_t, last_fit_s = dt, S
        return ok

    fit, fail = None, None
    S = start
    while S <= cap:
        r = attempt(S)
        if r is None:
            break
        if r:
            fit = S
            S *= 2
        else:
            fail = S
            break
    if fit is None and fail is not None:
        S = fail // 2
        while S >= gran:
            r = attempt(S)
            if r is None:
                break
            if r:
                fit = S
                break
            fail = S
            S //= 2
    while fit is not None and fail is not None and fail - fit > gran:
        mid = (fit + fail) // 2 // gran * gran
        if mid <= fit:
            break
        r = attempt(mid)
        if r is None:
            break
        if r:
            fit = mid
        else:
            fail = mid
    res = {"max_fit": fit, "min_fail": fail, "cap": cap, "granularity": gran,
           "note": ("reached cap" if fail is None and fit is not None and fit * 2 > cap else "")}
    rec.set(prefix, res)
    print(f"[{rec.data['system']}] MAXSEQ fit={fit} fail={fail}", flush=True)
    return res
