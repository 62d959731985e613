#!/usr/bin/env python3
"""Fixtures and checks that tie TuneStudio to transformers, PEFT and bitsandbytes.

Runs in phases (tests/interop/run_on_gpu.sh runs them all on a GPU host, with the tunestudio
binary between them); every phase reads and extends FX/expected.json:

    models FX [NAME...]
                    random tiny models made with transformers (Llama with GQA and an untied head,
                    Llama with tied embeddings, llama3 rope scaling and MQA, Qwen2 with q/k/v bias;
                    Qwen3 with q/k norms and a head_dim of its own; Gemma 3's text model and the
                    text model of a multimodal Gemma 3 folder, with sliding-window layers, their
                    own RoPE and query_pre_attn_scalar), each with a PEFT LoRA adapter whose A and
                    B are random (and PEFT trainable tokens on some); token sequences with labels;
                    HF's loss of every base and PEFT's loss of every base + adapter, in f32, and
                    HF's per-token logits of the Qwen3 and Gemma 3 bases. NAMEs: only those models
                    (their entries are replaced; the others' are kept).                  (CPU)
    bnb FX          a tiny Llama saved by transformers + bitsandbytes as a `*-bnb-4bit` checkpoint,
                    bnb's dequantization of each of its linears (bf16 and f32) and the f32 loss
                    of the model with those dequantized weights.                          (CUDA)
    merged FX DIR [NAME...]
                    HF loads the merged folders tunestudio wrote into DIR (<model>-f32 and
                    <model>-bf16) and scores the same tokens.                             (CPU)
    trained FX      PEFT loads the adapters tunestudio trained on the Qwen3 and Gemma 3 models
                    (<model>_trained_adapter, written by `cargo test --release --test
                    interop_fixtures -- --ignored write_trained_adapters`) and scores the tokens.
                                                                                         (CPU)
    demo FX DIR DEMO  PEFT loads the adapter tunestudio exported from a demo run (with trainable
                    tokens) over the demo base, with its linears as they are and as bnb's NF4
                    dequantizes them, and scores the examples tunestudio scored; HF loads the
                    merged demo folders.                                            (CUDA for NF4)

The Rust tests in tests/interop_fixtures.rs compare the engine against the numbers and tensors
written here, without a GPU. Losses are sums of per-token cross-entropy over the labelled
targets (labels[i + 1] predicted at position i), in float64 from f32 logits.
"""

import copy
import json
import math
import os
import sys
import warnings

import torch

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

TOKEN_SEQS_FILE = "tokens.json"
EXPECTED_FILE = "expected.json"
MODELS = ["llama_gqa", "llama_tied", "qwen2_bias"]
# The families of issue 14; their fixtures are made on the CPU (no bitsandbytes involved).
FAMILY_MODELS = ["qwen3_tied", "gemma3_text", "gemma3_mm"]
VOCAB = 96


def load_json(path, default=None):
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def save_json(path, value):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def loss_sum(model, seqs, device="cpu"):
    """Sum of token losses and their count, one unpadded sequence per forward."""
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for ids, labels in seqs:
            x = torch.tensor([ids], device=device)
            logits = model(input_ids=x).logits[0].float()
            lp = torch.log_softmax(logits.double(), dim=-1)
            tgt = torch.tensor(labels[1:], device=device)
            keep = tgt != -100
            nll = -lp[:-1][keep].gather(-1, tgt[keep][:, None]).squeeze(-1)
            total += nll.sum().item()
            count += int(keep.sum().item())
    return total, count


def loss_record(s_c):
    s, c = s_c
    return {"sum": s, "count": c, "mean": s / max(c, 1)}


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


