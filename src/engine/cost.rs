//! The step time predicted before Start: what one optimizer step does (FLOPs of the GEMMs and of
//! attention, bytes of the memory-bound kernels, bytes over the host link), divided by how fast the
//! card does each, so that `plan` and the studio can show tokens/s and the run's ETA for a card
//! the user may not have, and for each checkpointing choice.
//!
//! How fast: the card's datasheet rates ([`crate::backend::card::CardSpeed`]) times the fraction of
//! them our kernels reach, [`EFFICIENCY`], which was fitted once to `bench` on an H100 and an H200
//! (`bench --profile` gives each kernel class's share; the measured rows are in the tests below and
//! in bench/results.jsonl). On those cards the prediction is within 12% of the measurement from 2K
//! to 128K tokens and for every policy. On other cards it assumes our kernels reach the same
//! fractions of their datasheet, which nobody has measured yet; it says so where it is shown.
//!
//! The work counted, per decoder layer of `n = batch · seq` rows (`P` = the layer's base weights):
//! - base GEMMs: `2nP` for the forward, again for the input gradient (the base is frozen), and
//!   again for a recomputed layer's second forward;
//! - attention: `4 · head_dim · heads · pairs` for the forward, where `pairs` counts the causal
//!   (query, key) pairs inside the layer's window, 2.5× that for the backward, and the forward again
//!   when recomputed, unless the layer kept its output (`SavedAttention`);
//! - memory-bound bytes: NF4 dequantization (each weight read as nibbles, written in bf16, once per
//!   pass and, in a recomputed layer's MLP, per row chunk unless the mix holds the MLP's weights;
//!   none for a layer whose weights were dequantized once for the run), the skinny LoRA GEMMs (the rows of their inputs and outputs,
//!   per pass), and the norms, RoPE, gates and residual adds;
//! - the head and the loss: `2 · 2 · n · hidden · vocab` and the logits' bytes;
//! - offloaded layer inputs (bf16) and attention outputs kept in host memory, out and back over
//!   the host link, which overlaps compute: only what exceeds the step's compute time is counted.

use serde::Serialize;

use crate::backend::card::{CardLimits, CardSpeed};
use crate::config::{CheckpointPolicy, Quantization};
use crate::engine::plan::{Mix, PlanInput, SavedAttention};
use crate::model::ModelSpec;

/// The fractions of a card's datasheet rates our kernels reach, fitted to the measurements in
/// this module's tests (H100 80GB HBM3 and H200, Llama-3-8B shape, 2K–128K tokens, every policy).
pub struct Efficiency {
    /// Large base GEMMs (cuBLASLt, bf16): ~780 of 989 TFLOP/s on Hopper.
    pub gemm: f64,
    /// Attention forward (causal FLOPs): ~270 TFLOP/s on Hopper at 8K.
    pub attention_fwd: f64,
    /// Attention backward: ~200 TFLOP/s on Hopper.
    pub attention_bwd: f64,
    /// The memory-bound kernels (dequantization, LoRA's skinny GEMMs, element-wise), of the
    /// memory bandwidth.
    pub memory: f64,
    /// Of the host link's peak, for offloaded layer inputs (pinned, asynchronous copies).
    pub host_link: f64,
    /// Per step: the optimizer, the loss's bookkeeping.
    pub fixed_s: f64,
    /// Host time to issue one kernel or GEMM; a step is never shorter than its launches.
    pub launch_s: f64,
}

pub const EFFICIENCY: Efficiency =
    Efficiency { gemm: 0.78, attention_fwd: 0.27, attention_bwd: 0.20, memory: 0.55, host_link: 0.8, fixed_s: 0.003, launch_s: 4e-6 };

/// The same where cuDNN's fused attention runs it (Hopper with the library present,
/// `backend::cuda::cudnn`): its kernels measured at 8K–32K on an H100 (`gpu_bench`'s sweep,
/// 2026-12-06): forward 623–662 TFLOP/s, backward 440–494 (lower at 2K, where attention is a
/// small part of the step).
pub const EFFICIENCY_CUDNN: Efficiency = Efficiency { attention_fwd: 0.66, attention_bwd: 0.48, ..EFFICIENCY };

