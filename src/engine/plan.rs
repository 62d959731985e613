//! The memory plan: every buffer the engine and its backend allocate, with its size, computed
//! from the model's shape and the run's settings alone (no GPU, no weights). The Trainer allocates
//! through the same list (a test holds them equal), so the VRAM preview is the allocation.
//!
//! Everything is allocated once before the first step and lives for the whole run; the peak is
//! therefore the sum of the device-resident buffers plus what the CUDA context itself takes.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::backend::DType;
use crate::backend::card::CardLimits;
use crate::backend::workspace::packed_bytes;
use crate::config::{CheckpointPolicy, LoraConfig, Quantization, RunConfig, Target};
use crate::model::ModelSpec;

/// Which backend the plan is for: it sets the element sizes, the alignment and the backend's own
/// workspace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Cpu,
    Cuda,
}

impl BackendKind {
    /// The kind of the backend that reports `device`.
    pub fn of(device: &crate::backend::DeviceInfo) -> Self {
        if device.kind == "cpu" { BackendKind::Cpu } else { BackendKind::Cuda }
    }

    pub fn bytes(self, dtype: DType) -> u64 {
        match (self, dtype) {
            (BackendKind::Cuda, DType::Act) => 2,
            _ => 4,
        }
    }
}

/// The groups the preview stacks, in the order it draws them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Term {
    /// Quantized linears with their quant state, 16-bit embeddings, lm_head and norms.
    BaseWeights,
    /// 16-bit copies of NF4 linears, dequantized once for the run so their GEMMs skip the
    /// per-call dequantization (the first `MemoryPlan::cached_weight_layers` layers).
    DequantizedWeights,
    /// LoRA fp32 masters and their 16-bit compute copies (and trained token rows).
    LoraParams,
    LoraGrads,
    OptimizerStates,
    /// Layer inputs kept for the backward (on the device, or pinned host memory when offloaded).
    SavedActivations,
    /// Per-layer activations (all layers when nothing is recomputed, else one layer's).
    LayerActivations,
    /// Backward scratch, residual stream, batch ids, rotary table.
    Workspace,
    /// The backend's own scratch: NF4 dequantization buffer, loss chunk, GEMM workspace, attention
    /// backward accumulators; on CUDA also the unused space of the chunks small buffers are packed in.
    BackendWorkspace,
    /// The CUDA context and libraries, measured once per card and driver.
    CudaContext,
    /// What other processes hold on the card: not ours, but not ours to have either.
    OtherProcesses,
    /// Samples during training (`[samples]`): the sampler's own copy of the base weights, its
    /// LoRA copy, the KV cache of every prompt, its workspace and logits, and on CUDA its
    /// backend's scratch (`infer_buffers`, which generation allocates from).
    Samples,
}

impl Term {
    pub fn name(self) -> &'static str {
        match self {
            Term::BaseWeights => "base_weights",
            Term::DequantizedWeights => "dequantized_weights",
            Term::LoraParams => "lora_params",
            Term::LoraGrads => "lora_grads",
            Term::OptimizerStates => "optimizer_states",
            Term::SavedActivations => "saved_activations",
            Term::LayerActivations => "layer_activations",
            Term::Workspace => "workspace",
            Term::BackendWorkspace => "backend_workspace",
            Term::CudaContext => "cuda_context",
            Term::OtherProcesses => "other_processes",
            Term::Samples => "samples",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Location {
    Device,
    PinnedHost,
}

/// One allocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlannedBuffer {
    pub name: String,
    pub term: Term,
    pub elems: u64,
    /// `None` for raw byte buffers (NF4 data, quant state); `elems` then counts bytes.
    #[serde(skip)]
    pub dtype: Option<DType>,
    pub location: Location,
}

impl PlannedBuffer {
    pub fn bytes(&self, kind: BackendKind) -> u64 {
        self.dtype.map_or(self.elems, |d| self.elems * kind.bytes(d))
    }

    /// What the buffer takes where it lives: on CUDA its bytes up to the next
    /// `workspace::BUFFER_ALIGN`, where the next buffer of its block starts (`engine::arena`);
    /// on the CPU, where each is a vector of its own, its bytes.
    pub fn footprint(&self, kind: BackendKind) -> u64 {
        match kind {
            BackendKind::Cuda => packed_bytes([self.bytes(kind) as usize]) as u64,
            BackendKind::Cpu => self.bytes(kind),
        }
    }
}

/// Where each of `buffers` starts in the block of its location, in order, and the bytes of the
/// device and the pinned host block: what the engine's arena allocates and carves.
pub fn arena_offsets(buffers: &[PlannedBuffer], kind: BackendKind) -> (Vec<u64>, [u64; 2]) {
    let mut ends = [0u64; 2];
    let offsets = buffers
        .iter()
        .map(|b| {
            let end = &mut ends[usize::from(b.location == Location::PinnedHost)];
            let at = *end;
            *end += b.footprint(kind);
            at
        })
        .collect();
    (offsets, ends)
}

/// The settings the plan depends on.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanInput {
    pub lora: LoraConfig,
    pub quantization: Quantization,
    pub batch_size: usize,
    pub max_seq_len: usize,
    pub checkpointing: CheckpointPolicy,
    /// Embedding rows trained by the untrained-token fix.
    pub token_rows: usize,
    /// Rows per MLP chunk when layers are recomputed; 0 uses `MLP_CHUNK_ROWS`.
    pub mlp_chunk_rows: usize,
    /// The sampler of samples during training, when `[samples]` is on.
    pub samples: Option<SamplerSize>,
}

/// The generation model that answers the samples during training: one cache slot per prompt,
/// each holding the longest training row and the answer (a dataset row's prompt is shorter than
/// its row; a typed one is assumed to fit too), chunks of at most 256 rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SamplerSize {
    pub slots: usize,
    /// Positions per slot, before the model's own limit (`capacity`).
    pub positions: usize,
}

impl SamplerSize {
    /// `None` when samples are off.
    pub fn of(cfg: &RunConfig) -> Option<Self> {
        let s = &cfg.samples;
        if s.every == 0 {
            return None;
        }
        let slots = if s.prompts.is_empty() { s.count } else { s.prompts.len() };
        Some(SamplerSize { slots: slots.max(1), positions: cfg.train.max_seq_len + s.max_new_tokens })
    }

    /// The sampler's `Inference` sizes for `spec`.
    pub fn infer_options(&self, spec: &ModelSpec, quantization: Quantization) -> crate::engine::infer::InferOptions {
        let capacity = self.positions.min(spec.max_position_embeddings.max(2)).max(1);
        crate::engine::infer::InferOptions { quantization, slots: self.slots, capacity, chunk_rows: 256.min(capacity) }
    }
}

impl PlanInput {
    pub fn from_config(cfg: &RunConfig) -> Self {
        PlanInput {
            lora: cfg.lora.clone(),
            quantization: cfg.model.quantization,
            batch_size: cfg.train.batch_size,
            max_seq_len: cfg.train.max_seq_len,
            checkpointing: cfg.memory.checkpointing,
            token_rows: 0,
            mlp_chunk_rows: 0,
            samples: SamplerSize::of(cfg),
        }
    }

    pub fn rows(&self) -> usize {
        self.batch_size * self.max_seq_len
    }
}

