//! `tunestudio bench --generate`: prefill and decode speed of a real model shape on the GPU with
//! random weights (no files): the NF4 base with a LoRA adapter on all seven linears, kept apart
//! and switched on (the path the Chat page runs), batch 1. Decode is timed end to end per token as
//! a user sees it: the forward, the logits' copy to the host and the greedy choice.

use std::time::Instant;

use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::backend::Backend;
use crate::backend::cuda::CudaBackend;
use crate::bench::BenchWeights;
use crate::config::{LoraConfig, Quantization, Target};
use crate::engine::infer::{InferAdapter, InferOptions, Inference};
use crate::engine::lora::LoraWeights;
use crate::error::{Error, Result};
use crate::model::ModelSpec;

#[derive(Debug, Clone)]
pub struct DecodeBenchArgs {
    pub shape: String,
    pub rank: usize,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct DecodeBenchResult {
    pub card: String,
    pub shape: String,
    pub rank: usize,
    pub prompt_tokens: usize,
    pub new_tokens: usize,
    pub prefill_ms: f64,
    pub prefill_tokens_per_s: f64,
    /// Median milliseconds per generated token, and its rate.
    pub decode_ms_per_token: f64,
    pub decode_tokens_per_s: f64,
    /// Every token's time, in order.
    pub decode_ms: Vec<f64>,
    pub setup_s: f64,
    /// Device bytes the backend holds (weights, adapter, cache, scratch).
    pub memory_bytes: u64,
}

pub fn run(args: &DecodeBenchArgs, log: &dyn Fn(&str)) -> Result<DecodeBenchResult> {
    let spec = ModelSpec::by_shape_name(&args.shape)
        .ok_or_else(|| Error::arg("--shape", format!("unknown shape `{}` ({})", args.shape, ModelSpec::SHAPE_NAMES.join(", "))))?;
    let t0 = Instant::now();
    let be = CudaBackend::new()?;
    let card = be.device().name;
    log(&format!("{card}: building a random {} (NF4, LoRA r = {} on all seven linears) …", args.shape, args.rank));
    let weights = BenchWeights::new(Quantization::Nf4, &spec);
    let lora = LoraConfig { r: args.rank, alpha: args.rank as f64, dropout: 0.0, targets: Target::ALL.to_vec(), rslora: false };
    let mut adapter = LoraWeights::init(&spec, &lora, 7);
    // Non-zero B so the adapter's work is real (PEFT's zero B would make it a no-op only in value).
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(8);
    for layer in &mut adapter.layers {
        for p in layer.values_mut() {
            p.b.iter_mut().for_each(|v| *v = rng.random_range(-0.01..0.01));
        }
    }
    let capacity = args.prompt_tokens + args.new_tokens + 1;
    let opts = InferOptions { chunk_rows: args.prompt_tokens.clamp(1, 2048), ..InferOptions::new(Quantization::Nf4, 1, capacity) };
    let infer_adapter = InferAdapter { lora, weights: adapter, token_rows: None };
    let mut inf = Inference::new(be, spec.clone(), &weights, opts, Some(&infer_adapter))?;
    inf.set_adapter(0, true)?;
    let setup_s = t0.elapsed().as_secs_f64();
    let prompt: Vec<u32> = (0..args.prompt_tokens).map(|i| ((i * 7919 + 13) % spec.vocab_size) as u32).collect();
    // Warm-up: one short prefill and a few decode steps (module loading, first-use allocations).
    inf.forward(&[(0, &prompt[..prompt.len().min(16)])])?;
    for t in 0..4u32 {
        inf.forward(&[(0, &[t])])?;
    }
    inf.truncate(0, 0)?;
    inf.backend().synchronize()?;
    let t = Instant::now();
    let mut logits = inf.forward(&[(0, &prompt)])?.pop().unwrap_or_default();
    let prefill_ms = t.elapsed().as_secs_f64() * 1e3;
    log(&format!("prefill {} tokens: {prefill_ms:.1} ms", args.prompt_tokens));
    let mut times = Vec::with_capacity(args.new_tokens);
    for _ in 0..args.new_tokens {
        let t = Instant::now();
        let next = crate::generate::sample::argmax(&logits);
        logits = inf.forward(&[(0, &[next])])?.pop().unwrap_or_default();
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN);
    log(&format!("decode: median {median:.2} ms per token ({:.1} tokens/s)", 1e3 / median));
    Ok(DecodeBenchResult {
        card,
        shape: args.shape.clone(),
        rank: args.rank,
        prompt_tokens: args.prompt_tokens,
        new_tokens: args.new_tokens,
        prefill_ms,
        prefill_tokens_per_s: args.prompt_tokens as f64 / (prefill_ms / 1e3),
        decode_ms_per_token: median,
        decode_tokens_per_s: 1e3 / median,
        decode_ms: times,
        setup_s,
        memory_bytes: inf.backend().memory_used() as u64,
    })
}
