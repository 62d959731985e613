#!/usr/bin/env python3
"""Fixtures that pin src/quant/nf4.rs to bitsandbytes, byte for byte.

Run on a CUDA host with torch and bitsandbytes 0.50.2 (transformers optional):

    python3 tests/interop/make_nf4_fixtures.py [OUT_DIR]            # default tests/fixtures/nf4
    python3 tests/interop/make_nf4_fixtures.py OUT --big 16000000   # + big_random.safetensors (not committed)
    python3 tests/interop/make_nf4_fixtures.py OUT --rcp-table PATH # re-measure src/quant/nf4_rcp_sm90.bin

For each case, <case>.safetensors holds what quantize_4bit(A, blocksize=64, quant_type="nf4",
compress_statistics=True) and dequantize_4bit return for a deterministic input A:
  input (bf16; f32 for the *_f32 cases), packed (u8), absmax_q (u8), absmax2 (f32), offset (f32[1]),
  code2 (f32[256]), absmax_deq (f32, the absmax dequantize_4bit reconstructs),
  dequantized (bf16, or f32 for an f32 input) and, for small cases, dequantized_f32.
linear4bit_2layer.safetensors is the state dict of two bnb.nn.Linear4bit layers (names as
transformers gives them); linear4bit_2layer_reference.safetensors has their bf16 source weights
(<name>.original) and bnb's dequantization (<name>.dequantized). tiny_llama_bnb4bit/ is a
transformers save_pretrained of a tiny Llama loaded with load_in_4bit + double quant, with
tiny_llama_reference.safetensors beside it.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch

NF4_THRESHOLDS = [
    -0.8480964004993439, -0.6106329262256622, -0.4599952697753906, -0.33967943489551544,
    -0.23460740596055984, -0.13791173323988914, -0.045525018125772476, 0.03979014977812767,
    0.1202552504837513, 0.2035212516784668, 0.2920137718319893, 0.3893125355243683,
    0.5016634166240692, 0.6427869200706482, 0.8614784181118011,
]


def gen(seed):
    g = torch.Generator().manual_seed(seed)
    return g


def randn(shape, seed, scale):
    return (torch.randn(shape, generator=gen(seed)) * scale).to(torch.bfloat16)


def special_1d():
    """4133 bf16 values (not a multiple of 64, odd) with the blocks the kernel treats specially."""
    x = torch.randn(4133, generator=gen(4)) * 0.05
    x[0:64] = 0.0                                   # all-zero block: 1/0 = inf, 0*inf = NaN -> code 0
    x[64:128] = -0.0                                # negative zeros
    x[128:192] = 0.0
    x[130] = 0.5                                    # a single non-zero
    x[200] = 1000.0                                 # one large outlier: its block and its 256-group
    # A block whose values are the NF4 thresholds and codes times 2 (scale by a power of two, so
    # the reciprocal is exact and bf16 rounding alone moves them off the thresholds).
    vals = torch.tensor(NF4_THRESHOLDS + [-1.0, 1.0] + [v / 2 for v in NF4_THRESHOLDS], dtype=torch.float64)
    x[256:256 + len(vals)] = (vals * 2.0).float()
    x[320:384] = 1e-39                              # subnormal: flushed, so an absmax of 0
    x[384:448] = -1e-39
    x[400] = 3e-30                                  # normal but tiny, among subnormals
    x[448:512] = 0.3                                # all equal
    x[512:576] = torch.linspace(-1.0, 1.0, 64)      # a ramp through every code
    x[4096:] = 0.0                                  # the last, partial block all zero
    return x.to(torch.bfloat16)


def ties_f32():
    """f32 input whose scaled values land exactly on the thresholds: the ties of the NF4 tree."""
    t = torch.tensor(NF4_THRESHOLDS, dtype=torch.float32)
    up = torch.nextafter(t, torch.full_like(t, 2.0))
    down = torch.nextafter(t, torch.full_like(t, -2.0))
    x = torch.cat([torch.tensor([1.0]), t, up, down, torch.tensor([-1.0, 0.0, -0.0])])
    x = torch.cat([x, x * 0.25])                    # a second block with absmax 0.25
    return x


def rcp_flip_f32(A, x, seed):
    """Four f32 blocks whose absmax values make the 8-bit level depend on the GPU's reciprocal:
    absmax = 2 + A, 2 - A, 2 + x, 2 - x. Every one is a multiple of 2^-21 below 4, so torch's mean
    is exactly 2 in any summation order, the centred values are exactly A, -A, x, -x, and x / A
    lands where MUFU.RCP(A) and the correctly rounded 1/A pick neighbouring 8-bit codes."""
    absmax = torch.tensor([2 + A, 2 - A, 2 + x, 2 - x], dtype=torch.float64).float()
    assert absmax.double().sum().item() == 8.0
    v = (torch.rand((4, 64), generator=gen(seed)) * 1.8 - 0.9) * absmax.unsqueeze(1)
    v[:, 5] = absmax                                # one element per block carries its absmax
    return v


CASES = [
    # name, maker, keep the f32 dequantization too
    ("randn_80x211", lambda: randn((80, 211), 2, 0.02), False),   # 264 blocks: a full 256-group + 8
    ("odd_37x53", lambda: randn((37, 53), 3, 1.0), True),         # odd count: a half byte at the end
    ("special_4133", special_1d, True),
    ("zeros_130", lambda: torch.zeros(130, dtype=torch.bfloat16), True),
    ("randn_5x7x19", lambda: randn((5, 7, 19), 6, 0.1), True),
    ("wide_range_32x64", lambda: (torch.randn((32, 64), generator=gen(7))
                                  * torch.logspace(-6, 3, 32).unsqueeze(1)).to(torch.bfloat16), True),
    ("ties_f32", ties_f32, True),
    # MUFU.RCP one ulp below 1/A: code 179 where round-to-nearest gives 180; and one ulp above.
    ("rcp_flip_down_f32", lambda: rcp_flip_f32(1.9312448501586914, 0.1333765983581543, 11), True),
    ("rcp_flip_up_f32", lambda: rcp_flip_f32(1.2911558151245117, 0.3288412094116211, 12), True),
]


def quantize_case(A):
    import bitsandbytes.functional as F

    A = A.cuda()
    packed, qs = F.quantize_4bit(A, blocksize=64, quant_type="nf4", compress_statistics=True)
    deq = F.dequantize_4bit(packed, qs)
    qs32 = F.QuantState(absmax=qs.absmax, shape=qs.shape, code=qs.code, blocksize=qs.blocksize,
                        quant_type=qs.quant_type, dtype=torch.float32, offset=qs.offset, state2=qs.state2)
    deq32 = F.dequantize_4bit(packed, qs32)
    absmax_deq = F.dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    out = {
        "input": A,
        "packed": packed.reshape(-1),
        "absmax_q": qs.absmax,
        "absmax2": qs.state2.absmax,
        "offset": qs.offset.reshape(1).float(),
        "code2": qs.state2.code,
        "absmax_deq": absmax_deq.float(),
        "dequantized": deq,
        "dequantized_f32": deq32,
    }
    assert qs.state2.blocksize == 256 and qs.blocksize == 64
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def write_cases(out_dir):
    from safetensors.torch import save_file

    for name, make, keep_f32 in CASES:
        t = quantize_case(make())
        if not keep_f32:
            del t["dequantized_f32"]
        save_file(t, os.path.join(out_dir, f"{name}.safetensors"))
        print(f"{name:18s} shape {list(t['input'].shape)} blocks {t['absmax_q'].numel()} "
              f"offset {t['offset'].item():.9g} absmax2[0] {t['absmax2'][0].item():.6g}")


def write_linear4bit(out_dir):
    """Two Linear4bit layers, saved the way transformers saves a bnb-4bit model's state dict."""
    import bitsandbytes as bnb
    from safetensors.torch import save_file

    torch.manual_seed(8)
    dense = torch.nn.ModuleDict({"up_proj": torch.nn.Linear(64, 96, bias=True),
                                 "down_proj": torch.nn.Linear(96, 40, bias=False)}).to(torch.bfloat16)
    quant = torch.nn.ModuleDict({
        "up_proj": bnb.nn.Linear4bit(64, 96, bias=True, compute_dtype=torch.bfloat16,
                                     compress_statistics=True, quant_type="nf4"),
        "down_proj": bnb.nn.Linear4bit(96, 40, bias=False, compute_dtype=torch.bfloat16,
                                       compress_statistics=True, quant_type="nf4"),
    })
    # bf16 before the weights go in, so the quant state's dtype is bfloat16 as in a bf16 model.
    quant = quant.to(torch.bfloat16)
    quant.load_state_dict(dense.state_dict())
    assert quant["up_proj"].weight.dtype == torch.bfloat16
    quant = quant.cuda()  # Params4bit quantizes when moved to the GPU
    prefix = "model.layers.0.mlp."
    sd = {prefix + k: v.detach().contiguous().cpu() for k, v in quant.state_dict().items()}
    save_file(sd, os.path.join(out_dir, "linear4bit_2layer.safetensors"))
    ref = {}
    for name in ("up_proj", "down_proj"):
        w = quant[name].weight
        ref[f"{prefix}{name}.weight.original"] = dense[name].weight.detach().contiguous()
        deq = bnb.functional.dequantize_4bit(w.data, w.quant_state)
        ref[f"{prefix}{name}.weight.dequantized"] = deq.detach().contiguous().cpu()
    save_file(ref, os.path.join(out_dir, "linear4bit_2layer_reference.safetensors"))
    print("linear4bit_2layer  keys:", ", ".join(sorted(k[len(prefix):] for k in sd)))


