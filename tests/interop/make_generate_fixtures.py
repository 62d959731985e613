#!/usr/bin/env python3
"""Fixtures and checks that tie TuneStudio's generation and GGUF export to transformers and
llama.cpp. Runs in phases (tests/interop/generate_check.sh runs them all, with the tunestudio
binary between them, on a GPU host or on the CPU); every phase reads and extends FX/expected.json:

    models FX DEMO      random tiny models made with transformers, each with a PEFT LoRA
                        adapter whose A and B are random: a Llama-3-shaped one (GQA, llama3 rope
                        scaling, untied head, the Llama 3 pre-tokenizer and chat template), a
                        Qwen2-shaped one (q/k/v bias, tied embeddings, the Qwen2 pre-tokenizer,
                        ChatML, no BOS), a Qwen3-shaped one (per-head q/k norms, head_dim wider
                        than hidden / heads, untied, rows of 256 for Q4_K and Q6_K) and a Gemma-3-shaped one ((1 + w) norms around
                        both blocks, GeGLU, scaled embedding, five sliding-window layers of 8 keys
                        with their own RoPE and a global sixth, Gemma's turn template). Their
                        byte-level BPE is the demo's, re-split.  (torch)
    hf FX DEMO          for the demo (with its fixture adapter, which trains a token row) and every
                        random model, base and with the adapter: the prompt ids of two chat
                        prompts (apply_chat_template, add_generation_prompt) and transformers'
                        greedy `generate` of 40 tokens in f32, end tokens not stopping it.  (torch)
    llamacpp FX GG      llama.cpp (llama-cpp-python) loads the f16 GGUF tunestudio exported of
                        every model + adapter in GGUF_CASES (GG/<case>-f16.gguf), tokenizes each rendered prompt
                        and generates 40 greedy tokens from the same prompt ids (its sampler at
                        temperature 0, checked against the argmax of its logits), recording the
                        top-1/top-2 logit gap of each step and, in FX/llamacpp_logits.json,
                        the first step's logits; the `gguf` reader
                        opens the f16, q8_0 and q4_k_m files and every tensor is dequantized and
                        compared with the merged f32 weights (GG/<case>-f32/): exact for f16,
                        within each format's rounding for q8_0 and q4_k_m.       (llama-cpp-python, gguf)

tests/interop_generate.rs re-checks the engine against the ids and tokens recorded here, without a
GPU and without llama.cpp.
"""

import json
import math
import os
import sys

EXPECTED_FILE = "expected.json"
# llama.cpp's next-token logits after each prompt (f16 GGUF, adapter merged), per GGUF case.
LOGITS_FILE = "llamacpp_logits.json"
NEW_TOKENS = 40
PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Answer in one short sentence."},
     {"role": "user", "content": "Tell me about the river near Skarn, and the 3 bridges."}],
]
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
CHATML = ("{%- for message in messages %}"
          "{%- if loop.first and messages[0]['role'] != 'system' %}"
          "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
          "{%- endif %}"
          "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
          "{%- endfor %}"
          "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")
# Gemma 3's turn format (text only): the system message joins the first user turn.
GEMMA = ("{{- bos_token }}"
         "{%- if messages[0]['role'] == 'system' %}"
         "{%- set prefix = messages[0]['content'] + '\\n\\n' %}{%- set turns = messages[1:] %}"
         "{%- else %}{%- set prefix = '' %}{%- set turns = messages %}{%- endif %}"
         "{%- for message in turns %}"
         "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
         "{{- '<start_of_turn>' + role + '\\n' + (prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\\n' }}"
         "{%- endfor %}"
         "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}")
# The random models (the demo is a case besides them), and the cases tunestudio exports to GGUF.
RANDOM_MODELS = ["llama3_gen", "qwen2_gen", "qwen3_gen", "gemma3_gen"]
GGUF_CASES = ["demo", "llama3_gen", "qwen2_gen", "qwen3_gen"]


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


def cases(fx, demo):
    """(name, model folder, adapter folder)."""
    here = os.path.dirname(os.path.abspath(fx.rstrip("/")))
    return [("demo", os.path.join(demo, "model"), os.path.join(here, "interop", "demo_adapter"))] + [
        (name, os.path.join(fx, name), os.path.join(fx, name + "_adapter")) for name in RANDOM_MODELS]


