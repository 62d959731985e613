//! The training step, written once against `Backend`: embedding → decoder layers (attention and
//! MLP blocks with LoRA on any of the seven linears) → final norm → chunked lm_head + cross-entropy,
//! then the hand-written backward in reverse, gradient norm and clipping, AdamW on fp32 masters.
//!
//! Memory: every buffer is allocated when the `Trainer` is built, sized for the largest micro-batch
//! (`batch_size × max_seq_len` rows); a step allocates nothing. Checkpointing keeps each layer's
//! input and recomputes the layer in the backward, or keeps every activation when it fits.

pub mod arena;
pub mod cost;
pub mod infer;
pub mod lora;
pub mod model;
pub mod plan;
pub mod schedule;

use crate::backend::{AdamW, AdamwTensor, AttnShape, Backend, LinearDims, LoraBwd, LoraFwd, LossSum, RmsNorm};
use crate::config::{CheckpointPolicy, LoraConfig, OptimConfig, Quantization, Target};
use crate::data::Batch;
use crate::error::{Error, Result};
use crate::model::ModelSpec;
use crate::model::arch::MlpActivation;
use lora::{LoraPair, LoraWeights};
use model::{DeviceModel, LayerWeights, WeightSource};
use plan::PlannedBuffer;

/// The RMSNorm a model's norms apply: its epsilon and weight offset (Gemma's `1 + w`). Here, not
/// on `ModelSpec`: the model module sits below the backend and names none of its types.
pub(crate) fn norm_of(spec: &ModelSpec) -> RmsNorm {
    RmsNorm { eps: spec.rms_norm_eps as f32, weight_offset: spec.norm_weight_offset }
}

/// What the engine needs from a `RunConfig`, validated.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub lora: LoraConfig,
    pub optim: OptimConfig,
    pub quantization: Quantization,
    pub batch_size: usize,
    pub max_seq_len: usize,
    pub checkpointing: CheckpointPolicy,
    pub seed: u64,
    /// Rows per MLP chunk when layers are recomputed; 0 uses the plan's default.
    pub mlp_chunk_rows: usize,
    /// Where the recomputed layers keep attention's output and log-sum-exp (the plan's choice;
    /// ignored when no layer is recomputed).
    pub saved_attention: plan::SavedAttention,
    /// The first layers whose NF4 linears are dequantized once for the run (the plan's choice;
    /// ignored for 16-bit weights).
    pub cached_weight_layers: usize,
    /// Whether the recomputed layers' MLP weights are dequantized once per pass (the plan's
    /// `Mix::hold_mlp_weights`; ignored where it does nothing).
    pub hold_mlp_weights: bool,
}

/// One adapted linear on the device: fp32 masters, compute copies, gradients, AdamW moments.
pub struct LoraSlot<B: Backend> {
    pub target: Target,
    pub out_features: usize,
    pub in_features: usize,
    pub a: B::Tensor,
    pub b: B::Tensor,
    pub a_compute: B::Tensor,
    pub b_compute: B::Tensor,
    pub grad_a: B::Tensor,
    pub grad_b: B::Tensor,
    pub m_a: B::Tensor,
    pub v_a: B::Tensor,
    pub m_b: B::Tensor,
    pub v_b: B::Tensor,
}

/// Token rows of the embedding (and of an untied lm_head) trained with the adapter: the
/// untrained-token fix. Values are `[k, hidden]`, row `s` for token `ids[s]`.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRows {
    pub ids: Vec<u32>,
    pub embed: Vec<f32>,
    /// `None` when the embeddings are tied (the head is the embedding).
    pub head: Option<Vec<f32>>,
}

/// One trainable `[k, hidden]` block: fp32 master, gradient, AdamW moments.
struct RowParam<B: Backend> {
    master: B::Tensor,
    grad: B::Tensor,
    m: B::Tensor,
    v: B::Tensor,
}

struct TrainableRows<B: Backend> {
    k: usize,
    ids_host: Vec<u32>,
    ids: B::Ids,
    /// `[vocab]`: the row's slot, or −1.
    slot_of_token: B::Ids,
    embed: RowParam<B>,
    head: Option<RowParam<B>>,
}

/// One buffer per LoRA target, indexed by `Target as usize`; `None` where the target is not adapted.
type PerTarget<T> = Vec<Option<T>>;

/// A block's LoRA products `x·Aᵀ` and dropped-out inputs, per target.
type LoraInputs<T> = (PerTarget<T>, PerTarget<T>);

/// The activations of one decoder layer that its backward reads.
struct LayerActs<B: Backend> {
    h1: B::Tensor,
    inv1: B::Tensor,
    q: B::Tensor,
    k: B::Tensor,
    v: B::Tensor,
    att: B::Tensor,
    lse: B::Tensor,
    x2: B::Tensor,
    h2: B::Tensor,
    inv2: B::Tensor,
    /// `x_lora · Aᵀ` per attention target (`[n, r]`), by `Target as usize` (q, k, v, o).
    xa: PerTarget<B::Tensor>,
    /// The dropped-out LoRA input per attention target, when dropout is on.
    xd: PerTarget<B::Tensor>,
    mlp: MlpActs<B>,
    /// Per-head q/k norms (Qwen3, Gemma 3).
    qk: Option<QkNormActs<B>>,
    /// Gemma's norms of the attention output (all rows) and of the MLP output (per chunk).
    attn_out: Option<OutNormActs<B>>,
    mlp_out: Option<OutNormActs<B>>,
}

/// The q and k projections before their per-head norms, and the norms' inverse RMS per
/// (row, head); `q`/`k` of `LayerActs` hold the normed (then rotated) values.
struct QkNormActs<B: Backend> {
    q_pre: B::Tensor,
    k_pre: B::Tensor,
    q_inv: B::Tensor,
    k_inv: B::Tensor,
}

/// A norm applied to a block's output before the residual add: its input and inverse RMS.
struct OutNormActs<B: Backend> {
    pre: B::Tensor,
    inv: B::Tensor,
}

/// The MLP's activations, for all rows or for one chunk of rows.
struct MlpActs<B: Backend> {
    g: B::Tensor,
    u: B::Tensor,
    m: B::Tensor,
    /// By `Target as usize`; only gate, up and down are used.
    xa: PerTarget<B::Tensor>,
    xd: PerTarget<B::Tensor>,
}

/// Backward scratch of the MLP (chunk rows) and of every LoRA linear.
struct MlpGrads<B: Backend> {
    dm: B::Tensor,
    dg: B::Tensor,
    du: B::Tensor,
    /// `[n, r]`: `dy · B`.
    lora_scratch: B::Tensor,
    /// The gradient w.r.t. a dropped-out LoRA input.
    dx_lora: B::Tensor,
}

/// Row-chunk staging for the MLP (`[chunk, hidden]` each).
struct ChunkBuffers<B: Backend> {
    h2: B::Tensor,
    dy: B::Tensor,
    out: B::Tensor,
}

/// Scratch for the backward and the residual stream.
struct Workspace<B: Backend> {
    x: B::Tensor,
    layer_out: B::Tensor,
    hf: B::Tensor,
    invf: B::Tensor,
    dx: B::Tensor,
    dh: B::Tensor,
    dq: B::Tensor,
    dk: B::Tensor,
    dv: B::Tensor,
    datt: B::Tensor,
    mlp: MlpGrads<B>,
    /// The gradient of k before its per-head norm (q's goes to `datt`).
    dk_pre: Option<B::Tensor>,
    /// The gradient of the MLP's output before Gemma's output norm (chunk rows).
    dmlp_out: Option<B::Tensor>,
    chunk: Option<ChunkBuffers<B>>,
    /// Device copies of offloaded layer inputs, alternating so one is prefetched while the
    /// other is used.
    stage: Option<[B::Tensor; 2]>,
    /// The device copy of a recomputed layer's attention output kept in host memory: it takes
    /// turns with the shared activation set's own, so one is copied while the other is used.
    attention_stage: Option<AttentionOut<B>>,
}

/// Attention's output and log-sum-exp: what its backward reads besides q, k and v.
struct AttentionOut<B: Backend> {
    att: B::Tensor,
    lse: B::Tensor,
}