def write_tiny_llama(out_dir):
    """A real transformers `*-bnb-4bit` save: tiny random Llama, load_in_4bit with double quant."""
    import bitsandbytes as bnb
    from safetensors.torch import save_file
    from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=True)
    torch.manual_seed(9)
    dense = LlamaForCausalLM(cfg).to(torch.bfloat16)
    with tempfile.TemporaryDirectory() as src, tempfile.TemporaryDirectory() as dst:
        dense.save_pretrained(src)
        bnb_cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                     bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.bfloat16)
        q = LlamaForCausalLM.from_pretrained(src, quantization_config=bnb_cfg, dtype=torch.bfloat16,
                                             device_map={"": 0})
        q.save_pretrained(dst)
        folder = os.path.join(out_dir, "tiny_llama_bnb4bit")
        os.makedirs(folder, exist_ok=True)
        for f in ("model.safetensors", "config.json"):
            shutil.copy(os.path.join(dst, f), folder)
        dense_sd = dense.state_dict()
        ref = {}
        for name, mod in q.named_modules():
            if isinstance(mod, bnb.nn.Linear4bit):
                w = mod.weight
                ref[f"{name}.weight.original"] = dense_sd[f"{name}.weight"].contiguous()
                ref[f"{name}.weight.dequantized"] = bnb.functional.dequantize_4bit(
                    w.data, w.quant_state).contiguous().cpu()
        save_file(ref, os.path.join(out_dir, "tiny_llama_reference.safetensors"))
        print(f"tiny_llama_bnb4bit {len(ref) // 2} Linear4bit weights")


