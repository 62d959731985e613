//! Generation's forward pass, written once against `Backend` beside the Trainer: the frozen base
//! (NF4 or 16-bit) with the LoRA adapter kept apart and switched per sequence, a KV cache of
//! `slots` sequences, and one call that appends tokens to any of them and returns the next-token
//! logits of each. Prefill is that call with a whole prompt; decode is that call with one token per
//! sequence, batched over the sequences that are still answering.
//!
//! One copy of the weights answers as the base and as the fine-tuned model: each row of a batch
//! carries the adapter's scale (`α/r`, or 0 for the base) into `Backend::linear_rows`. Trained
//! token rows (the untrained-token fix) are appended to the embedding and head tables as extra
//! rows: a fine-tuned row reads a trained token's extra row, a base row its original one, and the
//! fine-tuned logits of those tokens come from the extra head rows.
//!
//! Memory: the cache (`slots × capacity` positions per layer) and a workspace for `chunk_rows` rows
//! are allocated here, once; a long prompt is run in chunks of that many rows (exact: each chunk's
//! keys are cached before its queries attend).

use super::arena::Arena;
use super::norm_of;
use crate::backend::{Backend, KvShape, LinearDims, LoraRows};
use crate::config::{LoraConfig, Quantization, Target};
use crate::engine::TokenRows;
use crate::engine::lora::LoraWeights;
use crate::engine::model::{DeviceModel, LayerWeights, WeightSource};
use crate::error::{Error, Result};
use crate::model::ModelSpec;
use crate::model::arch::MlpActivation;

/// Sizes of an inference model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InferOptions {
    pub quantization: Quantization,
    /// Sequences the cache holds at once (the largest batch of one decode step).
    pub slots: usize,
    /// Positions per sequence: prompt and answer together.
    pub capacity: usize,
    /// Most rows one forward pass runs at once; longer prompts are run in chunks of this size.
    pub chunk_rows: usize,
}

impl InferOptions {
    pub fn new(quantization: Quantization, slots: usize, capacity: usize) -> Self {
        InferOptions { quantization, slots, capacity, chunk_rows: 512 }
    }
}

/// An adapter as generation uses it: its config (for the scale), weights and trained token rows.
#[derive(Debug, Clone)]
pub struct InferAdapter {
    pub lora: LoraConfig,
    pub weights: LoraWeights,
    /// Rows of the embedding (and untied head) trained with the adapter, head rows completed
    /// (`adapter::complete_token_rows`).
    pub token_rows: Option<TokenRows>,
}

/// One adapted linear: the compute copies of `A` (`[r, in]`) and `B` (`[out, r]`).
struct LoraLinear<B: Backend> {
    target: Target,
    a: B::Tensor,
    b: B::Tensor,
}

/// Rows of one forward chunk.
struct Workspace<B: Backend> {
    ids: B::Ids,
    slots: B::Ids,
    positions: B::Ids,
    /// F32 `[rows]`: the adapter's scale per row (0 for base rows).
    row_scale: B::Tensor,
    x: B::Tensor,
    h: B::Tensor,
    t: B::Tensor,
    /// A block's output before Gemma's output norm.
    pre: B::Tensor,
    inv: B::Tensor,
    /// q and k before their per-head norms (Qwen3, Gemma 3), with the norms' inverse RMS.
    q_pre: B::Tensor,
    k_pre: B::Tensor,
    qk_inv: B::Tensor,
    q: B::Tensor,
    k: B::Tensor,
    v: B::Tensor,
    att: B::Tensor,
    g: B::Tensor,
    u: B::Tensor,
    m: B::Tensor,
    xa: B::Tensor,
    /// The last row of each entry, `[slots, hidden]`, gathered for the head.
    last: B::Tensor,
    last_normed: B::Tensor,
    last_inv: B::Tensor,
    /// F32 `[slots, vocab + extra rows]`.
    logits: B::Tensor,
}

