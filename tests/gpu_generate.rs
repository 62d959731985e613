//! Generation on the CUDA backend against the CPU reference (`CpuBackend<f32>`): each new op on
//! fresh seeded random inputs (outputs poisoned with NaN first, so an unwritten element fails),
//! then whole models: the logits of a random NF4 model with an adapter (prefill, then batched
//! decode of a fine-tuned and a base row), and greedy answers on the demo token for token.
//!
//! Error measure and bounds as in gpu_kernels.rs: ‖cuda − cpu‖ / ‖cpu‖; one bf16 rounding of an
//! output is ≤ 2⁻⁹ relative per element (4e-3 bound); a bf16 intermediate inside (LoRA's `xa`,
//! attention's probabilities times bf16 values) 1e-2; f32 outputs from the same bf16 inputs 1e-5.
//! The GEMV path dequantizes NF4 in f32 while the CPU does too, so it is held to the same 4e-3.
//!
//! Run on a GPU host: `cargo test --release --test gpu_generate -- --ignored --test-threads=1`.

use std::sync::atomic::AtomicBool;

use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tunestudio::backend::cpu::{CpuBackend, CpuTensor};
use tunestudio::backend::cuda::CudaBackend;
use tunestudio::backend::{Backend, DType, HostWeight, KvShape, LinearDims, LoraRows};
use tunestudio::config::{LoraConfig, Quantization, Target};
use tunestudio::engine::TokenRows;
use tunestudio::engine::infer::{InferAdapter, InferOptions, Inference};
use tunestudio::engine::lora::LoraWeights;
mod model_support;
use model_support::RandomWeights;
use tunestudio::generate::{Generator, LoadOptions, Prompt, Request, SamplingParams};
use tunestudio::model::ModelSpec;
use tunestudio::model::chat_template::Message;
use tunestudio::quant::nf4::Nf4Tensor;

type Cpu = CpuBackend<f32>;

fn gpu() -> CudaBackend {
    CudaBackend::new().unwrap_or_else(|e| panic!("this test needs a CUDA GPU: {e}"))
}

fn rb(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

fn randv(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rb(rng.random_range(-scale..scale))).collect()
}

fn rel_err(got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "length mismatch");
    if let Some(i) = got.iter().position(|x| !x.is_finite()) {
        panic!("element {i} is {} (unwritten or non-finite; expected {})", got[i], want[i]);
    }
    let (mut num, mut den) = (0f64, 0f64);
    for (&g, &w) in got.iter().zip(want) {
        num += (g as f64 - w as f64).powi(2);
        den += (w as f64).powi(2);
    }
    if den == 0.0 { num.sqrt() } else { (num / den).sqrt() }
}

fn check(op: &str, got: &[f32], want: &[f32], bound: f64) {
    let e = rel_err(got, want);
    println!("RESULT {op:<60} rel_err {e:9.3e}  bound {bound:7.1e}  {}", if e <= bound { "ok" } else { "FAIL" });
    assert!(e <= bound, "{op}: relative error {e:e} > {bound:e}");
}