impl<B: Backend> AttentionOut<B> {
    /// Trade buffers with a layer's activations (all of them have the same size).
    fn swap_with(&mut self, acts: &mut LayerActs<B>) {
        std::mem::swap(&mut self.att, &mut acts.att);
        std::mem::swap(&mut self.lse, &mut acts.lse);
    }
    /// Copy `src`'s first `rows` rows here on the copy stream.
    fn copy_async_from(&mut self, be: &B, src: &AttentionOut<B>, rows: usize, q_dim: usize, heads: usize) -> Result<()> {
        be.copy_async(&src.att, &mut self.att, rows * q_dim)?;
        be.copy_async(&src.lse, &mut self.lse, rows * heads)
    }
}

/// The current micro-batch on the device.
struct DeviceBatch<B: Backend> {
    ids: B::Ids,
    targets: B::Ids,
    positions: B::Ids,
    segments: B::Ids,
    shape: AttnShape,
}

/// Result of one optimizer step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepStats {
    /// Mean loss over the step's trained tokens.
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub lr: f64,
    pub tokens: usize,
    pub trained_tokens: usize,
}

/// AdamW moments and step count, for checkpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct OptimizerState {
    pub step: u64,
    /// Per slot in order: m_a, v_a, m_b, v_b.
    pub moments: Vec<[Vec<f32>; 4]>,
    /// Trainable token rows: embed m, embed v, then head m, head v when the head is untied.
    pub token_rows: Vec<Vec<f32>>,
}

pub struct Trainer<B: Backend> {
    pub backend: B,
    pub spec: ModelSpec,
    pub opts: EngineOptions,
    pub model: DeviceModel<B>,
    /// `slots[layer]` holds the adapted linears of that layer.
    pub slots: Vec<Vec<LoraSlot<B>>>,
    acts: Vec<LayerActs<B>>,
    /// Every layer's input (on the device, or in pinned host memory when offloaded).
    saved_inputs: Vec<B::Tensor>,
    /// Per layer, its attention output kept from the forward (recomputed layers, when the plan
    /// keeps them; on the device, or in pinned host memory with `ws.attention_stage`).
    saved_attention: Vec<Option<AttentionOut<B>>>,
    /// Which layers keep their activations (the last ones) and which set each layer uses.
    layout: plan::ActLayout,
    /// The first layers whose NF4 linears hold a dequantized copy.
    cached_weight_layers: usize,
    /// Whether the backend holds the MLP's dequantized weights through a recomputed layer's
    /// row chunks.
    hold_mlp_weights: bool,
    offload: bool,
    ws: Workspace<B>,
    batch: DeviceBatch<B>,
    rows: Option<TrainableRows<B>>,
    /// Every buffer this Trainer allocated: the memory plan's lists its arenas were carved from.
    allocated: Vec<PlannedBuffer>,
    /// Optimizer updates applied so far.
    pub step: u64,
    /// Micro-batches seen (keys the dropout masks).
    micro_counter: u64,
}

/// How a linear's LoRA input is keyed for dropout: distinct per step, micro-batch, layer, target.
fn dropout_key(seed: u64, micro: u64, layer: usize, target: Target) -> u64 {
    let mut z = seed ^ 0xD1B5_4A32_D192_ED03;
    for v in [micro, layer as u64, target as u64] {
        z = (z ^ v).wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(29);
    }
    z
}

impl<B: Backend> Trainer<B> {
    pub fn new(backend: B, spec: ModelSpec, src: &dyn WeightSource, opts: EngineOptions, lora_init: Option<&LoraWeights>) -> Result<Self> {
        Self::with_kept_layers(backend, spec, src, opts, lora_init, None)
    }