/// A model loaded for generation on a backend, with its KV cache.
pub struct Inference<B: Backend> {
    backend: B,
    spec: ModelSpec,
    opts: InferOptions,
    model: DeviceModel<B>,
    /// The model's vocabulary (the tables hold `vocab + extra.len()` rows).
    vocab: usize,
    /// Token ids whose trained rows follow the vocabulary: `extra[s]` is row `vocab + s`.
    extra: Vec<u32>,
    lora: Vec<Vec<LoraLinear<B>>>,
    rank: usize,
    scale: f32,
    /// Per layer: keys and values, `[slots · capacity, kv_dim]` each.
    cache: Vec<[B::Tensor; 2]>,
    ws: Workspace<B>,
    /// Positions cached per slot.
    lens: Vec<usize>,
    /// Whether each slot answers with the adapter.
    adapter_on: Vec<bool>,
}

/// The weights with the adapter's trained token rows appended to the embedding and head.
struct Extended<'a> {
    src: &'a dyn WeightSource,
    vocab: usize,
    hidden: usize,
    rows: Option<&'a TokenRows>,
}

impl WeightSource for Extended<'_> {
    fn dense(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let Some(rows) = self.rows else { return self.src.dense(name, shape) };
        let extra = match name {
            "model.embed_tokens.weight" => &rows.embed,
            "lm_head.weight" => {
                rows.head.as_ref().ok_or_else(|| Error::tensor(name, None, "has no trained rows for the adapter's tokens"))?
            }
            _ => return self.src.dense(name, shape),
        };
        let mut t = self.src.dense(name, &[self.vocab, self.hidden])?;
        t.extend_from_slice(extra);
        Ok(t)
    }
    fn has(&self, name: &str) -> bool {
        self.src.has(name)
    }
    fn linear(&self, name: &str, shape: (usize, usize), quant: Quantization) -> Result<crate::backend::HostWeight> {
        self.src.linear(name, shape, quant)
    }
}