def write_tokenizer(src_dir, dst_dir, split, style):
    """The demo's byte-level BPE with another splitting rule; `chatml` (Qwen): ChatML tokens and no
    BOS; `gemma`: Gemma's turn tokens; `llama3`: the demo's own tokens and template."""
    tok = load_json(os.path.join(src_dir, "tokenizer.json"))
    cfg = load_json(os.path.join(src_dir, "tokenizer_config.json"))
    tok["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": split}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    tok["model"]["ignore_merges"] = style != "chatml"
    added = {"chatml": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "gemma": ["<start_of_turn>", "<end_of_turn>"]}
    base = max(t["id"] for t in tok["added_tokens"]) + 1
    for i, content in enumerate(added.get(style, [])):
        tok["added_tokens"].append({"id": base + i, "content": content, "single_word": False, "lstrip": False,
                                    "rstrip": False, "normalized": False, "special": True})
        cfg["added_tokens_decoder"][str(base + i)] = {"content": content, "lstrip": False, "normalized": False,
                                                      "rstrip": False, "single_word": False, "special": True}
    if style == "chatml":
        tok["post_processor"] = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
        cfg.update({"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHATML})
    elif style == "gemma":
        cfg.update({"eos_token": "<end_of_turn>", "chat_template": GEMMA})
    os.makedirs(dst_dir, exist_ok=True)
    save_json(os.path.join(dst_dir, "tokenizer.json"), tok)
    save_json(os.path.join(dst_dir, "tokenizer_config.json"), cfg)
    return max(t["id"] for t in tok["added_tokens"]) + 1


def randomize(model, seed, gemma=False):
    """Weights large enough that greedy choices are clear (HF's 0.02 init makes logits nearly equal).
    Gemma scales its embedding by √hidden on the way in, so it is drawn smaller (and its norms,
    which multiply by 1 + w, scale each block's output by about 2): otherwise the residual stream is
    mostly the input token's row and the tied head repeats it."""
    embed_std = 0.1 if gemma else 0.5
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(embed_std * torch.randn(p.shape, generator=g))
            else:
                p.copy_(1.5 * torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))


def phase_models(fx, demo):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
    src = os.path.join(demo, "model")
    for k, name in enumerate(RANDOM_MODELS):
        folder = os.path.join(fx, name)
        style = {"llama3_gen": "llama3", "gemma3_gen": "gemma"}.get(name, "chatml")
        vocab = write_tokenizer(src, folder, LLAMA3_SPLIT if style == "llama3" else QWEN2_SPLIT, style)
        if name == "qwen2_gen":
            cfg = Qwen2Config(vocab_size=vocab, tie_word_embeddings=True, use_sliding_window=False, rope_theta=1000000.0,
                              eos_token_id=vocab - 1, pad_token_id=vocab - 3, bos_token_id=None, **common)
        elif name == "qwen3_gen":
            # Rows of 256 (o_proj, down_proj), so q4_k_m writes real Q4_K and Q6_K blocks.
            cfg = Qwen3Config(vocab_size=vocab, head_dim=64, tie_word_embeddings=False, use_sliding_window=False,
                              rope_theta=1000000.0, eos_token_id=vocab - 1, pad_token_id=vocab - 3, bos_token_id=None,
                              **dict(common, intermediate_size=256))
        elif name == "gemma3_gen":
            # Six layers so that llama.cpp's fixed Gemma 3 pattern (every sixth layer global) is
            # the model's; a window of 8 keys, far shorter than the prompts; query_pre_attn_scalar
            # = head_dim as in the released models.
            g3 = dict(common, num_hidden_layers=6, rms_norm_eps=1e-6)
            cfg = Gemma3TextConfig(vocab_size=vocab, head_dim=32, query_pre_attn_scalar=32, sliding_window=8,
                                   rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                                    "full_attention": {"rope_type": "default", "rope_theta": 1000000.0}},
                                   tie_word_embeddings=True, bos_token_id=1573, eos_token_id=[1574, vocab - 1],
                                   pad_token_id=1578, **g3)
        else:
            cfg = LlamaConfig(vocab_size=vocab, head_dim=16, tie_word_embeddings=False, bos_token_id=1573,
                              eos_token_id=[1574, 1577], pad_token_id=1578,
                              rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                               "original_max_position_embeddings": 64}, **common)
        torch.manual_seed(k)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        randomize(model, 500 + k, gemma=style == "gemma")
        model.save_pretrained(folder)
        if os.path.exists(os.path.join(folder, "generation_config.json")):
            os.remove(os.path.join(folder, "generation_config.json"))
        all7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=all7))
        g = torch.Generator().manual_seed(600 + k)
        with torch.no_grad():
            for pname, p in peft_model.named_parameters():
                if "lora_A" in pname or "lora_B" in pname:
                    p.copy_(0.5 * torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
        adapter_dir = os.path.join(fx, name + "_adapter")
        peft_model.save_pretrained(adapter_dir)
        os.remove(os.path.join(adapter_dir, "README.md"))
        print(f"{name}: vocab {vocab}, saved with its adapter")


def phase_hf(fx, demo):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    expected = load_json(os.path.join(fx, EXPECTED_FILE), {})
    for name, model_dir, adapter_dir in cases(fx, demo):
        tok = AutoTokenizer.from_pretrained(model_dir)
        rec = expected.setdefault(name, {})
        rec["prompts"] = []
        for msgs in PROMPTS:
            text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            ids = tok(text, add_special_tokens=False)["input_ids"]
            rec["prompts"].append({"messages": msgs, "text": text, "ids": ids})
        for variant in ["base", "adapter"]:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
            if variant == "adapter":
                model = PeftModel.from_pretrained(model, adapter_dir)
            model.eval()
            outs = []
            for p in rec["prompts"]:
                x = torch.tensor([p["ids"]])
                with torch.no_grad():
                    y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW_TOKENS, do_sample=False,
                                       eos_token_id=None, pad_token_id=0, top_k=None, top_p=None, temperature=None)
                outs.append(y[0, len(p["ids"]):].tolist())
            rec["hf_" + variant] = outs
            print(f"{name} {variant}: {[len(o) for o in outs]} tokens, first {outs[0][:8]}")
    save_json(os.path.join(fx, EXPECTED_FILE), expected)