/// What the plan is for: a backend and, for a GPU, the card and what of it a run may have. Built
/// for this machine (or a card profile, or a cap) by `crate::device::plan_target`, the one place
/// that reads the device choice, NVML and the measured context.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlanTarget {
    pub kind: BackendKind,
    /// "NVIDIA H200", "NVIDIA L4 (profile l4)", "a 24.00 GiB card", "CPU".
    pub name: String,
    /// The card's limits (the device's own or a profile's); `None` on the CPU or for a card known
    /// only by its size.
    pub card: Option<CardLimits>,
    /// The card's memory (on the CPU, the host's RAM); `None` when unknown.
    pub total_bytes: Option<u64>,
    /// Memory other processes (and the driver) hold on the card (on the CPU, RAM not available):
    /// a term of its own, so our own terms are those of an idle card whatever else runs.
    pub others_bytes: u64,
    /// A hard cap on what our process may use, context included (`--gpu-mem`, `memory.gpu_mem`).
    pub cap_bytes: Option<u64>,
    /// What the CUDA context and libraries take (measured once per card and driver).
    pub context_bytes: u64,
    /// CUDA: the host RAM that pinned buffers (offloaded layer inputs, the memory-mode embedding)
    /// may take: what the host has available. Pinned pages cannot be swapped, so a plan that
    /// needs more does not fit. `None`: not held against anything (a card on an unknown host).
    pub host_bytes: Option<u64>,
}

impl PlanTarget {
    /// The CPU, with nothing known about its RAM.
    pub fn cpu() -> Self {
        PlanTarget {
            kind: BackendKind::Cpu,
            name: "CPU".into(),
            card: None,
            total_bytes: None,
            others_bytes: 0,
            cap_bytes: None,
            context_bytes: 0,
            host_bytes: None,
        }
    }

    /// The same target, with pinned host memory held against `host`'s available RAM.
    pub fn with_host(self, host: Option<&crate::backend::HostMemory>) -> Self {
        PlanTarget { host_bytes: host.map(|h| h.available_bytes), ..self }
    }

    /// An idle card of `total_bytes` known by its size alone, with the default context.
    pub fn gpu(name: &str, total_bytes: u64) -> Self {
        PlanTarget {
            kind: BackendKind::Cuda,
            name: name.into(),
            total_bytes: Some(total_bytes),
            context_bytes: DEFAULT_CUDA_CONTEXT_BYTES,
            ..PlanTarget::cpu()
        }
    }

    /// What our process may take: the card less what other processes hold, within the cap.
    /// `None` when the card's memory is unknown and there is no cap.
    pub fn available_bytes(&self) -> Option<u64> {
        let room = self.total_bytes.map(|t| t.saturating_sub(self.others_bytes));
        match (room, self.cap_bytes) {
            (Some(r), Some(c)) => Some(r.min(c)),
            (r, c) => r.or(c),
        }
    }
}

/// The largest attention call of a run: a full micro-batch of `max_seq_len`-token rows. The CUDA
/// backend sizes its attention scratch for it ([`crate::backend::Backend::reserve_attention`]).
pub fn attention_max_shape(spec: &ModelSpec, batch_size: usize, max_seq_len: usize) -> crate::backend::AttnShape {
    crate::backend::AttnShape {
        batch: batch_size,
        seq: max_seq_len,
        heads: spec.num_heads,
        kv_heads: spec.num_kv_heads,
        head_dim: spec.head_dim,
        ..Default::default()
    }
}

/// What a plan counts for the CUDA context before a backend has measured it on the card.
pub use crate::backend::context::DEFAULT_CUDA_CONTEXT_BYTES;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemoryPlan {
    pub target: PlanTarget,
    /// The policy actually used (`auto` resolved).
    pub checkpointing: CheckpointPolicy,
    /// Layers whose activations are kept through the step (the last ones); the others are
    /// recomputed in the backward. All of them under `none`; under `auto`, as many as the memory
    /// allows once keeping them all does not fit.
    pub kept_layers: usize,
    /// Where the recomputed layers keep attention's output (`off` when none is recomputed).
    pub attention: SavedAttention,
    /// Layers whose NF4 linears hold a dequantized copy (the first ones).
    pub cached_weight_layers: usize,
    /// Whether the recomputed layers' MLP weights are dequantized once per pass (`Mix`).
    pub hold_mlp_weights: bool,
    pub buffers: Vec<PlannedBuffer>,
    /// Our device bytes: every device buffer plus the context (other processes not included).
    pub peak_bytes: u64,
    pub pinned_host_bytes: u64,
    /// Device bytes per term: ours (`cuda_context` included), and `other_processes` when another
    /// program holds memory on the card.
    pub terms: BTreeMap<&'static str, u64>,
    /// What other processes hold (the target's), apart from our own terms.
    pub others_bytes: u64,
    /// Whether `peak_bytes` fits what the target leaves us (the card less other processes, within
    /// the cap; on the CPU, everything in the RAM available) and `pinned_host_bytes` its host's RAM.
    pub fits: bool,
    /// Whether `pinned_host_bytes` fits the target's host RAM (true when not held against any).
    pub host_fits: bool,
    /// The predicted micro-step on the target's card (`crate::engine::cost`); `None` on the CPU
    /// and for a card whose speed is not known.
    pub step: Option<crate::engine::cost::StepPrediction>,
}

/// Bytes of an NF4 tensor on the device (`quant::nf4::device_parts`).
pub fn nf4_device_bytes(numel: u64) -> u64 {
    crate::quant::nf4::device_bytes(numel as usize) as u64
}

fn buf(name: impl Into<String>, term: Term, elems: usize, dtype: DType) -> PlannedBuffer {
    PlannedBuffer { name: name.into(), term, elems: elems as u64, dtype: Some(dtype), location: Location::Device }
}

/// Whether the embedding table lives in pinned host memory: in memory mode, when it is not also
/// the lm_head (a step reads only its batch's rows of it).
pub fn embed_on_host(spec: &ModelSpec, policy: CheckpointPolicy) -> bool {
    policy == CheckpointPolicy::Offload && !spec.tie_word_embeddings
}

/// The frozen model as the backend stores it; on CUDA the NF4 linears of the first
/// `cached_layers` layers also hold their dequantized 16-bit copy, allocated right after each.
pub fn weight_buffers(
    spec: &ModelSpec,
    quant: Quantization,
    kind: BackendKind,
    max_pos: usize,
    policy: CheckpointPolicy,
    cached_layers: usize,
) -> Vec<PlannedBuffer> {
    let (v, d) = (spec.vocab_size, spec.hidden_size);
    let mut embed = buf("embed_tokens", Term::BaseWeights, v * d, DType::Act);
    if embed_on_host(spec, policy) {
        embed.location = Location::PinnedHost;
    }
    let mut out = vec![embed];
    if !spec.tie_word_embeddings {
        out.push(buf("lm_head", Term::BaseWeights, v * d, DType::Act));
    }
    out.push(buf("final_norm", Term::BaseWeights, d, DType::Act));
    for l in 0..spec.num_layers {
        out.push(buf(format!("layers.{l}.input_norm"), Term::BaseWeights, d, DType::Act));
        out.push(buf(format!("layers.{l}.post_attention_norm"), Term::BaseWeights, d, DType::Act));
        if spec.sandwich_norms {
            out.push(buf(format!("layers.{l}.attn_out_norm"), Term::BaseWeights, d, DType::Act));
            out.push(buf(format!("layers.{l}.mlp_out_norm"), Term::BaseWeights, d, DType::Act));
        }
        for name in spec.qk_norm_names() {
            out.push(buf(format!("layers.{l}.{name}"), Term::BaseWeights, spec.head_dim, DType::Act));
        }
        for t in Target::ALL {
            let (o, i) = spec.linear_shape(t);
            let name = format!("layers.{l}.{}", t.hf_name());
            // The CPU backend keeps every base linear dequantized in its float type.
            match (quant, kind) {
                (Quantization::Nf4, BackendKind::Cuda) => out.push(PlannedBuffer {
                    name,
                    term: Term::BaseWeights,
                    elems: nf4_device_bytes((o * i) as u64),
                    dtype: None,
                    location: Location::Device,
                }),
                _ => out.push(buf(name, Term::BaseWeights, o * i, DType::Act)),
            }
            if spec.has_bias(t) {
                out.push(buf(format!("layers.{l}.{}.bias", t.hf_name()), Term::BaseWeights, o, DType::Act));
            }
            if caches_dequantized(quant, kind) && l < cached_layers {
                out.push(buf(format!("layers.{l}.{}.dequantized", t.hf_name()), Term::DequantizedWeights, o * i, DType::Act));
            }
        }
    }
    out.push(buf("rope_table", Term::Workspace, 2 * max_pos * (spec.head_dim / 2), DType::F32));
    if spec.local_rope.is_some() {
        out.push(buf("rope_table_local", Term::Workspace, 2 * max_pos * (spec.head_dim / 2), DType::F32));
    }
    out
}