    /// [`Trainer::new`], with `layer` checkpointing keeping the activations of the last
    /// `kept_layers` layers (what `auto` chooses when only some fit; tests set it directly).
    pub fn with_kept_layers(
        backend: B,
        spec: ModelSpec,
        src: &dyn WeightSource,
        opts: EngineOptions,
        lora_init: Option<&LoraWeights>,
        kept_layers: Option<usize>,
    ) -> Result<Self> {
        let rows = opts.batch_size * opts.max_seq_len;
        let (policy, kept) = match opts.checkpointing {
            // What fits a card depends on the card, other processes and a cap: the caller resolves
            // `auto` against `crate::device::plan_target` before building the Trainer (and passes
            // the layers it keeps). On the CPU the plan's own rule (recompute past 2 GiB of
            // activations) needs no target.
            CheckpointPolicy::Auto if backend.device().kind == "cpu" => {
                let input = plan::PlanInput {
                    lora: opts.lora.clone(),
                    quantization: opts.quantization,
                    batch_size: opts.batch_size,
                    max_seq_len: opts.max_seq_len,
                    checkpointing: CheckpointPolicy::Auto,
                    token_rows: 0,
                    mlp_chunk_rows: opts.mlp_chunk_rows,
                    samples: None,
                };
                let p = plan::plan(&spec, &input, &plan::PlanTarget::cpu());
                (p.checkpointing, p.kept_layers)
            }
            CheckpointPolicy::Auto => {
                return Err(Error::config(
                    "memory.checkpointing",
                    "`auto` must be resolved against the card's plan target before the engine is built (device::plan_target)",
                ));
            }
            p => (p, plan::kept_layers(&spec, p)),
        };
        let kept = match kept_layers {
            Some(k) if policy == CheckpointPolicy::Layer => k.min(spec.num_layers),
            Some(_) => return Err(Error::config("memory.checkpointing", "keeping some layers' activations needs `layer` checkpointing")),
            None => kept,
        };
        let layout = plan::ActLayout::new(&spec, rows, kept, opts.mlp_chunk_rows);
        let cached_weight_layers = if opts.quantization == Quantization::Nf4 { opts.cached_weight_layers.min(spec.num_layers) } else { 0 };
        let init;
        let weights = match lora_init {
            Some(w) => w,
            None => {
                init = LoraWeights::init(&spec, &opts.lora, opts.seed);
                &init
            }
        };
        let attention_kept = if layout.recomputes() { opts.saved_attention } else { plan::SavedAttention::Off };
        // Everything below is taken by name from the plan's own list of this run's buffers, in
        // one arena: the plan and the allocation are the same list.
        let kind = plan::BackendKind::of(&backend.device());
        let input = plan::PlanInput {
            lora: LoraConfig { r: weights.rank, ..opts.lora.clone() },
            quantization: opts.quantization,
            batch_size: opts.batch_size,
            max_seq_len: opts.max_seq_len,
            checkpointing: policy,
            token_rows: 0,
            mlp_chunk_rows: opts.mlp_chunk_rows,
            samples: None,
        };
        let mut planned = plan::weight_buffers(&spec, opts.quantization, kind, opts.max_seq_len, policy, cached_weight_layers);
        planned.extend(plan::engine_buffers(&spec, &input, policy, kept, attention_kept));
        let mut arena = arena::Arena::new(&backend, planned)?;
        let model = DeviceModel::load(&mut arena, &spec, src, opts.quantization)?;
        let hold_mlp_weights = plan::Mix {
            policy,
            kept_layers: kept,
            attention: attention_kept,
            cached_weight_layers,
            hold_mlp_weights: opts.hold_mlp_weights,
        }
        .holds_mlp_weights(&spec, opts.quantization, kind);
        if hold_mlp_weights {
            backend.hold_dequantized(plan::MLP_HELD_WEIGHTS)?;
        }
        let mut slots = Vec::with_capacity(spec.num_layers);
        for l in 0..spec.num_layers {
            let mut layer = Vec::new();
            for (&t, pair) in &weights.layers[l] {
                let (out, inp) = spec.linear_shape(t);
                let r = weights.rank;
                if pair.a.len() != r * inp || pair.b.len() != out * r {
                    return Err(Error::tensor(
                        crate::engine::lora::peft_key(&spec, l, t, 'A'),
                        None,
                        format!(
                            "LoRA shapes do not match the model: A has {} values (expected {}x{}), B has {} (expected {}x{})",
                            pair.a.len(),
                            r,
                            inp,
                            pair.b.len(),
                            out,
                            r
                        ),
                    ));
                }
                let p = format!("lora.{l}.{}", t.short());
                let mut upload = |which: &str, data: &[f32]| arena.upload(&format!("{p}.{which}"), data);
                let (a, b, a_compute, b_compute) =
                    (upload("a", &pair.a)?, upload("b", &pair.b)?, upload("a_compute", &pair.a)?, upload("b_compute", &pair.b)?);
                let mut zeros = |which: &str| arena.tensor(&format!("{p}.{which}"));
                layer.push(LoraSlot {
                    target: t,
                    out_features: out,
                    in_features: inp,
                    a,
                    b,
                    a_compute,
                    b_compute,
                    grad_a: zeros("grad_a")?,
                    grad_b: zeros("grad_b")?,
                    m_a: zeros("m_a")?,
                    v_a: zeros("v_a")?,
                    m_b: zeros("m_b")?,
                    v_b: zeros("v_b")?,
                });
            }
            slots.push(layer);
        }
        let dropout_on = opts.lora.dropout > 0.0;
        let offload = policy == CheckpointPolicy::Offload;
        let adapted = |t: Target| weights.layers.iter().any(|m| m.contains_key(&t));
        let sets = layout.sets().len();
        let mut acts = Vec::with_capacity(sets);
        for set in 0..sets {
            let p = format!("acts.{set}");
            // LoRA products and dropped inputs, for all rows (attention) or one chunk (MLP).
            let mut lora_bufs = |targets: &[Target]| -> Result<LoraInputs<B::Tensor>> {
                let (mut xa, mut xd): (Vec<_>, Vec<_>) = (0..7).map(|_| (None, None)).unzip();
                for &t in targets.iter().filter(|&&t| adapted(t)) {
                    xa[t as usize] = Some(arena.tensor(&format!("{p}.xa.{}", t.short()))?);
                    if dropout_on {
                        xd[t as usize] = Some(arena.tensor(&format!("{p}.xd.{}", t.short()))?);
                    }
                }
                Ok((xa, xd))
            };
            let (xa, xd) = lora_bufs(&[Target::Q, Target::K, Target::V, Target::O])?;
            let (mxa, mxd) = lora_bufs(&[Target::Gate, Target::Up, Target::Down])?;
            let mut act = |name: &str| arena.tensor(&format!("{p}.{name}"));
            let mut layer = LayerActs {
                h1: act("h1")?,
                inv1: act("inv1")?,
                q: act("q")?,
                k: act("k")?,
                v: act("v")?,
                att: act("att")?,
                lse: act("lse")?,
                x2: act("x2")?,
                h2: act("h2")?,
                inv2: act("inv2")?,
                xa,
                xd,
                mlp: MlpActs { g: act("g")?, u: act("u")?, m: act("m")?, xa: mxa, xd: mxd },
                qk: None,
                attn_out: None,
                mlp_out: None,
            };
            if spec.qk_norm {
                layer.qk = Some(QkNormActs { q_pre: act("q_pre")?, k_pre: act("k_pre")?, q_inv: act("q_inv")?, k_inv: act("k_inv")? });
            }
            if spec.sandwich_norms {
                layer.attn_out = Some(OutNormActs { pre: act("attn_out_pre")?, inv: act("attn_out_inv")? });
                layer.mlp_out = Some(OutNormActs { pre: act("mlp_out_pre")?, inv: act("mlp_out_inv")? });
            }
            acts.push(layer);
        }
        let saved_inputs = (0..spec.num_layers).map(|l| arena.tensor(&format!("saved_input.{l}"))).collect::<Result<Vec<_>>>()?;
        let mut saved_attention: Vec<Option<AttentionOut<B>>> = (0..spec.num_layers).map(|_| None).collect();
        if attention_kept != plan::SavedAttention::Off {
            for (l, slot) in saved_attention.iter_mut().enumerate().take(layout.first_kept()) {
                *slot = Some(AttentionOut { att: arena.tensor(&format!("saved_att.{l}"))?, lse: arena.tensor(&format!("saved_lse.{l}"))? });
            }
        }
        let mut w = |name: &str| arena.tensor(&format!("ws.{name}"));
        let mut ws = Workspace {
            x: w("x")?,
            layer_out: w("layer_out")?,
            hf: w("hf")?,
            invf: w("invf")?,
            dx: w("dx")?,
            dh: w("dh")?,
            dq: w("dq")?,
            dk: w("dk")?,
            dv: w("dv")?,
            datt: w("datt")?,
            mlp: MlpGrads { dm: w("dm")?, dg: w("dg")?, du: w("du")?, lora_scratch: w("lora_scratch")?, dx_lora: w("dx_lora")? },
            dk_pre: None,
            dmlp_out: None,
            chunk: None,
            stage: None,
            attention_stage: None,
        };
        if spec.qk_norm {
            ws.dk_pre = Some(w("dk_pre")?);
        }
        if spec.sandwich_norms {
            ws.dmlp_out = Some(w("dmlp_out")?);
        }
        if layout.recomputes() && layout.chunk < rows {
            ws.chunk = Some(ChunkBuffers { h2: w("chunk.h2")?, dy: w("chunk.dy")?, out: w("chunk.out")? });
        }
        if offload {
            ws.stage = Some([w("stage.0")?, w("stage.1")?]);
        }
        if attention_kept == plan::SavedAttention::Host {
            ws.attention_stage = Some(AttentionOut { att: w("stage.att")?, lse: w("stage.lse")? });
        }
        let batch = DeviceBatch {
            ids: arena.ids("batch.ids")?,
            targets: arena.ids("batch.targets")?,
            positions: arena.ids("batch.positions")?,
            segments: arena.ids("batch.segments")?,
            shape: AttnShape {
                batch: 0,
                seq: 0,
                heads: spec.num_heads,
                kv_heads: spec.num_kv_heads,
                head_dim: spec.head_dim,
                ..Default::default()
            },
        };
        let allocated = arena.finish()?;
        backend.reserve_attention(plan::attention_max_shape(&spec, opts.batch_size, opts.max_seq_len))?;
        Ok(Trainer {
            backend,
            spec,
            opts,
            model,
            slots,
            acts,
            saved_inputs,
            saved_attention,
            layout,
            cached_weight_layers,
            hold_mlp_weights,
            offload,
            ws,
            batch,
            rows: None,
            allocated,
            step: 0,
            micro_counter: 0,
        })
    }

    pub fn keeps_all_activations(&self) -> bool {
        !self.layout.recomputes()
    }

    /// Where the recomputed layers keep attention's output (`off` when none does).
    pub fn saved_attention(&self) -> plan::SavedAttention {
        match (self.saved_attention.iter().any(Option::is_some), self.ws.attention_stage.is_some()) {
            (false, _) => plan::SavedAttention::Off,
            (true, false) => plan::SavedAttention::Device,
            (true, true) => plan::SavedAttention::Host,
        }
    }

    /// Layers whose activations are kept through the step (the others are recomputed).
    pub fn kept_layers(&self) -> usize {
        self.layout.kept
    }

    /// Layers whose NF4 linears hold their dequantized copy (the first ones; a backend that
    /// keeps every weight dequantized, the CPU's, counts them too).
    pub fn cached_weight_layers(&self) -> usize {
        self.cached_weight_layers
    }

    /// The mix this Trainer runs, as the plan names it.
    pub fn mix(&self) -> plan::Mix {
        plan::Mix {
            policy: self.checkpointing(),
            kept_layers: self.kept_layers(),
            attention: self.saved_attention(),
            cached_weight_layers: self.cached_weight_layers,
            hold_mlp_weights: self.hold_mlp_weights,
        }
    }

    /// The checkpointing policy in force (`auto` resolved by the memory plan).
    pub fn checkpointing(&self) -> CheckpointPolicy {
        if self.keeps_all_activations() {
            CheckpointPolicy::None
        } else if self.offload {
            CheckpointPolicy::Offload
        } else {
            CheckpointPolicy::Layer
        }
    }

    /// Every buffer allocated so far, as the memory plan names them.
    pub fn allocations(&self) -> &[PlannedBuffer] {
        &self.allocated
    }

    pub fn lora_scale(&self) -> f32 {
        self.opts.lora.scale() as f32
    }

    fn upload_batch(&mut self, batch: &Batch) -> Result<()> {
        let n = batch.tokens();
        if batch.batch_size > self.opts.batch_size || batch.seq_len > self.opts.max_seq_len {
            return Err(Error::bug(
                "upload_batch",
                format!(
                    "micro-batch {}x{} exceeds the planned {}x{} (batch_size x max_seq_len)",
                    batch.batch_size, batch.seq_len, self.opts.batch_size, self.opts.max_seq_len
                ),
            ));
        }
        let to_i32 = |v: &[u32]| v.iter().map(|&x| x as i32).collect::<Vec<i32>>();
        debug_assert_eq!(batch.input_ids.len(), n);
        let (b, db) = (&self.backend, &mut self.batch);
        b.write_ids(&mut db.ids, &to_i32(&batch.input_ids))?;
        b.write_ids(&mut db.targets, &batch.targets)?;
        b.write_ids(&mut db.positions, &to_i32(&batch.positions))?;
        b.write_ids(&mut db.segments, &to_i32(&batch.segments))?;
        db.shape.batch = batch.batch_size;
        db.shape.seq = batch.seq_len;
        db.shape.causal_rows = batch.rows_attend_causally();
        Ok(())
    }