def write_big(out_dir, n):
    """A large random tensor (varying scales, some zero and outlier blocks) for the ignored
    big-fixture test: millions of blocks exercise every reciprocal and threshold path."""
    from safetensors.torch import save_file

    g = gen(10)
    x = torch.randn(n, generator=g)
    rows = (n + 4095) // 4096
    scales = torch.logspace(-5, 2, rows)[torch.randperm(rows, generator=g)]
    x = x * scales.repeat_interleave(4096)[:n]
    blocks = torch.randperm(n // 64, generator=g)[: max(1, n // 64 // 500)]
    for b in blocks[: len(blocks) // 2]:
        x[b * 64:(b + 1) * 64] = 0.0
    for b in blocks[len(blocks) // 2:]:
        x[b * 64 + 7] *= 1000.0
    t = quantize_case(x.to(torch.bfloat16))
    del t["dequantized_f32"]
    save_file(t, os.path.join(out_dir, "big_random.safetensors"))
    print(f"big_random         {n} values, {t['absmax_q'].numel()} blocks")


RCP_PROBE = r"""
#include <cstdio>
#include <cstdint>
#include <vector>
__global__ void k(int e, uint8_t* d) {
  uint32_t m = blockIdx.x * blockDim.x + threadIdx.x;
  if (m >= (1u << 23)) return;
  float x = __uint_as_float(((uint32_t)e << 23) | m);
  float a; asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(a) : "f"(x));
  int diff = (int)__float_as_uint(a) - (int)__float_as_uint(__frcp_rn(x));
  d[m] = (uint8_t)(diff + 2);
}
int main(int argc, char** argv) {
  const int N = 1 << 23;
  uint8_t* d; cudaMalloc(&d, N);
  std::vector<uint8_t> h(N), h0(N), bits(N / 8, 0);
  int exps[] = {127, 27, 227, 100, 150, 1, 253};
  for (int e : exps) {
    k<<<N / 256, 256>>>(e, d);
    cudaMemcpy(h.data(), d, N, cudaMemcpyDeviceToHost);
    long off = 0, bad = 0, changed = 0;
    for (int m = 0; m < N; m++) {
      if (h[m] != 2) off++;
      if (h[m] < 1 || h[m] > 3) bad++;
      if (e != 127 && e != 253 && h[m] != h0[m]) changed++;
    }
    printf("exponent %+d: %ld mantissas off round-to-nearest, %ld by more than one ulp, %ld unlike exponent 0\n",
           e - 127, off, bad, changed);
    if (e == 127) h0 = h;
  }
  for (int m = 0; m < N; m++) if (h0[m] != 2) bits[m >> 3] |= 1 << (m & 7);
  FILE* f = fopen(argv[1], "wb"); fwrite(bits.data(), 1, bits.size(), f); fclose(f);
  return 0;
}
"""


def write_rcp_table(path):
    """Measure where the GPU's approximate reciprocal (MUFU.RCP, what bnb's `1.0f / absmax` is
    under --use_fast_math) rounds to the other neighbour than round-to-nearest, per mantissa."""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "rcp.cu")
        with open(src, "w") as f:
            f.write(RCP_PROBE)
        exe = os.path.join(d, "rcp")
        subprocess.run(["nvcc", "-O3", "-arch=native", "-o", exe, src], check=True)
        subprocess.run([exe, path], check=True)
    print(f"rcp table -> {path} ({torch.cuda.get_device_name()})")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", default="tests/fixtures/nf4")
    ap.add_argument("--big", type=int, default=0, metavar="N", help="also write big_random.safetensors with N values")
    ap.add_argument("--rcp-table", metavar="PATH", help="also measure the reciprocal table into PATH")
    ap.add_argument("--skip-transformers", action="store_true")
    args = ap.parse_args()

    import bitsandbytes as bnb

    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device: the fixtures pin bnb's CUDA kernels")
    os.makedirs(args.out, exist_ok=True)
    print(f"torch {torch.__version__}, bitsandbytes {bnb.__version__}, {torch.cuda.get_device_name()}")
    if bnb.__version__ != "0.50.2":
        print(f"warning: fixtures are meant to come from bitsandbytes 0.50.2, not {bnb.__version__}")
    write_cases(args.out)
    write_linear4bit(args.out)
    if not args.skip_transformers:
        import transformers
        print(f"transformers {transformers.__version__}")
        write_tiny_llama(args.out)
    if args.big:
        write_big(args.out, args.big)
    if args.rcp_table:
        write_rcp_table(args.rcp_table)
    total = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(args.out) for f in fs
                if f != "big_random.safetensors")
    print(f"wrote {args.out}: {total / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