/// Whether a layer's linears can hold a dequantized copy: NF4 on a backend that dequantizes per
/// call (the CPU keeps every weight dequantized already).
pub fn caches_dequantized(quant: Quantization, kind: BackendKind) -> bool {
    quant == Quantization::Nf4 && kind == BackendKind::Cuda
}

/// Rows per MLP chunk when layers are recomputed: the MLP's `[rows, intermediate]` activations
/// are the largest per-layer buffers, and it is row-independent, so it runs in chunks.
pub const MLP_CHUNK_ROWS: usize = 4096;

/// The MLP chunk the engine uses for `rows` rows (`requested` 0 = the default).
pub fn mlp_chunk_rows(rows: usize, keep_all: bool, requested: usize) -> usize {
    let chunk = if requested == 0 { MLP_CHUNK_ROWS } else { requested };
    if keep_all { rows } else { rows.min(chunk) }
}

/// Whether the engine keeps every layer's activations (no recompute) under `policy`.
pub fn keeps_all(policy: CheckpointPolicy) -> bool {
    policy == CheckpointPolicy::None
}

/// The layers a resolved `policy` keeps when `auto` chose nothing finer: every layer or none.
pub fn kept_layers(spec: &ModelSpec, policy: CheckpointPolicy) -> usize {
    if keeps_all(policy) { spec.num_layers } else { 0 }
}

/// How the per-layer activation sets are laid out when the last `kept` of a model's layers keep
/// theirs and the others are recomputed: one shared set for the recomputed layers (MLP in row
/// chunks) first, then one set per kept layer (MLP over all rows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActLayout {
    pub layers: usize,
    pub kept: usize,
    pub rows: usize,
    /// Rows per MLP chunk of a recomputed layer.
    pub chunk: usize,
}

impl ActLayout {
    pub fn new(spec: &ModelSpec, rows: usize, kept: usize, requested_chunk: usize) -> Self {
        let layers = spec.num_layers;
        let kept = kept.min(layers);
        let chunk = mlp_chunk_rows(rows, kept == layers, requested_chunk);
        ActLayout { layers, kept, rows, chunk }
    }
    /// The first layer that keeps its activations.
    pub fn first_kept(&self) -> usize {
        self.layers - self.kept
    }
    pub fn is_kept(&self, layer: usize) -> bool {
        layer >= self.first_kept()
    }
    /// Whether some layer is recomputed (the shared set exists).
    pub fn recomputes(&self) -> bool {
        self.kept < self.layers
    }
    /// The activation sets, in allocation order, with the MLP rows of each.
    pub fn sets(&self) -> Vec<usize> {
        let shared = self.recomputes().then_some(self.chunk);
        shared.into_iter().chain(std::iter::repeat_n(self.rows, self.kept)).collect()
    }
    /// The set `layer` uses.
    pub fn set_of(&self, layer: usize) -> usize {
        let shared = usize::from(self.recomputes());
        if self.is_kept(layer) { shared + layer - self.first_kept() } else { 0 }
    }
    /// The MLP rows `layer` runs at once.
    pub fn mlp_rows(&self, layer: usize) -> usize {
        if self.is_kept(layer) { self.rows } else { self.chunk }
    }
    /// The rows the MLP backward scratch must hold: all of them once one layer is kept.
    pub fn workspace_mlp_rows(&self) -> usize {
        if self.kept > 0 { self.rows } else { self.chunk }
    }
}

/// Where the recomputed layers keep attention's output and log-sum-exp from the forward, so that
/// their recompute in the backward skips attention's forward, the costliest kernel of a long row
/// (the output and log-sum-exp are all attention's backward reads besides q, k and v).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SavedAttention {
    /// Not kept: the recompute runs attention's forward again.
    #[default]
    Off,
    /// One output and log-sum-exp per recomputed layer on the device.
    Device,
    /// In pinned host memory, through one device copy: out during the forward while the layer's
    /// MLP runs, back one layer ahead in the backward.
    Host,
}

/// A resolved checkpointing choice: what a plan is built for, what the engine runs and what the
/// cost model prices (`auto` searches over these).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Mix {
    /// Never `auto`.
    pub policy: CheckpointPolicy,
    /// Layers whose activations are kept (the last ones); the others are recomputed.
    pub kept_layers: usize,
    /// Where the recomputed layers keep attention's output.
    pub attention: SavedAttention,
    /// Layers whose NF4 linears hold a dequantized copy (the first ones, which the recompute
    /// dequantizes most often); 0 where weights are not NF4 on a GPU.
    pub cached_weight_layers: usize,
    /// The MLP's three NF4 weights of a recomputed layer are dequantized once per pass, each
    /// into a scratch of its own held through the row chunks, instead of once per chunk into the
    /// one shared scratch (two more buffers of the largest linear: [`MLP_HELD_WEIGHTS`]).
    pub hold_mlp_weights: bool,
}

/// The dequantization scratch buffers when the MLP's weights are held: gate, up and down.
pub const MLP_HELD_WEIGHTS: usize = 3;

impl Mix {
    /// A fixed policy with the layers it keeps, nothing else.
    pub fn of_policy(spec: &ModelSpec, policy: CheckpointPolicy) -> Self {
        Mix {
            policy,
            kept_layers: kept_layers(spec, policy),
            attention: SavedAttention::Off,
            cached_weight_layers: 0,
            hold_mlp_weights: false,
        }
    }

    /// Whether holding the MLP's weights does anything for this mix: NF4 on a GPU, and a layer
    /// that is recomputed without a dequantized copy of its weights. The plan and the engine
    /// both decide by this.
    pub fn holds_mlp_weights(&self, spec: &ModelSpec, quant: Quantization, kind: BackendKind) -> bool {
        let first_kept = spec.num_layers - self.kept_layers.min(spec.num_layers);
        self.hold_mlp_weights
            && caches_dequantized(quant, kind)
            && !keeps_all(self.policy)
            && self.cached_weight_layers.min(spec.num_layers) < first_kept
    }
}

/// Per-layer activations only some families have, after the common ones: the inputs and inverse
/// RMS of the per-head q/k norms (Qwen3, Gemma 3), and the pre-norm outputs and inverse RMS of
/// Gemma's attention and MLP output norms (the MLP's per chunk).
pub fn layer_extra_acts(spec: &ModelSpec, rows: usize, chunk: usize) -> Vec<(&'static str, usize, DType)> {
    let mut out = Vec::new();
    if spec.qk_norm {
        out.push(("q_pre", rows * spec.q_dim(), DType::Act));
        out.push(("k_pre", rows * spec.kv_dim(), DType::Act));
        out.push(("q_inv", rows * spec.num_heads, DType::F32));
        out.push(("k_inv", rows * spec.num_kv_heads, DType::F32));
    }
    if spec.sandwich_norms {
        out.push(("attn_out_pre", rows * spec.hidden_size, DType::Act));
        out.push(("attn_out_inv", rows, DType::F32));
        out.push(("mlp_out_pre", chunk * spec.hidden_size, DType::Act));
        out.push(("mlp_out_inv", chunk, DType::F32));
    }
    out
}

/// Backward scratch only some families need: the gradient of k before its norm (q's reuses
/// `datt`), and of the MLP's output before Gemma's norm (per chunk).
pub fn workspace_extra(spec: &ModelSpec, rows: usize, chunk: usize) -> Vec<(&'static str, usize, DType)> {
    let mut out = Vec::new();
    if spec.qk_norm {
        out.push(("dk_pre", rows * spec.kv_dim(), DType::Act));
    }
    if spec.sandwich_norms {
        out.push(("dmlp_out", chunk * spec.hidden_size, DType::Act));
    }
    out
}

