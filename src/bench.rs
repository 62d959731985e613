//! `tunestudio bench`: a training step of a real model shape on the GPU with random weights (no
//! files), QLoRA on all seven linears, batch 1, random token ids. Reports the median step's
//! tokens/s, device memory (driver-measured, the backend's own count, and the plan's prediction),
//! and MFU against the card's measured bf16 GEMM rate.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

use crate::backend::cuda::profile::KernelTime;
use crate::backend::cuda::{CudaBackend, CudaOptions};
use crate::backend::{Backend, DType, HostWeight, LinearDims};
use crate::config::DeviceChoice;
use crate::config::{CheckpointPolicy, LoraConfig, OptimConfig, Quantization, Target};
use crate::data::Batch;
use crate::device::{Gpu, Machine, Request, plan_target};
use crate::engine::model::WeightSource;
use crate::engine::plan::{self, PlanInput, PlanTarget};
use crate::engine::{EngineOptions, Trainer};
use crate::error::{Error, Result};
use crate::model::ModelSpec;
use crate::quant::nf4::Nf4Tensor;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BenchMode {
    /// The fastest policy that fits the card (`auto`).
    Speed,
    /// Least device memory: layer inputs offloaded to pinned host memory, MLP in chunks.
    Memory,
}

#[derive(Debug, Clone)]
pub struct BenchArgs {
    pub shape: String,
    pub seq: usize,
    pub steps: usize,
    pub warmup: usize,
    pub mode: BenchMode,
    pub rank: usize,
    /// Force a policy instead of the mode's choice (plan-vs-measured grids).
    pub checkpointing: Option<CheckpointPolicy>,
    /// After the timed steps, one more step with every kernel and GEMM timed by events.
    pub profile: bool,
    /// Decide as this card would (`--card`); `None`: `TUNESTUDIO_CARD`, else the device.
    pub card: Option<&'static crate::backend::card::CardProfile>,
    /// A hard cap on the process's device memory (`--gpu-mem`).
    pub gpu_mem_bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub card: String,
    pub shape: String,
    pub seq: usize,
    pub rank: usize,
    pub mode: BenchMode,
    pub checkpointing: CheckpointPolicy,
    /// Layers whose activations were kept (all under `none`; under `auto` with a cap, what fits).
    pub kept_layers: usize,
    /// Where the recomputed layers kept attention's output (`off`: their recompute ran it again).
    pub saved_attention: crate::engine::plan::SavedAttention,
    /// Layers whose NF4 linears were dequantized once for the run instead of at every GEMM.
    pub cached_weight_layers: usize,
    /// Whether the recomputed layers' MLP weights were dequantized once per pass.
    pub hold_mlp_weights: bool,
    /// The card profile the backend decided as (`--card`), if any.
    pub card_profile: Option<String>,
    /// The memory of the card (of the profile, under one) in GiB.
    pub card_memory_gib: f64,
    /// The memory cap (`--gpu-mem`) in GiB, if any.
    pub gpu_mem_cap_gib: Option<f64>,
    /// The attention kernels this card runs for the shape's head dim (forward + backward), or
    /// cuDNN's fused attention where it ran the first layer's.
    pub attention: String,
    pub steps: usize,
    pub step_ms: Vec<f64>,
    pub median_step_ms: f64,
    pub tokens_per_s: f64,
    /// Device bytes in use by this process at its peak (total − free, sampled after set-up and
    /// after every step), minus what other processes held before we started.
    pub peak_driver_bytes: u64,
    /// `peak_driver_bytes` in GiB.
    pub peak_gib: f64,
    /// What the backend allocated at its peak (no context).
    pub peak_arena_bytes: u64,
    /// The memory plan's peak (context included) and its arena part.
    pub plan_peak_bytes: u64,
    pub plan_arena_bytes: u64,
    /// The CUDA context + modules + library handles, measured before any allocation of ours.
    pub context_bytes: u64,
    /// Device bytes other processes held when the backend opened (not counted in the peaks).
    pub others_bytes: u64,
    /// The plan's terms (ours, and `other_processes` as NVML saw them when the run was planned).
    pub plan_terms: BTreeMap<&'static str, u64>,
    /// Driver-reported bytes in use after set-up (before the first step) and after the first
    /// step: what grows in between is not ours (lazily loaded library code, for one).
    pub driver_after_setup_bytes: u64,
    pub driver_after_first_step_bytes: u64,
    pub pinned_host_bytes: u64,
    pub gemm_tflops: f64,
    pub model_tflop_per_step: f64,
    pub mfu: f64,
    pub first_step_s: f64,
    pub setup_s: f64,
    pub loss_first: f64,
    pub loss_last: f64,
    /// Per-kernel times of one extra profiled step (`--profile`), the most expensive first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub kernels: Vec<KernelTime>,
}