def configs():
    from transformers import (Gemma3Config, Gemma3TextConfig, LlamaConfig, Qwen2Config, Qwen3Config,
                              SiglipVisionConfig)

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0)
    # Gemma 3's text model, small: a window shorter than the sequences (5 of up to 24 tokens), a
    # softmax scale that is not head_dim^-0.5, local and global RoPE (linear scaling on the global
    # layers only, as Gemma-3-4B has), GeGLU and (1 + w) norms come with the class.
    gemma_text = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
                      sliding_window=5, hidden_activation="gelu_pytorch_tanh",
                      rope_parameters={"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000000.0},
                                       "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
                      **{**common, "num_hidden_layers": 3})
    gemma_text["layer_types"] = ["sliding_attention", "full_attention", "sliding_attention"]
    # The text model of a multimodal folder: MQA, head_dim twice hidden / heads, a tiny SigLIP
    # tower that must survive the merge. Image tokens sit outside the text vocabulary.
    mm_text = dict(gemma_text, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                   query_pre_attn_scalar=40, sliding_window=7, layer_types=["sliding_attention", "full_attention"])
    vision = SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    return {
        "llama_gqa": LlamaConfig(num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                 tie_word_embeddings=False, **common),
        "llama_tied": LlamaConfig(num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                                  tie_word_embeddings=True,
                                  rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                                   "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0,
                                                   "original_max_position_embeddings": 16},
                                  **common),
        "qwen2_bias": Qwen2Config(num_attention_heads=4, num_key_value_heads=2,
                                  tie_word_embeddings=True, use_sliding_window=False, **common),
        # q/k norms, a head_dim that is not hidden / heads, tied embeddings as the small Qwen3s.
        "qwen3_tied": Qwen3Config(num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                  tie_word_embeddings=True, use_sliding_window=False,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, **common),
        "gemma3_text": Gemma3TextConfig(**gemma_text),
        "gemma3_mm": Gemma3Config(text_config=Gemma3TextConfig(**mm_text).to_dict(), vision_config=vision.to_dict(),
                                  mm_tokens_per_image=4, image_token_index=1000, boi_token_index=1001,
                                  eoi_token_index=1002),
    }


def adapter_settings():
    all7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    return {
        "llama_gqa": dict(r=4, lora_alpha=8, target_modules=all7,
                          trainable_token_indices={"embed_tokens": [3, 90], "lm_head": [3, 90]}),
        "llama_tied": dict(r=4, lora_alpha=8, use_rslora=True,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                           trainable_token_indices={"embed_tokens": [5, 17]}),
        "qwen2_bias": dict(r=2, lora_alpha=4, target_modules=all7),
        "qwen3_tied": dict(r=4, lora_alpha=8, target_modules=all7, trainable_token_indices={"embed_tokens": [3, 90]}),
        # Trainable tokens go through Gemma's embedding scale in PEFT too.
        "gemma3_text": dict(r=4, lora_alpha=8, target_modules=all7, trainable_token_indices={"embed_tokens": [5, 17]}),
        # A regex, as for any multimodal model: the vision tower's q/k/v/out projections stay plain.
        "gemma3_mm": dict(r=2, lora_alpha=4, target_modules=r".*\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"),
    }


def randomize(model, seed):
    """Weights of a size that gives the loss something to depend on (HF's init std of 0.02 makes
    every logit nearly equal, so any forward would pass)."""
    g = torch.Generator().manual_seed(seed)
    gemma = "gemma3" in model.config.model_type
    with torch.no_grad():
        for name, p in model.named_parameters():
            if gemma and ("vision_tower" in name or "multi_modal_projector" in name):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("norm.weight"):
                # Gemma's norms multiply by (1 + w): keep the factor near 1 there too.
                p.copy_((0.0 if gemma else 1.0) + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                # Small enough that a tied head gives logits of order one (Gemma's head sees the
                # table unscaled, its stream the table times sqrt(hidden)).
                p.copy_((0.12 if gemma else 0.25) * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))


def token_seqs():
    g = torch.Generator().manual_seed(5)
    seqs = []
    for i, n in enumerate([7, 12, 16, 21, 24]):
        ids = torch.randint(0, VOCAB, (n,), generator=g).tolist()
        # The trainable-token rows must be read and predicted for them to matter.
        ids[min(2, n - 1)] = [3, 5, 90, 17, 3][i]
        ids[n - 2] = [90, 17, 3, 5, 90][i]
        labels = list(ids)
        for j in range(min(i + 1, n - 2)):
            labels[j] = -100
        seqs.append((ids, labels))
    return seqs