    /// Train these embedding (and head) rows with the adapter, starting from the given values,
    /// which are also written into the frozen tables. Set-up only: allocates.
    pub fn set_token_rows(&mut self, rows: &TokenRows) -> Result<()> {
        let (k, d, v) = (rows.ids.len(), self.spec.hidden_size, self.spec.vocab_size);
        let tied = self.model.head.is_none();
        if rows.embed.len() != k * d || rows.head.as_ref().is_some_and(|h| h.len() != k * d) || rows.head.is_some() == tied {
            return Err(Error::Adapter {
                msg: format!(
                    "its trained token rows: {k} ids need [{k}, {d}] values for the embedding{}",
                    if tied { "" } else { " and the head" }
                ),
            });
        }
        if let Some(bad) = rows.ids.iter().find(|&&i| i as usize >= v) {
            return Err(Error::vocab(*bad, v, "a trained token row"));
        }
        let be = &self.backend;
        let ids: Vec<i32> = rows.ids.iter().map(|&i| i as i32).collect();
        let mut slot = vec![-1i32; v];
        for (s, &i) in rows.ids.iter().enumerate() {
            slot[i as usize] = s as i32;
        }
        let mut arena = arena::Arena::new(be, plan::token_row_buffers(&self.spec, k))?;
        let mut param = |which: &str, values: &[f32]| -> Result<RowParam<B>> {
            let p = format!("token_rows.{which}");
            Ok(RowParam {
                master: arena.upload(&p, values)?,
                grad: arena.tensor(&format!("{p}.grad"))?,
                m: arena.tensor(&format!("{p}.m"))?,
                v: arena.tensor(&format!("{p}.v"))?,
            })
        };
        let embed = param("embed", &rows.embed)?;
        let head = rows.head.as_deref().map(|h| param("head", h)).transpose()?;
        let mut ids_buf = arena.ids("token_rows.ids")?;
        be.write_ids(&mut ids_buf, &ids)?;
        let mut slot_buf = arena.ids("token_rows.slot_of_token")?;
        be.write_ids(&mut slot_buf, &slot)?;
        let planned = arena.finish()?;
        let tr = TrainableRows { k, ids_host: rows.ids.clone(), ids: ids_buf, slot_of_token: slot_buf, embed, head };
        // Calling this again (tests, resume) replaces the rows; the list keeps one set.
        self.allocated.retain(|b| !b.name.starts_with("token_rows."));
        self.allocated.extend(planned);
        be.set_rows(&mut self.model.embed, d, &tr.ids, &tr.embed.master, k)?;
        if let (Some(h), Some(p)) = (self.model.head.as_mut(), tr.head.as_ref()) {
            be.set_rows(h, d, &tr.ids, &p.master, k)?;
        }
        self.rows = Some(tr);
        Ok(())
    }

    /// The current values of the trained token rows.
    pub fn token_rows(&self) -> Result<Option<TokenRows>> {
        let Some(r) = &self.rows else { return Ok(None) };
        Ok(Some(TokenRows {
            ids: r.ids_host.clone(),
            embed: self.backend.download(&r.embed.master)?,
            head: r.head.as_ref().map(|h| self.backend.download(&h.master)).transpose()?,
        }))
    }

    /// The gradients of the trained token rows (same layout as `token_rows`).
    pub fn token_row_grads(&self) -> Result<Option<TokenRows>> {
        let Some(r) = &self.rows else { return Ok(None) };
        Ok(Some(TokenRows {
            ids: r.ids_host.clone(),
            embed: self.backend.download(&r.embed.grad)?,
            head: r.head.as_ref().map(|h| self.backend.download(&h.grad)).transpose()?,
        }))
    }

    /// Zero every trainable gradient.
    pub fn zero_grads(&mut self) -> Result<()> {
        for s in self.slots.iter_mut().flatten() {
            self.backend.fill(&mut s.grad_a, 0.0)?;
            self.backend.fill(&mut s.grad_b, 0.0)?;
        }
        if let Some(r) = self.rows.as_mut() {
            self.backend.fill(&mut r.embed.grad, 0.0)?;
            if let Some(h) = r.head.as_mut() {
                self.backend.fill(&mut h.grad, 0.0)?;
            }
        }
        Ok(())
    }

    /// Forward and backward over the micro-batches of one optimizer step, accumulating LoRA
    /// gradients of the mean loss over all their trained tokens (so accumulation gives the same
    /// gradient as one big batch). Returns the loss sum and token count.
    pub fn compute_gradients(&mut self, micro: &[Batch]) -> Result<LossSum> {
        self.zero_grads()?;
        let total: usize = micro.iter().map(Batch::trained_tokens).sum();
        let scale = 1.0 / total.max(1) as f32;
        let mut loss = LossSum::default();
        for batch in micro {
            let l = self.forward_backward(batch, scale, true)?;
            loss.sum += l.sum;
            loss.count += l.count;
        }
        Ok(loss)
    }

    /// Loss sum of one batch without touching gradients (evaluation).
    pub fn evaluate(&mut self, batch: &Batch) -> Result<LossSum> {
        self.forward_backward(batch, 0.0, false)
    }

    /// The logits of every row of one batch, `[tokens, vocab]` on the host, for comparing the
    /// forward with other tools on small vocabularies (training never forms them).
    pub fn logits(&mut self, batch: &Batch) -> Result<Vec<f32>> {
        self.forward_backward(batch, 0.0, false)?;
        let (n, d, v) = (batch.tokens(), self.spec.hidden_size, self.spec.vocab_size);
        let hidden = self.backend.download(&self.ws.hf)?;
        let head = self.backend.download(self.model.head())?;
        let mut out = vec![0f32; n * v];
        crate::backend::cpu::matmul::<f32>(n, v, d, &hidden, false, &head, true, &mut out, 1.0, false);
        Ok(out)
    }

    /// Global L2 norm of the LoRA gradients.
    pub fn grad_norm(&self) -> Result<f64> {
        let r = self.opts.lora.r;
        let mut grads = Vec::with_capacity(2 * self.slots.len() + 2);
        for s in self.slots.iter().flatten() {
            grads.push((&s.grad_a, r * s.in_features));
            grads.push((&s.grad_b, s.out_features * r));
        }
        if let Some(rows) = &self.rows {
            let n = rows.k * self.spec.hidden_size;
            grads.push((&rows.embed.grad, n));
            if let Some(h) = &rows.head {
                grads.push((&h.grad, n));
            }
        }
        Ok(self.backend.sum_squares(&grads)?.sqrt())
    }

    /// AdamW on every LoRA master with the given lr and gradient multiplier, then refresh the
    /// compute copies.
    pub fn apply_update(&mut self, lr: f64, grad_scale: f64) -> Result<()> {
        self.step += 1;
        let o = &self.opts.optim;
        let hp = AdamW {
            lr: lr as f32,
            beta1: o.beta1 as f32,
            beta2: o.beta2 as f32,
            eps: o.eps as f32,
            weight_decay: o.weight_decay as f32,
            step: self.step,
            grad_scale: grad_scale as f32,
        };
        let r = self.opts.lora.r;
        let d = self.spec.hidden_size;
        let mut update = Vec::with_capacity(2 * self.slots.len() + 2);
        for s in self.slots.iter_mut().flatten() {
            let (na, nb) = (r * s.in_features, s.out_features * r);
            update.push(AdamwTensor {
                param: &mut s.a,
                grad: &s.grad_a,
                m: &mut s.m_a,
                v: &mut s.v_a,
                compute: Some(&mut s.a_compute),
                n: na,
            });
            update.push(AdamwTensor {
                param: &mut s.b,
                grad: &s.grad_b,
                m: &mut s.m_b,
                v: &mut s.v_b,
                compute: Some(&mut s.b_compute),
                n: nb,
            });
        }
        if let Some(rows) = self.rows.as_mut() {
            let n = rows.k * d;
            for p in std::iter::once(&mut rows.embed).chain(rows.head.as_mut()) {
                update.push(AdamwTensor { param: &mut p.master, grad: &p.grad, m: &mut p.m, v: &mut p.v, compute: None, n });
            }
        }
        self.backend.adamw(&mut update, hp)?;
        drop(update);
        // The trained token rows go back into the tables the forward reads.
        if let Some(rows) = self.rows.as_ref() {
            self.backend.set_rows(&mut self.model.embed, d, &rows.ids, &rows.embed.master, rows.k)?;
            if let (Some(p), Some(table)) = (rows.head.as_ref(), self.model.head.as_mut()) {
                self.backend.set_rows(table, d, &rows.ids, &p.master, rows.k)?;
            }
        }
        Ok(())
    }