/// What one micro-step (one batch of `batch_size` rows of `max_seq_len` tokens) costs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct StepWork {
    pub gemm_flops: f64,
    pub attention_fwd_flops: f64,
    pub attention_bwd_flops: f64,
    pub memory_bytes: f64,
    pub host_link_bytes: f64,
    /// Kernel launches: on a small model the CPU cannot issue them as fast as the GPU runs them.
    pub launches: f64,
}

/// The predicted time of one micro-step on a card, and its parts.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepPrediction {
    /// Seconds per micro-step of full rows (`batch_size · max_seq_len` tokens).
    pub step_s: f64,
    pub tokens_per_s: f64,
    /// Seconds per part: GEMMs, attention forward and backward, memory-bound kernels, the part of
    /// the host transfers not hidden behind compute, and the fixed cost.
    pub gemm_s: f64,
    pub attention_s: f64,
    pub memory_s: f64,
    pub host_link_s: f64,
    /// Where the card's speed comes from: "NVIDIA L4 datasheet", or an estimate.
    pub basis: String,
    /// Whether [`EFFICIENCY`] was measured on this class of card (Hopper); elsewhere it is
    /// assumed.
    pub calibrated: bool,
}

impl StepPrediction {
    /// Seconds for `steps` optimizer steps of `grad_accum` micro-steps each.
    pub fn eta_s(&self, steps: u64, grad_accum: usize) -> f64 {
        self.step_s * steps as f64 * grad_accum.max(1) as f64
    }

    /// "~9,100 tokens/s (230 ms per micro-step of 2,048 tokens); 600 steps in about 9m12s; NVIDIA
    /// L4 datasheet, not yet measured on this card". Without a step count (a run sized in epochs,
    /// before its dataset is read) the ETA is left out.
    pub fn summary(&self, steps: Option<u64>, grad_accum: usize) -> String {
        let tokens = (self.tokens_per_s * self.step_s).round() as u64;
        let rate = (self.tokens_per_s / 100.0).round() as u64 * 100;
        let eta =
            steps.map(|n| format!("; {n} steps in about {}", crate::util::fmt_duration(self.eta_s(n, grad_accum)))).unwrap_or_default();
        format!(
            "~{} tokens/s ({} per micro-step of {} tokens){eta}; {}, {}",
            group_thousands(rate),
            if self.step_s < 1.0 { format!("{:.0} ms", self.step_s * 1e3) } else { format!("{:.2} s", self.step_s) },
            group_thousands(tokens),
            self.basis,
            if self.calibrated { "within 12% of bench on H100/H200" } else { "not yet measured on this card" }
        )
    }
}

