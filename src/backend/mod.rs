//! The `Backend` trait: the one place where the training step meets a device. The engine calls
//! one method per fused operation and never sees device types; the CPU backend (f32 or f64,
//! the numerical reference) and the CUDA backend (bf16 storage, fp32 accumulation) implement it.
//!
//! Conventions shared by every op:
//! - Tensors are flat and row-major; shapes are passed explicitly (`n` rows of width `d`), so one
//!   buffer sized for the largest micro-batch serves every smaller one.
//! - Token-level matrices are `[n, features]` with `n = batch * seq` and row `b * seq + t`.
//! - Backward ops that produce an input gradient take `accumulate`: when true they add into the
//!   destination (residual streams, several consumers of one input), else they overwrite it.
//! - LoRA gradients are always accumulated (`+=`); the engine zeroes them once per optimizer step.

pub mod card;
pub mod context;
pub mod cpu;
pub mod cuda;
pub mod nvml;
pub mod workspace;

use crate::error::Result;
use crate::quant::nf4::Nf4Tensor;

/// What a tensor stores. The CPU backend keeps everything in its one float type; the CUDA backend
/// stores `Act` in bf16 and `F32` in f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    /// Activations, gradients of activations, frozen 16-bit weights, LoRA compute copies.
    Act,
    /// Masters, optimizer states, LoRA gradients, statistics (inverse RMS, log-sum-exp).
    F32,
}

/// Where a frozen base linear goes in a block (`Backend::weight_in`): byte offsets of its data
/// (dense 16-bit, or NF4 as `quant::nf4::device_parts` lays it out), of its bias when it has one,
/// and of its dequantized 16-bit copy when the plan gives it one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WeightPlace {
    pub data: usize,
    pub bias: Option<usize>,
    pub dequantized: Option<usize>,
}

/// A frozen base linear as the host holds it before upload (`[out, in]`, row-major).
#[expect(clippy::large_enum_variant, reason = "one per linear, moved once into the backend: the inline NF4 code table costs nothing there")]
pub enum HostWeight {
    Dense { out_features: usize, in_features: usize, data: Vec<f32> },
    Nf4(Nf4Tensor),
}

impl HostWeight {
    pub fn shape(&self) -> (usize, usize) {
        match self {
            HostWeight::Dense { out_features, in_features, .. } => (*out_features, *in_features),
            HostWeight::Nf4(t) => (t.shape[0], t.shape[1]),
        }
    }
}

/// Dimensions of a linear applied to `n` rows: `y[n, out] = x[n, inp] · Wᵀ`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LinearDims {
    pub n: usize,
    pub inp: usize,
    pub out: usize,
}

/// The LoRA branch of a linear in the forward: `y += scale · (x_lora · Aᵀ) · Bᵀ`, where
/// `x_lora` is the input after dropout (the input itself when dropout is off). `xa` receives
/// `x_lora · Aᵀ` (`[n, r]`), which the backward needs.
pub struct LoraFwd<'a, T> {
    pub a: &'a T,
    pub b: &'a T,
    pub rank: usize,
    pub scale: f32,
    pub x_lora: &'a T,
    pub xa: &'a mut T,
}

/// The LoRA branch in the backward: accumulates `dA`, `dB`, and adds the branch's contribution to
/// the input gradient (`dx_lora`, which is `dx` itself when dropout is off).
pub struct LoraBwd<'a, T> {
    pub a: &'a T,
    pub b: &'a T,
    pub rank: usize,
    pub scale: f32,
    pub x_lora: &'a T,
    pub xa: &'a T,
    pub grad_a: &'a mut T,
    pub grad_b: &'a mut T,
    /// `[n, r]` scratch for `dy · B`.
    pub scratch: &'a mut T,
}