impl<B: Backend> Inference<B> {
    pub fn new(backend: B, spec: ModelSpec, src: &dyn WeightSource, opts: InferOptions, adapter: Option<&InferAdapter>) -> Result<Self> {
        if opts.slots == 0 || opts.capacity == 0 || opts.chunk_rows == 0 {
            return Err(Error::bug("Inference::new", "generation needs at least one slot, one position and one row per chunk"));
        }
        let (vocab, d) = (spec.vocab_size, spec.hidden_size);
        let rows = adapter.and_then(|a| a.token_rows.as_ref());
        let tied = spec.tie_word_embeddings;
        if let Some(r) = rows {
            if r.embed.len() != r.ids.len() * d || (!tied && r.head.as_ref().is_none_or(|h| h.len() != r.ids.len() * d)) {
                return Err(Error::Adapter {
                    msg: format!(
                        "its trained token rows: {} ids need [{}, {d}] values{}",
                        r.ids.len(),
                        r.ids.len(),
                        if tied { "" } else { " for the embedding and the head" }
                    ),
                });
            }
            if let Some(bad) = r.ids.iter().find(|&&i| i as usize >= vocab) {
                return Err(Error::vocab(*bad, vocab, "a token row the adapter trains"));
            }
        }
        let extra = rows.map(|r| r.ids.clone()).unwrap_or_default();
        let ext_spec = ModelSpec { vocab_size: vocab + extra.len(), ..spec.clone() };
        let ext = Extended { src, vocab, hidden: d, rows };
        let (rank, scale) = adapter.map_or((1, 0.0), |a| (a.weights.rank.max(1), a.lora.scale() as f32));
        let mut targets: Vec<Target> =
            adapter.map(|a| a.weights.layers.iter().flat_map(|l| l.keys().copied()).collect()).unwrap_or_default();
        targets.sort();
        targets.dedup();
        // Every buffer is taken from the list `plan::infer_buffers` makes, so the memory plan of
        // samples during training is what this allocates.
        let planned = crate::engine::plan::infer_buffers(
            &spec,
            &opts,
            adapter.map(|_| (rank, targets.as_slice())),
            extra.len(),
            crate::engine::plan::BackendKind::of(&backend.device()),
            crate::engine::plan::Term::Samples,
        );
        let mut arena = Arena::new(&backend, planned)?;
        let model = DeviceModel::load(&mut arena, &ext_spec, &ext, opts.quantization)?;
        let mut lora = Vec::with_capacity(spec.num_layers);
        for l in 0..spec.num_layers {
            let mut layer = Vec::new();
            if let Some(a) = adapter {
                let pairs = a.weights.layers.get(l).ok_or_else(|| Error::Adapter {
                    msg: format!("it has {} layers, the model {}", a.weights.layers.len(), spec.num_layers),
                })?;
                for (&t, pair) in pairs {
                    let key = |m: char| format!("lora.{l}.{}.{m}", t.short());
                    if pair.a.len() != arena.elems(&key('a'))? || pair.b.len() != arena.elems(&key('b'))? {
                        let (out, inp) = spec.linear_shape(t);
                        return Err(Error::tensor(
                            crate::engine::lora::peft_key(&spec, l, t, 'A'),
                            None,
                            format!("LoRA shapes do not match the model ({out}x{inp} at rank {rank})"),
                        ));
                    }
                    layer.push(LoraLinear { target: t, a: arena.upload(&key('a'), &pair.a)?, b: arena.upload(&key('b'), &pair.b)? });
                }
                // The plan gives every layer the union of the adapter's targets; a layer the
                // adapter leaves alone holds its (unused) place.
                for t in targets.iter().filter(|t| !pairs.contains_key(t)) {
                    for m in ['a', 'b'] {
                        arena.tensor(&format!("lora.{l}.{}.{m}", t.short()))?;
                    }
                }
            }
            lora.push(layer);
        }

        let cache = (0..spec.num_layers)
            .map(|l| Ok([arena.tensor(&format!("cache.{l}.k"))?, arena.tensor(&format!("cache.{l}.v"))?]))
            .collect::<Result<Vec<_>>>()?;
        let (ids, slots, positions) = (arena.ids("ws.ids")?, arena.ids("ws.slots")?, arena.ids("ws.positions")?);
        let mut w = |name: &str| arena.tensor(&format!("ws.{name}"));
        let ws = Workspace {
            ids,
            slots,
            positions,
            row_scale: w("row_scale")?,
            x: w("x")?,
            h: w("h")?,
            t: w("t")?,
            pre: w("pre")?,
            inv: w("inv")?,
            q_pre: w("q_pre")?,
            k_pre: w("k_pre")?,
            qk_inv: w("qk_inv")?,
            q: w("q")?,
            k: w("k")?,
            v: w("v")?,
            att: w("att")?,
            g: w("g")?,
            u: w("u")?,
            m: w("m")?,
            xa: w("xa")?,
            last: w("last")?,
            last_normed: w("last_normed")?,
            last_inv: w("last_inv")?,
            logits: w("logits")?,
        };
        arena.finish()?;
        Ok(Inference {
            backend,
            spec,
            opts,
            model,
            vocab,
            extra,
            lora,
            rank,
            scale,
            cache,
            ws,
            lens: vec![0; opts.slots],
            adapter_on: vec![adapter.is_some(); opts.slots],
        })
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    pub fn options(&self) -> InferOptions {
        self.opts
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Whether an adapter was loaded (otherwise every slot answers as the base).
    pub fn has_adapter(&self) -> bool {
        self.lora.iter().any(|l| !l.is_empty()) || !self.extra.is_empty()
    }

    /// Answer in `slot` with the adapter (`true`) or as the base model. Switching keeps the cache
    /// only when it was built the same way, so the caller resets the slot (see [`Self::truncate`]).
    pub fn set_adapter(&mut self, slot: usize, on: bool) -> Result<()> {
        self.check_slot(slot)?;
        self.adapter_on[slot] = on && self.has_adapter();
        Ok(())
    }

    /// Replace the adapter's LoRA weights by others of the same targets and rank (a training run's
    /// newer ones, for its samples), written over the old compute copies; the
    /// frozen base, the cache's buffers and the trained token rows stay as loaded. Every slot's
    /// cached positions are dropped: they were computed with the old weights.
    pub fn replace_lora(&mut self, weights: &LoraWeights) -> Result<()> {
        let same = weights.rank.max(1) == self.rank
            && weights.layers.len() == self.lora.len()
            && weights.layers.iter().zip(&self.lora).all(|(w, l)| w.len() == l.len() && l.iter().all(|x| w.contains_key(&x.target)));
        if !same || !self.has_adapter() {
            return Err(Error::bug(
                "Inference::replace_lora",
                "the new LoRA weights have other targets or another rank than the loaded ones",
            ));
        }
        for (layer, pairs) in self.lora.iter_mut().zip(&weights.layers) {
            for lin in layer.iter_mut() {
                let pair = &pairs[&lin.target];
                self.backend.write(&mut lin.a, &pair.a)?;
                self.backend.write(&mut lin.b, &pair.b)?;
            }
        }
        self.lens.iter_mut().for_each(|n| *n = 0);
        Ok(())
    }

    pub fn adapter_on(&self, slot: usize) -> bool {
        self.adapter_on.get(slot).copied().unwrap_or(false)
    }

    /// Positions cached in `slot`.
    pub fn cached_len(&self, slot: usize) -> usize {
        self.lens.get(slot).copied().unwrap_or(0)
    }

    /// Forget the positions of `slot` from `len` on (0 empties it); the earlier ones stay cached,
    /// so a conversation that grows by a turn only runs the new tokens.
    pub fn truncate(&mut self, slot: usize, len: usize) -> Result<()> {
        self.check_slot(slot)?;
        self.lens[slot] = self.lens[slot].min(len);
        Ok(())
    }

    fn check_slot(&self, slot: usize) -> Result<()> {
        if slot >= self.opts.slots {
            return Err(Error::bug(
                "Inference::forward",
                format!("slot {slot} does not exist (the cache holds {} sequences)", self.opts.slots),
            ));
        }
        Ok(())
    }

    /// Append each entry's tokens to its slot's sequence (each slot at most once) and return the
    /// logits of the token that follows each entry's last one, `[vocab]` per entry. Entries with no
    /// tokens are refused: the logits would have nothing to follow.
    pub fn forward(&mut self, entries: &[(usize, &[u32])]) -> Result<Vec<Vec<f32>>> {
        let mut seen = vec![false; self.opts.slots];
        for &(slot, tokens) in entries {
            self.check_slot(slot)?;
            if std::mem::replace(&mut seen[slot], true) {
                return Err(Error::bug("Inference::forward", format!("slot {slot} appears twice in one forward")));
            }
            if tokens.is_empty() {
                return Err(Error::bug("Inference::forward", format!("slot {slot}: nothing to run (no tokens)")));
            }
            if self.lens[slot] + tokens.len() > self.opts.capacity {
                return Err(Error::op(
                    "generation",
                    format!(
                        "{} cached + {} new tokens exceed the context of {} positions: shorten the conversation or load with a longer context",
                        self.lens[slot],
                        tokens.len(),
                        self.opts.capacity
                    ),
                ));
            }
            if let Some(bad) = tokens.iter().find(|&&t| t as usize >= self.vocab) {
                return Err(Error::vocab(*bad, self.vocab, "a prompt token"));
            }
        }
        // Every row of every entry, in order: (slot, position, token); and each entry's last row.
        let mut rows = Vec::new();
        let mut last_row = Vec::with_capacity(entries.len());
        for &(slot, tokens) in entries {
            rows.extend(tokens.iter().enumerate().map(|(i, &t)| (slot, self.lens[slot] + i, t)));
            last_row.push(rows.len() - 1);
        }
        let d = self.spec.hidden_size;
        for (c, chunk) in rows.chunks(self.opts.chunk_rows).enumerate() {
            self.run_chunk(chunk)?;
            let first = c * self.opts.chunk_rows;
            for (e, &r) in last_row.iter().enumerate() {
                if (first..first + chunk.len()).contains(&r) {
                    self.backend.copy_range(&self.ws.x, (r - first) * d, &mut self.ws.last, e * d, d)?;
                }
            }
        }
        for &(slot, tokens) in entries {
            self.lens[slot] += tokens.len();
        }
        self.head(entries)
    }

    /// Final norm and head over the gathered last rows; the adapter's trained head rows replace
    /// their tokens' logits on fine-tuned entries.
    fn head(&mut self, entries: &[(usize, &[u32])]) -> Result<Vec<Vec<f32>>> {
        let (be, ws) = (&self.backend, &mut self.ws);
        let (n, d) = (entries.len(), self.spec.hidden_size);
        let table = self.vocab + self.extra.len();
        be.rmsnorm_fwd(&ws.last, &self.model.final_norm, norm_of(&self.spec), n, d, &mut ws.last_normed, &mut ws.last_inv)?;
        be.logits(&ws.last_normed, self.model.head(), n, d, table, &mut ws.logits)?;
        let all = be.download(&ws.logits)?;
        Ok(entries
            .iter()
            .enumerate()
            .map(|(e, &(slot, _))| {
                let row = &all[e * table..(e + 1) * table];
                let mut l = row[..self.vocab].to_vec();
                if self.adapter_on[slot] {
                    for (s, &id) in self.extra.iter().enumerate() {
                        l[id as usize] = row[self.vocab + s];
                    }
                }
                l
            })
            .collect())
    }

    /// Every layer over one chunk of rows; the chunk's keys and values go into the cache.
    fn run_chunk(&mut self, chunk: &[(usize, usize, u32)]) -> Result<()> {
        let n = chunk.len();
        let d = self.spec.hidden_size;
        let be = &self.backend;
        let ws = &mut self.ws;
        // A fine-tuned row reads a trained token's appended row.
        let ids: Vec<i32> = chunk
            .iter()
            .map(|&(slot, _, t)| match self.extra.iter().position(|&x| x == t) {
                Some(s) if self.adapter_on[slot] => (self.vocab + s) as i32,
                _ => t as i32,
            })
            .collect();
        be.write_ids(&mut ws.ids, &ids)?;
        be.write_ids(&mut ws.slots, &chunk.iter().map(|c| c.0 as i32).collect::<Vec<_>>())?;
        be.write_ids(&mut ws.positions, &chunk.iter().map(|c| c.1 as i32).collect::<Vec<_>>())?;
        let scales: Vec<f32> = chunk.iter().map(|c| if self.adapter_on[c.0] { self.scale } else { 0.0 }).collect();
        be.write(&mut ws.row_scale, &scales)?;
        be.embedding_fwd(&ws.ids, &self.model.embed, n, d, &mut ws.x)?;
        if let Some(s) = self.spec.embed_scale {
            be.scale(&mut ws.x, n * d, s)?;
        }
        for l in 0..self.spec.num_layers {
            let kv = KvShape {
                heads: self.spec.num_heads,
                kv_heads: self.spec.num_kv_heads,
                head_dim: self.spec.head_dim,
                capacity: self.opts.capacity,
                scale: self.spec.attn_scale.unwrap_or(1.0 / (self.spec.head_dim as f64).sqrt()) as f32,
                window: self.spec.layer_window(l),
            };
            let ctx = LayerCtx { be, spec: &self.spec, lora: &self.lora[l], rank: self.rank, n, kv };
            layer_forward(&ctx, &self.model.layers[l], &mut self.cache[l], self.model.rope_table_for(&self.spec, l), ws)?;
        }
        Ok(())
    }
}

struct LayerCtx<'a, B: Backend> {
    be: &'a B,
    spec: &'a ModelSpec,
    lora: &'a [LoraLinear<B>],
    rank: usize,
    n: usize,
    kv: KvShape,
}

impl<B: Backend> LayerCtx<'_, B> {
    fn linear(
        &self,
        lw: &LayerWeights<B>,
        t: Target,
        x: &B::Tensor,
        y: &mut B::Tensor,
        xa: &mut B::Tensor,
        row_scale: &B::Tensor,
    ) -> Result<()> {
        let (out, inp) = self.spec.linear_shape(t);
        let dims = LinearDims { n: self.n, inp, out };
        let lora = self.lora.iter().find(|s| s.target == t).map(|s| LoraRows { a: &s.a, b: &s.b, rank: self.rank, row_scale, xa });
        self.be.linear_rows(x, &lw.linears[t as usize], lora, dims, y)
    }
}