fn poisoned(be: &CudaBackend, len: usize, dtype: DType) -> tunestudio::backend::cuda::CudaTensor {
    let mut t = be.alloc(len, dtype).unwrap();
    be.fill(&mut t, f32::NAN).unwrap();
    t
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn linear_rows_gemv_and_gemm_paths() {
    let (be, cpu) = (gpu(), Cpu::new());
    let mut rng = ChaCha8Rng::seed_from_u64(301);
    // (out, in): wide (one warp per row), narrow (warps share rows), NF4-unfriendly `in` (GEMM path).
    for (out, inp) in [(3000usize, 1024usize), (24, 4096), (200, 72)] {
        for nf4 in [false, true] {
            let raw = randv(&mut rng, out * inp, 0.05);
            let hw = if nf4 {
                HostWeight::Nf4(Nf4Tensor::quantize(&raw, &[out, inp]))
            } else {
                HostWeight::Dense { out_features: out, in_features: inp, data: raw.clone() }
            };
            let bias = randv(&mut rng, out, 0.2);
            let rank = 16;
            let a = randv(&mut rng, rank * inp, 0.05);
            let b = randv(&mut rng, out * rank, 0.05);
            let (cw, gw) = (cpu.upload_weight(&hw, Some(&bias)).unwrap(), be.upload_weight(&hw, Some(&bias)).unwrap());
            for n in [1usize, 3, 8, 40] {
                let x = randv(&mut rng, n * inp, 1.0);
                let scales: Vec<f32> = (0..n).map(|r| if r % 2 == 0 { 2.0 } else { 0.0 }).collect();
                for with_lora in [false, true] {
                    let dims = LinearDims { n, inp, out };
                    let mut want = CpuTensor(vec![0.0; n * out]);
                    let mut xa_c = CpuTensor(vec![0.0; n * rank]);
                    let (ac, bc, sc) = (CpuTensor(a.clone()), CpuTensor(b.clone()), CpuTensor(scales.clone()));
                    let lora = with_lora.then_some(LoraRows { a: &ac, b: &bc, rank, row_scale: &sc, xa: &mut xa_c });
                    cpu.linear_rows(&CpuTensor(x.clone()), &cw, lora, dims, &mut want).unwrap();
                    let (ag, bg, sg) =
                        (be.upload(&a, DType::Act).unwrap(), be.upload(&b, DType::Act).unwrap(), be.upload(&scales, DType::F32).unwrap());
                    let mut xa_g = poisoned(&be, n * rank, DType::Act);
                    let mut y = poisoned(&be, n * out, DType::Act);
                    let lora = with_lora.then_some(LoraRows { a: &ag, b: &bg, rank, row_scale: &sg, xa: &mut xa_g });
                    be.linear_rows(&be.upload(&x, DType::Act).unwrap(), &gw, lora, dims, &mut y).unwrap();
                    let path = if n <= 8 && inp % 32 == 0 { "gemv" } else { "gemm" };
                    let bound = if with_lora { 1e-2 } else { 4e-3 };
                    check(
                        &format!("linear_rows {path} {} {out}x{inp} n={n} lora={with_lora}", if nf4 { "nf4" } else { "bf16" }),
                        &be.download(&y).unwrap(),
                        &want.0,
                        bound,
                    );
                }
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn kv_store_and_cached_attention() {
    let (be, cpu) = (gpu(), Cpu::new());
    let mut rng = ChaCha8Rng::seed_from_u64(302);
    // (heads, kv heads, head_dim, window): Llama-3 GQA, MHA, Qwen2's group of 7, a window, Gemma's 256.
    for (heads, kv_heads, hd, window) in
        [(32usize, 8usize, 128usize, None), (4, 4, 64, None), (28, 4, 128, None), (8, 2, 64, Some(20)), (8, 4, 256, None)]
    {
        let (slots, capacity) = (3usize, 300usize);
        let kv = KvShape { heads, kv_heads, head_dim: hd, capacity, scale: 1.0 / (hd as f32).sqrt(), window };
        let w = kv.kv_width();
        let kc_init = randv(&mut rng, slots * capacity * w, 1.0);
        let vc_init = randv(&mut rng, slots * capacity * w, 1.0);
        // Decode rows of three sequences at different lengths, then a prefill chunk of one.
        for (label, rows) in [("decode", vec![(0usize, 299usize), (2, 7), (1, 150)]), ("prefill", (100..164).map(|p| (1, p)).collect())] {
            let n = rows.len();
            let slot_ids: Vec<i32> = rows.iter().map(|r| r.0 as i32).collect();
            let pos: Vec<i32> = rows.iter().map(|r| r.1 as i32).collect();
            let (k_new, v_new, q) = (randv(&mut rng, n * w, 1.0), randv(&mut rng, n * w, 1.0), randv(&mut rng, n * heads * hd, 1.0));
            let (mut kc, mut vc) = (CpuTensor(kc_init.clone()), CpuTensor(vc_init.clone()));
            cpu.kv_store(&CpuTensor(k_new.clone()), n, kv, &slot_ids, &pos, &mut kc).unwrap();
            cpu.kv_store(&CpuTensor(v_new.clone()), n, kv, &slot_ids, &pos, &mut vc).unwrap();
            let mut want = CpuTensor(vec![0.0; n * heads * hd]);
            cpu.attention_cached(&CpuTensor(q.clone()), &kc, &vc, &slot_ids, &pos, n, kv, &mut want).unwrap();

            let (mut gk, mut gv) = (be.upload(&kc_init, DType::Act).unwrap(), be.upload(&vc_init, DType::Act).unwrap());
            let (gs, gp) = (be.upload_ids(&slot_ids).unwrap(), be.upload_ids(&pos).unwrap());
            be.kv_store(&be.upload(&k_new, DType::Act).unwrap(), n, kv, &gs, &gp, &mut gk).unwrap();
            be.kv_store(&be.upload(&v_new, DType::Act).unwrap(), n, kv, &gs, &gp, &mut gv).unwrap();
            check(&format!("kv_store {label} (keys, exact)"), &be.download(&gk).unwrap(), &kc.0, 0.0);
            let mut out = poisoned(&be, n * heads * hd, DType::Act);
            be.attention_cached(&be.upload(&q, DType::Act).unwrap(), &gk, &gv, &gs, &gp, n, kv, &mut out).unwrap();
            check(
                &format!("attention_cached {label} h={heads} kv={kv_heads} hd={hd} window={window:?}"),
                &be.download(&out).unwrap(),
                &want.0,
                1e-2,
            );
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn logits_in_f32() {
    let (be, cpu) = (gpu(), Cpu::new());
    let mut rng = ChaCha8Rng::seed_from_u64(303);
    let (d, vocab) = (512usize, 5003usize);
    let head = randv(&mut rng, vocab * d, 0.05);
    for n in [1usize, 2, 12] {
        let h = randv(&mut rng, n * d, 1.0);
        let mut want = CpuTensor(vec![0.0; n * vocab]);
        cpu.logits(&CpuTensor(h.clone()), &CpuTensor(head.clone()), n, d, vocab, &mut want).unwrap();
        let mut out = poisoned(&be, n * vocab, DType::F32);
        be.logits(&be.upload(&h, DType::Act).unwrap(), &be.upload(&head, DType::Act).unwrap(), n, d, vocab, &mut out).unwrap();
        check(&format!("logits n={n} (f32 from bf16 inputs)"), &be.download(&out).unwrap(), &want.0, 1e-5);
    }
}

fn small_spec() -> ModelSpec {
    ModelSpec {
        vocab_size: 1000,
        hidden_size: 256,
        intermediate_size: 512,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 64,
        max_position_embeddings: 512,
        rope_theta: 500000.0,
        ..ModelSpec::llama3_8b()
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn a_random_model_answers_as_on_the_cpu() {
    let spec = small_spec();
    let w = RandomWeights::new(&spec, 9, 0.05);
    let lora = LoraConfig { r: 8, alpha: 16.0, dropout: 0.0, targets: Target::ALL.to_vec(), rslora: false };
    let mut weights = LoraWeights::init(&spec, &lora, 2);
    let mut rng = ChaCha8Rng::seed_from_u64(304);
    for layer in &mut weights.layers {
        for p in layer.values_mut() {
            p.b.iter_mut().for_each(|v| *v = rng.random_range(-0.05..0.05));
        }
    }
    let d = spec.hidden_size;
    let rows = TokenRows { ids: vec![5, 700], embed: randv(&mut rng, 2 * d, 0.05), head: Some(randv(&mut rng, 2 * d, 0.05)) };
    let adapter = InferAdapter { lora, weights, token_rows: Some(rows) };
    let opts = InferOptions { chunk_rows: 32, ..InferOptions::new(Quantization::Nf4, 2, 256) };
    let mut c = Inference::new(Cpu::new(), spec.clone(), &w, opts, Some(&adapter)).unwrap();
    let mut g = Inference::new(gpu(), spec.clone(), &w, opts, Some(&adapter)).unwrap();
    for inf in [&mut c as &mut dyn Step, &mut g] {
        inf.set(0, true);
        inf.set(1, false);
    }
    let p0: Vec<u32> = (0..70).map(|i| (i * 37 % 1000) as u32).chain([5, 700]).collect();
    let p1: Vec<u32> = (0..45).map(|i| (i * 91 % 1000) as u32).collect();
    let (lc, lg) = (c.forward(&[(0, &p0), (1, &p1)]).unwrap(), g.forward(&[(0, &p0), (1, &p1)]).unwrap());
    for (i, (a, b)) in lc.iter().zip(&lg).enumerate() {
        check(&format!("model prefill logits, slot {i} (72 and 45 tokens, chunks of 32)"), b, a, 2e-2);
    }
    for step in 0..20u32 {
        let t = [(step * 13 + 5) % 1000, 700];
        let (lc, lg) = (c.forward(&[(1, &t[..1]), (0, &t[1..])]).unwrap(), g.forward(&[(1, &t[..1]), (0, &t[1..])]).unwrap());
        for (i, (a, b)) in lc.iter().zip(&lg).enumerate() {
            check(&format!("model decode step {step}, entry {i}"), b, a, 2e-2);
        }
    }
}

/// What the test needs of an inference model on either backend.
trait Step {
    fn set(&mut self, slot: usize, on: bool);
}
impl<B: Backend> Step for Inference<B> {
    fn set(&mut self, slot: usize, on: bool) {
        self.set_adapter(slot, on).unwrap();
    }
}

fn demo_options(adapter: bool) -> LoadOptions {
    // The binary may run from a copy of the tree on the GPU host, where the build's path is not.
    let built = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let root = if built.join("assets/demo/model").is_dir() { built.to_path_buf() } else { std::env::current_dir().unwrap() };
    let mut o = LoadOptions::new(root.join("assets/demo/model"));
    o.slots = 2;
    o.context = 512;
    o.quantization = Quantization::Bf16;
    if adapter {
        o.adapter = Some(root.join("tests/fixtures/interop/demo_adapter"));
    }
    o
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn greedy_answers_on_the_demo_equal_the_cpu_token_for_token() {
    let prompts = ["What is the capital of France?", "Tell me about the river.", "Write a short line about the sea."];
    let cancel = AtomicBool::new(false);
    for adapter in [false, true] {
        let mut c = Generator::open(Cpu::new(), &demo_options(adapter)).unwrap();
        let mut g = Generator::open(gpu(), &demo_options(adapter)).unwrap();
        for p in prompts {
            let req = |on| Request {
                prompt: Prompt::Chat(vec![Message::new("user", p)]),
                adapter: on,
                params: SamplingParams { max_new_tokens: 48, ..SamplingParams::greedy(48) },
                stop_strings: vec![],
                ignore_eos: false,
            };
            // Side by side on the GPU (when there is an adapter), alone on the CPU.
            let reqs: Vec<Request> = if adapter { vec![req(true), req(false)] } else { vec![req(false)] };
            let ga = g.generate(&reqs, &cancel, &mut |_| {}).unwrap();
            for (i, r) in reqs.iter().enumerate() {
                let ca = c.generate(std::slice::from_ref(r), &cancel, &mut |_| {}).unwrap();
                let (a, b) = (&ca[0].tokens, &ga[i].tokens);
                let same = a.iter().zip(b).take_while(|(x, y)| x == y).count();
                println!("RESULT greedy demo adapter={adapter} row={i} `{p}`: {same} of {} tokens equal ({:?})", a.len(), ga[i].finish);
                assert_eq!(a, b, "first difference at token {same}: cpu `{}` cuda `{}`", ca[0].text, ga[i].text);
            }
        }
    }
}