/// Shape of a causal self-attention call. Query row `i` attends to key rows `j <= i` of its own
/// segment and, with a sliding window `w`, only to those with `i - j < w` (itself and the `w - 1`
/// rows before it: transformers' `kv_idx > q_idx - sliding_window`). Scores are `q·k · scale`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct AttnShape {
    pub batch: usize,
    pub seq: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Sliding window in keys (Gemma 3's local layers); `None`: full causal attention.
    pub window: Option<usize>,
    /// Softmax scale; `None`: `head_dim^-0.5`. Gemma 3 uses `query_pre_attn_scalar^-0.5`.
    pub softmax_scale: Option<f64>,
    /// Plain causal attention over each whole row gives the loss and every gradient that the
    /// segment mask gives (one example per row, any padding at its end: [`crate::data::Batch::rows_attend_causally`]).
    /// A backend may then run a kernel that takes no segments (CUDA: cuDNN's fused attention);
    /// the outputs of padding positions may differ, and nothing reads them.
    pub causal_rows: bool,
}

impl AttnShape {
    pub fn tokens(&self) -> usize {
        self.batch * self.seq
    }

    /// The scale applied to `q·k` before the softmax.
    pub fn scale(&self) -> f64 {
        self.softmax_scale.unwrap_or_else(|| 1.0 / (self.head_dim as f64).sqrt())
    }

    /// The window when it masks anything at this sequence length: a window of at least `seq`
    /// keys is plain causal attention.
    pub fn effective_window(&self) -> Option<usize> {
        self.window.filter(|&w| w < self.seq)
    }

    /// The first key row query row `i` (within its sequence) may attend to, before segments.
    pub fn first_key(&self, i: usize) -> usize {
        self.window.map_or(0, |w| (i + 1).saturating_sub(w))
    }
}

/// The LoRA branch of a linear in generation, switched per row:
/// `y[r] += row_scale[r] · (x[r] · Aᵀ) · Bᵀ`. `row_scale` (F32, `[n]`) holds the adapter's scale
/// (`α/r`) on rows that answer as the fine-tuned model and 0 on rows that answer as the base, so
/// both share one copy of the weights and one batched pass. `xa` is `[n, r]` scratch.
pub struct LoraRows<'a, T> {
    pub a: &'a T,
    pub b: &'a T,
    pub rank: usize,
    pub row_scale: &'a T,
    pub xa: &'a mut T,
}

/// The KV cache of one layer and the attention over it: `slots` sequences of up to `capacity`
/// positions each; the keys (and values) of sequence `s` at position `p` are row `s · capacity + p`
/// of a `[slots · capacity, kv_heads · head_dim]` tensor.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KvShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub capacity: usize,
    /// Multiplies `q · k` before the softmax (`1/√head_dim` for Llama and Qwen).
    pub scale: f32,
    /// A sliding window: a query at position `p` sees keys at `p − window < j ≤ p`; `None` sees
    /// every earlier key.
    pub window: Option<usize>,
}

impl KvShape {
    pub fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }
}

/// An RMSNorm as a model applies it: `out = x · rsqrt(mean(x²) + eps) · (weight_offset + w)`.
/// Gemma stores its norm weights around 0 and adds 1 (`weight_offset = 1`); the offset is added
/// in f32 inside the op, so a bf16 weight near 0 keeps its precision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RmsNorm {
    pub eps: f32,
    pub weight_offset: f32,
}

impl RmsNorm {
    /// Llama's: `x̂ · w`.
    pub fn plain(eps: f32) -> Self {
        RmsNorm { eps, weight_offset: 0.0 }
    }
}

/// AdamW hyper-parameters for one update (torch.optim.AdamW semantics, decoupled decay).
#[derive(Debug, Clone, Copy)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
    /// 1-based step number, for bias correction.
    pub step: u64,
    /// Multiplies the gradient first (gradient clipping).
    pub grad_scale: f32,
}

