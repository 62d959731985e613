//! Timings of the CUDA backend on Llama-3-8B shapes at seq 2048 (batch 1): each fused op, the NF4
//! linear, the chunked loss, and a whole training step of a 2-layer model with the 8B dimensions
//! (per-layer cost x 32 + head ≈ the full model's step), and attention alone at seq 2048-8192. Not a
//! correctness test (gpu_kernels and
//! gpu_step are); it prints `BENCH` lines with median milliseconds over repeats after a warm-up.
//!
//! Run on a GPU host: `cargo test --release --test gpu_bench -- --ignored --nocapture`.

use rayon::prelude::*;
use tunestudio::backend::cuda::CudaBackend;
use tunestudio::backend::{AttnShape, Backend, DType, HostWeight, LinearDims, LoraBwd, LoraFwd, RmsNorm};
use tunestudio::config::{CheckpointPolicy, LoraConfig, OptimConfig, Quantization, Target};
use tunestudio::data::Batch;
use tunestudio::engine::model::WeightSource;
use tunestudio::engine::{EngineOptions, Trainer};
use tunestudio::model::ModelSpec;
use tunestudio::quant::nf4::Nf4Tensor;

fn hash(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Uniform values in (−a, a) from a counter hash, generated in parallel (no 8B-sized RNG stream).
fn fast_random(n: usize, seed: u64, a: f32) -> Vec<f32> {
    (0..n)
        .into_par_iter()
        .map(|i| ((hash(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)) >> 40) as f32 / 16777216.0 * 2.0 - 1.0) * a)
        .collect()
}

struct FastWeights;

impl WeightSource for FastWeights {
    fn dense(&self, name: &str, shape: &[usize]) -> tunestudio::Result<Vec<f32>> {
        let n: usize = shape.iter().product();
        let seed = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
        Ok(if name.contains("norm") { vec![1.0; n] } else { fast_random(n, seed, 0.035) })
    }
    fn has(&self, name: &str) -> bool {
        let _ = name;
        true
    }
}

fn median_ms(be: &CudaBackend, reps: usize, mut f: impl FnMut() -> tunestudio::Result<()>) -> f32 {
    f().unwrap();
    be.synchronize().unwrap();
    let mut t: Vec<f32> = (0..reps).map(|_| be.time_ms(&mut f).unwrap()).collect();
    t.sort_by(f32::total_cmp);
    t[reps / 2]
}

/// Attention's inputs (random), outputs and gradients for one sequence of `shape`.
struct AttnBuffers {
    q: tunestudio::backend::cuda::CudaTensor,
    k: tunestudio::backend::cuda::CudaTensor,
    v: tunestudio::backend::cuda::CudaTensor,
    dout: tunestudio::backend::cuda::CudaTensor,
    seg: tunestudio::backend::cuda::CudaIds,
    out: tunestudio::backend::cuda::CudaTensor,
    lse: tunestudio::backend::cuda::CudaTensor,
    dq: tunestudio::backend::cuda::CudaTensor,
    dk: tunestudio::backend::cuda::CudaTensor,
    dv: tunestudio::backend::cuda::CudaTensor,
}

impl AttnBuffers {
    fn new(be: &CudaBackend, shape: AttnShape) -> Self {
        let AttnShape { seq: s, heads: h, kv_heads: kvh, head_dim: hd, .. } = shape;
        let act = |len: usize, seed: u64| be.upload(&fast_random(len, seed, 1.0), DType::Act).unwrap();
        let zeros = |len: usize, dtype| be.alloc(len, dtype).unwrap();
        AttnBuffers {
            q: act(s * h * hd, 1),
            k: act(s * kvh * hd, 2),
            v: act(s * kvh * hd, 3),
            dout: act(s * h * hd, 4),
            seg: be.upload_ids(&vec![0; s]).unwrap(),
            out: zeros(s * h * hd, DType::Act),
            lse: zeros(s * h, DType::F32),
            dq: zeros(s * h * hd, DType::Act),
            dk: zeros(s * kvh * hd, DType::Act),
            dv: zeros(s * kvh * hd, DType::Act),
        }
    }
}

