"""C: Unsloth QLoRA (FastLanguageModel, load_in_4bit, use_gradient_checkpointing="unsloth").

usage: bench_unsloth.py OUT_JSON DEADLINE_EPOCH [maxseq_start maxseq_cap maxseq_gran]
Plain training loop (same as the HF scripts): bsz 1, random ids, labels = ids, bf16 autocast,
torch fused AdamW. Max-seq search: the model is loaded with max_seq_length=2048 and the
max_seq_length attribute is raised on every module before each try (otherwise Unsloth
truncates the input to max_seq_length).
"""
import os
import sys
import time

t0 = time.time()
from unsloth import FastLanguageModel  # noqa: E402  (must come before transformers / peft)
import torch  # noqa: E402

from common import MODEL_DIR, TARGETS, Recorder, count_params, make_step, max_seq_search, mem_stats, throughput_all  # noqa: E402

out, deadline = sys.argv[1], float(sys.argv[2])
rec = Recorder(out, "unsloth_qlora")
rec.set("import_s", time.time() - t0)
t1 = time.time()
load = dict(model_name=MODEL_DIR, max_seq_length=2048, dtype=torch.bfloat16, load_in_4bit=True,
            fix_tokenizer=False, local_files_only=True)
try:
    model, tok = FastLanguageModel.from_pretrained(**load)
except Exception as e:  # noqa: BLE001  Unsloth routes some families (Gemma 3) through FastModel
    print(f"FastLanguageModel refused ({type(e).__name__}: {str(e)[:200]}); trying FastModel", flush=True)
    from unsloth import FastModel
    FastLanguageModel = FastModel  # noqa: N806  get_peft_model / for_training below
    model, tok = FastModel.from_pretrained(**load)
rec.set("loader", FastLanguageModel.__name__)
rec.set("load_s", time.time() - t1)
rec.set("mem_after_load", mem_stats())
model = FastLanguageModel.get_peft_model(
    model, r=32, lora_alpha=32, lora_dropout=0, target_modules=TARGETS, bias="none",
    use_gradient_checkpointing="unsloth", random_state=3407)
FastLanguageModel.for_training(model)
model.train()
rec.set("params", count_params(model))
rec.set("peft_s", time.time() - t1)
print(rec.data["params"], "import+load+peft", time.time() - t0, "s", flush=True)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
inner = make_step(model, opt, autocast=True)


def set_max_len(n):
    model.max_seq_length = n
    for m in model.modules():
        m.max_seq_length = n


def step(seq):
    if seq > getattr(model, "max_seq_length", 0):
        set_max_len(seq)
    return inner(seq)


throughput_all(step, rec)
if len(sys.argv) > 3:
    s0, cap, gran = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    max_seq_search(step, rec, s0, cap, gran, deadline, opt=opt)
rec.set("total_s", time.time() - t0)
print("done", time.time() - t0, flush=True)