/// One tensor of an AdamW update ([`Backend::adamw`]): the first `n` elements of its f32 master,
/// gradient and moments, and the compute copy (`DType::Act`) the forward reads, refreshed from
/// the updated master where there is one.
pub struct AdamwTensor<'a, T> {
    pub param: &'a mut T,
    pub grad: &'a T,
    pub m: &'a mut T,
    pub v: &'a mut T,
    pub compute: Option<&'a mut T>,
    pub n: usize,
}

/// Sum of token losses and how many tokens contributed.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LossSum {
    pub sum: f64,
    pub count: usize,
}

/// The host's RAM, as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HostMemory {
    pub total_bytes: u64,
    /// `MemAvailable`: what can be allocated (or pinned) without swapping.
    pub available_bytes: u64,
}

/// `MemTotal` and `MemAvailable` from /proc/meminfo (Linux); `None` elsewhere.
pub fn host_memory() -> Option<HostMemory> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    parse_meminfo(&text)
}

fn parse_meminfo(text: &str) -> Option<HostMemory> {
    let kib = |key: &str| -> Option<u64> {
        text.lines().find_map(|l| l.strip_prefix(key)?.trim().strip_suffix("kB")?.trim().parse::<u64>().ok()).map(|k| k * 1024)
    };
    let total = kib("MemTotal:")?;
    Some(HostMemory { total_bytes: total, available_bytes: kib("MemAvailable:").unwrap_or(total) })
}

#[cfg(test)]
mod host_tests {
    use super::*;

    #[test]
    fn meminfo_is_read_in_bytes() {
        let h = parse_meminfo("MemTotal:       32000000 kB\nMemFree:  100 kB\nMemAvailable:   16000000 kB\n").unwrap();
        assert_eq!(h, HostMemory { total_bytes: 32_000_000 * 1024, available_bytes: 16_000_000 * 1024 });
        assert_eq!(parse_meminfo("MemTotal: 1000 kB\n").unwrap().available_bytes, 1000 * 1024, "no MemAvailable: all of it");
        assert_eq!(parse_meminfo("nothing"), None);
    }
}

/// What the backend runs on, for logs and the studio.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DeviceInfo {
    /// `cpu` or `cuda`.
    pub kind: String,
    /// `CPU (f32, 2 threads)` or the card's name.
    pub name: String,
    pub total_memory_bytes: Option<u64>,
    pub free_memory_bytes: Option<u64>,
    /// Device memory held by other processes (and the driver), when NVML reports it.
    pub others_bytes: Option<u64>,
    /// A GPU's PCI bus id in NVML's form (`00000000:41:00.0`): how NVML finds the same card.
    pub pci_bus_id: Option<String>,
    /// A GPU's limits (the device's, or its profile's under `TUNESTUDIO_CARD`).
    pub card: Option<card::CardLimits>,
}

pub trait Backend: Send {
    type Tensor: Send;
    type Weight: Send;
    type Ids: Send;
    /// One allocation that planned buffers are carved from (the engine's arena); each tensor
    /// carved from it keeps it alive.
    type Block: Send;

    fn device(&self) -> DeviceInfo;

    // ---- planned memory ----------------------------------------------------------------------
    /// `bytes` in one allocation: device memory, zero-filled, or pinned host memory when `host`
    /// (not cleared). The engine's arena takes one of each for the memory plan's buffers.
    fn alloc_block(&self, bytes: usize, host: bool) -> Result<Self::Block>;
    /// A tensor of `len` elements at byte `offset` of `block` (a multiple of
    /// `workspace::BUFFER_ALIGN`).
    fn tensor_in(&self, block: &Self::Block, offset: usize, len: usize, dtype: DType) -> Result<Self::Tensor>;
    /// An id buffer of `len` entries at byte `offset` of `block`.
    fn ids_in(&self, block: &Self::Block, offset: usize, len: usize) -> Result<Self::Ids>;
    /// A frozen base linear (dense or NF4, optional bias) written into `block` at `place`; with
    /// `place.dequantized` an NF4 weight also gets its dequantized copy there, which its GEMMs read
    /// instead of dequantizing at every call (see [`Backend::cache_dequantized`]).
    fn weight_in(&self, block: &Self::Block, place: WeightPlace, w: &HostWeight, bias: Option<&[f32]>) -> Result<Self::Weight>;