/// Attention's output and log-sum-exp for `rows` rows, as a layer's forward writes them.
pub fn attention_pair(spec: &ModelSpec, rows: usize) -> [(&'static str, usize, DType); 2] {
    [("att", rows * spec.q_dim(), DType::Act), ("lse", rows * spec.num_heads, DType::F32)]
}

/// The kept attention of every recomputed layer (none when `attention` is off or no layer is
/// recomputed), in allocation order.
pub fn saved_attention_buffers(spec: &ModelSpec, layout: &ActLayout, attention: SavedAttention) -> Vec<(String, usize, DType)> {
    if attention == SavedAttention::Off {
        return Vec::new();
    }
    (0..layout.first_kept())
        .flat_map(|l| attention_pair(spec, layout.rows).map(|(name, n, dt)| (format!("saved_{name}.{l}"), n, dt)))
        .collect()
}

/// The buffers `engine::Trainer::new` allocates, in order, for a resolved policy that keeps the
/// activations of the last `kept` layers, and attention's output where `attention` says.
pub fn engine_buffers(
    spec: &ModelSpec,
    input: &PlanInput,
    policy: CheckpointPolicy,
    kept: usize,
    attention: SavedAttention,
) -> Vec<PlannedBuffer> {
    let rows = input.rows();
    let r = input.lora.r;
    let (d, f, qd, kvd, h) = (spec.hidden_size, spec.intermediate_size, spec.q_dim(), spec.kv_dim(), spec.num_heads);
    let mut out = Vec::new();
    let mut targets = input.lora.targets.clone();
    targets.sort();
    for l in 0..spec.num_layers {
        for &t in &targets {
            let (o, i) = spec.linear_shape(t);
            let p = format!("lora.{l}.{}", t.short());
            let (na, nb) = (r * i, o * r);
            out.push(buf(format!("{p}.a"), Term::LoraParams, na, DType::F32));
            out.push(buf(format!("{p}.b"), Term::LoraParams, nb, DType::F32));
            out.push(buf(format!("{p}.a_compute"), Term::LoraParams, na, DType::Act));
            out.push(buf(format!("{p}.b_compute"), Term::LoraParams, nb, DType::Act));
            out.push(buf(format!("{p}.grad_a"), Term::LoraGrads, na, DType::F32));
            out.push(buf(format!("{p}.grad_b"), Term::LoraGrads, nb, DType::F32));
            for m in ["m_a", "v_a"] {
                out.push(buf(format!("{p}.{m}"), Term::OptimizerStates, na, DType::F32));
            }
            for m in ["m_b", "v_b"] {
                out.push(buf(format!("{p}.{m}"), Term::OptimizerStates, nb, DType::F32));
            }
        }
    }
    let dropout_on = input.lora.dropout > 0.0;
    let layout = ActLayout::new(spec, rows, kept, input.mlp_chunk_rows);
    let a = Term::LayerActivations;
    for (s, chunk) in layout.sets().into_iter().enumerate() {
        let p = format!("acts.{s}");
        let attention = [Target::Q, Target::K, Target::V, Target::O];
        let mlp = [Target::Gate, Target::Up, Target::Down];
        for (group, n_rows) in [(&attention[..], rows), (&mlp[..], chunk)] {
            for &t in group.iter().filter(|t| targets.contains(t)) {
                out.push(buf(format!("{p}.xa.{}", t.short()), a, n_rows * r, DType::Act));
                if dropout_on {
                    out.push(buf(format!("{p}.xd.{}", t.short()), a, n_rows * spec.linear_shape(t).1, DType::Act));
                }
            }
        }
        for (name, n, dt) in [
            ("h1", rows * d, DType::Act),
            ("inv1", rows, DType::F32),
            ("q", rows * qd, DType::Act),
            ("k", rows * kvd, DType::Act),
            ("v", rows * kvd, DType::Act),
            ("att", rows * qd, DType::Act),
            ("lse", rows * h, DType::F32),
            ("x2", rows * d, DType::Act),
            ("h2", rows * d, DType::Act),
            ("inv2", rows, DType::F32),
            ("g", chunk * f, DType::Act),
            ("u", chunk * f, DType::Act),
            ("m", chunk * f, DType::Act),
        ] {
            out.push(buf(format!("{p}.{name}"), a, n, dt));
        }
        for (name, n, dt) in layer_extra_acts(spec, rows, chunk) {
            out.push(buf(format!("{p}.{name}"), a, n, dt));
        }
    }
    for l in 0..spec.num_layers {
        let mut b = buf(format!("saved_input.{l}"), Term::SavedActivations, rows * d, DType::Act);
        if policy == CheckpointPolicy::Offload {
            b.location = Location::PinnedHost;
        }
        out.push(b);
    }
    for (name, n, dt) in saved_attention_buffers(spec, &layout, attention) {
        let mut b = buf(name, Term::SavedActivations, n, dt);
        if attention == SavedAttention::Host {
            b.location = Location::PinnedHost;
        }
        out.push(b);
    }
    let w = Term::Workspace;
    let (chunk, mlp_rows) = (layout.chunk, layout.workspace_mlp_rows());
    for (name, n, dt) in [
        ("x", rows * d, DType::Act),
        ("layer_out", rows * d, DType::Act),
        ("hf", rows * d, DType::Act),
        ("invf", rows, DType::F32),
        ("dx", rows * d, DType::Act),
        ("dh", rows * d, DType::Act),
        ("dq", rows * qd, DType::Act),
        ("dk", rows * kvd, DType::Act),
        ("dv", rows * kvd, DType::Act),
        ("datt", rows * qd, DType::Act),
        ("dm", mlp_rows * f, DType::Act),
        ("dg", mlp_rows * f, DType::Act),
        ("du", mlp_rows * f, DType::Act),
        ("lora_scratch", rows * r, DType::Act),
        ("dx_lora", (rows * d.max(qd)).max(mlp_rows * f), DType::Act),
    ] {
        out.push(buf(format!("ws.{name}"), w, n, dt));
    }
    for (name, n, dt) in workspace_extra(spec, rows, mlp_rows) {
        out.push(buf(format!("ws.{name}"), w, n, dt));
    }
    if layout.recomputes() && chunk < rows {
        for name in ["h2", "dy", "out"] {
            out.push(buf(format!("ws.chunk.{name}"), w, chunk * d, DType::Act));
        }
    }
    if policy == CheckpointPolicy::Offload {
        for i in 0..2 {
            out.push(buf(format!("ws.stage.{i}"), w, rows * d, DType::Act));
        }
    }
    if attention == SavedAttention::Host && layout.recomputes() {
        for (name, n, dt) in attention_pair(spec, rows) {
            out.push(buf(format!("ws.stage.{name}"), w, n, dt));
        }
    }
    // Batch ids (i32, counted as 4-byte elements).
    for name in ["ids", "targets", "positions", "segments"] {
        out.push(buf(format!("batch.{name}"), w, rows, DType::F32));
    }
    out.extend(token_row_buffers(spec, input.token_rows));
    out
}

/// The buffers of `k` embedding (and untied head) rows trained with the adapter, which
/// `Trainer::set_token_rows` allocates once the preflight has chosen them (none when `k` is 0).
pub fn token_row_buffers(spec: &ModelSpec, k: usize) -> Vec<PlannedBuffer> {
    let mut out = Vec::new();
    if k == 0 {
        return out;
    }
    let d = spec.hidden_size;
    let heads = if spec.tie_word_embeddings { 1 } else { 2 };
    for m in 0..heads {
        let which = if m == 0 { "embed" } else { "head" };
        out.push(buf(format!("token_rows.{which}"), Term::LoraParams, k * d, DType::F32));
        out.push(buf(format!("token_rows.{which}.grad"), Term::LoraGrads, k * d, DType::F32));
        out.push(buf(format!("token_rows.{which}.m"), Term::OptimizerStates, k * d, DType::F32));
        out.push(buf(format!("token_rows.{which}.v"), Term::OptimizerStates, k * d, DType::F32));
    }
    // Ids are i32, counted as 4-byte elements.
    out.push(buf("token_rows.ids", Term::Workspace, k, DType::F32));
    out.push(buf("token_rows.slot_of_token", Term::Workspace, spec.vocab_size, DType::F32));
    out
}

/// The buffers of a generation model (`engine::infer::Inference`) with an adapter of `lora`
/// (rank and targets; `None`: no adapter) and `token_rows` trained token rows, under `term`:
/// its frozen weights (the embedding and head with the trained rows appended), then the LoRA
/// compute copies, the KV cache, the workspace of one chunk and the logits. `Inference::new`
/// allocates its own buffers by these names and sizes, so this list is what it takes; the
/// backend's scratch is apart ([`cuda_creation_scratch`]).
pub fn infer_buffers(
    spec: &ModelSpec,
    io: &crate::engine::infer::InferOptions,
    lora: Option<(usize, &[Target])>,
    token_rows: usize,
    kind: BackendKind,
    term: Term,
) -> Vec<PlannedBuffer> {
    let ext = ModelSpec { vocab_size: spec.vocab_size + token_rows, ..spec.clone() };
    let mut out = weight_buffers(&ext, io.quantization, kind, io.capacity, CheckpointPolicy::None, 0);
    let rank = lora.map_or(1, |(r, _)| r.max(1));
    let (d, f, qd, kvd) = (spec.hidden_size, spec.intermediate_size, spec.q_dim(), spec.kv_dim());
    let mut b = |name: String, elems: usize, dtype: DType| out.push(buf(name, term, elems, dtype));
    for l in 0..spec.num_layers {
        for &t in lora.map_or(&[][..], |(_, t)| t) {
            let (o, i) = spec.linear_shape(t);
            b(format!("lora.{l}.{}.a", t.short()), rank * i, DType::Act);
            b(format!("lora.{l}.{}.b", t.short()), o * rank, DType::Act);
        }
    }
    for l in 0..spec.num_layers {
        for kv in ["k", "v"] {
            b(format!("cache.{l}.{kv}"), io.slots * io.capacity * kvd, DType::Act);
        }
    }
    let n = io.chunk_rows;
    // Token ids, slots and positions are i32: counted as 4-byte elements.
    for (name, elems, dtype) in [
        ("ids", n, DType::F32),
        ("slots", n, DType::F32),
        ("positions", n, DType::F32),
        ("row_scale", n, DType::F32),
        ("x", n * d, DType::Act),
        ("h", n * d, DType::Act),
        ("t", n * d, DType::Act),
        ("pre", n * d, DType::Act),
        ("inv", n, DType::F32),
        ("q_pre", n * qd, DType::Act),
        ("k_pre", n * kvd, DType::Act),
        ("qk_inv", n * spec.num_heads, DType::F32),
        ("q", n * qd, DType::Act),
        ("k", n * kvd, DType::Act),
        ("v", n * kvd, DType::Act),
        ("att", n * qd, DType::Act),
        ("g", n * f, DType::Act),
        ("u", n * f, DType::Act),
        ("m", n * f, DType::Act),
        ("xa", n * rank, DType::Act),
        ("last", io.slots * d, DType::Act),
        ("last_normed", io.slots * d, DType::Act),
        ("last_inv", io.slots, DType::F32),
        ("logits", io.slots * ext.vocab_size, DType::F32),
    ] {
        b(format!("ws.{name}"), elems, dtype);
    }
    for x in out.iter_mut() {
        x.term = term;
    }
    out
}

/// What a CUDA backend allocates when it is created (before any weights): the GEMM workspace, the
/// loss chunk and the norm reduction's partial sums; with NF4 weights also the dequantization
/// buffer the first weights bring.
pub fn cuda_creation_scratch(spec: &ModelSpec, quantization: Quantization) -> Vec<PlannedBuffer> {
    use crate::backend::workspace::{GEMM_WORKSPACE_BYTES, LOSS_CHUNK_ELEMS, SMALL_SCRATCH};
    let bw = Term::BackendWorkspace;
    let raw = |name: &str, bytes: usize| PlannedBuffer {
        name: name.into(),
        term: bw,
        elems: bytes as u64,
        dtype: None,
        location: Location::Device,
    };
    // The small ones share one block, each at its aligned place: their footprints add up to it.
    let mut out = vec![
        raw("gemm_workspace", GEMM_WORKSPACE_BYTES),
        raw("loss.logits", LOSS_CHUNK_ELEMS * 4),
        raw("loss.dlogits", LOSS_CHUNK_ELEMS * 2),
    ];
    out.extend(SMALL_SCRATCH.map(|(name, bytes)| raw(name, bytes)));
    if quantization == Quantization::Nf4 {
        let largest = Target::ALL.iter().map(|&t| {
            let (o, i) = spec.linear_shape(t);
            o * i
        });
        out.push(buf("dequant_scratch", bw, largest.max().unwrap_or(0), DType::Act));
    }
    out
}

/// The sampler of samples during training (`input.samples`), all under [`Term::Samples`]: its
/// generation model with the run's LoRA and token rows, and on CUDA the scratch of its own
/// backend (a second `CudaBackend` on the run's card, in this process: the context is shared).
/// The session's log and the plan both count it from here.
pub fn sampler_buffers(spec: &ModelSpec, input: &PlanInput, kind: BackendKind) -> Vec<PlannedBuffer> {
    let Some(size) = input.samples else { return Vec::new() };
    let io = size.infer_options(spec, input.quantization);
    let mut targets = input.lora.targets.clone();
    targets.sort();
    let mut out = infer_buffers(spec, &io, Some((input.lora.r, &targets)), input.token_rows, kind, Term::Samples);
    if kind == BackendKind::Cuda {
        out.extend(cuda_creation_scratch(spec, input.quantization).into_iter().map(|b| PlannedBuffer { term: Term::Samples, ..b }));
    }
    out
}

/// The CUDA backend's own scratch, as `backend::cuda` allocates it: everything at creation (in this
/// order), then the NF4 dequantization buffer with the weights (and two more when the MLP's
/// weights are held: `Mix::hold_mlp_weights`), and the attention backward's accumulators when
/// the Trainer reserves them for its largest batch.
pub fn cuda_workspace(spec: &ModelSpec, input: &PlanInput, hold_mlp_weights: bool) -> Vec<PlannedBuffer> {
    use crate::backend::workspace::attention_scratch_bytes;
    let mut out = cuda_creation_scratch(spec, input.quantization);
    if hold_mlp_weights && let Some(first) = out.iter().find(|b| b.name == "dequant_scratch").cloned() {
        out.extend((1..MLP_HELD_WEIGHTS).map(|i| PlannedBuffer { name: format!("dequant_scratch.{i}"), ..first.clone() }));
    }
    let raw = |name: &str, bytes: usize| PlannedBuffer {
        name: name.into(),
        term: Term::BackendWorkspace,
        elems: bytes as u64,
        dtype: None,
        location: Location::Device,
    };
    out.push(raw("attention.bwd_scratch", attention_scratch_bytes(attention_max_shape(spec, input.batch_size, input.max_seq_len))));
    out
}

fn total(buffers: &[PlannedBuffer], kind: BackendKind, loc: Location) -> u64 {
    buffers.iter().filter(|b| b.location == loc).map(|b| b.footprint(kind)).sum()
}

/// `mix` with what does nothing for this run switched off: attention's output kept where no layer
/// is recomputed, cached weights but NF4 on a GPU, held MLP weights where no layer needs them.
/// Mixes that differ only there build the same plan (and `Plans` builds it once).
fn effective(spec: &ModelSpec, input: &PlanInput, kind: BackendKind, mix: Mix) -> Mix {
    let attention = if mix.kept_layers >= spec.num_layers { SavedAttention::Off } else { mix.attention };
    let cached_weight_layers = if caches_dequantized(input.quantization, kind) { mix.cached_weight_layers.min(spec.num_layers) } else { 0 };
    let mix = Mix { attention, cached_weight_layers, ..mix };
    Mix { hold_mlp_weights: mix.holds_mlp_weights(spec, input.quantization, kind), ..mix }
}

fn build(spec: &ModelSpec, input: &PlanInput, target: &PlanTarget, mix: Mix) -> MemoryPlan {
    let kind = target.kind;
    let mix = effective(spec, input, kind, mix);
    let Mix { policy, kept_layers, attention, cached_weight_layers, hold_mlp_weights } = mix;
    let mut buffers = weight_buffers(spec, input.quantization, kind, input.max_seq_len, policy, cached_weight_layers);
    buffers.extend(engine_buffers(spec, input, policy, kept_layers, attention));
    if kind == BackendKind::Cuda {
        buffers.extend(cuda_workspace(spec, input, hold_mlp_weights));
    }
    buffers.extend(sampler_buffers(spec, input, kind));
    let mut terms: BTreeMap<&'static str, u64> = BTreeMap::new();
    for b in buffers.iter().filter(|b| b.location == Location::Device) {
        *terms.entry(b.term.name()).or_default() += b.footprint(kind);
    }
    if target.context_bytes > 0 {
        terms.insert(Term::CudaContext.name(), target.context_bytes);
    }
    let peak_bytes = total(&buffers, kind, Location::Device) + target.context_bytes;
    let pinned_host_bytes = total(&buffers, kind, Location::PinnedHost);
    if target.others_bytes > 0 {
        terms.insert(Term::OtherProcesses.name(), target.others_bytes);
    }
    let host_fits = pinned_host_bytes == 0 || target.host_bytes.is_none_or(|host| pinned_host_bytes <= host);
    // On the CPU "pinned" memory is the same RAM as the rest.
    let need = if kind == BackendKind::Cpu { peak_bytes + pinned_host_bytes } else { peak_bytes };
    let fits = host_fits && target.available_bytes().is_none_or(|room| need <= room);
    MemoryPlan {
        target: target.clone(),
        checkpointing: policy,
        kept_layers,
        attention,
        cached_weight_layers,
        hold_mlp_weights,
        buffers,
        peak_bytes,
        pinned_host_bytes,
        terms,
        others_bytes: target.others_bytes,
        fits,
        host_fits,
        step: target.card.as_ref().and_then(|card| crate::engine::cost::predict(spec, input, mix, card)),
    }
}

/// What `auto` leaves free when it keeps some layers' activations and recomputes the others: it
/// fills the card up to here, and a desktop's other processes grow (a browser tab, the
/// compositor), so the plan must not end a few megabytes short of an out-of-memory error.
pub const PARTIAL_KEEP_HEADROOM_BYTES: u64 = 512 << 20;

/// Whether a plan that fills the card by choice (kept layers, attention kept on the device) leaves
/// [`PARTIAL_KEEP_HEADROOM_BYTES`] free.
fn fits_with_headroom(p: &MemoryPlan) -> bool {
    p.fits && p.target.available_bytes().is_none_or(|free| p.peak_bytes + PARTIAL_KEEP_HEADROOM_BYTES <= free)
}

/// The plans of one `auto` search, each mix built once: the searches below ask for the same
/// mixes again (a candidate is the start of its cache search), and a plan is a few thousand
/// buffers that the studio's budget builds while a slider moves.
struct Plans<'a> {
    spec: &'a ModelSpec,
    input: &'a PlanInput,
    target: &'a PlanTarget,
    built: std::cell::RefCell<std::collections::HashMap<Mix, std::rc::Rc<MemoryPlan>>>,
}