def save_logits(model, seqs, path):
    """HF's f32 logits of every sequence, `seq<i>` = [len, vocab]."""
    from safetensors.torch import save_file

    model.eval()
    out = {}
    with torch.no_grad():
        for i, (ids, _) in enumerate(seqs):
            out[f"seq{i}"] = model(input_ids=torch.tensor([ids])).logits[0].float().contiguous()
    save_file(out, path)


def phase_models(fx, names=None):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    os.makedirs(fx, exist_ok=True)
    seqs = token_seqs()
    save_json(os.path.join(fx, TOKEN_SEQS_FILE), [{"input_ids": i, "labels": l} for i, l in seqs])
    expected = load_json(os.path.join(fx, EXPECTED_FILE), {})
    for k, (name, cfg) in enumerate(configs().items()):
        if names and name not in names:
            continue
        torch.manual_seed(k)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        randomize(model, 100 + k)
        folder = os.path.join(fx, name)
        # bf16 on disk keeps the fixtures small; both sides compute in f32 from the same values.
        model.to(torch.bfloat16).save_pretrained(folder)
        base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        rec = {"base": loss_record(loss_sum(base, seqs))}
        if name in FAMILY_MODELS:
            save_logits(base, seqs, os.path.join(fx, name + "_logits.safetensors"))

        peft_model = get_peft_model(base, LoraConfig(lora_dropout=0.0, **adapter_settings()[name]))
        g = torch.Generator().manual_seed(200 + k)
        with torch.no_grad():
            for pname, p in peft_model.named_parameters():
                if "lora_A" in pname or "lora_B" in pname:
                    p.copy_(0.15 * torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
                elif "trainable_tokens_delta" in pname:
                    p.copy_(0.25 * torch.randn(p.shape, generator=g))
        adapter_dir = os.path.join(fx, name + "_adapter")
        peft_model.save_pretrained(adapter_dir)
        os.remove(os.path.join(adapter_dir, "README.md"))

        fresh = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = PeftModel.from_pretrained(fresh, adapter_dir)
        bad = [str(w.message) for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
        assert not bad, f"{name}: PEFT warned while loading its own adapter: {bad}"
        rec["peft"] = loss_record(loss_sum(loaded, seqs))
        rec["peft_in_memory"] = loss_record(loss_sum(peft_model, seqs))
        assert rel(rec["peft"]["sum"], rec["peft_in_memory"]["sum"]) < 1e-6, name
        assert abs(rec["peft"]["mean"] - rec["base"]["mean"]) > 1e-3, f"{name}: the adapter changes nothing"
        expected[name] = rec
        print(f"{name}: base loss {rec['base']['mean']:.6f}, with adapter {rec['peft']['mean']:.6f}")
    save_json(os.path.join(fx, EXPECTED_FILE), expected)


def phase_bnb(fx):
    import bitsandbytes as bnb
    import tempfile
    from safetensors.torch import save_file
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=64, tie_word_embeddings=False, rms_norm_eps=1e-5,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(7)
    dense = LlamaForCausalLM(cfg)
    randomize(dense, 300)
    dense = dense.to(torch.bfloat16)
    seqs = [(s["input_ids"], s["labels"]) for s in load_json(os.path.join(fx, TOKEN_SEQS_FILE))]
    expected = load_json(os.path.join(fx, EXPECTED_FILE), {})
    folder = os.path.join(fx, "bnb4bit")
    with tempfile.TemporaryDirectory() as src:
        dense.save_pretrained(src)
        qcfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=torch.bfloat16)
        dev = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU path only for trying the script
        q = LlamaForCausalLM.from_pretrained(src, quantization_config=qcfg, dtype=torch.bfloat16,
                                             device_map={"": 0 if dev == "cuda" else "cpu"})
        q.save_pretrained(folder)
        ref = {}
        deq = {}
        for name, mod in q.named_modules():
            if isinstance(mod, bnb.nn.Linear4bit):
                w = mod.weight
                b16 = bnb.functional.dequantize_4bit(w.data, w.quant_state).contiguous().cpu()
                qs32 = copy.copy(w.quant_state)
                qs32.dtype = torch.float32
                f32 = bnb.functional.dequantize_4bit(w.data, qs32).contiguous().cpu()
                ref[f"{name}.weight.bf16"] = b16
                ref[f"{name}.weight.f32"] = f32
                deq[f"{name}.weight"] = b16
        assert len(deq) == 7 * cfg.num_hidden_layers, f"{len(deq)} Linear4bit modules"
        save_file(ref, os.path.join(fx, "bnb4bit_reference.safetensors"))
        # The function a bf16 compute dtype gives: the dense model with bnb's bf16 dequantization,
        # scored in f32.
        f32_model = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32)
        sd = f32_model.state_dict()
        for k, v in deq.items():
            sd[k] = v.float()
        f32_model.load_state_dict(sd)
        rec = {"dequantized_bf16_f32": loss_record(loss_sum(f32_model, seqs))}
        rec["bnb_forward_bf16"] = loss_record(loss_sum(q, seqs, device=dev))
        expected["bnb4bit"] = rec
        print(f"bnb4bit: f32 loss with bnb-dequantized weights {rec['dequantized_bf16_f32']['mean']:.6f}, "
              f"bnb's own bf16 forward {rec['bnb_forward_bf16']['mean']:.6f}")
    # The tokenizer-free folder is all the Rust tests need; keep it to what transformers wrote.
    save_json(os.path.join(fx, EXPECTED_FILE), expected)