def unpermute(w, heads):
    """The inverse of llama.cpp's q/k row permutation (rows interleaved per head back to halves)."""
    import numpy as np
    rows = w.shape[0]
    per = rows // heads
    return w.reshape(heads, per // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def last_logits(llm):
    """The next-token logits after the last token `llm.eval` decoded (llama.cpp computes logits
    only for the batch's last token unless the model is opened with logits_all).

    Not `llm.scores`: since llama-cpp-python 0.3 `Llama.eval` fills that array only with
    logits_all=True (sampling moved into llama.cpp's sampler), so without it every row stays 0.
    An earlier revision of this script read `llm.scores[llm.n_tokens - 1]` that way: argmax of a
    row of zeros is token 0, which is where the all-0 "llama.cpp tokens" once recorded came from
    (reproduced with 0.3.36 on the same GGUF files; our GGUF was not at fault)."""
    import llama_cpp
    import numpy as np
    ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    logits = np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()
    if not np.isfinite(logits).all() or float(logits.max() - logits.min()) == 0.0:
        raise SystemExit("llama.cpp's last logits are constant or not finite; nothing recorded")
    return logits


def llamacpp_greedy(llm, ids):
    """llama.cpp's greedy decode of NEW_TOKENS tokens after `ids`, two ways that must agree: its own
    sampler (`Llama.generate` with temperature 0 and top_k 1, the documented path; end tokens do
    not stop it), and eval + argmax of the raw logits, which also gives the first step's logits and
    each step's gap between the top two logits (how close a near-tie came)."""
    import numpy as np
    llm.reset()
    sampled = []
    for t in llm.generate(ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        sampled.append(int(t))
        if len(sampled) == NEW_TOKENS:
            break
    llm.reset()
    llm.eval(ids)
    out, first, gaps = [], None, []
    for _ in range(NEW_TOKENS):
        logits = last_logits(llm)
        if first is None:
            first = logits
        top2 = np.sort(logits)[-2:]
        gaps.append(round(float(top2[1] - top2[0]), 5))
        out.append(int(np.argmax(logits)))
        llm.eval([out[-1]])
    if out != sampled:
        raise SystemExit(f"llama.cpp's sampler and the argmax of its logits disagree: {sampled} vs {out}")
    return out, first, gaps


def phase_llamacpp(fx, demo, gg):
    import gguf
    import numpy as np
    from llama_cpp import Llama
    from safetensors.numpy import load_file

    expected = load_json(os.path.join(fx, EXPECTED_FILE), {})
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
             "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
             "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
             "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
             "self_attn.v_proj.bias": "attn_v.bias", "mlp.gate_proj.weight": "ffn_gate.weight",
             "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
             "self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight"}
    failures = []
    step1 = {}
    for name, model_dir, _ in cases(fx, demo):
        if name not in GGUF_CASES:
            continue
        rec = expected[name]
        cfg = load_json(os.path.join(model_dir, "config.json"))
        arch = cfg["model_type"] if cfg["model_type"] in ("qwen2", "qwen3") else "llama"
        merged = load_file(os.path.join(gg, f"{name}-f32", "model.safetensors"))
        # Every tensor of every quantization against the merged weights.
        rec["gguf"] = {}
        for quant in ["f16", "q8_0", "q4_k_m"]:
            r = gguf.GGUFReader(os.path.join(gg, f"{name}-{quant}.gguf"))
            kv = {f.name: f for f in r.fields.values()}
            got_arch = bytes(kv["general.architecture"].parts[-1]).decode()
            assert got_arch == arch, (name, got_arch)
            for key in ["tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                        "tokenizer.ggml.merges", "tokenizer.chat_template", "tokenizer.ggml.eos_token_id"]:
                assert key in kv, (name, quant, key)
            tensors = {t.name: t for t in r.tensors}
            worst = {}
            for hf, w in merged.items():
                if hf in names:
                    g = names[hf]
                else:
                    layer, rest = hf[len("model.layers."):].split(".", 1)
                    g = f"blk.{layer}.{parts[rest]}"
                t = tensors.pop(g)
                deq = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
                if arch == "llama" and (".attn_q." in g or ".attn_k." in g):
                    deq = unpermute(deq, cfg["num_attention_heads"] if ".attn_q." in g else cfg["num_key_value_heads"])
                want = w.astype(np.float32)
                if quant == "f16" and w.ndim == 2:
                    want = want.astype(np.float16).astype(np.float32)
                err = float(np.sqrt(((deq - want) ** 2).sum() / max((want ** 2).sum(), 1e-30)))
                tname = t.tensor_type.name
                worst[tname] = max(worst.get(tname, 0.0), err)
                bound = {"F32": 0.0, "F16": 0.0, "BF16": 4e-3, "Q8_0": 8e-3, "Q6_K": 0.02, "Q5_0": 0.05, "Q4_K": 0.1}[tname]
                if err > bound:
                    failures.append(f"{name} {quant} {g} ({tname}): relative error {err:.3e} > {bound}")
            assert not [t for t in tensors if t != "rope_freqs.weight"], (name, quant, list(tensors))
            rec["gguf"][quant] = worst
            print(f"{name} {quant}: every tensor within its format's rounding: {worst}")
        # llama.cpp: tokenization of the rendered prompts and greedy generation from our prompt ids.
        llm = Llama(model_path=os.path.join(gg, f"{name}-f16.gguf"), n_ctx=256, n_threads=2, verbose=False, seed=0)
        rec["llamacpp_prompt_ids"] = []
        rec["llamacpp_adapter"] = []
        rec["llamacpp_logit_gaps"] = []
        step1[name] = []
        for p in rec["prompts"]:
            rec["llamacpp_prompt_ids"].append(llm.tokenize(p["text"].encode(), add_bos=False, special=True))
            out, first, gaps = llamacpp_greedy(llm, p["ids"])
            rec["llamacpp_adapter"].append(out)
            rec["llamacpp_logit_gaps"].append(gaps)
            step1[name].append([round(float(x), 5) for x in first])
        print(f"{name}: llama.cpp prompt ids equal ours: {[a == p['ids'] for a, p in zip(rec['llamacpp_prompt_ids'], rec['prompts'])]}; "
              f"greedy equal to transformers+PEFT: {[a == b for a, b in zip(rec['llamacpp_adapter'], rec['hf_adapter'])]}; "
              f"smallest top-1/top-2 logit gap (step) {[(min(g), g.index(min(g))) for g in rec['llamacpp_logit_gaps']]}")
        del llm
    save_json(os.path.join(fx, EXPECTED_FILE), expected)
    save_json(os.path.join(fx, LOGITS_FILE), step1)
    if failures:
        print("\n".join(failures))
        sys.exit(1)


if __name__ == "__main__":
    phase, fx = sys.argv[1], sys.argv[2]
    if phase == "models":
        phase_models(fx, sys.argv[3])
    elif phase == "hf":
        phase_hf(fx, sys.argv[3])
    elif phase == "llamacpp":
        phase_llamacpp(fx, sys.argv[3], sys.argv[4])
    else:
        sys.exit(f"unknown phase {phase}")