impl<'a> Plans<'a> {
    fn new(spec: &'a ModelSpec, input: &'a PlanInput, target: &'a PlanTarget) -> Self {
        Plans { spec, input, target, built: Default::default() }
    }

    fn of(&self, mix: Mix) -> std::rc::Rc<MemoryPlan> {
        let mix = effective(self.spec, self.input, self.target.kind, mix);
        if let Some(p) = self.built.borrow().get(&mix) {
            return p.clone();
        }
        let p = std::rc::Rc::new(build(self.spec, self.input, self.target, mix));
        self.built.borrow_mut().insert(mix, p.clone());
        p
    }

    /// Under `layer` checkpointing, the most layers whose activations can be kept with
    /// [`PARTIAL_KEEP_HEADROOM_BYTES`] to spare (each kept layer skips its recompute in the
    /// backward), the rest of the mix as `with` says (kept attention, cached weights).
    fn most_kept(&self, with: Mix) -> std::rc::Rc<MemoryPlan> {
        let layer = Mix { policy: CheckpointPolicy::Layer, ..with };
        // All of them is `none`.
        self.most_that_fit(self.spec.num_layers - 1, None, |k| Mix { kept_layers: k, ..layer })
    }

    /// The most layers of `with` whose linears can hold their dequantized copy with
    /// [`PARTIAL_KEEP_HEADROOM_BYTES`] to spare (none where weights are not NF4 on a GPU).
    fn most_cached(&self, with: Mix) -> std::rc::Rc<MemoryPlan> {
        if !caches_dequantized(self.input.quantization, self.target.kind) {
            return self.of(with);
        }
        // Each cached layer adds its linears in 16 bits.
        let per_layer = self.spec.layer_linear_params() * self.target.kind.bytes(DType::Act);
        self.most_that_fit(self.spec.num_layers, Some(per_layer), |c| Mix { cached_weight_layers: c, ..with })
    }