fn group_thousands(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Causal (query, key) pairs of one sequence of `seq` tokens when each query sees at most `window`
/// keys (itself included).
fn attended_pairs(seq: usize, window: Option<usize>) -> f64 {
    let s = seq as f64;
    match window {
        Some(w) if w < seq => {
            let w = w as f64;
            // The first w queries see 1..=w keys, the others w each.
            w * (w + 1.0) / 2.0 + (s - w) * w
        }
        _ => s * (s + 1.0) / 2.0,
    }
}

/// Layers recomputed in the backward: none under `none`; the first `layers - kept` under `layer`;
/// all under `offload`.
fn recomputed(layer: usize, layers: usize, policy: CheckpointPolicy, kept_layers: usize) -> bool {
    match policy {
        CheckpointPolicy::None => false,
        CheckpointPolicy::Layer | CheckpointPolicy::Auto => layer < layers.saturating_sub(kept_layers),
        CheckpointPolicy::Offload => true,
    }
}

/// The work of one micro-step under a resolved mix.
pub fn step_work(spec: &ModelSpec, input: &PlanInput, mix: Mix) -> StepWork {
    let Mix { policy, kept_layers, attention, cached_weight_layers, hold_mlp_weights } = mix;
    let (batch, seq) = (input.batch_size as f64, input.max_seq_len as f64);
    let n = batch * seq;
    let (d, ff) = (spec.hidden_size as f64, spec.intermediate_size as f64);
    let mut w = StepWork::default();
    let linears: Vec<(f64, f64, bool)> = crate::config::Target::ALL
        .iter()
        .map(|&t| {
            let (out, inp) = spec.linear_shape(t);
            (inp as f64, out as f64, input.lora.targets.contains(&t))
        })
        .collect();
    let params: f64 = linears.iter().map(|(i, o, _)| i * o).sum();
    let mlp_params: f64 = crate::config::Target::ALL
        .iter()
        .zip(&linears)
        .filter(|(t, _)| matches!(t, crate::config::Target::Gate | crate::config::Target::Up | crate::config::Target::Down))
        .map(|(_, (i, o, _))| i * o)
        .sum();
    let attention_params = params - mlp_params;
    // A recomputed layer runs its MLP in row chunks (`plan::ActLayout`), each dequantizing again.
    let rows = input.batch_size * input.max_seq_len;
    let mlp_chunks = rows.div_ceil(crate::engine::plan::mlp_chunk_rows(rows, false, input.mlp_chunk_rows)) as f64;
    let qkv = (spec.q_dim() + 2 * spec.kv_dim()) as f64;
    for l in 0..spec.num_layers {
        let r = if recomputed(l, spec.num_layers, policy, kept_layers) { 1.0 } else { 0.0 };
        w.gemm_flops += 2.0 * n * params * (2.0 + r);
        let fwd = 4.0 * (spec.head_dim * spec.num_heads) as f64 * batch * attended_pairs(input.max_seq_len, spec.layer_window(l));
        let attention_again = if attention == SavedAttention::Off { r } else { 0.0 };
        w.attention_fwd_flops += fwd * (1.0 + attention_again);
        if attention == SavedAttention::Host {
            // Its bf16 output and f32 log-sum-exp, out and back.
            w.host_link_bytes += r * 2.0 * n * (2.0 * spec.q_dim() as f64 + 4.0 * spec.num_heads as f64);
        }
        w.attention_bwd_flops += 2.5 * fwd;
        // LoRA's skinny GEMMs: a forward reads x and writes y (the branch runs first; the base
        // GEMM, compute-bound, adds to y in its epilogue); the backward reads dy twice, x once and
        // updates dx. Two bytes an element.
        let lora: f64 = linears.iter().filter(|l| l.2).map(|(i, o, _)| (i + o) * (1.0 + r) + (3.0 * i + 2.0 * o)).sum();
        w.memory_bytes += 2.0 * n * lora;
        if input.quantization == Quantization::Nf4 && l >= cached_weight_layers {
            // Half a byte read and two written per weight, per pass (forward, backward, recompute),
            // and per MLP row chunk for the MLP's weights, unless the layer's weights were
            // dequantized once for the run.
            let chunks = if r > 0.0 { mlp_chunks } else { 1.0 };
            w.memory_bytes += if r > 0.0 && hold_mlp_weights {
                // Held through the chunks: the MLP's weights once in the forward and once for
                // the recompute and the backward together.
                (attention_params * (2.0 + r) + mlp_params * 2.0) * 2.5
            } else {
                (attention_params + chunks * mlp_params) * 2.5 * (2.0 + r)
            };
        }
        // Norms, RoPE, the gate and the residual adds: about ten rows of `hidden`, three of the
        // MLP's width and two of q/k/v per forward, twice that in the backward.
        w.memory_bytes += 2.0 * n * (10.0 * d + 3.0 * ff + 2.0 * qkv) * (3.0 + r);
        // About 60 kernels and GEMMs per layer and pass (forward, backward, recompute).
        w.launches += 60.0 * (2.0 + r);
    }
    let vocab = spec.vocab_size as f64;
    w.gemm_flops += 2.0 * 2.0 * n * d * vocab;
    w.memory_bytes += 3.0 * 4.0 * n * vocab;
    if policy == CheckpointPolicy::Offload {
        // Each layer's bf16 input, out and back.
        w.host_link_bytes += 2.0 * 2.0 * n * d * spec.num_layers as f64;
    }
    w
}

/// The predicted micro-step on `card` (`None` when no speed is known for it).
pub fn predict(spec: &ModelSpec, input: &PlanInput, mix: Mix, card: &CardLimits) -> Option<StepPrediction> {
    let (speed, basis) = card.speed()?;
    let (e, basis) = if crate::backend::cuda::cudnn::runs_on(card) {
        (&EFFICIENCY_CUDNN, format!("{basis}, attention on cuDNN"))
    } else {
        (&EFFICIENCY, basis)
    };
    let mut p = predict_with(&step_work(spec, input, mix), &speed, e, basis, input.batch_size * input.max_seq_len);
    p.calibrated = card.compute_capability.0 == 9;
    Some(p)
}

/// [`predict`] from the work, the card's speed and the fractions of it our kernels reach.
pub fn predict_with(w: &StepWork, speed: &CardSpeed, e: &Efficiency, basis: String, tokens: usize) -> StepPrediction {
    let flops = speed.bf16_tflops * 1e12;
    let gemm_s = w.gemm_flops / (flops * e.gemm);
    let attention_s = w.attention_fwd_flops / (flops * e.attention_fwd) + w.attention_bwd_flops / (flops * e.attention_bwd);
    let memory_s = w.memory_bytes / (speed.memory_gb_s * 1e9 * e.memory);
    let compute = (gemm_s + attention_s + memory_s + e.fixed_s).max(w.launches * e.launch_s);
    let host = w.host_link_bytes / (speed.host_link_gb_s * 1e9 * e.host_link);
    let host_link_s = (host - compute).max(0.0);
    let step_s = compute + host_link_s;
    StepPrediction { step_s, tokens_per_s: tokens as f64 / step_s, gemm_s, attention_s, memory_s, host_link_s, basis, calibrated: false }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::card::profile_named;
    use crate::config::LoraConfig;

    fn llama3_8b() -> ModelSpec {
        ModelSpec::by_shape_name("llama3-8b").expect("llama3-8b shape")
    }

    /// A mix with no weights cached.
    fn mix(policy: CheckpointPolicy, kept_layers: usize, attention: SavedAttention) -> Mix {
        Mix { policy, kept_layers, attention, cached_weight_layers: 0, hold_mlp_weights: false }
    }

    fn input(seq: usize) -> PlanInput {
        PlanInput {
            lora: LoraConfig { r: 32, alpha: 32.0, ..LoraConfig::default() },
            quantization: Quantization::Nf4,
            batch_size: 1,
            max_seq_len: seq,
            checkpointing: CheckpointPolicy::Auto,
            token_rows: 0,
            mlp_chunk_rows: 0,
            samples: None,
        }
    }

    /// `tunestudio bench`, Llama-3-8B shape, r 32, batch 1, measured tokens/s (bench/results.jsonl
    /// runs 2026-11-27-h100-a/-b and 2026-12-04-h200-a/-c; the H200 rows at 16K–64K in memory mode and
    /// 4K/8K in speed mode are issue 12's table, run at commit 3aa03ff).
    const MEASURED: &[(&str, usize, CheckpointPolicy, usize, f64)] = &[
        ("h100-80", 2048, CheckpointPolicy::None, 32, 12_281.0),
        ("h100-80", 2048, CheckpointPolicy::Offload, 0, 8_925.0),
        ("h100-80", 8192, CheckpointPolicy::None, 32, 10_585.0),
        ("h100-80", 8192, CheckpointPolicy::Offload, 0, 7_655.0),
        ("h100-80", 32768, CheckpointPolicy::Offload, 0, 3_997.0),
        ("h100-80", 131072, CheckpointPolicy::Offload, 0, 1_166.0),
        ("h200", 2048, CheckpointPolicy::None, 32, 13_113.0),
        ("h200", 2048, CheckpointPolicy::Offload, 0, 9_485.0),
        ("h200", 4096, CheckpointPolicy::None, 32, 12_801.0),
        ("h200", 4096, CheckpointPolicy::Layer, 26, 11_327.0),
        ("h200", 8192, CheckpointPolicy::None, 32, 11_033.0),
        ("h200", 8192, CheckpointPolicy::Layer, 11, 8_450.0),
        ("h200", 8192, CheckpointPolicy::Layer, 0, 7_727.0),
        ("h200", 8192, CheckpointPolicy::Offload, 0, 8_032.0),
        ("h200", 16384, CheckpointPolicy::Layer, 3, 6_078.0),
        ("h200", 16384, CheckpointPolicy::Offload, 0, 6_150.0),
        ("h200", 32768, CheckpointPolicy::Offload, 0, 4_101.0),
        ("h200", 65536, CheckpointPolicy::Offload, 0, 2_148.0),
    ];

    /// The prediction's largest relative error over `rows` (card profile, seq, policy, kept
    /// layers, measured tokens/s) with the rates `e`, and the row it was on.
    fn worst_error(rows: &[(&str, usize, CheckpointPolicy, usize, f64)], e: &Efficiency) -> (f64, String) {
        let rows: Vec<_> = rows.iter().map(|&(card, seq, policy, kept, tps)| (card, seq, policy, kept, SavedAttention::Off, tps)).collect();
        worst_error_saved(&rows, e)
    }

    /// [`worst_error`] over rows that also say where attention's output was kept.
    fn worst_error_saved(rows: &[(&str, usize, CheckpointPolicy, usize, SavedAttention, f64)], e: &Efficiency) -> (f64, String) {
        worst_error_of(rows.iter().map(|&(card, seq, policy, kept, attention, tps)| (card, seq, mix(policy, kept, attention), tps)), e)
    }

    /// [`worst_error`] over rows of any mix.
    fn worst_error_of<'a>(rows: impl Iterator<Item = (&'a str, usize, Mix, f64)>, e: &Efficiency) -> (f64, String) {
        let spec = llama3_8b();
        let mut worst = (0.0f64, String::new());
        for (card, seq, m, measured) in rows {
            let limits = profile_named(card).unwrap().limits();
            let (speed, basis) = limits.speed().unwrap();
            let p = predict_with(&step_work(&spec, &input(seq), m), &speed, e, basis, seq);
            let err = p.tokens_per_s / measured - 1.0;
            println!("{card} seq {seq} {m:?}: predicted {:.0}, measured {measured} ({:+.1}%)", p.tokens_per_s, 100.0 * err);
            if err.abs() > worst.0.abs() {
                worst = (err, format!("{card} seq {seq} {m:?}: predicted {:.0}, measured {measured}", p.tokens_per_s));
            }
        }
        worst
    }

    #[test]
    fn the_prediction_is_within_12_percent_of_every_measured_hopper_step() {
        // Our own attention kernels ran these (predict would take cuDNN's rates where the library
        // is installed).
        let worst = worst_error(MEASURED, &EFFICIENCY);
        assert!(worst.0.abs() <= 0.12, "worst: {:+.1}% ({})", 100.0 * worst.0, worst.1);
    }

    /// `tunestudio bench` with cuDNN's attention (run 2026-12-06-h100-j, commit a3e9ed1): the caps
    /// of issue 12 at 2K–64K (offload chosen) and unconstrained at 2K and 8K (keep all).
    const MEASURED_CUDNN: &[(&str, usize, CheckpointPolicy, usize, f64)] = &[
        ("h100-80", 2048, CheckpointPolicy::None, 32, 13_214.0),
        ("h100-80", 8192, CheckpointPolicy::None, 32, 12_836.0),
        ("h100-80", 2048, CheckpointPolicy::Offload, 0, 9_573.0),
        ("h100-80", 8192, CheckpointPolicy::Offload, 0, 9_322.0),
        ("h100-80", 32768, CheckpointPolicy::Offload, 0, 6_424.0),
        ("h100-80", 65536, CheckpointPolicy::Offload, 0, 4_498.0),
    ];

    #[test]
    fn with_cudnn_attention_the_prediction_is_within_12_percent_of_every_measured_step() {
        let worst = worst_error(MEASURED_CUDNN, &EFFICIENCY_CUDNN);
        assert!(worst.0.abs() <= 0.12, "worst: {:+.1}% ({})", 100.0 * worst.0, worst.1);
    }

    /// `tunestudio bench` with the recomputed layers keeping attention's output (runs
    /// 2026-12-06-h100-n/-o/-p, commit 9e51199): issue 12's caps and 24 GiB, as `auto` chose.
    const MEASURED_SAVED_ATTENTION: &[(&str, usize, CheckpointPolicy, usize, SavedAttention, f64)] = &[
        ("h100-80", 8192, CheckpointPolicy::Offload, 0, SavedAttention::Host, 9_523.0),
        ("h100-80", 16384, CheckpointPolicy::Offload, 0, SavedAttention::Host, 8_595.0),
        ("h100-80", 32768, CheckpointPolicy::Offload, 0, SavedAttention::Host, 6_995.0),
        ("h100-80", 65536, CheckpointPolicy::Offload, 0, SavedAttention::Host, 5_079.0),
        ("h100-80", 8192, CheckpointPolicy::Layer, 11, SavedAttention::Host, 10_534.0),
        ("h100-80", 16384, CheckpointPolicy::Layer, 3, SavedAttention::Host, 8_813.0),
        ("h100-80", 32768, CheckpointPolicy::Offload, 0, SavedAttention::Device, 6_989.0),
    ];

    #[test]
    fn with_attention_output_kept_the_prediction_is_within_12_percent_of_every_measured_step() {
        let worst = worst_error_saved(MEASURED_SAVED_ATTENTION, &EFFICIENCY_CUDNN);
        assert!(worst.0.abs() <= 0.12, "worst: {:+.1}% ({})", 100.0 * worst.0, worst.1);
    }

    /// `tunestudio bench` with weights dequantized once for the run (run 2026-12-06-h100-s, commit
    /// 23b5966, cuDNN's attention): unconstrained, issue 12's caps and 24 GiB, as `auto` chose;
    /// the last field is the layers whose weights were cached.
    const MEASURED_CACHED: &[(&str, usize, CheckpointPolicy, usize, SavedAttention, usize, f64)] = &[
        ("h100-80", 2048, CheckpointPolicy::None, 32, SavedAttention::Off, 32, 14_268.0),
        ("h100-80", 8192, CheckpointPolicy::None, 32, SavedAttention::Off, 32, 13_280.0),
        ("h100-80", 2048, CheckpointPolicy::None, 32, SavedAttention::Off, 16, 13_711.0),
        ("h100-80", 8192, CheckpointPolicy::Layer, 11, SavedAttention::Host, 1, 10_498.0),
        ("h100-80", 16384, CheckpointPolicy::Offload, 0, SavedAttention::Host, 2, 8_571.0),
        ("h100-80", 16384, CheckpointPolicy::Offload, 0, SavedAttention::Host, 32, 8_840.0),
        ("h100-80", 32768, CheckpointPolicy::Offload, 0, SavedAttention::Host, 7, 6_997.0),
        ("h100-80", 32768, CheckpointPolicy::Offload, 0, SavedAttention::Host, 28, 7_160.0),
        ("h100-80", 65536, CheckpointPolicy::Offload, 0, SavedAttention::Host, 17, 5_139.0),
    ];

    #[test]
    fn with_weights_dequantized_once_the_prediction_is_within_12_percent_of_every_measured_step() {
        let rows = MEASURED_CACHED.iter().map(|&(card, seq, policy, kept, attention, cached, tps)| {
            (card, seq, Mix { cached_weight_layers: cached, ..mix(policy, kept, attention) }, tps)
        });
        let worst = worst_error_of(rows, &EFFICIENCY_CUDNN);
        assert!(worst.0.abs() <= 0.12, "worst: {:+.1}% ({})", 100.0 * worst.0, worst.1);
    }

    /// `tunestudio bench` after the multi-tensor optimizer and LoRA's branch before the base GEMM
    /// (runs 2026-12-07-h100-a/-b, commit f1df42f): unconstrained, issue 12's caps and 24 GiB, each
    /// with the mix `auto` chose (the layers whose weights were cached, the MLP's weights held
    /// through the row chunks).
    const MEASURED_HELD: &[(&str, usize, Mix, f64)] = {
        use CheckpointPolicy::{Layer, None as Keep, Offload};
        use SavedAttention::{Host, Off};
        const fn m(policy: CheckpointPolicy, kept_layers: usize, attention: SavedAttention, cached: usize, held: bool) -> Mix {
            Mix { policy, kept_layers, attention, cached_weight_layers: cached, hold_mlp_weights: held }
        }
        &[
            ("h100-80", 2048, m(Keep, 32, Off, 32, false), 15_774.0),
            ("h100-80", 8192, m(Keep, 32, Off, 32, false), 13_823.0),
            ("h100-80", 8192, m(Offload, 0, Off, 0, true), 9_526.0),
            ("h100-80", 8192, m(Layer, 11, Host, 0, true), 10_932.0),
            ("h100-80", 16384, m(Offload, 0, Host, 2, true), 8_880.0),
            ("h100-80", 32768, m(Offload, 0, Host, 7, true), 7_173.0),
            ("h100-80", 65536, m(Offload, 0, Host, 17, true), 5_213.0),
        ]
    };

    #[test]
    fn with_mlp_weights_held_the_prediction_is_within_12_percent_of_every_measured_step() {
        let worst = worst_error_of(MEASURED_HELD.iter().copied(), &EFFICIENCY_CUDNN);
        assert!(worst.0.abs() <= 0.12, "worst: {:+.1}% ({})", 100.0 * worst.0, worst.1);
    }

    #[test]
    fn recomputing_and_offloading_cost_time_and_a_slower_card_is_slower() {
        let spec = llama3_8b();
        let l4 = profile_named("l4").unwrap().limits();
        let at =
            |policy, kept, card: &CardLimits| predict(&spec, &input(8192), mix(policy, kept, SavedAttention::Off), card).unwrap().step_s;
        let keep_all = at(CheckpointPolicy::None, 32, &l4);
        let some = at(CheckpointPolicy::Layer, 16, &l4);
        let recompute_all = at(CheckpointPolicy::Layer, 0, &l4);
        let offload = at(CheckpointPolicy::Offload, 0, &l4);
        assert!(keep_all < some && some < recompute_all && recompute_all <= offload, "{keep_all} {some} {recompute_all} {offload}");
        let h100 = profile_named("h100-80").unwrap().limits();
        assert!(at(CheckpointPolicy::Layer, 0, &h100) * 3.0 < recompute_all);
    }

    #[test]
    fn keeping_attention_output_skips_the_recomputed_forward_and_costs_host_traffic() {
        let spec = llama3_8b();
        let at = |policy, kept, attention| step_work(&spec, &input(32768), mix(policy, kept, attention));
        let off = at(CheckpointPolicy::Offload, 0, SavedAttention::Off);
        let host = at(CheckpointPolicy::Offload, 0, SavedAttention::Host);
        let device = at(CheckpointPolicy::Offload, 0, SavedAttention::Device);
        // Every layer is recomputed: the forward ran twice, now once.
        assert!((off.attention_fwd_flops - 2.0 * host.attention_fwd_flops).abs() < 1e-6 * off.attention_fwd_flops);
        assert_eq!(host.attention_fwd_flops, device.attention_fwd_flops);
        assert_eq!((host.attention_bwd_flops, host.gemm_flops), (off.attention_bwd_flops, off.gemm_flops));
        // 32 layers × 32K rows × (4096 bf16 + 32 f32), out and back.
        let extra = 32.0 * 2.0 * 32768.0 * (2.0 * 4096.0 + 4.0 * 32.0);
        assert!((host.host_link_bytes - off.host_link_bytes - extra).abs() < 1.0);
        assert_eq!(device.host_link_bytes, off.host_link_bytes);
        // Kept layers have nothing to keep.
        let keep_all = at(CheckpointPolicy::None, 32, SavedAttention::Host);
        assert_eq!(keep_all, at(CheckpointPolicy::None, 32, SavedAttention::Off));
        let h100 = profile_named("h100-80").unwrap().limits();
        let step = |attention| predict(&spec, &input(32768), mix(CheckpointPolicy::Offload, 0, attention), &h100).unwrap().step_s;
        assert!(
            step(SavedAttention::Host) < 0.95 * step(SavedAttention::Off),
            "{} vs {}",
            step(SavedAttention::Host),
            step(SavedAttention::Off)
        );
    }

    #[test]
    fn dequantized_weights_remove_the_dequantization_of_their_layers_only() {
        let spec = llama3_8b();
        let at = |policy, kept, cached| {
            step_work(&spec, &input(2048), Mix { cached_weight_layers: cached, ..mix(policy, kept, SavedAttention::Off) })
        };
        let params = spec.layer_linear_params() as f64;
        // Kept layers dequantize twice a step (forward, backward), recomputed ones three times.
        let keep_all = at(CheckpointPolicy::None, 32, 0);
        assert!((keep_all.memory_bytes - at(CheckpointPolicy::None, 32, 32).memory_bytes - 32.0 * 2.0 * 2.5 * params).abs() < 1.0);
        let recompute = at(CheckpointPolicy::Layer, 0, 0);
        assert!((recompute.memory_bytes - at(CheckpointPolicy::Layer, 0, 8).memory_bytes - 8.0 * 3.0 * 2.5 * params).abs() < 1.0);
        assert_eq!(recompute.gemm_flops, at(CheckpointPolicy::Layer, 0, 8).gemm_flops);
        // Dense weights have nothing to dequantize.
        let dense = PlanInput { quantization: Quantization::Bf16, ..input(2048) };
        let w =
            |cached| step_work(&spec, &dense, Mix { cached_weight_layers: cached, ..mix(CheckpointPolicy::None, 32, SavedAttention::Off) });
        assert_eq!(w(0).memory_bytes, w(32).memory_bytes);
    }

    #[test]
    fn sliding_windows_bound_attention_work() {
        assert_eq!(attended_pairs(4, None), 10.0);
        assert_eq!(attended_pairs(4, Some(2)), 1.0 + 2.0 + 2.0 + 2.0);
        assert_eq!(attended_pairs(4, Some(8)), 10.0);
        let gemma = ModelSpec::by_shape_name("gemma3-4b").unwrap();
        let w = step_work(&gemma, &input(32768), mix(CheckpointPolicy::None, gemma.num_layers, SavedAttention::Off));
        let mut global = gemma.clone();
        global.sliding_window = None;
        let g = step_work(&global, &input(32768), mix(CheckpointPolicy::None, global.num_layers, SavedAttention::Off));
        // Five local layers of six see 1K keys instead of up to 32K.
        assert!(w.attention_fwd_flops < 0.3 * g.attention_fwd_flops, "{} vs {}", w.attention_fwd_flops, g.attention_fwd_flops);
    }

    #[test]
    fn a_device_known_by_name_or_by_architecture_has_a_speed() {
        use crate::backend::card::CardLimits;
        let h200 = CardLimits::from_table("NVIDIA H200", (9, 0), 132, 141 << 30);
        assert_eq!(h200.speed().unwrap().1, "NVIDIA H200 datasheet");
        // An RTX 4080 (8.9, 76 SMs) is not a profile: the 8.9 GeForce card's rate, scaled (its
        // datasheet says 48.7); an L4-like professional card is estimated from the L4.
        let other = CardLimits::from_table("NVIDIA GeForce RTX 4080", (8, 9), 76, 16 << 30);
        let (speed, basis) = other.speed().unwrap();
        assert!(basis.contains("estimated from the NVIDIA GeForce RTX 4090"), "{basis}");
        assert!((speed.bf16_tflops - 82.6 * 76.0 / 128.0).abs() < 1e-9);
        let pro = CardLimits::from_table("NVIDIA L20", (8, 9), 92, 48 << 30);
        assert!(pro.speed().unwrap().1.contains("NVIDIA L4 "), "{:?}", pro.speed());
        assert!(CardLimits::from_table("future", (13, 0), 100, 1 << 30).speed().is_none());
    }

    #[test]
    fn the_summary_gives_the_rate_the_eta_and_how_far_to_trust_it() {
        let spec = llama3_8b();
        let l4 = profile_named("l4").unwrap().limits();
        let p = predict(&spec, &input(2048), mix(CheckpointPolicy::Offload, 0, SavedAttention::Off), &l4).unwrap();
        assert!((p.eta_s(600, 2) - 1200.0 * p.step_s).abs() < 1e-9);
        let s = p.summary(Some(600), 2);
        assert!(!p.summary(None, 2).contains("steps in"));
        assert!(s.contains("tokens/s") && s.contains("600 steps in about") && s.contains("NVIDIA L4 datasheet"), "{s}");
        assert!(s.contains("not yet measured on this card"), "{s}");
        let h200 = profile_named("h200").unwrap().limits();
        assert!(
            predict(&spec, &input(2048), mix(CheckpointPolicy::None, 32, SavedAttention::Off), &h200)
                .unwrap()
                .summary(None, 1)
                .contains("within 12%")
        );
        assert_eq!(group_thousands(1234567), "1,234,567");
        assert_eq!(group_thousands(900), "900");
    }
}