const GIB: f64 = (1u64 << 30) as f64;

fn hash(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Uniform values in (−a, a) from a counter hash, in parallel (an 8B model needs no RNG stream).
fn random_uniform(n: usize, seed: u64, a: f32) -> Vec<f32> {
    (0..n)
        .into_par_iter()
        .map(|i| ((hash(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)) >> 40) as f32 / 16_777_216.0 * 2.0 - 1.0) * a)
        .collect()
}

/// Random weights in the exact shape: one random NF4 tensor per distinct linear shape, shared by
/// every layer (the values do not change the speed or the memory, but they are never zeros).
pub(crate) struct BenchWeights {
    quant: Quantization,
    tied: bool,
    /// What norm weights sit around: 1, or 0 where the model adds the 1 (Gemma).
    norm_base: f32,
    cache: Mutex<BTreeMap<(usize, usize), HostWeight>>,
}

impl BenchWeights {
    /// Random weights of `spec`'s shape (the decode benchmark of `generate::bench` uses them too).
    pub(crate) fn new(quant: Quantization, spec: &ModelSpec) -> Self {
        BenchWeights { quant, tied: spec.tie_word_embeddings, norm_base: 1.0 - spec.norm_weight_offset, cache: Mutex::new(BTreeMap::new()) }
    }
}

impl WeightSource for BenchWeights {
    fn dense(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let n: usize = shape.iter().product();
        let seed = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
        Ok(if name.contains("norm") {
            random_uniform(n, seed, 0.1).into_iter().map(|x| self.norm_base + x).collect()
        } else {
            random_uniform(n, seed, 0.035)
        })
    }
    fn has(&self, name: &str) -> bool {
        !(name.ends_with(".bias") || self.tied && name == "lm_head.weight")
    }
    fn linear(&self, _name: &str, shape: (usize, usize), _quant: Quantization) -> Result<HostWeight> {
        let mut cache = self
            .cache
            .lock()
            .map_err(|_| Error::bug("bench weights", "the weight cache is poisoned (a thread panicked while filling it)"))?;
        let w = cache.entry(shape).or_insert_with(|| {
            let data = random_uniform(shape.0 * shape.1, (shape.0 * 31 + shape.1) as u64, 0.035);
            match self.quant {
                Quantization::Nf4 => HostWeight::Nf4(Nf4Tensor::quantize(&data, &[shape.0, shape.1])),
                Quantization::Bf16 => HostWeight::Dense { out_features: shape.0, in_features: shape.1, data },
            }
        });
        Ok(match w {
            HostWeight::Nf4(t) => HostWeight::Nf4(t.clone()),
            HostWeight::Dense { out_features, in_features, data } => {
                HostWeight::Dense { out_features: *out_features, in_features: *in_features, data: data.clone() }
            }
        })
    }
}

/// The card's bf16 GEMM rate through our own GEMM path (8192³, median of 10).
fn gemm_tflops(be: &CudaBackend) -> Result<f64> {
    let n = 8192;
    let x = be.upload(&random_uniform(n * n, 1, 1.0), DType::Act)?;
    let w = be.upload_weight(&HostWeight::Dense { out_features: n, in_features: n, data: random_uniform(n * n, 2, 0.01) }, None)?;
    let mut y = be.alloc(n * n, DType::Act)?;
    let dims = LinearDims { n, inp: n, out: n };
    be.linear_fwd(&x, &w, None, dims, &mut y)?;
    let mut t: Vec<f32> = (0..10).map(|_| be.time_ms(|| be.linear_fwd(&x, &w, None, dims, &mut y))).collect::<Result<_>>()?;
    t.sort_by(f32::total_cmp);
    Ok(2.0 * (n as f64).powi(3) / (t[5] as f64 / 1e3) / 1e12)
}

/// Model FLOPs of one bsz-1 step with LoRA (no recompute counted): forward and input-gradient
/// GEMMs of every linear and the head, weight gradients of LoRA only, causal attention ×3.
pub fn model_flops_per_step(spec: &ModelSpec, seq: usize, rank: usize) -> f64 {
    let lin = spec.linear_params() as f64 + (spec.vocab_size * spec.hidden_size) as f64;
    let lora = spec.lora_params(rank, &Target::ALL) as f64;
    let pairs = (seq as f64 + 1.0) / 2.0;
    let attn = 4.0 * (spec.num_layers * spec.num_heads * spec.head_dim) as f64 * pairs;
    seq as f64 * (4.0 * lin + 6.0 * lora + 3.0 * attn)
}

