//! The frozen base model on a backend: embeddings, norms, the (optionally NF4) linears, lm_head,
//! and the rotary table. Loaded once; never written during training.

use super::arena::Arena;
use crate::backend::{Backend, HostWeight};
use crate::config::{Quantization, Target};
use crate::error::{Error, Result};
use crate::model::arch::Rope;
use crate::model::{ModelSpec, WeightStore};
use crate::quant::nf4::Nf4Tensor;

pub struct LayerWeights<B: Backend> {
    pub input_norm: B::Tensor,
    /// The MLP's input norm: Llama's `post_attention_layernorm`, Gemma's `pre_feedforward_layernorm`.
    pub post_attention_norm: B::Tensor,
    /// Gemma's norms of the attention and MLP outputs (`post_attention_layernorm`,
    /// `post_feedforward_layernorm`), applied before each residual add.
    pub attn_out_norm: Option<B::Tensor>,
    pub mlp_out_norm: Option<B::Tensor>,
    /// Per-head norms of q and k (`[head_dim]`, Qwen3 and Gemma 3).
    pub q_norm: Option<B::Tensor>,
    pub k_norm: Option<B::Tensor>,
    /// Indexed by `Target as usize` (q, k, v, o, gate, up, down).
    pub linears: Vec<B::Weight>,
}

pub struct DeviceModel<B: Backend> {
    pub embed: B::Tensor,
    /// `None` when the embeddings are tied (the head is `embed`).
    pub head: Option<B::Tensor>,
    pub final_norm: B::Tensor,
    pub layers: Vec<LayerWeights<B>>,
    /// `[max_pos, head_dim/2]` cosines then sines.
    pub rope_table: B::Tensor,
    /// The same for sliding-window layers with a RoPE of their own (Gemma 3).
    pub rope_table_local: Option<B::Tensor>,
    pub rope_positions: usize,
}

impl<B: Backend> DeviceModel<B> {
    pub fn head(&self) -> &B::Tensor {
        self.head.as_ref().unwrap_or(&self.embed)
    }

    /// The rotary table layer `l` reads.
    pub fn rope_table_for(&self, spec: &ModelSpec, l: usize) -> &B::Tensor {
        match &self.rope_table_local {
            Some(t) if spec.uses_local_rope(l) => t,
            _ => &self.rope_table,
        }
    }
}