    /// One optimizer step: forward → loss → backward → grad norm → clip → AdamW.
    pub fn train_step(&mut self, micro: &[Batch], lr: f64) -> Result<StepStats> {
        let loss = self.compute_gradients(micro)?;
        let mean_loss = loss.sum / loss.count.max(1) as f64;
        let grad_norm = self.grad_norm()?;
        let step = self.step + 1;
        if !mean_loss.is_finite() {
            return Err(Error::NonFinite {
                what: "loss".into(),
                step,
                advice: "check the preflight report for untrained tokens used by the data, or lower the learning rate".into(),
            });
        }
        if !grad_norm.is_finite() {
            return Err(Error::NonFinite {
                what: "gradient".into(),
                step,
                advice: "lower the learning rate or enable gradient clipping (optim.max_grad_norm)".into(),
            });
        }
        let max_norm = self.opts.optim.max_grad_norm;
        let clip = if max_norm > 0.0 { (max_norm / (grad_norm + 1e-6)).min(1.0) } else { 1.0 };
        self.apply_update(lr, clip)?;
        Ok(StepStats { loss: mean_loss, grad_norm, lr, tokens: micro.iter().map(Batch::tokens).sum(), trained_tokens: loss.count })
    }

    fn forward_backward(&mut self, batch: &Batch, grad_scale: f32, backward: bool) -> Result<LossSum> {
        self.upload_batch(batch)?;
        let db = &self.batch;
        let n = batch.tokens();
        let d = self.spec.hidden_size;
        let norm = norm_of(&self.spec);
        let micro = self.micro_counter;
        self.micro_counter += 1;
        let be = &self.backend;
        let ws = &mut self.ws;
        let layout = self.layout;
        be.embedding_fwd(&db.ids, &self.model.embed, n, d, &mut ws.x)?;
        if let Some(s) = self.spec.embed_scale {
            be.scale(&mut ws.x, n * d, s)?;
        }
        for l in 0..self.spec.num_layers {
            let (acts, mlp_chunk) = (&mut self.acts[layout.set_of(l)], layout.mlp_rows(l));
            let ctx = LayerCtx {
                be,
                spec: &self.spec,
                opts: &self.opts,
                layer: l,
                micro,
                n,
                row0: 0,
                batch: db,
                rope_table: self.model.rope_table_for(&self.spec, l),
                attention_ready: false,
            };
            let (lw, slots) = (&self.model.layers[l], &self.slots[l]);
            if self.offload {
                // The input goes to host memory on the copy stream while this layer computes from
                // it; the next layer may overwrite it only once the copy is done.
                be.copy_async(&ws.x, &mut self.saved_inputs[l], n * d)?;
                layer_forward(&ctx, lw, slots, acts, ws.chunk.as_mut(), mlp_chunk, &ws.x, &mut ws.layer_out)?;
                be.wait_copies()?;
                std::mem::swap(&mut ws.x, &mut ws.layer_out);
            } else {
                be.copy(&ws.x, &mut self.saved_inputs[l], n * d)?;
                layer_forward(&ctx, lw, slots, acts, ws.chunk.as_mut(), mlp_chunk, &self.saved_inputs[l], &mut ws.x)?;
            }
            // Keep a recomputed layer's attention output for its backward. In host memory it
            // leaves through the stage, which the next layer's attention may overwrite only once
            // the copy out of it (issued a layer ago) is done.
            if let (true, Some(saved)) = (backward, self.saved_attention[l].as_mut()) {
                match ws.attention_stage.as_mut() {
                    None => saved.swap_with(acts),
                    Some(stage) => {
                        be.wait_copies()?;
                        stage.swap_with(acts);
                        saved.copy_async_from(be, stage, n, self.spec.q_dim(), self.spec.num_heads)?;
                    }
                }
            }
        }
        be.rmsnorm_fwd(&ws.x, &self.model.final_norm, norm, n, d, &mut ws.hf, &mut ws.invf)?;
        let head = self.model.head.as_ref().unwrap_or(&self.model.embed);
        // Trainable head rows: the head's own rows, or the embedding's when tied (both paths
        // then add into one gradient).
        let head_rows = match self.rows.as_mut() {
            Some(r) if backward => Some((&r.ids, &mut r.head.as_mut().unwrap_or(&mut r.embed).grad)),
            _ => None,
        };
        let loss = be.lm_head_ce(&ws.hf, head, &db.targets, n, d, self.spec.vocab_size, grad_scale, &mut ws.dh, head_rows)?;
        if !backward {
            return Ok(loss);
        }
        be.rmsnorm_bwd(&ws.dh, &ws.x, &self.model.final_norm, norm, &ws.invf, n, d, &mut ws.dx, false)?;
        let layers = self.spec.num_layers;
        let (q_dim, heads) = (self.spec.q_dim(), self.spec.num_heads);
        if self.offload {
            let stage = ws.stage.as_mut().expect("offload allocates staging buffers");
            be.copy_async(&self.saved_inputs[layers - 1], &mut stage[(layers - 1) % 2], n * d)?;
        }
        // The last recomputed layer's attention output needs no fetch: the forward left it in the
        // stage (the copy out of it was its last use).
        for l in (0..layers).rev() {
            let (acts, mlp_chunk) = (&mut self.acts[layout.set_of(l)], layout.mlp_rows(l));
            let ctx = LayerCtx {
                be,
                spec: &self.spec,
                opts: &self.opts,
                layer: l,
                micro,
                n,
                row0: 0,
                batch: db,
                rope_table: self.model.rope_table_for(&self.spec, l),
                attention_ready: self.saved_attention[l].is_some(),
            };
            let (lw, slots) = (&self.model.layers[l], &mut self.slots[l]);
            let mut stage = ws.stage.take();
            if stage.is_some() || (ctx.attention_ready && ws.attention_stage.is_some()) {
                // What this layer reads from host memory has arrived; the next layer's is fetched
                // while this one runs.
                be.wait_copies()?;
            }
            if let Some(saved) = self.saved_attention[l].as_mut() {
                match ws.attention_stage.as_mut() {
                    None => saved.swap_with(acts),
                    Some(stage) => {
                        stage.swap_with(acts);
                        if let Some(Some(next)) = l.checked_sub(1).map(|p| &self.saved_attention[p]) {
                            stage.copy_async_from(be, next, n, q_dim, heads)?;
                        }
                    }
                }
            }
            let input: &B::Tensor = match stage.as_mut() {
                Some(st) => {
                    if l > 0 {
                        be.copy_async(&self.saved_inputs[l - 1], &mut st[(l - 1) % 2], n * d)?;
                    }
                    &st[l % 2]
                }
                None => &self.saved_inputs[l],
            };
            let result = (|| {
                if !layout.is_kept(l) {
                    // Recompute what the backward reads; the MLP is recomputed chunk by chunk
                    // inside the backward when it is chunked.
                    if mlp_chunk >= n {
                        layer_forward(&ctx, lw, slots, acts, ws.chunk.as_mut(), mlp_chunk, input, &mut ws.layer_out)?;
                    } else {
                        attention_forward(&ctx, lw, slots, acts, input)?;
                    }
                }
                layer_backward(&ctx, lw, slots, acts, mlp_chunk, input, ws)
            })();
            ws.stage = stage;
            result?;
        }
        if let Some(r) = self.rows.as_mut() {
            // The table's rows reach the stream through the embedding scale (Gemma).
            if let Some(s) = self.spec.embed_scale {
                be.scale(&mut ws.dx, n * d, s)?;
            }
            be.embedding_bwd_rows(&ws.dx, &db.ids, n, d, &r.slot_of_token, &mut r.embed.grad)?;
        }
        Ok(loss)
    }

    /// Download the LoRA masters.
    pub fn lora_weights(&self) -> Result<LoraWeights> {
        let layers = self
            .slots
            .iter()
            .map(|layer| {
                layer
                    .iter()
                    .map(|s| Ok((s.target, LoraPair { a: self.backend.download(&s.a)?, b: self.backend.download(&s.b)? })))
                    .collect::<Result<_>>()
            })
            .collect::<Result<_>>()?;
        Ok(LoraWeights { rank: self.opts.lora.r, layers })
    }