    // ---- memory ------------------------------------------------------------------------------
    /// A zero-filled tensor of `len` elements.
    fn alloc(&self, len: usize, dtype: DType) -> Result<Self::Tensor>;
    fn upload(&self, data: &[f32], dtype: DType) -> Result<Self::Tensor>;
    fn download(&self, t: &Self::Tensor) -> Result<Vec<f32>>;
    /// Overwrite the first `data.len()` elements.
    fn write(&self, t: &mut Self::Tensor, data: &[f32]) -> Result<()>;
    fn fill(&self, t: &mut Self::Tensor, value: f32) -> Result<()>;
    /// A tensor in pinned host memory (layer inputs offloaded during the step). Ops other than the
    /// copies below never see one.
    fn alloc_host(&self, len: usize, dtype: DType) -> Result<Self::Tensor> {
        self.alloc(len, dtype)
    }
    /// A tensor in pinned host memory holding `data`, that `embedding_fwd` and `set_rows` may use
    /// as their table (the GPU reads it over the bus): the memory-saving home of an untied
    /// embedding table, of which a step reads only its batch's rows.
    fn upload_host(&self, data: &[f32], dtype: DType) -> Result<Self::Tensor> {
        self.upload(data, dtype)
    }
    /// `dst[..n] = src[..n]` (device or host, in stream order).
    fn copy(&self, src: &Self::Tensor, dst: &mut Self::Tensor, n: usize) -> Result<()>;
    /// `dst[dst_off..dst_off + n] = src[src_off..src_off + n]` (row chunks of a larger tensor).
    fn copy_range(&self, src: &Self::Tensor, src_off: usize, dst: &mut Self::Tensor, dst_off: usize, n: usize) -> Result<()>;
    /// Copy on the copy stream, after all compute work queued so far, so the copy overlaps the
    /// compute that follows (offload and prefetch of layer inputs). CPU: a plain copy.
    fn copy_async(&self, src: &Self::Tensor, dst: &mut Self::Tensor, n: usize) -> Result<()> {
        self.copy(src, dst, n)
    }
    /// Compute work queued after this waits for every `copy_async` issued before it.
    fn wait_copies(&self) -> Result<()> {
        Ok(())
    }
    /// `dst[..n] = cast(src[..n])`: refresh a compute copy from its master.
    fn cast(&self, src: &Self::Tensor, dst: &mut Self::Tensor, n: usize) -> Result<()> {
        self.copy(src, dst, n)
    }
    /// An id buffer of `len` entries (token ids, targets, positions, segments), allocated once.
    fn alloc_ids(&self, len: usize) -> Result<Self::Ids>;
    /// Overwrite the first `data.len()` entries (no allocation: the step loop calls this).
    fn write_ids(&self, ids: &mut Self::Ids, data: &[i32]) -> Result<()>;
    /// Allocate and fill (set-up code and tests).
    fn upload_ids(&self, data: &[i32]) -> Result<Self::Ids> {
        let mut ids = self.alloc_ids(data.len())?;
        self.write_ids(&mut ids, data)?;
        Ok(ids)
    }
    /// Frozen base linear (dense or NF4) with an optional bias.
    fn upload_weight(&self, w: &HostWeight, bias: Option<&[f32]>) -> Result<Self::Weight>;
    /// Give an NF4 weight a dequantized 16-bit copy that its GEMMs read from then on, instead of
    /// dequantizing it into the shared scratch at every call: the weights are frozen, so one
    /// dequantization serves the whole run. Costs `out × in` 16-bit elements of device memory
    /// (the plan's `dequantized_weights` term). A dense weight, or a backend that keeps every
    /// weight dequantized (the CPU's), has nothing to do.
    fn cache_dequantized(&self, _w: &mut Self::Weight) -> Result<()> {
        Ok(())
    }
    /// Keep `buffers` NF4 weights dequantized at once in the per-call scratch (each as large as
    /// the largest NF4 weight uploaded so far), the least recently used replaced first: a weight
    /// called again while its copy is still there is not dequantized again. The engine asks for
    /// the MLP's three weights, which a recomputed layer calls once per row chunk (the plan's
    /// `Mix::hold_mlp_weights`). A backend without a per-call scratch has nothing to do.
    fn hold_dequantized(&self, _buffers: usize) -> Result<()> {
        Ok(())
    }