def load_checked(path, **kw):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kw)
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    assert not problems, f"{path}: {problems}"
    return model


def phase_merged(fx, merged_dir, names=None):
    seqs = [(s["input_ids"], s["labels"]) for s in load_json(os.path.join(fx, TOKEN_SEQS_FILE))]
    expected = load_json(os.path.join(fx, EXPECTED_FILE))
    report = {}
    for name in names or MODELS:
        rec = expected[name]
        for dt in ("f32", "bf16"):
            path = os.path.join(merged_dir, f"{name}-{dt}")
            model = load_checked(path, dtype=torch.float32)
            cfg = load_json(os.path.join(path, "config.json"))
            want = {"f32": "float32", "bf16": "bfloat16"}[dt]
            assert cfg.get("torch_dtype", cfg.get("dtype")) == want, (path, cfg.get("torch_dtype"), cfg.get("dtype"))
            got = loss_record(loss_sum(model, seqs))
            rec[f"merged_{dt}_hf"] = got
            report[f"{name} merged {dt}: HF loss vs PEFT loss, relative"] = rel(got["sum"], rec["peft"]["sum"])
        assert report[f"{name} merged f32: HF loss vs PEFT loss, relative"] < 1e-4, report
    save_json(os.path.join(fx, EXPECTED_FILE), expected)
    return report


def nf4_dequantized(model):
    """The base as tunestudio's QLoRA sees it: every decoder linear through bnb's NF4 (double
    quantization, blocks of 64) and back, unrounded (f32 quant state), on the GPU (the CPU path
    of bnb rounds differently and is only good for trying this script out)."""
    import bitsandbytes as bnb

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, torch.nn.Linear) and ".layers." in name:
                w = mod.weight.data.to(torch.bfloat16).to(dev)
                q, qs = bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
                qs.dtype = torch.float32
                mod.weight.data = bnb.functional.dequantize_4bit(q, qs).float().cpu()
    return model