    /// Download the LoRA gradients (same layout as the weights).
    pub fn lora_grads(&self) -> Result<LoraWeights> {
        let layers = self
            .slots
            .iter()
            .map(|layer| {
                layer
                    .iter()
                    .map(|s| Ok((s.target, LoraPair { a: self.backend.download(&s.grad_a)?, b: self.backend.download(&s.grad_b)? })))
                    .collect::<Result<_>>()
            })
            .collect::<Result<_>>()?;
        Ok(LoraWeights { rank: self.opts.lora.r, layers })
    }

    /// Overwrite the LoRA masters (and compute copies).
    pub fn set_lora_weights(&mut self, w: &LoraWeights) -> Result<()> {
        for (l, layer) in self.slots.iter_mut().enumerate() {
            for s in layer.iter_mut() {
                let p = w
                    .layers
                    .get(l)
                    .and_then(|m| m.get(&s.target))
                    .ok_or_else(|| Error::tensor(lora::peft_key(&self.spec, l, s.target, 'A'), None, "is missing from the adapter"))?;
                self.backend.write(&mut s.a, &p.a)?;
                self.backend.write(&mut s.b, &p.b)?;
                self.backend.write(&mut s.a_compute, &p.a)?;
                self.backend.write(&mut s.b_compute, &p.b)?;
            }
        }
        Ok(())
    }

    pub fn optimizer_state(&self) -> Result<OptimizerState> {
        let be = &self.backend;
        let moments = self
            .slots
            .iter()
            .flatten()
            .map(|s| Ok([be.download(&s.m_a)?, be.download(&s.v_a)?, be.download(&s.m_b)?, be.download(&s.v_b)?]))
            .collect::<Result<_>>()?;
        let mut token_rows = Vec::new();
        if let Some(r) = &self.rows {
            for p in std::iter::once(&r.embed).chain(r.head.as_ref()) {
                token_rows.push(be.download(&p.m)?);
                token_rows.push(be.download(&p.v)?);
            }
        }
        Ok(OptimizerState { step: self.step, moments, token_rows })
    }

    pub fn set_optimizer_state(&mut self, st: &OptimizerState) -> Result<()> {
        let count = self.slots.iter().map(Vec::len).sum::<usize>();
        if st.moments.len() != count {
            return Err(Error::Checkpoint {
                msg: format!("its optimizer state has {} LoRA pairs, this run trains {count}", st.moments.len()),
            });
        }
        for (s, m) in self.slots.iter_mut().flatten().zip(&st.moments) {
            self.backend.write(&mut s.m_a, &m[0])?;
            self.backend.write(&mut s.v_a, &m[1])?;
            self.backend.write(&mut s.m_b, &m[2])?;
            self.backend.write(&mut s.v_b, &m[3])?;
        }
        if let Some(r) = self.rows.as_mut() {
            let params: Vec<&mut RowParam<B>> = std::iter::once(&mut r.embed).chain(r.head.as_mut()).collect();
            if st.token_rows.len() != 2 * params.len() {
                return Err(Error::Checkpoint { msg: "its optimizer state does not cover the trained token rows of this run".into() });
            }
            for (p, mv) in params.into_iter().zip(st.token_rows.chunks(2)) {
                self.backend.write(&mut p.m, &mv[0])?;
                self.backend.write(&mut p.v, &mv[1])?;
            }
        }
        self.step = st.step;
        Ok(())
    }

    /// The micro-batch counter that keys dropout masks (saved in checkpoints so a resumed run
    /// draws the same masks).
    pub fn micro_counter(&self) -> u64 {
        self.micro_counter
    }

    pub fn set_micro_counter(&mut self, v: u64) {
        self.micro_counter = v;
    }
}

struct LayerCtx<'a, B: Backend> {
    be: &'a B,
    spec: &'a ModelSpec,
    opts: &'a EngineOptions,
    layer: usize,
    micro: u64,
    /// Rows this call works on (the whole micro-batch, or one MLP chunk).
    n: usize,
    /// The first row of this call within the micro-batch (MLP chunks), so dropout masks do
    /// not depend on chunking.
    row0: usize,
    batch: &'a DeviceBatch<B>,
    rope_table: &'a B::Tensor,
    /// The layer's attention output and log-sum-exp are already in its activations (kept from the
    /// forward): a recompute skips attention's forward.
    attention_ready: bool,
}

impl<B: Backend> Clone for LayerCtx<'_, B> {
    fn clone(&self) -> Self {
        LayerCtx { ..*self }
    }
}

impl<B: Backend> LayerCtx<'_, B> {
    /// The same layer, restricted to `rows` rows starting at `row0`.
    fn for_chunk(&self, row0: usize, rows: usize) -> Self {
        LayerCtx { n: rows, row0, ..self.clone() }
    }
    fn dims(&self, t: Target) -> LinearDims {
        let (out, inp) = self.spec.linear_shape(t);
        LinearDims { n: self.n, inp, out }
    }
    fn dropout(&self, t: Target) -> Option<(f32, u64)> {
        let p = self.opts.lora.dropout as f32;
        (p > 0.0).then(|| (p, dropout_key(self.opts.seed, self.micro, self.layer, t)))
    }
    fn slot<'s>(&self, slots: &'s [LoraSlot<B>], t: Target) -> Option<&'s LoraSlot<B>> {
        slots.iter().find(|s| s.target == t)
    }
    /// This layer's attention: the batch's shape with the layer's window and the model's scale.
    fn attn_shape(&self) -> AttnShape {
        AttnShape { window: self.spec.layer_window(self.layer), softmax_scale: self.spec.attn_scale, ..self.batch.shape }
    }
}

/// The weights and activations of an optional norm must come together (both follow the spec).
fn norm_mismatch(what: &str, layer: usize) -> Error {
    Error::bug(format!("layer {layer}'s {what} norm"), "its weights and activations disagree")
}

/// `y = x·Wᵀ (+ bias) + scale · dropout(x)·Aᵀ·Bᵀ` for one of the seven linears.
#[allow(clippy::too_many_arguments)]
fn lora_linear_fwd<B: Backend>(
    ctx: &LayerCtx<'_, B>,
    t: Target,
    w: &B::Weight,
    slot: Option<&LoraSlot<B>>,
    x: &B::Tensor,
    xa: &mut Option<B::Tensor>,
    xd: &mut Option<B::Tensor>,
    y: &mut B::Tensor,
) -> Result<()> {
    let dims = ctx.dims(t);
    let lora = match (slot, xa.as_mut()) {
        (Some(s), Some(xa)) => {
            let x_lora: &B::Tensor = match (ctx.dropout(t), xd.as_mut()) {
                (Some((p, key)), Some(buf)) => {
                    ctx.be.dropout(x, buf, dims.n * dims.inp, p, key, (ctx.row0 * dims.inp) as u64)?;
                    buf
                }
                _ => x,
            };
            Some(LoraFwd { a: &s.a_compute, b: &s.b_compute, rank: ctx.opts.lora.r, scale: ctx.opts.lora.scale() as f32, x_lora, xa })
        }
        _ => None,
    };
    ctx.be.linear_fwd(x, w, lora, dims, y)
}

/// Input gradient of a LoRA linear (written or accumulated into `dx`) and its LoRA gradients.
#[allow(clippy::too_many_arguments)]
fn lora_linear_bwd<B: Backend>(
    ctx: &LayerCtx<'_, B>,
    t: Target,
    w: &B::Weight,
    slot: Option<&mut LoraSlot<B>>,
    x: &B::Tensor,
    xa: &Option<B::Tensor>,
    xd: &Option<B::Tensor>,
    dy: &B::Tensor,
    dx: &mut B::Tensor,
    accumulate: bool,
    scratch: &mut B::Tensor,
    dx_lora: &mut B::Tensor,
) -> Result<()> {
    let dims = ctx.dims(t);
    let (Some(s), Some(xa)) = (slot, xa.as_ref()) else {
        return ctx.be.linear_bwd(dy, w, None, dims, dx, accumulate, None);
    };
    let drop = ctx.dropout(t);
    let x_lora = match (drop, xd.as_ref()) {
        (Some(_), Some(buf)) => buf,
        _ => x,
    };
    let lora = LoraBwd {
        a: &s.a_compute,
        b: &s.b_compute,
        rank: ctx.opts.lora.r,
        scale: ctx.opts.lora.scale() as f32,
        x_lora,
        xa,
        grad_a: &mut s.grad_a,
        grad_b: &mut s.grad_b,
        scratch,
    };
    match drop {
        Some((p, key)) => {
            ctx.be.linear_bwd(dy, w, Some(lora), dims, dx, accumulate, Some(&mut *dx_lora))?;
            ctx.be.dropout_bwd(dx_lora, dx, dims.n * dims.inp, p, key, (ctx.row0 * dims.inp) as u64, true)
        }
        None => ctx.be.linear_bwd(dy, w, Some(lora), dims, dx, accumulate, None),
    }
}