    /// The plan of the largest `n` in `0..=max` whose plan fits with the headroom (the plan of 0
    /// when none does, or on a target without a memory limit), for mixes whose peak grows by about
    /// `step` bytes with each `n` (measured from 0 and 1 when not given). The walk starts at the
    /// guess the step gives: two or three plans where a bisection built six.
    fn most_that_fit(&self, max: usize, step: Option<u64>, mix: impl Fn(usize) -> Mix) -> std::rc::Rc<MemoryPlan> {
        let base = self.of(mix(0));
        let Some(free) = self.target.available_bytes() else { return base };
        if max == 0 || !base.fits {
            return base;
        }
        let room = free.saturating_sub(PARTIAL_KEEP_HEADROOM_BYTES).saturating_sub(base.peak_bytes);
        let step = step.unwrap_or_else(|| self.of(mix(1)).peak_bytes.saturating_sub(base.peak_bytes)).max(1);
        let fits = |n: usize| n == 0 || fits_with_headroom(&self.of(mix(n)));
        let mut n = ((room / step) as usize).min(max);
        if fits(n) {
            while n < max && fits(n + 1) {
                n += 1;
            }
        } else {
            while !fits(n) {
                n -= 1;
            }
        }
        self.of(mix(n))
    }
}

/// The plan for a run; `auto` searches the mixes that fit (keep everything; keep layer inputs on
/// the device with as many layers' activations kept as the card has room for, the others
/// recomputed; offload the inputs to pinned host memory), each of the last two also with the
/// recomputed layers' attention output kept on the device or in pinned host memory, and each with
/// as many layers' weights dequantized once for the run as the room left allows (under `layer`
/// also the other way round: the weights first, then the kept layers), for the shortest predicted
/// step (`crate::engine::cost`). Without a prediction (a card of unknown speed) it takes the
/// first that fits of the first three, in the order of their cost, with the weights cached that
/// the room left allows (a cached weight only removes work). A fixed policy is built as it is,
/// nothing cached: `offload` is what a user sets to spend the least memory.
pub fn plan(spec: &ModelSpec, input: &PlanInput, target: &PlanTarget) -> MemoryPlan {
    let policy = match input.checkpointing {
        CheckpointPolicy::Auto => return auto(spec, input, target),
        p => p,
    };
    build(spec, input, target, Mix::of_policy(spec, policy))
}