/// Device bytes in use on the real card by every process (a profile's limit aside).
fn used_now(be: &CudaBackend) -> Result<u64> {
    be.device_memory_in_use()
}

pub fn run(args: &BenchArgs, log: &dyn Fn(&str)) -> Result<BenchResult> {
    let spec = ModelSpec::by_shape_name(&args.shape)
        .ok_or_else(|| Error::arg("--shape", format!("unknown shape `{}` ({})", args.shape, ModelSpec::SHAPE_NAMES.join(", "))))?;
    let t_start = Instant::now();
    let be = CudaBackend::with_options(&CudaOptions { card: args.card, memory_limit_bytes: args.gpu_mem_bytes })?;
    be.synchronize()?;
    let dev = be.device();
    let card = be.card().clone();
    let mut attention = match be.attention_kernels(spec.head_dim) {
        Ok(k) => format!("{} + {}", k.fwd.kernel.symbol(), k.bwd.kernel.symbol()),
        Err(e) => return Err(Error::Card { card: card.describe(), msg: e }),
    };
    // Everything in use on the card now is other processes, our context and the backend's fixed
    // scratch. NVML measured the context as the backend opened (other processes apart); without
    // NVML the context is whatever is in use but our scratch, which counts other processes too.
    let used0 = used_now(&be)?;
    let context_bytes = be.context_bytes().unwrap_or_else(|| used0.saturating_sub(be.memory_used() as u64));
    let others_bytes = used0.saturating_sub(context_bytes + be.memory_used() as u64);
    let gemm = gemm_tflops(&be)?;
    be.synchronize()?;
    let checkpointing = args.checkpointing.unwrap_or(match args.mode {
        BenchMode::Speed => CheckpointPolicy::Auto,
        BenchMode::Memory => CheckpointPolicy::Offload,
    });
    // The plan target of this backend: its card (a profile's under one), what other processes hold
    // on it, its measured context and the cap. Pinned memory is not held against the host here.
    let machine = Machine { gpu: Some(Gpu::of_backend(&be)), ..Machine::default() };
    let target = plan_target(&Request { device: DeviceChoice::Cuda, card: None, memory_cap: args.gpu_mem_bytes }, &machine);
    let lora = LoraConfig { r: args.rank, alpha: args.rank as f64, dropout: 0.0, targets: Target::ALL.to_vec(), rslora: false };
    let mut input = PlanInput {
        lora: lora.clone(),
        quantization: Quantization::Nf4,
        batch_size: 1,
        max_seq_len: args.seq,
        checkpointing,
        token_rows: 0,
        mlp_chunk_rows: 0,
        samples: None,
    };
    // `auto` (speed mode): the fastest policy that fits what the card leaves us, with the layers
    // whose activations it keeps.
    let resolved = plan::plan(&spec, &input, &target);
    let (policy, kept) = (resolved.checkpointing, resolved.kept_layers);
    input.checkpointing = policy;
    let opts = EngineOptions {
        lora,
        optim: OptimConfig::default(),
        quantization: Quantization::Nf4,
        batch_size: 1,
        max_seq_len: args.seq,
        checkpointing: policy,
        seed: 3407,
        mlp_chunk_rows: 0,
        saved_attention: resolved.attention,
        cached_weight_layers: resolved.cached_weight_layers,
        hold_mlp_weights: resolved.hold_mlp_weights,
    };
    log(&format!("{}: building a random {} (r = {}, seq {}) …", dev.name, args.shape, args.rank, args.seq));
    let weights = BenchWeights::new(Quantization::Nf4, &spec);
    // The GEMM probe's buffers are gone; measure the peak from here.
    be.reset_peak_memory();
    let kept = (policy == CheckpointPolicy::Layer).then_some(kept);
    let mut trainer = Trainer::with_kept_layers(be, spec.clone(), &weights, opts, None, kept)?;
    // Planned with the context this backend measured, as the driver peak is.
    let planned = plan::plan_resolved(&spec, &input, &PlanTarget { context_bytes, ..target.clone() }, trainer.mix());
    let plan_arena_bytes = planned.peak_bytes - context_bytes;
    let setup_s = t_start.elapsed().as_secs_f64();

    let ids: Vec<u32> = (0..args.seq).map(|i| (hash(i as u64 + 17) % spec.vocab_size as u64) as u32).collect();
    let labels: Vec<i32> = ids.iter().map(|&x| x as i32).collect();
    let batch = Batch::from_examples(&[(&ids, &labels)], 0, None);
    let mut peak_driver = used_now(&trainer.backend)?.saturating_sub(others_bytes);
    let driver_after_setup_bytes = peak_driver;
    let mut driver_after_first_step_bytes = 0;
    let mut times = Vec::new();
    let (mut loss_first, mut loss_last) = (f64::NAN, f64::NAN);
    let mut first_step_s = 0.0;
    for i in 0..args.warmup + args.steps {
        let t0 = Instant::now();
        let s = trainer.train_step(std::slice::from_ref(&batch), 1e-5)?;
        trainer.backend.synchronize()?;
        let dt = t0.elapsed().as_secs_f64();
        if i == 0 {
            first_step_s = t_start.elapsed().as_secs_f64();
            driver_after_first_step_bytes = used_now(&trainer.backend)?.saturating_sub(others_bytes);
            loss_first = s.loss;
        }
        loss_last = s.loss;
        peak_driver = peak_driver.max(used_now(&trainer.backend)?.saturating_sub(others_bytes));
        if i >= args.warmup {
            times.push(dt * 1e3);
        }
        log(&format!("step {:>3}  {:8.1} ms  loss {:.4}", i + 1, dt * 1e3, s.loss));
    }
    // Where cuDNN ran this shape's attention (the first layer's: sliding-window layers keep ours).
    let first_layer = crate::backend::AttnShape {
        batch: 1,
        seq: args.seq,
        heads: spec.num_heads,
        kv_heads: spec.num_kv_heads,
        head_dim: spec.head_dim,
        window: spec.layer_window(0),
        softmax_scale: spec.attn_scale,
        causal_rows: batch.rows_attend_causally(),
    };
    if trainer.backend.attention_on_cudnn(first_layer) {
        attention = format!("{} fused attention", trainer.backend.cudnn_attention().unwrap_or_default());
    }
    let kernels = if args.profile {
        trainer.backend.start_profile();
        trainer.train_step(std::slice::from_ref(&batch), 1e-5)?;
        let k = trainer.backend.finish_profile()?;
        let total: f64 = k.iter().map(|k| k.total_ms).sum();
        log(&format!("profiled step: {total:.1} ms of kernels and GEMMs on the compute stream"));
        for k in k.iter().take(25) {
            log(&format!("  {:>8.2} ms {:>5.1}%  {:>5} calls  {}", k.total_ms, 100.0 * k.total_ms / total, k.calls, k.name));
        }
        k
    } else {
        Vec::new()
    };
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN);
    let flops = model_flops_per_step(&spec, args.seq, args.rank);
    let tps = args.seq as f64 / (median / 1e3);
    Ok(BenchResult {
        card: dev.name,
        shape: args.shape.clone(),
        seq: args.seq,
        rank: args.rank,
        mode: args.mode,
        checkpointing: policy,
        kept_layers: trainer.kept_layers(),
        saved_attention: trainer.saved_attention(),
        cached_weight_layers: trainer.cached_weight_layers(),
        hold_mlp_weights: trainer.mix().hold_mlp_weights,
        card_profile: card.profile.map(str::to_string),
        card_memory_gib: card.memory_bytes as f64 / GIB,
        gpu_mem_cap_gib: args.gpu_mem_bytes.map(|b| b as f64 / GIB),
        attention,
        steps: args.steps,
        step_ms: times,
        median_step_ms: median,
        tokens_per_s: tps,
        peak_driver_bytes: peak_driver,
        peak_gib: peak_driver as f64 / GIB,
        peak_arena_bytes: trainer.backend.peak_memory() as u64,
        plan_peak_bytes: planned.peak_bytes,
        plan_arena_bytes,
        context_bytes,
        others_bytes,
        plan_terms: planned.terms.clone(),
        driver_after_setup_bytes,
        driver_after_first_step_bytes,
        pinned_host_bytes: planned.pinned_host_bytes,
        gemm_tflops: gemm,
        model_tflop_per_step: flops / 1e12,
        mfu: flops / (median / 1e3) / (gemm * 1e12),
        first_step_s,
        setup_s,
        loss_first,
        loss_last,
        kernels,
    })
}