/// Attention block and the MLP's input norm: `x2 = input + o(attention(…))` (Gemma: the output
/// normed first), `h2 = rmsnorm(x2)`. With per-head q/k norms the projections land in
/// `qk.q_pre`/`k_pre` and their norms write `q`/`k`, which RoPE then rotates in place.
fn attention_forward<B: Backend>(
    ctx: &LayerCtx<'_, B>,
    lw: &LayerWeights<B>,
    slots: &[LoraSlot<B>],
    a: &mut LayerActs<B>,
    input: &B::Tensor,
) -> Result<()> {
    let (be, spec, n) = (ctx.be, ctx.spec, ctx.n);
    let (d, hd) = (spec.hidden_size, spec.head_dim);
    let norm = norm_of(spec);
    let w = |t: Target| &lw.linears[t as usize];
    let ti = |t: Target| t as usize;
    let positions = &ctx.batch.positions;
    be.rmsnorm_fwd(input, &lw.input_norm, norm, n, d, &mut a.h1, &mut a.inv1)?;
    let (q_out, k_out) = match a.qk.as_mut() {
        Some(qk) => (&mut qk.q_pre, &mut qk.k_pre),
        None => (&mut a.q, &mut a.k),
    };
    for (t, y) in [(Target::Q, q_out), (Target::K, k_out), (Target::V, &mut a.v)] {
        lora_linear_fwd(ctx, t, w(t), ctx.slot(slots, t), &a.h1, &mut a.xa[ti(t)], &mut a.xd[ti(t)], y)?;
    }
    match (a.qk.as_mut(), &lw.q_norm, &lw.k_norm) {
        (Some(qk), Some(qn), Some(kn)) => {
            be.rmsnorm_fwd(&qk.q_pre, qn, norm, n * spec.num_heads, hd, &mut a.q, &mut qk.q_inv)?;
            be.rmsnorm_fwd(&qk.k_pre, kn, norm, n * spec.num_kv_heads, hd, &mut a.k, &mut qk.k_inv)?;
        }
        (None, None, None) => {}
        _ => return Err(norm_mismatch("q/k", ctx.layer)),
    }
    be.rope(&mut a.q, n, spec.num_heads, hd, positions, ctx.rope_table, false)?;
    be.rope(&mut a.k, n, spec.num_kv_heads, hd, positions, ctx.rope_table, false)?;
    if !ctx.attention_ready {
        be.attention_fwd(&a.q, &a.k, &a.v, &ctx.batch.segments, ctx.attn_shape(), &mut a.att, &mut a.lse)?;
    }
    let o = Target::O;
    let o_out = match a.attn_out.as_mut() {
        Some(p) => &mut p.pre,
        None => &mut a.x2,
    };
    lora_linear_fwd(ctx, o, w(o), ctx.slot(slots, o), &a.att, &mut a.xa[ti(o)], &mut a.xd[ti(o)], o_out)?;
    match (a.attn_out.as_mut(), &lw.attn_out_norm) {
        (Some(p), Some(wn)) => be.rmsnorm_fwd(&p.pre, wn, norm, n, d, &mut a.x2, &mut p.inv)?,
        (None, None) => {}
        _ => return Err(norm_mismatch("attention output", ctx.layer)),
    }
    be.add(&mut a.x2, input, n * d)?;
    be.rmsnorm_fwd(&a.x2, &lw.post_attention_norm, norm, n, d, &mut a.h2, &mut a.inv2)
}

/// `g, u, m` and `out = down(m)` for the rows of `h2` (a whole batch or one chunk), with the
/// model's gate activation (SwiGLU or GeGLU).
fn mlp_core_forward<B: Backend>(
    ctx: &LayerCtx<'_, B>,
    lw: &LayerWeights<B>,
    slots: &[LoraSlot<B>],
    a: &mut MlpActs<B>,
    h2: &B::Tensor,
    out: &mut B::Tensor,
) -> Result<()> {
    let w = |t: Target| &lw.linears[t as usize];
    let ti = |t: Target| t as usize;
    for (t, y) in [(Target::Gate, &mut a.g), (Target::Up, &mut a.u)] {
        lora_linear_fwd(ctx, t, w(t), ctx.slot(slots, t), h2, &mut a.xa[ti(t)], &mut a.xd[ti(t)], y)?;
    }
    let elems = ctx.n * ctx.spec.intermediate_size;
    match ctx.spec.mlp_activation {
        MlpActivation::Silu => ctx.be.swiglu_fwd(&a.g, &a.u, elems, &mut a.m)?,
        MlpActivation::GeluTanh => ctx.be.geglu_fwd(&a.g, &a.u, elems, &mut a.m)?,
    }
    let dn = Target::Down;
    lora_linear_fwd(ctx, dn, w(dn), ctx.slot(slots, dn), &a.m, &mut a.xa[ti(dn)], &mut a.xd[ti(dn)], out)
}

/// The MLP block's output for the rows of `h2`: `down(…)`, normed by Gemma's output norm when
/// the model has one (its input and inverse RMS kept in `post`).
#[allow(clippy::too_many_arguments)]
fn mlp_forward<B: Backend>(
    ctx: &LayerCtx<'_, B>,
    lw: &LayerWeights<B>,
    slots: &[LoraSlot<B>],
    a: &mut MlpActs<B>,
    post: Option<&mut OutNormActs<B>>,
    h2: &B::Tensor,
    out: &mut B::Tensor,
) -> Result<()> {
    match (post, &lw.mlp_out_norm) {
        (Some(p), Some(wn)) => {
            mlp_core_forward(ctx, lw, slots, a, h2, &mut p.pre)?;
            ctx.be.rmsnorm_fwd(&p.pre, wn, norm_of(ctx.spec), ctx.n, ctx.spec.hidden_size, out, &mut p.inv)
        }
        (None, None) => mlp_core_forward(ctx, lw, slots, a, h2, out),
        _ => Err(norm_mismatch("MLP output", ctx.layer)),
    }
}

/// Row ranges of the MLP chunks: `(first row, rows)`.
fn chunks(n: usize, chunk: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n.div_ceil(chunk.max(1))).map(move |c| (c * chunk, chunk.min(n - c * chunk)))
}

/// A whole decoder layer: `output = x2 + down(silu(gate(h2)) · up(h2))`. With `mlp_chunk < n`
/// the MLP runs over row chunks (it is row-independent), so its `[n, intermediate]` activations
/// never exist at once.
#[allow(clippy::too_many_arguments)]
fn layer_forward<B: Backend>(
    ctx: &LayerCtx<'_, B>,
    lw: &LayerWeights<B>,
    slots: &[LoraSlot<B>],
    a: &mut LayerActs<B>,
    chunk_ws: Option<&mut ChunkBuffers<B>>,
    mlp_chunk: usize,
    input: &B::Tensor,
    output: &mut B::Tensor,
) -> Result<()> {
    attention_forward(ctx, lw, slots, a, input)?;
    let (be, n, d) = (ctx.be, ctx.n, ctx.spec.hidden_size);
    match chunk_ws {
        Some(cw) if mlp_chunk < n => {
            for (r0, rows) in chunks(n, mlp_chunk) {
                let cctx = ctx.for_chunk(r0, rows);
                be.copy_range(&a.h2, r0 * d, &mut cw.h2, 0, rows * d)?;
                mlp_forward(&cctx, lw, slots, &mut a.mlp, a.mlp_out.as_mut(), &cw.h2, &mut cw.out)?;
                be.copy_range(&cw.out, 0, output, r0 * d, rows * d)?;
            }
        }
        _ => mlp_forward(ctx, lw, slots, &mut a.mlp, a.mlp_out.as_mut(), &a.h2, output)?,
    }
    be.add(output, &a.x2, n * d)
}