/// Where the frozen weights come from.
pub trait WeightSource {
    /// A float tensor as f32, shape-checked.
    fn dense(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>>;
    fn has(&self, name: &str) -> bool;
    /// A linear's weight as stored: dense, or already NF4 (pre-quantized checkpoints).
    fn linear(&self, name: &str, shape: (usize, usize), quant: Quantization) -> Result<HostWeight> {
        let data = self.dense(name, &[shape.0, shape.1])?;
        Ok(match quant {
            Quantization::Nf4 => HostWeight::Nf4(Nf4Tensor::quantize(&data, &[shape.0, shape.1])),
            Quantization::Bf16 => HostWeight::Dense { out_features: shape.0, in_features: shape.1, data },
        })
    }
}

/// The tensor bitsandbytes stores beside a packed NF4 weight; its presence marks a linear of a
/// pre-quantized (`*-bnb-4bit`) checkpoint.
pub fn bnb_quant_state_name(weight: &str) -> String {
    format!("{weight}.quant_state.bitsandbytes__nf4")
}

impl WeightSource for WeightStore {
    fn dense(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.f32(name, shape)
    }
    fn has(&self, name: &str) -> bool {
        self.contains(name)
    }
    /// A pre-quantized linear is taken as stored: requantizing an already-NF4 weight would move
    /// it away from the function the checkpoint's authors (and bnb) compute. With `bf16` it is
    /// dequantized exactly as bitsandbytes does for a bf16 compute dtype.
    fn linear(&self, name: &str, shape: (usize, usize), quant: Quantization) -> Result<HostWeight> {
        let fp4 = format!("{name}.quant_state.bitsandbytes__fp4");
        if !self.contains(&bnb_quant_state_name(name)) && !self.contains(&fp4) {
            let data = self.dense(name, &[shape.0, shape.1])?;
            return Ok(match quant {
                Quantization::Nf4 => HostWeight::Nf4(Nf4Tensor::quantize(&data, &[shape.0, shape.1])),
                Quantization::Bf16 => HostWeight::Dense { out_features: shape.0, in_features: shape.1, data },
            });
        }
        let q = Nf4Tensor::from_weight_store(self, name)?;
        if q.shape != [shape.0, shape.1] {
            let file = self.get(name).map(|e| self.shard_path(e).to_path_buf());
            return Err(Error::tensor(
                bnb_quant_state_name(name),
                file.as_deref(),
                format!("records shape {:?}, but config.json needs [{}, {}]", q.shape, shape.0, shape.1),
            ));
        }
        Ok(match quant {
            Quantization::Nf4 => HostWeight::Nf4(q),
            Quantization::Bf16 => HostWeight::Dense {
                out_features: shape.0,
                in_features: shape.1,
                data: q.dequantize_bf16().into_iter().map(f32::from).collect(),
            },
        })
    }
}

/// The rotary table of the global layers for positions `0..max_pos`, computed in f64.
pub fn rope_table(spec: &ModelSpec, max_pos: usize) -> Vec<f32> {
    rope_table_of(spec, &spec.global_rope(), max_pos)
}

/// [`rope_table`] for a given rotary embedding (a local layer's).
pub fn rope_table_of(spec: &ModelSpec, rope: &Rope, max_pos: usize) -> Vec<f32> {
    let inv = spec.rope_inv_freq_of(rope);
    let scale = ModelSpec::rope_position_scale_of(rope);
    let half = inv.len();
    let mut table = vec![0f32; 2 * max_pos * half];
    for p in 0..max_pos {
        for (i, f) in inv.iter().enumerate() {
            let angle = p as f64 * scale * f;
            table[p * half + i] = angle.cos() as f32;
            table[max_pos * half + p * half + i] = angle.sin() as f32;
        }
    }
    table
}

pub fn linear_name(layer: usize, t: Target) -> String {
    format!("model.layers.{layer}.{}.{}", t.hf_parent(), t.hf_name())
}

impl<B: Backend> DeviceModel<B> {
    /// The frozen model from `src`, into the buffers `plan::weight_buffers` lists, taken from
    /// `arena` by name: where the embedding lives (pinned host memory in memory mode), how long
    /// the rope tables are and which linears get a dequantized copy are the plan's choices.
    pub fn load(arena: &mut Arena<'_, B>, spec: &ModelSpec, src: &dyn WeightSource, quant: Quantization) -> Result<Self> {
        let (v, d) = (spec.vocab_size, spec.hidden_size);
        let embed = arena.upload("embed_tokens", &src.dense("model.embed_tokens.weight", &[v, d])?)?;
        // Tied: the head is the embedding, even where a checkpoint stores a copy of it.
        let head = if spec.tie_word_embeddings {
            None
        } else if src.has("lm_head.weight") {
            Some(arena.upload("lm_head", &src.dense("lm_head.weight", &[v, d])?)?)
        } else {
            return Err(Error::tensor("lm_head.weight", None, "is missing and the embeddings are not tied"));
        };
        let final_norm = arena.upload("final_norm", &src.dense("model.norm.weight", &[d])?)?;
        let mut layers = Vec::with_capacity(spec.num_layers);
        for l in 0..spec.num_layers {
            let p = format!("model.layers.{l}");
            let mut norm = |plan_name: &str, hf: &str| -> Result<B::Tensor> {
                arena.upload(&format!("layers.{l}.{plan_name}"), &src.dense(&format!("{p}.{hf}.weight"), &[d])?)
            };
            // In `ModelSpec::layer_norm_names` order: input, MLP input, then Gemma's output norms.
            let names = spec.layer_norm_names();
            let (input_norm, post_attention_norm) = (norm("input_norm", names[0])?, norm("post_attention_norm", names[1])?);
            let attn_out_norm = names.get(2).map(|n| norm("attn_out_norm", n)).transpose()?;
            let mlp_out_norm = names.get(3).map(|n| norm("mlp_out_norm", n)).transpose()?;
            let mut head_norm = |name: &str| {
                arena.upload(&format!("layers.{l}.{name}"), &src.dense(&format!("{p}.self_attn.{name}.weight"), &[spec.head_dim])?)
            };
            let (q_norm, k_norm) = if spec.qk_norm { (Some(head_norm("q_norm")?), Some(head_norm("k_norm")?)) } else { (None, None) };
            let mut linears = Vec::with_capacity(7);
            for t in Target::ALL {
                let name = linear_name(l, t);
                let shape = spec.linear_shape(t);
                let w = src.linear(&format!("{name}.weight"), shape, quant)?;
                let bias = if spec.has_bias(t) { Some(src.dense(&format!("{name}.bias"), &[shape.0])?) } else { None };
                linears.push(arena.weight(&format!("layers.{l}.{}", t.hf_name()), &w, bias.as_deref())?);
            }
            layers.push(LayerWeights { input_norm, post_attention_norm, attn_out_norm, mlp_out_norm, q_norm, k_norm, linears });
        }
        // `[max_pos, head_dim / 2]` cosines and sines: the plan's length says how many positions.
        let rope_positions = arena.elems("rope_table")? / (2 * (spec.head_dim / 2)).max(1);
        let rope_table = arena.upload("rope_table", &rope_table(spec, rope_positions))?;
        let rope_table_local = match &spec.local_rope {
            Some(r) => Some(arena.upload("rope_table_local", &rope_table_of(spec, r, rope_positions))?),
            None => None,
        };
        Ok(DeviceModel { embed, head, final_norm, layers, rope_table, rope_table_local, rope_positions })
    }
}