def phase_demo(fx, merged_dir, demo):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, GenerationConfig

    expected = load_json(os.path.join(fx, EXPECTED_FILE))
    adapter = os.path.join(fx, "demo_adapter")
    cfg = load_json(os.path.join(adapter, "adapter_config.json"))
    rec = {"trainable_token_indices": cfg.get("trainable_token_indices")}
    report = {}
    for quant in ("bf16", "nf4"):
        ours = load_json(os.path.join(fx, f"demo_eval_{quant}.json"))
        seqs = [(e["input_ids"], e["labels"]) for e in ours["examples"]]
        base = AutoModelForCausalLM.from_pretrained(os.path.join(demo, "model"), dtype=torch.float32)
        if quant == "nf4":
            base = nf4_dequantized(base)
        plain = loss_record(loss_sum(base, seqs))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            peft_model = PeftModel.from_pretrained(base, adapter)
        msgs = [str(w.message) for w in caught]
        bad = [m for m in msgs if "missing" in m.lower() or "unexpected" in m.lower()]
        assert not bad, f"PEFT warned while loading our adapter: {bad}"
        got = loss_record(loss_sum(peft_model, seqs))
        rec[f"peft_{quant}"] = got
        rec[f"base_{quant}"] = plain
        report[f"demo {quant}: PEFT loss {got['mean']:.6f} vs tunestudio eval {ours['mean_loss']:.6f}, relative"] = rel(ours["loss_sum"], got["sum"])
        report[f"demo {quant}: tokens PEFT {got['count']} / tunestudio {ours['tokens']}"] = got["count"] == ours["tokens"]
        if quant == "nf4":
            # The trained token rows reached the model PEFT built.
            emb = peft_model.get_input_embeddings()
            ids = cfg["trainable_token_indices"]["embed_tokens"]
            w = emb.weight if hasattr(emb, "weight") else None
            rec["peft_warnings"] = msgs
            if w is not None:
                from safetensors.torch import load_file

                sd = load_file(os.path.join(adapter, "adapter_model.safetensors"))
                rows = sd["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
                report["demo: PEFT embedding rows equal the exported token rows"] = bool(torch.equal(w[ids].float().cpu(), rows.float()))
            for dt in ("f32", "bf16"):
                path = os.path.join(merged_dir, f"demo-{dt}")
                merged = load_checked(path, dtype=torch.float32)
                m = loss_record(loss_sum(merged, seqs))
                rec[f"merged_{dt}_hf"] = m
                report[f"demo merged {dt}: HF loss {m['mean']:.6f} vs tunestudio eval (nf4 base + adapter), relative"] = rel(m["sum"], ours["loss_sum"])
                gen = GenerationConfig.from_pretrained(path)
                rec[f"merged_{dt}_eos"] = gen.eos_token_id
    expected["demo"] = rec
    save_json(os.path.join(fx, EXPECTED_FILE), expected)
    return report


def phase_trained(fx):
    """PEFT's loss with the adapters tunestudio trained (and exported) for the new families."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    seqs = [(s["input_ids"], s["labels"]) for s in load_json(os.path.join(fx, TOKEN_SEQS_FILE))]
    expected = load_json(os.path.join(fx, EXPECTED_FILE))
    report = {}
    for name in FAMILY_MODELS:
        adapter = os.path.join(fx, name + "_trained_adapter")
        base = AutoModelForCausalLM.from_pretrained(os.path.join(fx, name), dtype=torch.float32)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = PeftModel.from_pretrained(base, adapter)
        bad = [str(w.message) for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
        assert not bad, f"{name}: PEFT warned while loading the adapter tunestudio trained: {bad}"
        got = loss_record(loss_sum(model, seqs))
        expected[name]["trained_peft"] = got
        report[f"{name}: PEFT loss with tunestudio's trained adapter"] = got["mean"]
        report[f"{name}: base loss"] = expected[name]["base"]["mean"]
    save_json(os.path.join(fx, EXPECTED_FILE), expected)
    return report


def main():
    phase, fx = sys.argv[1], sys.argv[2]
    if phase == "models":
        phase_models(fx, sys.argv[3:])
    elif phase == "bnb":
        phase_bnb(fx)
    elif phase == "merged":
        print(json.dumps(phase_merged(fx, sys.argv[3], sys.argv[4:]), indent=1))
    elif phase == "trained":
        print(json.dumps(phase_trained(fx), indent=1))
    elif phase == "demo":
        print(json.dumps(phase_demo(fx, sys.argv[3], sys.argv[4]), indent=1))
    else:
        sys.exit(f"unknown phase {phase}")


if __name__ == "__main__":
    main()
