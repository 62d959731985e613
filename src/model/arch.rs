//! Hugging Face `config.json` → `ModelSpec`: the dimensions and options of a decoder-only model.
//! Llama 2/3/3.1/3.2 (with `llama3` rope scaling), Mistral, Qwen2/2.5 (q/k/v bias), Qwen3 (per-head
//! q/k norms) and Gemma 3 (the text model of `gemma3_text` and of a `gemma3` folder: (1 + w) norms
//! around both blocks, GeGLU, a scaled embedding, local sliding-window layers with their own RoPE)
//! share one forward; everything that differs between them is a field here.

use std::path::Path;

use serde::Serialize;
use serde_json::Value;

use crate::config::Target;
use crate::error::{Error, IoContext, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
    Gemma3,
}

/// The gate's activation in the gated MLP `down(act(gate(x)) · up(x))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MlpActivation {
    /// SwiGLU (Llama, Mistral, Qwen).
    Silu,
    /// GeGLU with the tanh approximation of GELU (Gemma's `gelu_pytorch_tanh`).
    GeluTanh,
}

/// The rotary embedding of one kind of layer: base and scaling.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rope {
    pub theta: f64,
    pub scaling: Option<RopeScaling>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Positions divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3.1's frequency-dependent scaling.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: f64 },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelSpec {
    pub family: Family,
    /// `model_type` as written in config.json.
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on q, k, v (Qwen2, or Llama with `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on o_proj (Llama with `attention_bias`).
    pub o_bias: bool,
    /// Bias on gate/up/down (Llama with `mlp_bias`).
    pub mlp_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
    /// `torch_dtype`/`dtype` from config.json, if given.
    pub dtype: Option<String>,
    /// Per-head RMSNorm of q and k (over head_dim, weights `q_norm`/`k_norm`) before RoPE (Qwen3,
    /// Gemma 3).
    pub qk_norm: bool,
    /// Added to every RMSNorm weight before it multiplies: 1 for Gemma (`x̂ · (1 + w)`, weights
    /// stored around 0), else 0.
    pub norm_weight_offset: f32,
    /// Gemma's extra norms on the attention and MLP outputs before each residual add
    /// (`post_attention_layernorm`, `post_feedforward_layernorm`); the MLP's input norm is then
    /// `pre_feedforward_layernorm`.
    pub sandwich_norms: bool,
    pub mlp_activation: MlpActivation,
    /// Multiplies the embedding's output (Gemma: √hidden; a backend computing in bf16 rounds it to
    /// bf16 first, as transformers does in the weights' dtype).
    pub embed_scale: Option<f32>,
    /// Softmax scale of attention when not head_dim^-0.5 (Gemma: `query_pre_attn_scalar`^-0.5).
    pub attn_scale: Option<f64>,
    /// Keys per query on sliding-window layers (the query and the `w − 1` before it).
    pub sliding_window: Option<usize>,
    /// Which layers use the sliding window (`layer_types` of config.json); empty when none do.
    pub sliding_layers: Vec<bool>,
    /// RoPE of the sliding layers when it differs from the global one (Gemma 3: θ = 10 000, no
    /// scaling, where global layers use θ = 1 000 000 with the model's scaling).
    pub local_rope: Option<Rope>,
    /// The text model is `text_config` of a multimodal folder (`gemma3`): its tensors live under
    /// a prefix (see `WeightStore`) and PEFT addresses its modules under `language_model`.
    pub text_tower: bool,
}

fn get<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    v.get(key).filter(|x| !x.is_null())
}

fn usize_field(v: &Value, key: &str, path: &Path) -> Result<usize> {
    get(v, key)
        .ok_or_else(|| Error::file(path, format!("`{key}` is missing")))?
        .as_u64()
        .map(|x| x as usize)
        .ok_or_else(|| Error::file(path, format!("`{key}` is not a non-negative integer")))
}

fn f64_or(v: &Value, key: &str, default: f64) -> f64 {
    get(v, key).and_then(Value::as_f64).unwrap_or(default)
}

fn ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_u64().map(|x| x as u32)).collect(),
        _ => vec![],
    }
}

/// A rotary block of config.json (`rope_scaling`, or one entry of `rope_parameters`).
fn parse_rope(s: &Value, default_theta: f64, path: &Path) -> Result<Rope> {
    let theta = f64_or(s, "rope_theta", default_theta);
    let kind = get(s, "rope_type").or_else(|| get(s, "type")).and_then(Value::as_str).unwrap_or("default");
    let scaling = match kind {
        "default" => None,
        "linear" => Some(RopeScaling::Linear { factor: f64_or(s, "factor", 1.0) }),
        "llama3" => Some(RopeScaling::Llama3 {
            factor: f64_or(s, "factor", 8.0),
            low_freq_factor: f64_or(s, "low_freq_factor", 1.0),
            high_freq_factor: f64_or(s, "high_freq_factor", 4.0),
            original_max_position_embeddings: f64_or(s, "original_max_position_embeddings", 8192.0),
        }),
        other => {
            return Err(Error::file(path, format!("rope scaling `{other}` is not supported (supported: default, linear, llama3)")));
        }
    };
    Ok(Rope { theta, scaling })
}

/// `Gemma3TextConfig`'s defaults (transformers), which config.json files rely on.
fn gemma3_text_defaults() -> Value {
    serde_json::json!({
        "vocab_size": 262208, "hidden_size": 2304, "intermediate_size": 9216, "num_hidden_layers": 26,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 131072, "rms_norm_eps": 1e-6,
        "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2, "tie_word_embeddings": true,
        "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0, "attention_bias": false,
        "query_pre_attn_scalar": 256, "sliding_window": 4096, "sliding_window_pattern": 6
    })
}

impl ModelSpec {
    /// Read `<dir>/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        if !dir.is_dir() {
            return Err(Error::file(dir, "is not a folder (a Hugging Face model folder is expected)"));
        }
        let text = std::fs::read_to_string(&path).with_path(&path)?;
        let v: Value = serde_json::from_str(&text).map_err(|e| Error::line(&path, e.line(), format!("invalid JSON: {e}")))?;
        Self::from_json(&v, &path)
    }

    pub fn from_json(root: &Value, path: &Path) -> Result<Self> {
        let model_type = get(root, "model_type").and_then(Value::as_str).unwrap_or("").to_string();
        let family = match model_type.as_str() {
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            "qwen3" => Family::Qwen3,
            "gemma3" | "gemma3_text" => Family::Gemma3,
            "" => return Err(Error::file(path, "`model_type` is missing")),
            other => {
                return Err(Error::file(
                    path,
                    format!(
                        "unknown architecture `{other}`: supported are llama, mistral, qwen2, qwen3, gemma3_text and gemma3 (its text model)"
                    ),
                ));
            }
        };
        let text_tower = model_type == "gemma3";
        let owned;
        let v: &Value = if family == Family::Gemma3 {
            // transformers fills what a Gemma 3 config.json leaves out from Gemma3TextConfig's
            // defaults (the published 4B/12B/27B files give only a few fields): do the same. A
            // `gemma3` folder holds the text model in `text_config`; ids and dtype may sit at the top.
            let text = if text_tower {
                get(root, "text_config")
                    .ok_or_else(|| Error::file(path, "`text_config` is missing (a gemma3 folder holds the text model there)"))?
            } else {
                root
            };
            let mut merged = gemma3_text_defaults();
            let m = merged.as_object_mut().expect("object");
            for key in ["bos_token_id", "eos_token_id", "pad_token_id", "torch_dtype", "dtype", "tie_word_embeddings"] {
                if let Some(x) = get(root, key) {
                    m.insert(key.into(), x.clone());
                }
            }
            for (k, x) in text.as_object().into_iter().flatten().filter(|(_, x)| !x.is_null()) {
                m.insert(k.clone(), x.clone());
            }
            owned = merged;
            &owned
        } else {
            root
        };
        let hidden_size = usize_field(v, "hidden_size", path)?;
        let num_heads = usize_field(v, "num_attention_heads", path)?;
        let num_kv_heads = get(v, "num_key_value_heads").and_then(Value::as_u64).map_or(num_heads, |x| x as usize);
        let head_dim =
            get(v, "head_dim").and_then(Value::as_u64).map_or_else(|| hidden_size.checked_div(num_heads).unwrap_or(0), |x| x as usize);
        let num_layers = usize_field(v, "num_hidden_layers", path)?;
        // transformers ≥ 5 writes `rope_parameters` (theta + scaling together; per layer type for
        // models with local layers); older files write `rope_theta` and `rope_scaling`.
        let rope_params = get(v, "rope_parameters");
        let per_type = rope_params.and_then(|p| get(p, "full_attention").or_else(|| get(p, "sliding_attention")).map(|_| p));
        let default_theta = if family == Family::Gemma3 { 1_000_000.0 } else { 10_000.0 };
        let global = match per_type {
            Some(p) => match get(p, "full_attention") {
                Some(g) => parse_rope(g, f64_or(v, "rope_theta", default_theta), path)?,
                None => Rope { theta: f64_or(v, "rope_theta", default_theta), scaling: None },
            },
            None => {
                let theta = rope_params
                    .and_then(|p| get(p, "rope_theta"))
                    .and_then(Value::as_f64)
                    .unwrap_or_else(|| f64_or(v, "rope_theta", default_theta));
                match get(v, "rope_scaling").or(rope_params) {
                    Some(s) => Rope { theta, scaling: parse_rope(s, theta, path)?.scaling },
                    None => Rope { theta, scaling: None },
                }
            }
        };
        let attention_bias = get(v, "attention_bias").and_then(Value::as_bool).unwrap_or(false);
        // Sliding-window layers: `layer_types` when given; else Gemma's pattern (every
        // `sliding_window_pattern`-th layer is global), Qwen's `use_sliding_window` from
        // `max_window_layers` on, and Mistral's window on every layer.
        let window = get(v, "sliding_window").and_then(Value::as_u64).map(|w| w as usize);
        let use_window = match family {
            Family::Qwen2 | Family::Qwen3 => get(v, "use_sliding_window").and_then(Value::as_bool).unwrap_or(false),
            _ => true,
        };
        let sliding_window = window.filter(|_| use_window);
        let sliding_layers: Vec<bool> = match (sliding_window, get(v, "layer_types").and_then(Value::as_array)) {
            (None, _) => vec![],
            (Some(_), Some(types)) => {
                if types.len() != num_layers {
                    return Err(Error::file(path, format!("`layer_types` has {} entries for {num_layers} layers", types.len())));
                }
                types
                    .iter()
                    .map(|t| match t.as_str() {
                        Some("sliding_attention") => Ok(true),
                        Some("full_attention") => Ok(false),
                        _ => {
                            Err(Error::file(path, format!("`layer_types` entry {t} is not supported (full_attention, sliding_attention)")))
                        }
                    })
                    .collect::<Result<_>>()?
            }
            (Some(_), None) => match family {
                Family::Gemma3 => {
                    let pattern = get(v, "sliding_window_pattern").and_then(Value::as_u64).unwrap_or(6).max(1) as usize;
                    (0..num_layers).map(|i| (i + 1) % pattern != 0).collect()
                }
                Family::Qwen2 | Family::Qwen3 => {
                    let first = get(v, "max_window_layers").and_then(Value::as_u64).unwrap_or(28) as usize;
                    (0..num_layers).map(|i| i >= first).collect()
                }
                _ => vec![true; num_layers],
            },
        };
        let sliding_layers = if sliding_layers.iter().any(|&s| s) { sliding_layers } else { vec![] };
        let gemma = family == Family::Gemma3;
        let local_rope = if !gemma || sliding_layers.is_empty() {
            None
        } else {
            match per_type.and_then(|p| get(p, "sliding_attention")) {
                Some(l) => Some(parse_rope(l, f64_or(v, "rope_local_base_freq", 10_000.0), path)?),
                None => Some(Rope { theta: f64_or(v, "rope_local_base_freq", 10_000.0), scaling: None }),
            }
        };
        if gemma {
            for key in ["final_logit_softcapping", "attn_logit_softcapping"] {
                if get(v, key).is_some() {
                    return Err(Error::file(path, format!("`{key}` is set: logit soft-capping (Gemma 2) is not supported")));
                }
            }
            if get(v, "use_bidirectional_attention").and_then(Value::as_bool) == Some(true) {
                return Err(Error::file(path, "`use_bidirectional_attention` is true: only causal language models can be trained"));
            }
        }
        let activation = get(v, "hidden_activation").or_else(|| get(v, "hidden_act")).and_then(Value::as_str).unwrap_or("silu");
        let mlp_activation = match activation {
            "silu" | "swish" => MlpActivation::Silu,
            "gelu_pytorch_tanh" | "gelu_tanh" | "gelu_new" => MlpActivation::GeluTanh,
            other => return Err(Error::file(path, format!("activation `{other}` is not supported (silu, gelu_pytorch_tanh)"))),
        };
        let dtype = get(v, "torch_dtype").or_else(|| get(v, "dtype")).and_then(Value::as_str).map(str::to_string);
        let embed_scale = gemma.then(|| (hidden_size as f64).sqrt() as f32);
        let attn_scale = if gemma { Some(f64_or(v, "query_pre_attn_scalar", 256.0).powf(-0.5)) } else { None };
        let spec = ModelSpec {
            family,
            model_type,
            vocab_size: usize_field(v, "vocab_size", path)?,
            hidden_size,
            intermediate_size: usize_field(v, "intermediate_size", path)?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: f64_or(v, "rms_norm_eps", 1e-6),
            rope_theta: global.theta,
            rope_scaling: global.scaling,
            max_position_embeddings: get(v, "max_position_embeddings").and_then(Value::as_u64).unwrap_or(4096) as usize,
            tie_word_embeddings: get(v, "tie_word_embeddings").and_then(Value::as_bool).unwrap_or(gemma),
            qkv_bias: family == Family::Qwen2 || attention_bias,
            o_bias: family != Family::Qwen2 && attention_bias,
            mlp_bias: get(v, "mlp_bias").and_then(Value::as_bool).unwrap_or(false),
            bos_token_id: get(v, "bos_token_id").and_then(Value::as_u64).map(|x| x as u32),
            eos_token_ids: ids(get(v, "eos_token_id")),
            pad_token_id: get(v, "pad_token_id").and_then(Value::as_u64).map(|x| x as u32),
            dtype,
            qk_norm: matches!(family, Family::Qwen3 | Family::Gemma3),
            norm_weight_offset: if gemma { 1.0 } else { 0.0 },
            sandwich_norms: gemma,
            mlp_activation,
            embed_scale,
            attn_scale,
            sliding_window: sliding_window.filter(|_| !sliding_layers.is_empty()),
            sliding_layers,
            local_rope,
            text_tower,
        };
        spec.check(path)?;
        Ok(spec)
    }

    fn check(&self, path: &Path) -> Result<()> {
        let bad = |msg: String| Err(Error::file(path, msg));
        if self.num_heads == 0 || self.num_kv_heads == 0 || self.head_dim == 0 || self.hidden_size == 0 {
            return bad("hidden_size, num_attention_heads, num_key_value_heads and head_dim must be > 0".into());
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_heads, self.num_kv_heads
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim ({}) must be even for rotary embeddings", self.head_dim));
        }
        if self.vocab_size == 0 || self.num_layers == 0 || self.intermediate_size == 0 {
            return bad("vocab_size, num_hidden_layers and intermediate_size must be > 0".into());
        }
        if self.sliding_window == Some(0) {
            return bad("sliding_window must be > 0".into());
        }
        Ok(())
    }

    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// (out_features, in_features) of a decoder linear, as stored in the weight matrix.
    pub fn linear_shape(&self, t: Target) -> (usize, usize) {
        let (d, f) = (self.hidden_size, self.intermediate_size);
        match t {
            Target::Q => (self.q_dim(), d),
            Target::K | Target::V => (self.kv_dim(), d),
            Target::O => (d, self.q_dim()),
            Target::Gate | Target::Up => (f, d),
            Target::Down => (d, f),
        }
    }

    pub fn has_bias(&self, t: Target) -> bool {
        match t {
            Target::Q | Target::K | Target::V => self.qkv_bias,
            Target::O => self.o_bias,
            Target::Gate | Target::Up | Target::Down => self.mlp_bias,
        }
    }

    /// Parameters of the decoder linears (no biases, no norms).
    pub fn linear_params(&self) -> u64 {
        self.layer_linear_params() * self.num_layers as u64
    }

    /// Parameters of one decoder layer's seven linears (no biases).
    pub fn layer_linear_params(&self) -> u64 {
        Target::ALL
            .iter()
            .map(|&t| {
                let (o, i) = self.linear_shape(t);
                (o * i) as u64
            })
            .sum()
    }

    /// Every parameter of the model, as `transformers` counts them.
    pub fn total_params(&self) -> u64 {
        let d = self.hidden_size as u64;
        let embed = self.vocab_size as u64 * d;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        let biases: u64 =
            Target::ALL.iter().filter(|&&t| self.has_bias(t)).map(|&t| self.linear_shape(t).0 as u64).sum::<u64>() * self.num_layers as u64;
        let per_layer_norms = self.layer_norm_names().len() as u64 * d + if self.qk_norm { 2 * self.head_dim as u64 } else { 0 };
        let norms = self.num_layers as u64 * per_layer_norms + d;
        self.linear_params() + embed + head + biases + norms
    }

    /// The hidden-size norms of a decoder layer as config.json's checkpoints name them
    /// (`model.layers.N.<name>.weight`), in [`LayerNorms`] order: input, MLP input, then with
    /// sandwich norms the attention output's and the MLP output's.
    pub fn layer_norm_names(&self) -> &'static [&'static str] {
        if self.sandwich_norms {
            &["input_layernorm", "pre_feedforward_layernorm", "post_attention_layernorm", "post_feedforward_layernorm"]
        } else {
            &["input_layernorm", "post_attention_layernorm"]
        }
    }

    /// The per-head norms of q and k (`model.layers.N.self_attn.<name>.weight`, `[head_dim]`).
    pub fn qk_norm_names(&self) -> &'static [&'static str] {
        if self.qk_norm { &["q_norm", "k_norm"] } else { &[] }
    }

    /// Where PEFT addresses the decoder (`base_model.model.` + the module path of its layers in
    /// the transformers model): `model.` for a causal LM, `model.language_model.` for the text
    /// model of a multimodal folder.
    pub fn peft_decoder_prefix(&self) -> &'static str {
        if self.text_tower { "base_model.model.model.language_model." } else { "base_model.model.model." }
    }

    /// Whether layer `l` attends through the sliding window.
    pub fn is_sliding(&self, l: usize) -> bool {
        self.sliding_layers.get(l).copied().unwrap_or(false)
    }

    /// The sliding window of layer `l`, `None` for a global (full causal) layer.
    pub fn layer_window(&self, l: usize) -> Option<usize> {
        self.sliding_window.filter(|_| self.is_sliding(l))
    }

    /// The RoPE of global layers.
    pub fn global_rope(&self) -> Rope {
        Rope { theta: self.rope_theta, scaling: self.rope_scaling.clone() }
    }

    /// The RoPE layer `l` uses (the local one on sliding layers when the model has one).
    pub fn layer_rope(&self, l: usize) -> Rope {
        match &self.local_rope {
            Some(r) if self.is_sliding(l) => r.clone(),
            _ => self.global_rope(),
        }
    }

    /// Whether layer `l` reads the local rotary table (`rope_table_local`).
    pub fn uses_local_rope(&self, l: usize) -> bool {
        self.local_rope.is_some() && self.is_sliding(l)
    }

    /// LoRA parameters for rank `r` over `targets` in every layer.
    pub fn lora_params(&self, r: usize, targets: &[Target]) -> u64 {
        let per_layer: usize = targets
            .iter()
            .map(|&t| {
                let (o, i) = self.linear_shape(t);
                r * (o + i)
            })
            .sum();
        (per_layer * self.num_layers) as u64
    }

    /// Rotary inverse frequencies of the global layers (head_dim / 2 of them), with rope scaling
    /// applied, computed as transformers does (f32 powers) but returned in f64.
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        self.rope_inv_freq_of(&self.global_rope())
    }

    /// [`Self::rope_inv_freq`] for a given rotary embedding (a local layer's).
    pub fn rope_inv_freq_of(&self, rope: &Rope) -> Vec<f64> {
        let half = self.head_dim / 2;
        let base: Vec<f64> = (0..half)
            .map(|i| {
                let exponent = (2 * i) as f32 / self.head_dim as f32;
                1.0 / (rope.theta as f32).powf(exponent) as f64
            })
            .collect();
        match &rope.scaling {
            None | Some(RopeScaling::Linear { .. }) => base,
            Some(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }) => {
                let old = *original_max_position_embeddings;
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }

    /// Positions of the global layers are multiplied by this before the rotation (1 / factor
    /// under linear scaling), else 1.
    pub fn rope_position_scale(&self) -> f64 {
        Self::rope_position_scale_of(&self.global_rope())
    }

    /// [`Self::rope_position_scale`] for a given rotary embedding.
    pub fn rope_position_scale_of(rope: &Rope) -> f64 {
        match rope.scaling {
            Some(RopeScaling::Linear { factor }) => 1.0 / factor,
            _ => 1.0,
        }
    }

    /// A one-line description for `inspect` and the studio.
    pub fn summary(&self) -> String {
        let mut extra = String::new();
        if self.qk_norm {
            extra.push_str(", q/k norms");
        }
        if let Some(w) = self.sliding_window {
            let local = self.sliding_layers.iter().filter(|&&s| s).count();
            extra.push_str(&format!(", sliding window {w} on {local}/{} layers", self.num_layers));
        }
        // The family only where it tells more than model_type ("gemma3_text (Gemma3)", not
        // "llama (Llama)").
        let family = format!("{:?}", self.family);
        let name =
            if family.eq_ignore_ascii_case(&self.model_type) { self.model_type.clone() } else { format!("{} ({family})", self.model_type) };
        format!(
            "{name}: {} layers, hidden {}, intermediate {}, heads {}/{} kv, head_dim {}, vocab {}, {} params{}{extra}",
            self.num_layers,
            self.hidden_size,
            self.intermediate_size,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.vocab_size,
            crate::util::fmt_count(self.total_params()),
            if self.tie_word_embeddings { ", tied embeddings" } else { "" },
        )
    }

    /// The Llama-3-8B shape, for benchmarks and plans without files.
    pub fn llama3_8b() -> Self {
        ModelSpec {
            family: Family::Llama,
            model_type: "llama".into(),
            vocab_size: 128256,
            hidden_size: 4096,
            intermediate_size: 14336,
            num_layers: 32,
            num_heads: 32,
            num_kv_heads: 8,
            head_dim: 128,
            rms_norm_eps: 1e-5,
            rope_theta: 500000.0,
            rope_scaling: None,
            max_position_embeddings: 8192,
            tie_word_embeddings: false,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            bos_token_id: Some(128000),
            eos_token_ids: vec![128001],
            pad_token_id: None,
            dtype: Some("bfloat16".into()),
            qk_norm: false,
            norm_weight_offset: 0.0,
            sandwich_norms: false,
            mlp_activation: MlpActivation::Silu,
            embed_scale: None,
            attn_scale: None,
            sliding_window: None,
            sliding_layers: vec![],
            local_rope: None,
            text_tower: false,
        }
    }

    /// The Qwen3-8B shape (Qwen/Qwen3-8B config.json).
    pub fn qwen3_8b() -> Self {
        ModelSpec {
            family: Family::Qwen3,
            model_type: "qwen3".into(),
            vocab_size: 151936,
            hidden_size: 4096,
            intermediate_size: 12288,
            num_layers: 36,
            num_heads: 32,
            num_kv_heads: 8,
            head_dim: 128,
            rms_norm_eps: 1e-6,
            rope_theta: 1_000_000.0,
            max_position_embeddings: 40960,
            bos_token_id: Some(151643),
            eos_token_ids: vec![151645],
            qk_norm: true,
            ..Self::llama3_8b()
        }
    }

    /// The text model of Gemma-3-4B (google/gemma-3-4b-it config.json and Gemma3TextConfig's
    /// defaults): 34 layers, 5 local (window 1024, θ 10 000) to 1 global (θ 1 000 000, linear ×8).
    pub fn gemma3_4b() -> Self {
        let layers = 34;
        ModelSpec {
            family: Family::Gemma3,
            model_type: "gemma3".into(),
            vocab_size: 262208,
            hidden_size: 2560,
            intermediate_size: 10240,
            num_layers: layers,
            num_heads: 8,
            num_kv_heads: 4,
            head_dim: 256,
            rms_norm_eps: 1e-6,
            rope_theta: 1_000_000.0,
            rope_scaling: Some(RopeScaling::Linear { factor: 8.0 }),
            max_position_embeddings: 131072,
            tie_word_embeddings: true,
            bos_token_id: Some(2),
            eos_token_ids: vec![1, 106],
            pad_token_id: Some(0),
            qk_norm: true,
            norm_weight_offset: 1.0,
            sandwich_norms: true,
            mlp_activation: MlpActivation::GeluTanh,
            embed_scale: Some((2560f64).sqrt() as f32),
            attn_scale: Some(256f64.powf(-0.5)),
            sliding_window: Some(1024),
            sliding_layers: (0..layers).map(|i| (i + 1) % 6 != 0).collect(),
            local_rope: Some(Rope { theta: 10_000.0, scaling: None }),
            text_tower: true,
            ..Self::llama3_8b()
        }
    }

    /// The Llama-3.2-3B shape (tied embeddings, llama3 rope scaling).
    pub fn llama32_3b() -> Self {
        ModelSpec {
            hidden_size: 3072,
            intermediate_size: 8192,
            num_layers: 28,
            num_heads: 24,
            num_kv_heads: 8,
            head_dim: 128,
            tie_word_embeddings: true,
            max_position_embeddings: 131072,
            rope_scaling: Some(RopeScaling::Llama3 {
                factor: 32.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192.0,
            }),
            eos_token_ids: vec![128001, 128008, 128009],
            ..Self::llama3_8b()
        }
    }

    /// The names [`Self::by_shape_name`] knows.
    pub const SHAPE_NAMES: &'static [&'static str] = &["llama3-8b", "llama3.1-8b", "llama3.2-3b", "llama3.2-1b", "qwen3-8b", "gemma3-4b"];

    /// Named shapes for `bench` and `plan`.
    pub fn by_shape_name(name: &str) -> Option<Self> {
        match name {
            "llama3-8b" | "llama3.1-8b" => Some(Self::llama3_8b()),
            "llama3.2-3b" => Some(Self::llama32_3b()),
            "llama3.2-1b" => Some(ModelSpec {
                hidden_size: 2048,
                intermediate_size: 8192,
                num_layers: 16,
                num_heads: 32,
                num_kv_heads: 8,
                head_dim: 64,
                ..Self::llama32_3b()
            }),
            "qwen3-8b" => Some(Self::qwen3_8b()),
            "gemma3-4b" => Some(Self::gemma3_4b()),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_names_the_family_only_when_it_adds_to_model_type() {
        let mut spec = ModelSpec::llama3_8b();
        assert!(spec.summary().starts_with("llama: 32 layers"), "{}", spec.summary());
        spec.model_type = "gemma3_text".into();
        spec.family = Family::Gemma3;
        assert!(spec.summary().starts_with("gemma3_text (Gemma3): "), "{}", spec.summary());
    }

    #[test]
    fn every_listed_shape_name_resolves() {
        for name in ModelSpec::SHAPE_NAMES {
            assert!(ModelSpec::by_shape_name(name).is_some(), "{name}");
        }
    }

    #[test]
    fn llama3_8b_param_count() {
        // 8,030,261,248 is what transformers reports for Meta-Llama-3-8B.
        assert_eq!(ModelSpec::llama3_8b().total_params(), 8_030_261_248);
        // 3,212,749,824 for Llama-3.2-3B.
        assert_eq!(ModelSpec::llama32_3b().total_params(), 3_212_749_824);
    }

    #[test]
    fn parses_llama31_with_rope_scaling_and_v5_rope_parameters() {
        let v: Value = serde_json::json!({
            "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100,
            "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
            "eos_token_id": [1, 2]
        });
        let s = ModelSpec::from_json(&v, Path::new("config.json")).unwrap();
        assert_eq!(s.head_dim, 16);
        assert!(matches!(s.rope_scaling, Some(RopeScaling::Llama3 { .. })));
        assert_eq!(s.eos_token_ids, vec![1, 2]);
        let v5: Value = serde_json::json!({
            "model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "vocab_size": 100,
            "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}
        });
        let s = ModelSpec::from_json(&v5, Path::new("config.json")).unwrap();
        assert_eq!(s.rope_theta, 500000.0);
        assert_eq!(s.num_kv_heads, 4);
        assert!(s.rope_scaling.is_none());
    }

    #[test]
    fn unknown_architecture_names_file() {
        let v: Value = serde_json::json!({"model_type": "gpt2"});
        let e = ModelSpec::from_json(&v, Path::new("m/config.json")).unwrap_err().to_string();
        assert!(e.contains("m/config.json") && e.contains("gpt2"), "{e}");
    }

    fn fixture(name: &str) -> ModelSpec {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/configs").join(name).join("config.json");
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        ModelSpec::from_json(&v, &path).unwrap()
    }

    /// Parameter counts by hand from the published dimensions (transformers reports the same:
    /// 8,190,735,360 for Qwen3-8B, 999,885,952 for Gemma-3-1B).
    #[test]
    fn qwen3_and_gemma3_configs_and_parameter_counts() {
        let q = fixture("qwen3-8b");
        assert_eq!((q.family, q.head_dim, q.qk_norm, q.tie_word_embeddings, q.qkv_bias), (Family::Qwen3, 128, true, false, false));
        assert!(q.sliding_window.is_none() && q.sliding_layers.is_empty() && q.attn_scale.is_none());
        // 36 × (q, o 4096² + k, v 1024·4096 + 3 · 4096·12288) + 2 tables + 36 × (2 · 4096 + 2 · 128) + 4096
        let linears = 36 * (2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 4096 * 12288);
        assert_eq!(q.total_params(), linears + 2 * 151_936 * 4096 + 36 * (2 * 4096 + 2 * 128) + 4096);
        assert_eq!(q.total_params(), 8_190_735_360);
        assert_eq!(q, ModelSpec { dtype: q.dtype.clone(), ..ModelSpec::qwen3_8b() }, "the named shape is the published model");

        let g = fixture("gemma-3-1b-it");
        assert_eq!((g.family, g.head_dim, g.num_kv_heads, g.tie_word_embeddings), (Family::Gemma3, 256, 1, true));
        assert_eq!((g.norm_weight_offset, g.sandwich_norms, g.mlp_activation), (1.0, true, MlpActivation::GeluTanh));
        assert_eq!(g.attn_scale, Some(1.0 / 16.0));
        assert_eq!(g.embed_scale, Some((1152f32).sqrt()));
        // Five local layers to one global: layers 5, 11, 17, 23 are global.
        assert_eq!(g.sliding_window, Some(512));
        let global: Vec<usize> = (0..26).filter(|&l| !g.is_sliding(l)).collect();
        assert_eq!(global, vec![5, 11, 17, 23]);
        assert_eq!(g.layer_rope(0), Rope { theta: 10_000.0, scaling: None });
        assert_eq!(g.layer_rope(5), Rope { theta: 1_000_000.0, scaling: None });
        assert_eq!(g.total_params(), 999_885_952);

        // The multimodal folder's text model: what the file leaves out comes from transformers'
        // Gemma3TextConfig defaults; linear RoPE scaling applies to the global layers only.
        let f = fixture("gemma-3-4b-it");
        assert!(f.text_tower);
        assert_eq!((f.vocab_size, f.num_heads, f.num_kv_heads, f.head_dim, f.num_layers), (262_208, 8, 4, 256, 34));
        assert_eq!(f.layer_rope(5), Rope { theta: 1_000_000.0, scaling: Some(RopeScaling::Linear { factor: 8.0 }) });
        assert_eq!(f.layer_rope(4), Rope { theta: 10_000.0, scaling: None });
        assert_eq!(f.eos_token_ids, vec![1, 106]);
        let linears = 34 * (2 * 2048 * 2560 + 2 * 1024 * 2560 + 3 * 2560 * 10240);
        assert_eq!(f.total_params(), linears + 262_208 * 2560 + 34 * (4 * 2560 + 2 * 256) + 2560);
        assert_eq!(f, ModelSpec { dtype: f.dtype.clone(), ..ModelSpec::gemma3_4b() }, "the named shape is the published model");
    }

    #[test]
    fn gemma_refuses_what_it_cannot_train() {
        let v: Value = serde_json::json!({"model_type": "gemma3_text", "final_logit_softcapping": 30.0});
        let e = ModelSpec::from_json(&v, Path::new("g/config.json")).unwrap_err().to_string();
        assert!(e.contains("g/config.json") && e.contains("final_logit_softcapping"), "{e}");
        let v: Value = serde_json::json!({"model_type": "gemma3"});
        let e = ModelSpec::from_json(&v, Path::new("g/config.json")).unwrap_err().to_string();
        assert!(e.contains("text_config"), "{e}");
    }

    #[test]
    fn qwen2_has_qkv_bias() {
        let v: Value = serde_json::json!({
            "model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 100, "tie_word_embeddings": true
        });
        let s = ModelSpec::from_json(&v, Path::new("config.json")).unwrap();
        assert!(s.qkv_bias && !s.o_bias && s.tie_word_embeddings);
    }
}