    // ---- elementwise -------------------------------------------------------------------------
    /// `x[..n] += y[..n]`.
    fn add(&self, x: &mut Self::Tensor, y: &Self::Tensor, n: usize) -> Result<()>;
    /// Inverted dropout with a counter-based mask: element `i` is kept when
    /// `dropout_uniform(key, first + i) >= p`, and kept elements are scaled by `1 / (1 - p)`.
    /// `first` is the element's index in the whole tensor, so a row chunk draws the same mask
    /// as the whole.
    #[allow(clippy::too_many_arguments)]
    fn dropout(&self, x: &Self::Tensor, out: &mut Self::Tensor, n: usize, p: f32, key: u64, first: u64) -> Result<()>;
    /// `dx[..n] (+)= dropout'(dy)`: the same mask applied to a gradient.
    #[allow(clippy::too_many_arguments)]
    fn dropout_bwd(&self, dy: &Self::Tensor, dx: &mut Self::Tensor, n: usize, p: f32, key: u64, first: u64, accumulate: bool)
    -> Result<()>;

    // ---- layers (forward and backward side by side) ------------------------------------------
    /// `out[r] = table[ids[r]]` for `n` rows of width `d`.
    fn embedding_fwd(&self, ids: &Self::Ids, table: &Self::Tensor, n: usize, d: usize, out: &mut Self::Tensor) -> Result<()>;

    /// `out = x · rsqrt(mean(x²) + eps) · (offset + w)` over `n` rows of width `d` (per-head q/k
    /// norms are rows of `head_dim`); saves the inverse RMS per row (f32).
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_fwd(
        &self,
        x: &Self::Tensor,
        w: &Self::Tensor,
        norm: RmsNorm,
        n: usize,
        d: usize,
        out: &mut Self::Tensor,
        inv_rms: &mut Self::Tensor,
    ) -> Result<()>;
    /// Input gradient of RMSNorm (the norm weight is frozen).
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_bwd(
        &self,
        dy: &Self::Tensor,
        x: &Self::Tensor,
        w: &Self::Tensor,
        norm: RmsNorm,
        inv_rms: &Self::Tensor,
        n: usize,
        d: usize,
        dx: &mut Self::Tensor,
        accumulate: bool,
    ) -> Result<()>;

    /// `y = x · Wᵀ + bias + LoRA`.
    fn linear_fwd(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        lora: Option<LoraFwd<'_, Self::Tensor>>,
        dims: LinearDims,
        y: &mut Self::Tensor,
    ) -> Result<()>;
    /// `dx (+)= dy · W + LoRA's input gradient`; accumulates LoRA's `dA`, `dB`. With dropout on,
    /// the engine passes `dx_lora` (the gradient w.r.t. the dropped input) separately.
    #[allow(clippy::too_many_arguments)]
    fn linear_bwd(
        &self,
        dy: &Self::Tensor,
        w: &Self::Weight,
        lora: Option<LoraBwd<'_, Self::Tensor>>,
        dims: LinearDims,
        dx: &mut Self::Tensor,
        accumulate: bool,
        dx_lora: Option<&mut Self::Tensor>,
    ) -> Result<()>;