fn auto(spec: &ModelSpec, input: &PlanInput, target: &PlanTarget) -> MemoryPlan {
    use std::rc::Rc;
    let plans = Plans::new(spec, input, target);
    let order = [CheckpointPolicy::None, CheckpointPolicy::Layer, CheckpointPolicy::Offload];
    // A mix that recomputes holds the MLP's weights through its row chunks where the two more
    // scratch buffers fit (nothing to hold on the CPU, or for 16-bit weights).
    let held = |p: CheckpointPolicy| {
        let mix = Mix::of_policy(spec, p);
        let with = plans.of(Mix { hold_mlp_weights: true, ..mix });
        if with.fits { with } else { plans.of(mix) }
    };
    let mut candidates: Vec<Rc<MemoryPlan>> = order.iter().map(|&p| held(p)).collect();
    // On the CPU, memory is not planned against a card; recompute when activations would take
    // more than 2 GiB, as the engine does.
    if target.kind == BackendKind::Cpu {
        let acts = candidates[0].terms.get(Term::LayerActivations.name()).copied().unwrap_or(0);
        let pick = if acts < (2 << 30) { 0 } else { 1 };
        return MemoryPlan::clone(&candidates[pick]);
    }
    if !candidates[0].fits && candidates[1].fits {
        candidates[1] = plans.most_kept(candidates[1].mix());
    }
    let mut fitting: Vec<Rc<MemoryPlan>> = candidates.iter().filter(|p| p.fits).cloned().collect();
    if fitting.is_empty() {
        return MemoryPlan::clone(&candidates[2]);
    }
    let predicted = |p: &MemoryPlan| p.step.as_ref().map(|s| s.step_s);
    if !fitting.iter().all(|p| predicted(p).is_some()) {
        return MemoryPlan::clone(&plans.most_cached(fitting[0].mix()));
    }
    if !fitting[0].keeps_all(spec) {
        // Keeping attention's output trades memory (device or pinned host) for attention's second
        // forward; it fills the card by choice, so it keeps the headroom.
        for attention in [SavedAttention::Device, SavedAttention::Host] {
            let kept = plans.most_kept(Mix { attention, ..candidates[1].mix() });
            let offload = plans.of(Mix { attention, ..candidates[2].mix() });
            fitting.extend([kept, offload].into_iter().filter(|p| fits_with_headroom(p)));
        }
    }
    // Dequantized weights spend memory on the dequantization of every pass; kept activations
    // spend it on a recompute. Each mix gets the weights the room it leaves allows; under `layer`
    // the weights may also come first, the kept layers after (for the kept attention of the
    // fastest `layer` mix so far). A mix whose step would not beat the fastest so far even with
    // every layer's weights cached is not searched (a prediction needs no plan).
    let by_time = |a: &Rc<MemoryPlan>, b: &Rc<MemoryPlan>| predicted(a).partial_cmp(&predicted(b)).expect("finite times");
    let best = fitting.iter().min_by(|a, b| by_time(a, b)).and_then(|p| predicted(p)).expect("fitting");
    let card = target.card.as_ref().expect("a prediction has a card");
    let could_win = |mix: Mix| {
        let all = Mix { cached_weight_layers: spec.num_layers, ..mix };
        crate::engine::cost::predict(spec, input, all, card).is_some_and(|p| p.step_s < best)
    };
    if caches_dequantized(input.quantization, target.kind) {
        let mut cached: Vec<Rc<MemoryPlan>> = fitting.iter().filter(|p| could_win(p.mix())).map(|p| plans.most_cached(p.mix())).collect();
        let layer = fitting.iter().filter(|p| p.checkpointing == CheckpointPolicy::Layer).min_by(|a, b| by_time(a, b)).map(|p| p.mix());
        if let Some(layer) = layer
            && could_win(layer)
        {
            let weights = plans.most_cached(Mix { kept_layers: 0, ..layer });
            cached.push(plans.most_kept(weights.mix()));
        }
        fitting.extend(cached.into_iter().filter(|p| fits_with_headroom(p)));
    }
    MemoryPlan::clone(fitting.iter().min_by(|a, b| by_time(a, b)).expect("fitting"))
}

/// The plan of a mix already resolved (what a running Trainer has).
pub fn plan_resolved(spec: &ModelSpec, input: &PlanInput, target: &PlanTarget, mix: Mix) -> MemoryPlan {
    build(spec, input, target, mix)
}

impl MemoryPlan {
    /// The mix this plan was built for.
    pub fn mix(&self) -> Mix {
        Mix {
            policy: self.checkpointing,
            kept_layers: self.kept_layers,
            attention: self.attention,
            cached_weight_layers: self.cached_weight_layers,
            hold_mlp_weights: self.hold_mlp_weights,
        }
    }

    /// The policy in words, with the kept layers when only some are, where attention's output
    /// is kept and which layers' weights are dequantized once: "layer (12 of 32 layers kept, the
    /// rest recomputed; attention output kept in host memory; weights of 8 of 32 layers
    /// dequantized once)".
    pub fn checkpointing_label(&self, spec: &ModelSpec) -> String {
        let name = format!("{:?}", self.checkpointing).to_lowercase();
        let mut parts = Vec::new();
        if self.checkpointing == CheckpointPolicy::Layer && self.kept_layers > 0 {
            parts.push(format!("{} of {} layers kept, the rest recomputed", self.kept_layers, spec.num_layers));
        }
        match self.attention {
            SavedAttention::Off => {}
            SavedAttention::Device => parts.push("attention output kept on the GPU".into()),
            SavedAttention::Host => parts.push("attention output kept in host memory".into()),
        }
        match self.cached_weight_layers {
            0 => {}
            n if n >= spec.num_layers => parts.push("weights dequantized once".into()),
            n => parts.push(format!("weights of {n} of {} layers dequantized once", spec.num_layers)),
        }
        if self.hold_mlp_weights {
            parts.push("MLP weights dequantized once per pass".into());
        }
        if parts.is_empty() { name } else { format!("{name} ({})", parts.join("; ")) }
    }

    /// Whether every layer keeps its activations (nothing is recomputed).
    pub fn keeps_all(&self, spec: &ModelSpec) -> bool {
        self.kept_layers >= spec.num_layers
    }
}

/// The largest value of one setting that still fits, everything else fixed (binary search over
/// `lo..=hi`), or `None` when even `lo` does not fit.
pub fn largest_fitting(
    spec: &ModelSpec,
    input: &PlanInput,
    target: &PlanTarget,
    lo: usize,
    hi: usize,
    set: impl Fn(&mut PlanInput, usize),
) -> Option<usize> {
    let fits = |v: usize| {
        let mut i = input.clone();
        set(&mut i, v);
        plan(spec, &i, target).fits
    };
    if !fits(lo) {
        return None;
    }
    let (mut good, mut bad) = (lo, hi + 1);
    if fits(hi) {
        return Some(hi);
    }
    while bad - good > 1 {
        let mid = good + (bad - good) / 2;
        if fits(mid) { good = mid } else { bad = mid }
    }
    Some(good)
}

/// A change that makes a run fit, cheapest first (the one that costs the least speed or quality).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Suggestion {
    pub change: String,
    pub peak_bytes: u64,
}

