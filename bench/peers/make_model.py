"""Create a model of the PEER_SHAPE shape (default llama3-8b; qwen3-8b, gemma3-4b) with random
weights (bf16) + a dummy tokenizer of its vocabulary, and save both to MODEL_DIR with
save_pretrained. Init is normal_(std=0.02) done on the GPU; norms at 1 (Gemma's, stored as
offsets from 1, at 0)."""
import json
import os
import sys
import time

import torch

from common import MODEL_DIR, SHAPE, VOCAB

t0 = time.time()
if os.path.exists(os.path.join(MODEL_DIR, "config.json")) and os.path.exists(os.path.join(MODEL_DIR, "tokenizer.json")):
    print("model already present at", MODEL_DIR)
    sys.exit(0)

def llama_config():
    from transformers import LlamaConfig

    common = dict(
        vocab_size=VOCAB, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
        rms_norm_eps=1e-5, bos_token_id=128000, eos_token_id=128001, tie_word_embeddings=False,
        hidden_act="silu", attention_bias=False, mlp_bias=False, initializer_range=0.02,
    )
    try:
        return LlamaConfig(**common, rope_parameters={"rope_type": "default", "rope_theta": 500000.0})
    except TypeError:
        return LlamaConfig(**common, rope_theta=500000.0)


def qwen3_config():
    """Qwen/Qwen3-8B's config.json."""
    from transformers import Qwen3Config

    common = dict(
        vocab_size=VOCAB, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
        rms_norm_eps=1e-6, bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=False,
        hidden_act="silu", attention_bias=False, use_sliding_window=False, initializer_range=0.02,
    )
    try:
        return Qwen3Config(**common, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    except TypeError:
        return Qwen3Config(**common, rope_theta=1000000.0)


def gemma3_config():
    """The text model of google/gemma-3-4b-it (its config.json and Gemma3TextConfig's defaults),
    as a Gemma3ForCausalLM."""
    from transformers import Gemma3TextConfig

    common = dict(
        vocab_size=VOCAB, hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=131072,
        rms_norm_eps=1e-6, bos_token_id=2, eos_token_id=[1, 106], pad_token_id=0, tie_word_embeddings=True,
        hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=256, sliding_window=1024,
        initializer_range=0.02,
    )
    try:
        return Gemma3TextConfig(**common, rope_parameters={
            "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})
    except TypeError:
        return Gemma3TextConfig(**common, rope_theta=1000000.0, rope_local_base_freq=10000.0,
                                rope_scaling={"rope_type": "linear", "factor": 8.0})


config = {"llama3-8b": llama_config, "qwen3-8b": qwen3_config, "gemma3-4b": gemma3_config}[SHAPE]()
config.dtype = torch.bfloat16
print(config)

from transformers import AutoModelForCausalLM  # noqa: E402

torch.manual_seed(0)
torch.set_default_dtype(torch.bfloat16)
with torch.device("cuda"):
    model = AutoModelForCausalLM.from_config(config)
torch.set_default_dtype(torch.float32)
# Make sure every weight is a cheap random normal (std 0.02), norms at 1 (Gemma multiplies by 1 + w).
norm_value = 0.0 if SHAPE.startswith("gemma") else 1.0
with torch.no_grad():
    for n, p in model.named_parameters():
        if p.ndim >= 2:
            p.normal_(0.0, 0.02)
        else:
            p.fill_(norm_value)
n = sum(p.numel() for p in model.parameters())
print(f"params {n/1e9:.3f}e9, dtype {next(model.parameters()).dtype}, built in {time.time()-t0:.1f}s", flush=True)
os.makedirs(MODEL_DIR, exist_ok=True)
model.save_pretrained(MODEL_DIR, max_shard_size="5GB")
print(f"saved in {time.time()-t0:.1f}s", flush=True)
del model
torch.cuda.empty_cache()

# Dummy tokenizer (Unsloth's loader insists on one): word-level over the whole vocabulary, the
# shape's special tokens at their published ids.
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

if SHAPE == "llama3-8b":
    first_special = 128000
    special = {128000: "<|begin_of_text|>", 128001: "<|end_of_text|>", 128004: "<|finetune_right_pad_id|>",
               128006: "<|start_header_id|>", 128007: "<|end_header_id|>", 128009: "<|eot_id|>"}
    names = dict(bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>", pad_token="<|finetune_right_pad_id|>")
elif SHAPE == "qwen3-8b":
    first_special = 151643
    special = {151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>"}
    names = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>")
else:
    first_special = None
    special = {0: "<pad>", 1: "<eos>", 2: "<bos>", 3: "<unk>", 105: "<start_of_turn>", 106: "<end_of_turn>"}
    names = dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
vocab, specials = {}, []
for i in range(VOCAB):
    if i in special or (first_special is not None and i >= first_special):
        s = special.get(i, f"<|reserved_special_token_{i}|>")
        specials.append(s)
    else:
        s = f"t{i}"
    vocab[s] = i
unk = "<unk>" if "<unk>" in vocab else "t0"
tk = Tokenizer(models.WordLevel(vocab, unk_token=unk))
tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
tk.add_special_tokens(specials)
hf_tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token=unk, model_max_length=8192, **names)
hf_tok.save_pretrained(MODEL_DIR)
print("files:", {f: os.path.getsize(os.path.join(MODEL_DIR, f)) for f in sorted(os.listdir(MODEL_DIR))})
print(f"make_model done in {time.time()-t0:.1f}s", flush=True)