    /// Rotary embedding in place on `[n, heads * head_dim]` (rotate-half convention); `table` is
    /// `[max_pos, head_dim / 2]` cosines followed by the same shape of sines. `inverse` rotates
    /// by −θ, which is the backward.
    #[allow(clippy::too_many_arguments)]
    fn rope(
        &self,
        x: &mut Self::Tensor,
        n: usize,
        heads: usize,
        head_dim: usize,
        positions: &Self::Ids,
        table: &Self::Tensor,
        inverse: bool,
    ) -> Result<()>;

    /// Causal attention within equal segment ids, GQA; saves the log-sum-exp per (row, head).
    #[allow(clippy::too_many_arguments)]
    fn attention_fwd(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        segments: &Self::Ids,
        shape: AttnShape,
        out: &mut Self::Tensor,
        lse: &mut Self::Tensor,
    ) -> Result<()>;
    #[allow(clippy::too_many_arguments)]
    fn attention_bwd(
        &self,
        dout: &Self::Tensor,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        out: &Self::Tensor,
        lse: &Self::Tensor,
        segments: &Self::Ids,
        shape: AttnShape,
        dq: &mut Self::Tensor,
        dk: &mut Self::Tensor,
        dv: &mut Self::Tensor,
    ) -> Result<()>;
    /// Size whatever the attention backward needs for shapes up to `max` (the CUDA backend's
    /// accumulator scratch, [`cuda::attention_scratch_bytes`]), once, before the first step.
    fn reserve_attention(&self, _max: AttnShape) -> Result<()> {
        Ok(())
    }

    /// `out = silu(g) · u` on `n` elements.
    fn swiglu_fwd(&self, g: &Self::Tensor, u: &Self::Tensor, n: usize, out: &mut Self::Tensor) -> Result<()>;
    fn swiglu_bwd(
        &self,
        dout: &Self::Tensor,
        g: &Self::Tensor,
        u: &Self::Tensor,
        n: usize,
        dg: &mut Self::Tensor,
        du: &mut Self::Tensor,
    ) -> Result<()>;

    /// `out = gelu_tanh(g) · u` on `n` elements (GeGLU; GELU's tanh approximation,
    /// `0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))`, transformers' `gelu_pytorch_tanh`).
    fn geglu_fwd(&self, g: &Self::Tensor, u: &Self::Tensor, n: usize, out: &mut Self::Tensor) -> Result<()>;
    fn geglu_bwd(
        &self,
        dout: &Self::Tensor,
        g: &Self::Tensor,
        u: &Self::Tensor,
        n: usize,
        dg: &mut Self::Tensor,
        du: &mut Self::Tensor,
    ) -> Result<()>;

    /// `x[..n] *= alpha` (Gemma's embedding scale, forward and backward), with `alpha` as the
    /// tensor's storage holds it: a bf16 tensor is scaled by bf16(alpha), as transformers' Gemma
    /// converts its scale to the weights' dtype.
    fn scale(&self, x: &mut Self::Tensor, n: usize, alpha: f32) -> Result<()>;

    /// Accumulate the gradient of trainable embedding rows: for every row `r` whose token has a
    /// slot (`slot_of_token[ids[r]] >= 0`), `grad_rows[slot] += dx[r]`.
    #[allow(clippy::too_many_arguments)]
    fn embedding_bwd_rows(
        &self,
        dx: &Self::Tensor,
        ids: &Self::Ids,
        n: usize,
        d: usize,
        slot_of_token: &Self::Ids,
        grad_rows: &mut Self::Tensor,
    ) -> Result<()>;
    /// `table[token_ids[s]] = values[s]` for `s < k` (rows of width `d`).
    fn set_rows(&self, table: &mut Self::Tensor, d: usize, token_ids: &Self::Ids, values: &Self::Tensor, k: usize) -> Result<()>;