pub fn suggestions(spec: &ModelSpec, input: &PlanInput, target: &PlanTarget) -> Vec<Suggestion> {
    let current = plan(spec, input, target);
    if current.fits {
        return vec![];
    }
    let mut out = Vec::new();
    for (policy, label) in [
        (CheckpointPolicy::Layer, "checkpointing = \"layer\" (recompute each layer in the backward)"),
        (CheckpointPolicy::Offload, "checkpointing = \"offload\" (layer inputs in pinned host memory)"),
    ] {
        let mut i = input.clone();
        i.checkpointing = policy;
        let p = plan(spec, &i, target);
        if p.fits {
            out.push(Suggestion { change: format!("memory.{label}"), peak_bytes: p.peak_bytes });
            break;
        }
    }
    let mut offload = input.clone();
    offload.checkpointing = CheckpointPolicy::Offload;
    if input.batch_size > 1
        && let Some(b) = largest_fitting(spec, &offload, target, 1, input.batch_size - 1, |i, v| i.batch_size = v)
    {
        let mut i = offload.clone();
        i.batch_size = b;
        out.push(Suggestion {
            change: format!("train.batch_size = {b} with offload (raise train.grad_accum to keep the effective batch)"),
            peak_bytes: plan(spec, &i, target).peak_bytes,
        });
    }
    if let Some(s) = largest_fitting(spec, &offload, target, 64, input.max_seq_len.saturating_sub(1).max(64), |i, v| i.max_seq_len = v) {
        let s = s / 64 * 64;
        if s >= 64 && s < input.max_seq_len {
            let mut i = offload.clone();
            i.max_seq_len = s;
            out.push(Suggestion { change: format!("train.max_seq_len = {s} with offload"), peak_bytes: plan(spec, &i, target).peak_bytes });
        }
    }
    if input.lora.r > 1
        && let Some(r) = largest_fitting(spec, &offload, target, 1, input.lora.r - 1, |i, v| i.lora.r = v)
    {
        let mut i = offload.clone();
        i.lora.r = r;
        out.push(Suggestion { change: format!("lora.r = {r} with offload"), peak_bytes: plan(spec, &i, target).peak_bytes });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input() -> PlanInput {
        PlanInput {
            lora: LoraConfig { r: 32, alpha: 32.0, ..LoraConfig::default() },
            quantization: Quantization::Nf4,
            batch_size: 1,
            max_seq_len: 2048,
            checkpointing: CheckpointPolicy::Layer,
            token_rows: 0,
            mlp_chunk_rows: 0,
            samples: None,
        }
    }

    /// Exact bytes of Llama-3-8B's weight terms from config.json numbers alone.
    #[test]
    fn llama3_8b_weight_bytes_are_exact() {
        let spec = ModelSpec::llama3_8b();
        let w = weight_buffers(&spec, Quantization::Nf4, BackendKind::Cuda, 2048, CheckpointPolicy::Layer, 0);
        let bytes = |name: &str| w.iter().find(|b| b.name == name).unwrap().bytes(BackendKind::Cuda);
        assert_eq!(bytes("embed_tokens"), 128_256 * 4096 * 2);
        assert_eq!(bytes("lm_head"), 128_256 * 4096 * 2);
        // q_proj: 4096×4096 = 16,777,216 values → 8,388,608 packed bytes, 262,144 absmax bytes,
        // 1,024 nested absmax (4 KiB) and the 1 KiB code.
        assert_eq!(bytes("layers.0.q_proj"), 8_388_608 + 262_144 + 4_096 + 1_024);
        // down_proj: 4096×14336.
        assert_eq!(bytes("layers.31.down_proj"), 29_360_128 + 917_504 + 14_336 + 1_024);
        let base: u64 = w.iter().filter(|b| b.term == Term::BaseWeights).map(|b| b.bytes(BackendKind::Cuda)).sum();
        // 6,979,321,856 linear params at 4.5 bits + quant state, 2 × 525 MB 16-bit tables, norms.
        let linears: u64 = (0..32)
            .flat_map(|_| Target::ALL)
            .map(|t| {
                let (o, i) = spec.linear_shape(t);
                nf4_device_bytes((o * i) as u64)
            })
            .sum();
        assert_eq!(base, linears + 2 * 128_256 * 4096 * 2 + (2 * 32 + 1) * 4096 * 2);
        // 6,979,321,856 values: 3,489,660,928 packed bytes + 109,051,904 absmax bytes
        // + 425,984 nested absmax × 4 bytes + 224 tensors × 1 KiB code.
        assert_eq!(linears, 3_489_660_928 + 109_051_904 + 425_984 * 4 + 224 * 1_024);
    }

    #[test]
    fn lora_terms_match_the_parameter_count() {
        let spec = ModelSpec::llama3_8b();
        let p = plan(&spec, &input(), &PlanTarget::gpu("H100", 80 << 30));
        let n = spec.lora_params(32, &Target::ALL);
        assert_eq!(n, 83_886_080);
        assert_eq!(p.terms["lora_params"], n * (4 + 2));
        assert_eq!(p.terms["lora_grads"], n * 4);
        assert_eq!(p.terms["optimizer_states"], n * 8);
    }

    /// Offloading moves layer inputs to pinned host memory: a host without the RAM for them
    /// makes the plan not fit, and bounds "largest that fits".
    #[test]
    fn pinned_memory_is_held_against_the_host() {
        let spec = ModelSpec::llama3_8b();
        let mut i = input();
        i.checkpointing = CheckpointPolicy::Offload;
        i.max_seq_len = 65536;
        let card = PlanTarget::gpu("24 GB", 24 << 30);
        let unbounded = plan(&spec, &i, &card);
        assert!(unbounded.fits && unbounded.host_fits && unbounded.pinned_host_bytes > 8 << 30, "{}", unbounded.pinned_host_bytes);
        let small_host = crate::backend::HostMemory { total_bytes: 16 << 30, available_bytes: 8 << 30 };
        let held = plan(&spec, &i, &card.clone().with_host(Some(&small_host)));
        assert_eq!(held.peak_bytes, unbounded.peak_bytes, "the device side is the same");
        assert!(!held.host_fits && !held.fits);
        let room = crate::backend::HostMemory { total_bytes: 256 << 30, available_bytes: 200 << 30 };
        assert!(plan(&spec, &i, &card.clone().with_host(Some(&room))).fits);
        let seq = |t: &PlanTarget| largest_fitting(&spec, &i, t, 64, 1 << 20, |i, v| i.max_seq_len = v).unwrap();
        let (free, bound) = (seq(&card), seq(&card.clone().with_host(Some(&small_host))));
        assert!(bound < 65536 && bound < free, "host-bound {bound}, device-bound {free}");
        let at = |s: usize| plan(&spec, &PlanInput { max_seq_len: s, ..i.clone() }, &card.clone().with_host(Some(&small_host)));
        assert!(at(bound).pinned_host_bytes <= 8 << 30 && at(bound + 1).pinned_host_bytes > 8 << 30);
    }

    #[test]
    fn auto_policy_falls_back_until_it_fits() {
        let spec = ModelSpec::llama3_8b();
        let mut i = input();
        i.checkpointing = CheckpointPolicy::Auto;
        let big = plan(&spec, &i, &PlanTarget::gpu("H100", 80 << 30));
        assert_eq!(big.checkpointing, CheckpointPolicy::None);
        i.max_seq_len = 32768;
        let small = plan(&spec, &i, &PlanTarget::gpu("24 GB", 24 << 30));
        assert_ne!(small.checkpointing, CheckpointPolicy::None);
        let offload =
            plan(&spec, &PlanInput { checkpointing: CheckpointPolicy::Offload, ..i.clone() }, &PlanTarget::gpu("24 GB", 24 << 30));
        assert!(offload.pinned_host_bytes > 0);
    }

    #[test]
    fn largest_fitting_is_the_boundary() {
        let spec = ModelSpec::llama3_8b();
        let t = PlanTarget::gpu("16 GB", 16 << 30);
        let s = largest_fitting(&spec, &input(), &t, 128, 1 << 20, |i, v| i.max_seq_len = v).unwrap();
        let at = |v| plan(&spec, &PlanInput { max_seq_len: v, ..input() }, &t).fits;
        assert!(at(s) && !at(s + 1));
        assert!(!suggestions(&spec, &PlanInput { max_seq_len: 1 << 20, ..input() }, &t).is_empty());
    }
}