/// Backward of `g, u, m, down` for the rows of `h2`/`dy`; writes `dh2`.
#[allow(clippy::too_many_arguments)]
fn mlp_core_backward<B: Backend>(
    ctx: &LayerCtx<'_, B>,
    lw: &LayerWeights<B>,
    slots: &mut [LoraSlot<B>],
    a: &MlpActs<B>,
    h2: &B::Tensor,
    dy: &B::Tensor,
    dh2: &mut B::Tensor,
    g: &mut MlpGrads<B>,
) -> Result<()> {
    let w = |t: Target| &lw.linears[t as usize];
    let ti = |t: Target| t as usize;
    macro_rules! slot {
        ($t:expr) => {
            slots.iter_mut().find(|s| s.target == $t)
        };
    }
    let dn = Target::Down;
    lora_linear_bwd(
        ctx,
        dn,
        w(dn),
        slot!(dn),
        &a.m,
        &a.xa[ti(dn)],
        &a.xd[ti(dn)],
        dy,
        &mut g.dm,
        false,
        &mut g.lora_scratch,
        &mut g.dx_lora,
    )?;
    let elems = ctx.n * ctx.spec.intermediate_size;
    match ctx.spec.mlp_activation {
        MlpActivation::Silu => ctx.be.swiglu_bwd(&g.dm, &a.g, &a.u, elems, &mut g.dg, &mut g.du)?,
        MlpActivation::GeluTanh => ctx.be.geglu_bwd(&g.dm, &a.g, &a.u, elems, &mut g.dg, &mut g.du)?,
    }
    let (gt, ut) = (Target::Gate, Target::Up);
    lora_linear_bwd(ctx, gt, w(gt), slot!(gt), h2, &a.xa[ti(gt)], &a.xd[ti(gt)], &g.dg, dh2, false, &mut g.lora_scratch, &mut g.dx_lora)?;
    lora_linear_bwd(ctx, ut, w(ut), slot!(ut), h2, &a.xa[ti(ut)], &a.xd[ti(ut)], &g.du, dh2, true, &mut g.lora_scratch, &mut g.dx_lora)
}

/// Backward of [`mlp_forward`]: through Gemma's output norm (into `d_pre`) when the model has one,
/// then the MLP; writes `dh2`.
#[allow(clippy::too_many_arguments)]
fn mlp_backward<B: Backend>(
    ctx: &LayerCtx<'_, B>,
    lw: &LayerWeights<B>,
    slots: &mut [LoraSlot<B>],
    a: &MlpActs<B>,
    post: Option<&OutNormActs<B>>,
    h2: &B::Tensor,
    dy: &B::Tensor,
    dh2: &mut B::Tensor,
    g: &mut MlpGrads<B>,
    d_pre: Option<&mut B::Tensor>,
) -> Result<()> {
    match (post, &lw.mlp_out_norm, d_pre) {
        (Some(p), Some(wn), Some(dp)) => {
            ctx.be.rmsnorm_bwd(dy, &p.pre, wn, norm_of(ctx.spec), &p.inv, ctx.n, ctx.spec.hidden_size, dp, false)?;
            mlp_core_backward(ctx, lw, slots, a, h2, dp, dh2, g)
        }
        (None, None, None) => mlp_core_backward(ctx, lw, slots, a, h2, dy, dh2, g),
        _ => Err(norm_mismatch("MLP output", ctx.layer)),
    }
}

/// On entry `ws.dx` holds the gradient of the layer's output; on exit, of its input. With
/// chunking, the MLP activations are recomputed chunk by chunk here (the attention block's were
/// recomputed, or kept, before the call).
#[allow(clippy::too_many_arguments)]
fn layer_backward<B: Backend>(
    ctx: &LayerCtx<'_, B>,
    lw: &LayerWeights<B>,
    slots: &mut [LoraSlot<B>],
    a: &mut LayerActs<B>,
    mlp_chunk: usize,
    input: &B::Tensor,
    ws: &mut Workspace<B>,
) -> Result<()> {
    let (be, spec, n) = (ctx.be, ctx.spec, ctx.n);
    let (d, hd) = (spec.hidden_size, spec.head_dim);
    let w = |t: Target| &lw.linears[t as usize];
    let ti = |t: Target| t as usize;
    let positions = &ctx.batch.positions;

    // MLP block (recomputed chunk by chunk when chunked).
    let norm = norm_of(spec);
    match ws.chunk.as_mut() {
        Some(cw) if mlp_chunk < n => {
            for (r0, rows) in chunks(n, mlp_chunk) {
                let cctx = ctx.for_chunk(r0, rows);
                be.copy_range(&a.h2, r0 * d, &mut cw.h2, 0, rows * d)?;
                be.copy_range(&ws.dx, r0 * d, &mut cw.dy, 0, rows * d)?;
                mlp_forward(&cctx, lw, slots, &mut a.mlp, a.mlp_out.as_mut(), &cw.h2, &mut cw.out)?;
                mlp_backward(&cctx, lw, slots, &a.mlp, a.mlp_out.as_ref(), &cw.h2, &cw.dy, &mut cw.out, &mut ws.mlp, ws.dmlp_out.as_mut())?;
                be.copy_range(&cw.out, 0, &mut ws.dh, r0 * d, rows * d)?;
            }
        }
        _ => mlp_backward(ctx, lw, slots, &a.mlp, a.mlp_out.as_ref(), &a.h2, &ws.dx, &mut ws.dh, &mut ws.mlp, ws.dmlp_out.as_mut())?,
    }
    be.rmsnorm_bwd(&ws.dh, &a.x2, &lw.post_attention_norm, norm, &a.inv2, n, d, &mut ws.dx, true)?;

    // Attention block.
    macro_rules! slot {
        ($t:expr) => {
            slots.iter_mut().find(|s| s.target == $t)
        };
    }
    let o = Target::O;
    let m = &mut ws.mlp;
    // Gemma: x2 = input + norm(o(…)); the gradient passes that norm first, into `dh` (free until
    // the q/k/v backward writes it).
    let d_o: &B::Tensor = match (a.attn_out.as_ref(), &lw.attn_out_norm) {
        (Some(p), Some(wn)) => {
            be.rmsnorm_bwd(&ws.dx, &p.pre, wn, norm, &p.inv, n, d, &mut ws.dh, false)?;
            &ws.dh
        }
        (None, None) => &ws.dx,
        _ => return Err(norm_mismatch("attention output", ctx.layer)),
    };
    lora_linear_bwd(
        ctx,
        o,
        w(o),
        slot!(o),
        &a.att,
        &a.xa[ti(o)],
        &a.xd[ti(o)],
        d_o,
        &mut ws.datt,
        false,
        &mut m.lora_scratch,
        &mut m.dx_lora,
    )?;
    be.attention_bwd(
        &ws.datt,
        &a.q,
        &a.k,
        &a.v,
        &a.att,
        &a.lse,
        &ctx.batch.segments,
        ctx.attn_shape(),
        &mut ws.dq,
        &mut ws.dk,
        &mut ws.dv,
    )?;
    be.rope(&mut ws.dq, n, spec.num_heads, hd, positions, ctx.rope_table, true)?;
    be.rope(&mut ws.dk, n, spec.num_kv_heads, hd, positions, ctx.rope_table, true)?;
    // Per-head norms: q's gradient through its norm into `datt` (attention's backward has read
    // it), k's into `dk_pre`.
    let (dq, dk): (&B::Tensor, &B::Tensor) = match (a.qk.as_ref(), &lw.q_norm, &lw.k_norm, ws.dk_pre.as_mut()) {
        (Some(qk), Some(qn), Some(kn), Some(dk_pre)) => {
            be.rmsnorm_bwd(&ws.dq, &qk.q_pre, qn, norm, &qk.q_inv, n * spec.num_heads, hd, &mut ws.datt, false)?;
            be.rmsnorm_bwd(&ws.dk, &qk.k_pre, kn, norm, &qk.k_inv, n * spec.num_kv_heads, hd, dk_pre, false)?;
            (&ws.datt, &*dk_pre)
        }
        (None, None, None, None) => (&ws.dq, &ws.dk),
        _ => return Err(norm_mismatch("q/k", ctx.layer)),
    };
    let mut first = true;
    for (t, dy) in [(Target::Q, dq), (Target::K, dk), (Target::V, &ws.dv)] {
        lora_linear_bwd(
            ctx,
            t,
            w(t),
            slot!(t),
            &a.h1,
            &a.xa[ti(t)],
            &a.xd[ti(t)],
            dy,
            &mut ws.dh,
            !first,
            &mut m.lora_scratch,
            &mut m.dx_lora,
        )?;
        first = false;
    }
    be.rmsnorm_bwd(&ws.dh, input, &lw.input_norm, norm, &a.inv1, n, d, &mut ws.dx, true)
}