/// One decoder layer in place on `ws.x`: the training forward's blocks (`engine::attention_forward`
/// and `mlp_forward`: per-head q/k norms, Gemma's output norms, GeGLU), with attention over the
/// cache.
fn layer_forward<B: Backend>(
    c: &LayerCtx<'_, B>,
    lw: &LayerWeights<B>,
    cache: &mut [B::Tensor; 2],
    rope_table: &B::Tensor,
    ws: &mut Workspace<B>,
) -> Result<()> {
    let (be, spec, n) = (c.be, c.spec, c.n);
    let (d, hd) = (spec.hidden_size, spec.head_dim);
    let norm = norm_of(spec);
    be.rmsnorm_fwd(&ws.x, &lw.input_norm, norm, n, d, &mut ws.h, &mut ws.inv)?;
    c.linear(lw, Target::V, &ws.h, &mut ws.v, &mut ws.xa, &ws.row_scale)?;
    match (&lw.q_norm, &lw.k_norm) {
        (Some(qn), Some(kn)) => {
            c.linear(lw, Target::Q, &ws.h, &mut ws.q_pre, &mut ws.xa, &ws.row_scale)?;
            c.linear(lw, Target::K, &ws.h, &mut ws.k_pre, &mut ws.xa, &ws.row_scale)?;
            be.rmsnorm_fwd(&ws.q_pre, qn, norm, n * spec.num_heads, hd, &mut ws.q, &mut ws.qk_inv)?;
            be.rmsnorm_fwd(&ws.k_pre, kn, norm, n * spec.num_kv_heads, hd, &mut ws.k, &mut ws.qk_inv)?;
        }
        _ => {
            c.linear(lw, Target::Q, &ws.h, &mut ws.q, &mut ws.xa, &ws.row_scale)?;
            c.linear(lw, Target::K, &ws.h, &mut ws.k, &mut ws.xa, &ws.row_scale)?;
        }
    }
    be.rope(&mut ws.q, n, spec.num_heads, hd, &ws.positions, rope_table, false)?;
    be.rope(&mut ws.k, n, spec.num_kv_heads, hd, &ws.positions, rope_table, false)?;
    let [kc, vc] = cache;
    be.kv_store(&ws.k, n, c.kv, &ws.slots, &ws.positions, kc)?;
    be.kv_store(&ws.v, n, c.kv, &ws.slots, &ws.positions, vc)?;
    be.attention_cached(&ws.q, kc, vc, &ws.slots, &ws.positions, n, c.kv, &mut ws.att)?;
    match &lw.attn_out_norm {
        Some(wn) => {
            c.linear(lw, Target::O, &ws.att, &mut ws.pre, &mut ws.xa, &ws.row_scale)?;
            be.rmsnorm_fwd(&ws.pre, wn, norm, n, d, &mut ws.t, &mut ws.inv)?;
        }
        None => c.linear(lw, Target::O, &ws.att, &mut ws.t, &mut ws.xa, &ws.row_scale)?,
    }
    be.add(&mut ws.x, &ws.t, n * d)?;
    be.rmsnorm_fwd(&ws.x, &lw.post_attention_norm, norm, n, d, &mut ws.h, &mut ws.inv)?;
    c.linear(lw, Target::Gate, &ws.h, &mut ws.g, &mut ws.xa, &ws.row_scale)?;
    c.linear(lw, Target::Up, &ws.h, &mut ws.u, &mut ws.xa, &ws.row_scale)?;
    let elems = n * spec.intermediate_size;
    match spec.mlp_activation {
        MlpActivation::Silu => be.swiglu_fwd(&ws.g, &ws.u, elems, &mut ws.m)?,
        MlpActivation::GeluTanh => be.geglu_fwd(&ws.g, &ws.u, elems, &mut ws.m)?,
    }
    match &lw.mlp_out_norm {
        Some(wn) => {
            c.linear(lw, Target::Down, &ws.m, &mut ws.pre, &mut ws.xa, &ws.row_scale)?;
            be.rmsnorm_fwd(&ws.pre, wn, norm, n, d, &mut ws.t, &mut ws.inv)?;
        }
        None => c.linear(lw, Target::Down, &ws.m, &mut ws.t, &mut ws.xa, &ws.row_scale)?,
    }
    be.add(&mut ws.x, &ws.t, n * d)
}
