//! The whole training step (`engine::Trainer`) on the CUDA backend against the CPU reference
//! (`CpuBackend<f32>`), on small random models of each family: Llama-shaped (GQA, head_dim 64,
//! packed rows), Qwen3 (q/k norms, head_dim 128 ≠ hidden / heads, tied) and Gemma 3 (the (1 + w)
//! norms around both blocks, GeGLU, the scaled embedding, local layers with their own RoPE and a
//! sliding window, query_pre_attn_scalar).
//!
//! Both backends see the same weight values: every dense tensor is rounded to bf16 first, and for
//! NF4 the CPU side gets the dequantized weights (what the CUDA kernel produces) as dense ones.
//! What remains is the CUDA path's bf16 activations: each op rounds its output to 2⁻⁹ relative,
//! a few dozen ops deep. Bounds: mean loss within 1e-2 relative (the brief's bound; in practice
//! ~1e-3), LoRA gradients within 5e-2 relative in norm over all adapters (1.5e-1 per tensor,
//! since small tensors average fewer roundings).
//!
//! Run on a GPU host: `cargo test --release --test gpu_step -- --ignored --test-threads=1`.

mod model_support;

use model_support::RandomWeights;

use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tunestudio::backend::cpu::CpuBackend;
use tunestudio::backend::cuda::CudaBackend;
use tunestudio::backend::cuda::nf4::Nf4Parts;
use tunestudio::backend::{Backend, HostWeight};
use tunestudio::config::{CheckpointPolicy, LoraConfig, OptimConfig, Quantization, Target};
use tunestudio::data::Batch;
use tunestudio::engine::lora::LoraWeights;
use tunestudio::engine::model::WeightSource;
use tunestudio::engine::plan::SavedAttention;
use tunestudio::engine::{EngineOptions, Trainer};
use tunestudio::model::ModelSpec;
use tunestudio::model::arch::{Family, MlpActivation, Rope, RopeScaling};
use tunestudio::quant::nf4::Nf4Tensor;