fn report(what: &str, ms: f32, flops: f64, bytes: f64) {
    let tf = if flops > 0.0 { format!("{:7.1} TFLOP/s", flops / ms as f64 / 1e9) } else { String::new() };
    let gb = if bytes > 0.0 { format!("{:7.0} GB/s", bytes / ms as f64 / 1e6) } else { String::new() };
    println!("BENCH {what:<52} {ms:9.3} ms {tf} {gb}");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn ops_at_llama3_8b_shapes() {
    let be = CudaBackend::new().unwrap_or_else(|e| panic!("this test needs a CUDA GPU: {e}"));
    println!("DEVICE {}", be.device().name);
    let (s, d, f, h, kvh, hd, vocab) = (2048usize, 4096usize, 14336usize, 32usize, 8usize, 128usize, 128256usize);
    let n = s;
    let act = |len: usize, seed: u64, a: f32| be.upload(&fast_random(len, seed, a), DType::Act).unwrap();

    // Attention, causal, GQA 4.
    let shape = AttnShape { batch: 1, seq: s, heads: h, kv_heads: kvh, head_dim: hd, ..Default::default() };
    let (q, k, v) = (act(n * h * hd, 1, 1.0), act(n * kvh * hd, 2, 1.0), act(n * kvh * hd, 3, 1.0));
    let seg = be.upload_ids(&vec![0; n]).unwrap();
    let mut out = be.alloc(n * h * hd, DType::Act).unwrap();
    let mut lse = be.alloc(n * h, DType::F32).unwrap();
    let attn_flops = 4.0 * (s * s) as f64 / 2.0 * (h * hd) as f64;
    let dout = act(n * h * hd, 4, 1.0);
    let (mut dq, mut dk, mut dv) = (
        be.alloc(n * h * hd, DType::Act).unwrap(),
        be.alloc(n * kvh * hd, DType::Act).unwrap(),
        be.alloc(n * kvh * hd, DType::Act).unwrap(),
    );
    let kern = be.attention_kernels(hd).unwrap();
    be.reserve_attention(shape).unwrap();
    let ms = median_ms(&be, 10, || be.attention_fwd(&q, &k, &v, &seg, shape, &mut out, &mut lse));
    report(&format!("attention fwd {} (s=2048, 32/8 heads, hd 128)", kern.fwd.kernel.symbol()), ms, attn_flops, 0.0);
    let ms = median_ms(&be, 10, || be.attention_bwd(&dout, &q, &k, &v, &out, &lse, &seg, shape, &mut dq, &mut dk, &mut dv));
    // Useful work of a backward: 2.5x the forward (dQ, dK, dV, and recomputing P).
    report(&format!("attention bwd {}", kern.bwd.kernel.symbol()), ms, 2.5 * attn_flops, 0.0);

    // NF4 linear: gate/up shape, dequant + GEMM, then with LoRA r=16, then the backward.
    let wq = Nf4Tensor::quantize(&fast_random(f * d, 5, 0.03), &[f, d]);
    let w = be.upload_weight(&HostWeight::Nf4(wq), None).unwrap();
    let x = act(n * d, 6, 1.0);
    let mut y = be.alloc(n * f, DType::Act).unwrap();
    let dims = LinearDims { n, inp: d, out: f };
    let gemm_flops = 2.0 * (n * d * f) as f64;
    let ms = median_ms(&be, 10, || be.dequantize_to_scratch(&w));
    report("nf4 dequant 14336x4096 -> bf16 scratch", ms, 0.0, (f * d / 2 + f * d / 64 + 2 * f * d) as f64);
    let ms = median_ms(&be, 10, || be.linear_fwd(&x, &w, None, dims, &mut y));
    report("linear fwd nf4 4096->14336 (dequant + GEMM)", ms, gemm_flops, 0.0);
    let r = 16;
    let (la, lb) = (act(r * d, 7, 0.02), act(f * r, 8, 0.02));
    let mut xa = be.alloc(n * r, DType::Act).unwrap();
    let ms = median_ms(&be, 10, || {
        be.linear_fwd(&x, &w, Some(LoraFwd { a: &la, b: &lb, rank: r, scale: 2.0, x_lora: &x, xa: &mut xa }), dims, &mut y)
    });
    report("linear fwd nf4 + LoRA r=16", ms, gemm_flops, 0.0);
    let dy = act(n * f, 9, 1.0);
    let mut dx = be.alloc(n * d, DType::Act).unwrap();
    let (mut ga, mut gb) = (be.alloc(r * d, DType::F32).unwrap(), be.alloc(f * r, DType::F32).unwrap());
    let mut scr = be.alloc(n * r, DType::Act).unwrap();
    let ms = median_ms(&be, 10, || {
        be.linear_bwd(
            &dy,
            &w,
            Some(LoraBwd { a: &la, b: &lb, rank: r, scale: 2.0, x_lora: &x, xa: &xa, grad_a: &mut ga, grad_b: &mut gb, scratch: &mut scr }),
            dims,
            &mut dx,
            true,
            None,
        )
    });
    report("linear bwd nf4 + LoRA r=16", ms, gemm_flops, 0.0);

    // Elementwise and row ops (bytes: each input read once, each output written once).
    let (g, u) = (act(n * f, 10, 3.0), act(n * f, 11, 1.0));
    let mut m = be.alloc(n * f, DType::Act).unwrap();
    let ms = median_ms(&be, 20, || be.swiglu_fwd(&g, &u, n * f, &mut m));
    report("swiglu fwd (2048 x 14336)", ms, 0.0, (3 * n * f * 2) as f64);
    let (mut dg, mut du) = (be.alloc(n * f, DType::Act).unwrap(), be.alloc(n * f, DType::Act).unwrap());
    let ms = median_ms(&be, 20, || be.swiglu_bwd(&m, &g, &u, n * f, &mut dg, &mut du));
    report("swiglu bwd", ms, 0.0, (5 * n * f * 2) as f64);
    let nw = be.upload(&vec![1.0; d], DType::Act).unwrap();
    let mut hn = be.alloc(n * d, DType::Act).unwrap();
    let mut inv = be.alloc(n, DType::F32).unwrap();
    let ms = median_ms(&be, 20, || be.rmsnorm_fwd(&x, &nw, RmsNorm::plain(1e-5), n, d, &mut hn, &mut inv));
    report("rmsnorm fwd (2048 x 4096)", ms, 0.0, (2 * n * d * 2) as f64);
    let ms = median_ms(&be, 20, || be.rmsnorm_bwd(&hn, &x, &nw, RmsNorm::plain(1e-5), &inv, n, d, &mut dx, true));
    report("rmsnorm bwd (accumulate)", ms, 0.0, (4 * n * d * 2) as f64);
    let table = be.upload(&fast_random(2 * s * hd / 2, 12, 1.0), DType::F32).unwrap();
    let pos = be.upload_ids(&(0..n as i32).collect::<Vec<_>>()).unwrap();
    let mut qq = act(n * h * hd, 13, 1.0);
    let ms = median_ms(&be, 20, || be.rope(&mut qq, n, h, hd, &pos, &table, false));
    report("rope q (2048 x 32 x 128)", ms, 0.0, (2 * n * h * hd * 2) as f64);

    // Chunked lm_head + CE at the full vocabulary.
    let head = act(vocab * d, 14, 0.02);
    let targets = be.upload_ids(&(0..n as i32).map(|i| (i * 7919) % vocab as i32).collect::<Vec<_>>()).unwrap();
    let mut dh = be.alloc(n * d, DType::Act).unwrap();
    let ms = median_ms(&be, 5, || be.lm_head_ce(&x, &head, &targets, n, d, vocab, 1.0 / n as f32, &mut dh, None).map(|_| ()));
    report("lm_head + CE fwd+bwd (vocab 128256)", ms, 2.0 * 2.0 * (n * d * vocab) as f64, 0.0);
    println!("MEMORY bench buffers {:.1} MiB", be.memory_used() as f64 / 1048576.0);
}

/// Attention alone at Llama-3-8B's shape (32 / 8 heads, head_dim 128, causal, one sequence) for
/// seq 2048 to 32768, as this card runs it (`TUNESTUDIO_CARD` picks another card's instances).
/// Rates count the causal half of the score matrix: forward 2 products, backward 5 (2.5x the
/// forward).
#[test]
#[ignore = "needs a CUDA GPU"]
fn attention_seq_sweep() {
    let be = CudaBackend::new().unwrap_or_else(|e| panic!("this test needs a CUDA GPU: {e}"));
    println!("DEVICE {}", be.device().name);
    let (h, kvh, hd) = (32usize, 8usize, 128usize);
    // What cuDNN's plans ask for beyond their graph tensors, by launch (kv heads of 8, one sequence).
    for s in [2048usize, 8192, 16384, 32768, 65536] {
        let shape = AttnShape { batch: 1, seq: s, heads: h, kv_heads: kvh, head_dim: hd, causal_rows: true, ..Default::default() };
        let fwd = be.cudnn_plan_workspace(shape, false, 1, kvh);
        let bwd: Vec<String> =
            [1, 2, 4, 8].iter().map(|&kvn| format!("{kvn} kv: {:?}", be.cudnn_plan_workspace(shape, true, 1, kvn))).collect();
        println!("BENCH cudnn workspace s={s}: fwd {fwd:?}, bwd {}", bwd.join(", "));
    }
    for s in [2048usize, 8192, 32768] {
        let shape = AttnShape { batch: 1, seq: s, heads: h, kv_heads: kvh, head_dim: hd, ..Default::default() };
        let AttnBuffers { q, k, v, dout, seg, mut out, mut lse, mut dq, mut dk, mut dv } = AttnBuffers::new(&be, shape);
        let flops = 4.0 * (s * s) as f64 / 2.0 * (h * hd) as f64;
        let reps = if s >= 8192 { 5 } else { 10 };
        let kern = be.attention_kernels(hd).unwrap();
        be.reserve_attention(shape).unwrap();
        // Our kernels (segments honoured), then, where this card decides for it, cuDNN's fused
        // attention on the same inputs (rows that attend causally).
        for causal_rows in [false, true] {
            let shape = AttnShape { causal_rows, ..shape };
            let t0 = std::time::Instant::now();
            let on_cudnn = be.attention_on_cudnn(shape);
            if causal_rows && !on_cudnn {
                println!("BENCH attention s={s}: cuDNN not used ({})", be.cudnn_attention().err().unwrap_or_else(|| "declined".into()));
                continue;
            }
            let (fwd_name, bwd_name) = if on_cudnn {
                let name = be.cudnn_attention().unwrap_or_default();
                println!("BENCH attention s={s}: {name} plans built in {:.2} s", t0.elapsed().as_secs_f64());
                (name.clone(), name)
            } else {
                (kern.fwd.kernel.symbol().to_string(), kern.bwd.kernel.symbol().to_string())
            };
            let ms = median_ms(&be, reps, || be.attention_fwd(&q, &k, &v, &seg, shape, &mut out, &mut lse));
            report(&format!("attention fwd {fwd_name} s={s} (32/8 heads, hd 128)"), ms, flops, 0.0);
            let ms = median_ms(&be, reps, || be.attention_bwd(&dout, &q, &k, &v, &out, &lse, &seg, shape, &mut dq, &mut dk, &mut dv));
            report(&format!("attention bwd {bwd_name} s={s}"), ms, 2.5 * flops, 0.0);
        }
    }
}

/// The attention backward at 8K–32K (Llama-3-8B's heads) against how many (sequence, kv head)
/// units one launch takes: the scratch decides the split, and a split launch sees fewer heads.
#[test]
#[ignore = "needs a CUDA GPU"]
fn attention_bwd_split_sweep() {
    let be = CudaBackend::new().unwrap_or_else(|e| panic!("this test needs a CUDA GPU: {e}"));
    println!("DEVICE {}", be.device().name);
    let (h, kvh, hd) = (32usize, 8usize, 128usize);
    for s in [8192usize, 16384, 32768] {
        let shape = AttnShape { batch: 1, seq: s, heads: h, kv_heads: kvh, head_dim: hd, causal_rows: true, ..Default::default() };
        let AttnBuffers { q, k, v, dout, seg, mut out, mut lse, mut dq, mut dk, mut dv } = AttnBuffers::new(&be, shape);
        let flops = 4.0 * (s * s) as f64 / 2.0 * (h * hd) as f64;
        // Room for every kv head of one sequence in one launch.
        be.reserve_attention(AttnShape { seq: s * kvh, ..shape }).unwrap();
        let unit = tunestudio::backend::workspace::attention_unit_bytes(shape);
        be.attention_fwd(&q, &k, &v, &seg, shape, &mut out, &mut lse).unwrap();
        for units in [1usize, 2, 3, 4, 8] {
            be.set_attention_scratch_limit(Some(units * unit));
            let ms = median_ms(&be, 5, || be.attention_bwd(&dout, &q, &k, &v, &out, &lse, &seg, shape, &mut dq, &mut dk, &mut dv));
            report(
                &format!("attention bwd s={s} {units} units per launch (on cuDNN: {})", be.attention_on_cudnn(shape)),
                ms,
                2.5 * flops,
                0.0,
            );
        }
        be.set_attention_scratch_limit(None);
        let ms = median_ms(&be, 5, || be.attention_fwd(&q, &k, &v, &seg, shape, &mut out, &mut lse));
        report(&format!("attention fwd s={s}"), ms, flops, 0.0);
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn train_step_llama3_8b_two_layers() {
    let mut spec = ModelSpec::llama3_8b();
    spec.num_layers = 2;
    for policy in [CheckpointPolicy::Layer] {
        let be = CudaBackend::new().unwrap_or_else(|e| panic!("this test needs a CUDA GPU: {e}"));
        let opts = EngineOptions {
            lora: LoraConfig { r: 16, alpha: 16.0, dropout: 0.0, targets: Target::ALL.to_vec(), rslora: false },
            optim: OptimConfig::default(),
            quantization: Quantization::Nf4,
            batch_size: 1,
            max_seq_len: 2048,
            checkpointing: policy,
            seed: 1,
            mlp_chunk_rows: 0,
            saved_attention: tunestudio::engine::plan::SavedAttention::Off,
            cached_weight_layers: 0,
            hold_mlp_weights: false,
        };
        let t0 = std::time::Instant::now();
        let mut tr = Trainer::new(be, spec.clone(), &FastWeights, opts, None).unwrap();
        let load_s = t0.elapsed().as_secs_f64();
        let ids: Vec<u32> = (0..2048u32).map(|i| (i * 7919) % 128256).collect();
        let labels: Vec<i32> = ids.iter().map(|&x| x as i32).collect();
        let micro = vec![Batch::from_examples(&[(&ids, &labels)], 0, None)];
        tr.train_step(&micro, 1e-4).unwrap();
        tr.backend.synchronize().unwrap();
        let mut times = Vec::new();
        for _ in 0..5 {
            let t = std::time::Instant::now();
            let st = tr.train_step(&micro, 1e-4).unwrap();
            tr.backend.synchronize().unwrap();
            times.push(t.elapsed().as_secs_f64() * 1e3);
            assert!(st.loss.is_finite());
        }
        times.sort_by(f64::total_cmp);
        println!(
            "BENCH train_step 2 layers of Llama-3-8B, seq 2048, NF4, r=16 all targets, {policy:?}: {:.2} ms (load {load_s:.1} s); device memory {:.2} GiB",
            times[2],
            tr.backend.peak_memory() as f64 / 1073741824.0
        );
    }
}