    /// lm_head + softmax cross-entropy over `n` rows, in chunks so `[n, vocab]` logits never
    /// exist. Targets < 0 are ignored. Writes `dh = grad_scale · (softmax − onehot) · W` (zero rows
    /// for ignored targets) and returns the unscaled loss sum. With `head_rows = (token_ids,
    /// grad)`, also accumulates `grad[s] += Σ_r dlogits[r, token_ids[s]] · h[r]` for trainable rows.
    #[allow(clippy::too_many_arguments)]
    fn lm_head_ce(
        &self,
        h: &Self::Tensor,
        head: &Self::Tensor,
        targets: &Self::Ids,
        n: usize,
        d: usize,
        vocab: usize,
        grad_scale: f32,
        dh: &mut Self::Tensor,
        head_rows: Option<(&Self::Ids, &mut Self::Tensor)>,
    ) -> Result<LossSum>;

    // ---- generation (inference: no backward, nothing saved) ------------------------------------
    /// `y = x · Wᵀ + bias + LoRA switched per row` ([`LoraRows`]). A backend may pick another
    /// kernel than `linear_fwd` for few rows (decode is memory-bound: a fused NF4 GEMV).
    fn linear_rows(
        &self,
        x: &Self::Tensor,
        w: &Self::Weight,
        lora: Option<LoraRows<'_, Self::Tensor>>,
        dims: LinearDims,
        y: &mut Self::Tensor,
    ) -> Result<()>;
    /// Write `n` rows of width `kv.kv_width()` of `src` into the cache: row `r` goes to sequence
    /// `slots[r]` at position `positions[r]`.
    #[allow(clippy::too_many_arguments)]
    fn kv_store(
        &self,
        src: &Self::Tensor,
        n: usize,
        kv: KvShape,
        slots: &Self::Ids,
        positions: &Self::Ids,
        cache: &mut Self::Tensor,
    ) -> Result<()>;
    /// Attention of `n` query rows (`[n, heads · head_dim]`) over the cache: the query of row `r`
    /// belongs to sequence `slots[r]` at position `positions[r]` and sees that sequence's cached
    /// keys at positions `0..=positions[r]` (within the window), which must already be stored.
    #[allow(clippy::too_many_arguments)]
    fn attention_cached(
        &self,
        q: &Self::Tensor,
        k_cache: &Self::Tensor,
        v_cache: &Self::Tensor,
        slots: &Self::Ids,
        positions: &Self::Ids,
        n: usize,
        kv: KvShape,
        out: &mut Self::Tensor,
    ) -> Result<()>;
    /// `out[n, vocab] = h[n, d] · headᵀ` in f32 (`out` is `DType::F32`): the next-token logits.
    #[allow(clippy::too_many_arguments)]
    fn logits(&self, h: &Self::Tensor, head: &Self::Tensor, n: usize, d: usize, vocab: usize, out: &mut Self::Tensor) -> Result<()>;

    // ---- optimizer ---------------------------------------------------------------------------
    /// Σx² over the first `n` elements of each tensor: the step's whole gradient in one call, so
    /// the GPU is waited for once rather than once per tensor. Deterministic: the same tensors
    /// give the same bits.
    fn sum_squares(&self, tensors: &[(&Self::Tensor, usize)]) -> Result<f64>;
    /// AdamW on every tensor given, each compute copy cast from its updated master (on the GPU a
    /// few multi-tensor launches for the whole step).
    fn adamw(&self, tensors: &mut [AdamwTensor<'_, Self::Tensor>], hp: AdamW) -> Result<()>;

    /// Wait for queued work (no-op on the CPU).
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }
}

/// The dropout mask's uniform draw for element `i` under `key`: a splitmix64 hash, so every
/// backend draws the same mask without sharing RNG state, and a recompute draws it again.
#[inline]
pub fn dropout_uniform(key: u64, i: u64) -> f32 {
    let mut z = key ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    (z >> 40) as f32 / (1u64 << 24) as f32
}