fn rb(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

/// Random weights rounded to bf16; NF4 linears quantized, and for the CPU handed over dequantized.
struct SameWeights {
    inner: RandomWeights,
    for_cpu: bool,
}

impl WeightSource for SameWeights {
    fn dense(&self, name: &str, shape: &[usize]) -> tunestudio::Result<Vec<f32>> {
        Ok(self.inner.dense(name, shape)?.into_iter().map(rb).collect())
    }
    fn has(&self, name: &str) -> bool {
        self.inner.has(name)
    }
    fn linear(&self, name: &str, shape: (usize, usize), quant: Quantization) -> tunestudio::Result<HostWeight> {
        let data = self.dense(name, &[shape.0, shape.1])?;
        Ok(match quant {
            Quantization::Bf16 => HostWeight::Dense { out_features: shape.0, in_features: shape.1, data },
            Quantization::Nf4 => {
                let q = Nf4Tensor::quantize(&data, &[shape.0, shape.1]);
                if self.for_cpu {
                    let deq = Nf4Parts::of(&q).dequantize_reference().into_iter().map(rb).collect();
                    HostWeight::Dense { out_features: shape.0, in_features: shape.1, data: deq }
                } else {
                    HostWeight::Nf4(q)
                }
            }
        })
    }
}

fn spec(qkv_bias: bool) -> ModelSpec {
    ModelSpec {
        vocab_size: 1000,
        hidden_size: 256,
        intermediate_size: 512,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        head_dim: 64,
        max_position_embeddings: 256,
        qkv_bias,
        tie_word_embeddings: false,
        ..ModelSpec::llama3_8b()
    }
}

/// Qwen3 in small: per-head q/k norms, a head_dim of its own, tied embeddings.
fn qwen3_spec() -> ModelSpec {
    ModelSpec {
        family: Family::Qwen3,
        model_type: "qwen3".into(),
        head_dim: 128,
        qk_norm: true,
        tie_word_embeddings: true,
        rms_norm_eps: 1e-6,
        ..spec(false)
    }
}

/// Gemma 3 in small, layer 0 local (window `window`, θ 10 000), layer 1 global (θ 1e6, linear ×8).
fn gemma3_spec(head_dim: usize, window: usize) -> ModelSpec {
    ModelSpec {
        family: Family::Gemma3,
        model_type: "gemma3_text".into(),
        head_dim,
        qk_norm: true,
        norm_weight_offset: 1.0,
        sandwich_norms: true,
        mlp_activation: MlpActivation::GeluTanh,
        embed_scale: Some((256f32).sqrt()),
        attn_scale: Some(1.0 / 12.0),
        sliding_window: Some(window),
        sliding_layers: vec![true, false],
        local_rope: Some(Rope { theta: 10_000.0, scaling: None }),
        rope_theta: 1_000_000.0,
        rope_scaling: Some(RopeScaling::Linear { factor: 8.0 }),
        tie_word_embeddings: true,
        rms_norm_eps: 1e-6,
        ..spec(false)
    }
}

/// Two rows of 96: row 0 packs two examples (positions restart, segments 0 and 1), row 1 is one
/// example with a padding tail. Prompt tokens of each example are not trained.
fn batch(rng: &mut ChaCha8Rng, vocab: u32) -> Batch {
    let seq = 96;
    let mut b = Batch {
        batch_size: 2,
        seq_len: seq,
        input_ids: vec![0; 2 * seq],
        targets: vec![-100; 2 * seq],
        positions: vec![0; 2 * seq],
        segments: vec![0; 2 * seq],
    };
    let examples: [(usize, usize, usize, u32); 3] = [(0, 0, 50, 0), (0, 50, 46, 1), (1, 0, 80, 0)];
    for (row, start, len, seg) in examples {
        let ids: Vec<u32> = (0..len).map(|_| rng.random_range(0..vocab)).collect();
        for t in 0..len {
            let i = row * seq + start + t;
            b.input_ids[i] = ids[t];
            b.positions[i] = t as u32;
            b.segments[i] = seg;
            if t + 1 < len && t >= 5 {
                b.targets[i] = ids[t + 1] as i32;
            }
        }
    }
    for t in 80..seq {
        b.segments[seq + t] = 7;
        b.positions[seq + t] = t as u32;
    }
    b
}

fn options(quant: Quantization, policy: CheckpointPolicy, dropout: f64, mlp_chunk_rows: usize) -> EngineOptions {
    EngineOptions {
        lora: LoraConfig { r: 16, alpha: 32.0, dropout, targets: Target::ALL.to_vec(), rslora: false },
        optim: OptimConfig { lr: 1e-3, ..OptimConfig::default() },
        quantization: quant,
        batch_size: 2,
        max_seq_len: 96,
        checkpointing: policy,
        seed: 5,
        mlp_chunk_rows,
        saved_attention: SavedAttention::Off,
        cached_weight_layers: 0,
        hold_mlp_weights: false,
    }
}

/// LoRA init with B random (PEFT's zero B would make every dA zero).
fn lora_init(spec: &ModelSpec, cfg: &LoraConfig) -> LoraWeights {
    let mut init = LoraWeights::init(spec, cfg, 21);
    let mut rng = ChaCha8Rng::seed_from_u64(22);
    for layer in &mut init.layers {
        for p in layer.values_mut() {
            p.b.iter_mut().for_each(|v| *v = rng.random_range(-0.05..0.05));
        }
    }
    init
}

fn flatten(w: &LoraWeights) -> Vec<(String, Vec<f32>)> {
    let mut out = Vec::new();
    for (l, layer) in w.layers.iter().enumerate() {
        for (t, p) in layer {
            out.push((format!("layer{l}.{t:?}.A"), p.a.clone()));
            out.push((format!("layer{l}.{t:?}.B"), p.b.clone()));
        }
    }
    out
}

fn rel(a: &[f32], b: &[f32]) -> f64 {
    assert!(a.iter().all(|x| x.is_finite()), "non-finite CUDA gradient");
    let num: f64 = a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

fn compare_step(name: &str, spec: ModelSpec, quant: Quantization, policy: CheckpointPolicy, dropout: f64, mlp_chunk_rows: usize) {
    compare_step_kept(name, spec, quant, policy, dropout, mlp_chunk_rows, None, SavedAttention::Off)
}

/// [`compare_step`] with `layer` checkpointing keeping the last `kept` layers' activations (both
/// backends), as `auto` does when only some fit, and the recomputed layers keeping attention's
/// output where `attention` says.
#[allow(clippy::too_many_arguments)]
fn compare_step_kept(
    name: &str,
    spec: ModelSpec,
    quant: Quantization,
    policy: CheckpointPolicy,
    dropout: f64,
    mlp_chunk_rows: usize,
    kept: Option<usize>,
    attention: SavedAttention,
) {
    let opts = EngineOptions { saved_attention: attention, ..options(quant, policy, dropout, mlp_chunk_rows) };
    compare_step_opts(name, spec, opts, kept)
}

/// [`compare_step`] with the options as given and `layer` checkpointing keeping the last `kept`
/// layers' activations.
fn compare_step_opts(name: &str, spec: ModelSpec, opts: EngineOptions, kept: Option<usize>) {
    let attention = opts.saved_attention;
    let weights = RandomWeights::new(&spec, 3, 0.05);
    let init = lora_init(&spec, &opts.lora);
    let cuda = CudaBackend::new().unwrap_or_else(|e| panic!("this test needs a CUDA GPU: {e}"));
    let cpu_src = SameWeights { inner: RandomWeights { spec: spec.clone(), tensors: weights.tensors.clone() }, for_cpu: true };
    let gpu_src = SameWeights { inner: weights, for_cpu: false };
    let mut tc = Trainer::with_kept_layers(CpuBackend::<f32>::new(), spec.clone(), &cpu_src, opts.clone(), Some(&init), kept).unwrap();
    let mut tg = Trainer::with_kept_layers(cuda, spec.clone(), &gpu_src, opts.clone(), Some(&init), kept).unwrap();
    if let Some(k) = kept {
        assert_eq!(tg.kept_layers(), k, "{name}: kept layers");
    }
    assert_eq!(tg.saved_attention(), attention, "{name}: where attention's output is kept");
    let recomputes_uncached = !tg.keeps_all_activations() && opts.cached_weight_layers < spec.num_layers - tg.kept_layers();
    let held = opts.hold_mlp_weights && opts.quantization == Quantization::Nf4 && recomputes_uncached;
    assert_eq!(tg.mix().hold_mlp_weights, held, "{name}: MLP weights held");
    for (l, layer) in tg.model.layers.iter().enumerate() {
        let cached = opts.quantization == Quantization::Nf4 && l < opts.cached_weight_layers;
        assert!(layer.linears.iter().all(|w| w.is_cached() == cached), "{name}: layer {l} holds its dequantized weights: {cached}");
    }
    let mut rng = ChaCha8Rng::seed_from_u64(31);
    let micro = vec![batch(&mut rng, spec.vocab_size as u32), batch(&mut rng, spec.vocab_size as u32)];

    let lc = tc.compute_gradients(&micro).unwrap();
    let lg = tg.compute_gradients(&micro).unwrap();
    assert_eq!(lc.count, lg.count, "trained tokens");
    let (mc, mg) = (lc.sum / lc.count as f64, lg.sum / lg.count as f64);
    let loss_err = ((mg - mc) / mc).abs();
    println!("RESULT step[{name}] mean loss cpu {mc:.6} cuda {mg:.6} rel_err {loss_err:.3e} bound 1e-2");
    assert!(loss_err <= 1e-2, "{name}: loss differs by {loss_err:e}");

    let (gc, gg) = (flatten(&tc.lora_grads().unwrap()), flatten(&tg.lora_grads().unwrap()));
    let (mut all_c, mut all_g) = (Vec::new(), Vec::new());
    let mut worst = (0.0f64, String::new());
    for ((key, c), (_, g)) in gc.iter().zip(&gg) {
        let e = rel(g, c);
        if e > worst.0 {
            worst = (e, key.clone());
        }
        all_c.extend_from_slice(c);
        all_g.extend_from_slice(g);
    }
    let total = rel(&all_g, &all_c);
    println!("RESULT step[{name}] LoRA grads rel_err {total:.3e} (bound 5e-2); worst tensor {} {:.3e} (bound 1.5e-1)", worst.1, worst.0);
    assert!(total <= 5e-2 && worst.0 <= 1.5e-1, "{name}: LoRA gradients differ ({total:e} overall, {:e} in {})", worst.0, worst.1);

    // A few optimizer steps: losses stay together, and the CUDA step allocates nothing.
    let (allocs, used) = (tg.backend.allocation_count(), tg.backend.memory_used());
    tg.backend.reset_peak_memory();
    for step in 0..3 {
        let sc = tc.train_step(&micro, 1e-3).unwrap();
        let sg = tg.train_step(&micro, 1e-3).unwrap();
        let e = ((sg.loss - sc.loss) / sc.loss).abs();
        println!(
            "RESULT step[{name}] train_step {step}: loss cpu {:.6} cuda {:.6} rel_err {e:.3e}; grad_norm cpu {:.5} cuda {:.5}",
            sc.loss, sg.loss, sc.grad_norm, sg.grad_norm
        );
        assert!(e <= 1e-2, "{name}: step {step} loss differs by {e:e}");
        let ge = ((sg.grad_norm - sc.grad_norm) / sc.grad_norm).abs();
        assert!(ge <= 5e-2, "{name}: step {step} grad norm differs by {ge:e}");
    }
    tg.backend.synchronize().unwrap();
    println!(
        "MEMORY step[{name}] {:.1} MiB in {} allocations; peak during steps {:.1} MiB",
        used as f64 / 1048576.0,
        allocs,
        tg.backend.peak_memory() as f64 / 1048576.0
    );
    assert_eq!(tg.backend.allocation_count(), allocs, "{name}: the step allocated device memory");
    assert_eq!(tg.backend.peak_memory(), used, "{name}: device memory grew during the step");
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn step_bf16_layer_checkpointing() {
    compare_step("bf16, layer checkpointing", spec(false), Quantization::Bf16, CheckpointPolicy::Layer, 0.0, 0);
}

/// Layer inputs in pinned host memory (copied on the copy stream, prefetched a layer ahead), the
/// untied embedding table in pinned host memory, the MLP in row chunks.
#[test]
#[ignore = "needs a CUDA GPU"]
fn step_nf4_offload() {
    compare_step("nf4, offload", spec(false), Quantization::Nf4, CheckpointPolicy::Offload, 0.0, 0);
}

/// The MLP recomputed in row chunks that do not divide the rows (192 rows, chunks of 40).
#[test]
#[ignore = "needs a CUDA GPU"]
fn step_bf16_layer_chunked_mlp() {
    // One layer kept whole (MLP over all rows), the other recomputed in MLP chunks.
    compare_step_kept(
        "nf4, layer, 1 of 2 layers kept, MLP chunks of 40 rows",
        spec(true),
        Quantization::Nf4,
        CheckpointPolicy::Layer,
        0.1,
        40,
        Some(1),
        SavedAttention::Off,
    );
    compare_step_kept(
        "gemma3, bf16, layer, 1 of 2 layers kept",
        gemma3_spec(128, 96),
        Quantization::Bf16,
        CheckpointPolicy::Layer,
        0.0,
        40,
        Some(1),
        SavedAttention::Off,
    );
    compare_step("bf16, layer, MLP chunks of 40 rows", spec(true), Quantization::Bf16, CheckpointPolicy::Layer, 0.1, 40);
}

/// Recomputed layers that keep attention's output from the forward and skip its second forward:
/// on the device (swapped into the shared activations), and in pinned host memory (out through the
/// stage on the copy stream, back one layer ahead), alongside offloaded inputs.
#[test]
#[ignore = "needs a CUDA GPU"]
fn step_saved_attention_output() {
    use SavedAttention::{Device, Host};
    let (nf4, layer) = (Quantization::Nf4, CheckpointPolicy::Layer);
    compare_step_kept("nf4, layer, 1 of 2 kept, MLP chunks, attention output on the GPU", spec(true), nf4, layer, 0.1, 40, Some(1), Device);
    compare_step_kept("nf4, offload, attention output in host memory", spec(false), nf4, CheckpointPolicy::Offload, 0.0, 0, None, Host);
    compare_step_kept("qwen3, bf16, layer, attention output in host memory", qwen3_spec(), Quantization::Bf16, layer, 0.0, 0, None, Host);
    compare_step_kept("gemma3, nf4, layer, attention output on the GPU", gemma3_spec(128, 96), nf4, layer, 0.0, 0, None, Device);
}

/// NF4 weights dequantized once for the run: the GEMMs read the copies of the first layers and
/// dequantize the others per call, under each checkpointing mix (kept, recomputed with MLP row
/// chunks, offloaded with attention's output in host memory).
#[test]
#[ignore = "needs a CUDA GPU"]
fn step_cached_dequantized_weights() {
    let nf4 = |policy, cached, chunk| EngineOptions { cached_weight_layers: cached, ..options(Quantization::Nf4, policy, 0.1, chunk) };
    compare_step_opts("nf4, keep all, weights of every layer dequantized once", spec(true), nf4(CheckpointPolicy::None, 2, 0), None);
    compare_step_opts(
        "nf4, layer, 1 of 2 kept, MLP chunks, weights of layer 0 dequantized once",
        spec(true),
        nf4(CheckpointPolicy::Layer, 1, 40),
        Some(1),
    );
    compare_step_opts(
        "nf4, offload, attention output in host memory, weights of layer 0 dequantized once",
        spec(false),
        EngineOptions { saved_attention: SavedAttention::Host, ..nf4(CheckpointPolicy::Offload, 1, 0) },
        None,
    );
    compare_step_opts(
        "gemma3, nf4, layer, every layer's weights dequantized once",
        gemma3_spec(128, 96),
        nf4(CheckpointPolicy::Layer, 2, 0),
        None,
    );
}

/// The MLP's NF4 weights held through a recomputed layer's row chunks (dequantized once per pass
/// into buffers of their own, the least recently used replaced): recomputed with MLP chunks, one
/// layer kept; offloaded with chunks; Gemma 3 with chunks; and with layer 0's weights cached.
#[test]
#[ignore = "needs a CUDA GPU"]
fn step_mlp_weights_held() {
    let held = |policy, cached, chunk| EngineOptions {
        cached_weight_layers: cached,
        hold_mlp_weights: true,
        ..options(Quantization::Nf4, policy, 0.1, chunk)
    };
    compare_step_opts("nf4, layer, MLP chunks of 40 rows, MLP weights held", spec(true), held(CheckpointPolicy::Layer, 0, 40), None);
    compare_step_opts("nf4, layer, 1 of 2 kept, MLP chunks, MLP weights held", spec(false), held(CheckpointPolicy::Layer, 0, 40), Some(1));
    compare_step_opts("nf4, offload, MLP chunks, MLP weights held", spec(true), held(CheckpointPolicy::Offload, 0, 64), None);
    compare_step_opts("gemma3, nf4, layer, MLP chunks, MLP weights held", gemma3_spec(128, 96), held(CheckpointPolicy::Layer, 0, 40), None);
    compare_step_opts("nf4, layer, MLP chunks, layer 0 cached, MLP weights held", spec(true), held(CheckpointPolicy::Layer, 1, 40), None);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn step_nf4_keep_all_dropout_qkv_bias() {
    compare_step("nf4, keep all, dropout 0.1, qkv bias", spec(true), Quantization::Nf4, CheckpointPolicy::None, 0.1, 0);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn step_qwen3_nf4_layer_checkpointing() {
    compare_step("qwen3, nf4, layer checkpointing", qwen3_spec(), Quantization::Nf4, CheckpointPolicy::Layer, 0.0, 0);
    compare_step("qwen3, bf16, keep all, dropout 0.1", qwen3_spec(), Quantization::Bf16, CheckpointPolicy::None, 0.1, 0);
    compare_step("qwen3, bf16, offload, MLP chunks of 40 rows", qwen3_spec(), Quantization::Bf16, CheckpointPolicy::Offload, 0.0, 40);
}

/// Gemma 3 with head_dim 128 and a window as long as the sequence (the local layer's mask is then
/// plain causal): the norms, GeGLU, embedding scale, softmax scale and per-layer RoPE.
#[test]
#[ignore = "needs a CUDA GPU"]
fn step_gemma3_nf4_window_not_masking() {
    compare_step("gemma3, nf4, layer checkpointing", gemma3_spec(128, 96), Quantization::Nf4, CheckpointPolicy::Layer, 0.0, 0);
    compare_step("gemma3, bf16, keep all, dropout 0.1", gemma3_spec(128, 96), Quantization::Bf16, CheckpointPolicy::None, 0.1, 0);
    compare_step("gemma3, nf4, layer, MLP chunks of 40 rows", gemma3_spec(128, 96), Quantization::Nf4, CheckpointPolicy::Layer, 0.0, 40);
}

/// Gemma 3 as published: head_dim 256 and a window (32) shorter than the sequence, which masks.
#[test]
#[ignore = "needs a CUDA GPU"]
fn step_gemma3_sliding_window_head_dim_256() {
    compare_step("gemma3, head_dim 256, window 32, nf4", gemma3_spec(256, 32), Quantization::Nf4, CheckpointPolicy::Layer, 0.0, 0);
}
