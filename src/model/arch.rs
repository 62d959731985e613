//! Hugging Face `config.json` → `ModelSpec`: the dimensions and options of a Llama-family decoder.
//! Llama 2/3/3.1/3.2 (with `llama3` rope scaling), Mistral, and Qwen2/2.5 (q/k/v bias) share one
//! forward; everything that differs between them is a field here.

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

    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        let model_type = get(v, "model_type").and_then(Value::as_str).unwrap_or("").to_string();
        let family = match model_type.as_str() {
            "llama" => Family::Llama,
            "mistral" => Family::Mistral,
            "qwen2" => Family::Qwen2,
            "" => return Err(Error::file(path, "`model_type` is missing")),
            other => {
                return Err(Error::file(path, format!("unknown architecture `{other}`: supported are llama, mistral, qwen2")));
            }
        };
        let hidden_size = usize_field(v, "hidden_size", path)?;
        let num_heads = usize_field(v, "num_attention_heads", path)?;
        let num_kv_heads = get(v, "num_key_value_heads").and_then(Value::as_u64).map_or(num_heads, |x| x as usize);
        let head_dim = get(v, "head_dim")
            .and_then(Value::as_u64)
            .map_or_else(|| if num_heads == 0 { 0 } else { hidden_size / num_heads }, |x| x as usize);
        // transformers ≥ 5 writes `rope_parameters` (theta + scaling together); older files write
        // `rope_theta` and `rope_scaling`.
        let rope_params = get(v, "rope_parameters");
        let rope_theta =
            rope_params.and_then(|p| get(p, "rope_theta")).and_then(Value::as_f64).unwrap_or_else(|| f64_or(v, "rope_theta", 10000.0));
        let scaling_value = get(v, "rope_scaling").or(rope_params);
        let rope_scaling = match scaling_value {
            None => None,
            Some(s) => {
                let kind = get(s, "rope_type").or_else(|| get(s, "type")).and_then(Value::as_str).unwrap_or("default");
                match kind {
                    "default" => None,
                    "linear" => Some(RopeScaling::Linear { factor: f64_or(s, "factor", 1.0) }),
                    "llama3" => Some(RopeScaling::Llama3 {
                        factor: f64_or(s, "factor", 8.0),
                        low_freq_factor: f64_or(s, "low_freq_factor", 1.0),
                        high_freq_factor: f64_or(s, "high_freq_factor", 4.0),
                        original_max_position_embeddings: f64_or(s, "original_max_position_embeddings", 8192.0),
                    }),
                    other => {
                        return Err(Error::file(
                            path,
                            format!("rope scaling `{other}` is not supported (supported: default, linear, llama3)"),
                        ));
                    }
                }
            }
        };
        let attention_bias = get(v, "attention_bias").and_then(Value::as_bool).unwrap_or(false);
        let spec = ModelSpec {
            family,
            model_type,
            vocab_size: usize_field(v, "vocab_size", path)?,
            hidden_size,
            intermediate_size: usize_field(v, "intermediate_size", path)?,
            num_layers: usize_field(v, "num_hidden_layers", path)?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: f64_or(v, "rms_norm_eps", 1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: get(v, "max_position_embeddings").and_then(Value::as_u64).unwrap_or(4096) as usize,
            tie_word_embeddings: get(v, "tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false),
            qkv_bias: family == Family::Qwen2 || attention_bias,
            o_bias: family != Family::Qwen2 && attention_bias,
            mlp_bias: get(v, "mlp_bias").and_then(Value::as_bool).unwrap_or(false),
            bos_token_id: get(v, "bos_token_id").and_then(Value::as_u64).map(|x| x as u32),
            eos_token_ids: ids(get(v, "eos_token_id")),
            pad_token_id: get(v, "pad_token_id").and_then(Value::as_u64).map(|x| x as u32),
            dtype: get(v, "torch_dtype").or_else(|| get(v, "dtype")).and_then(Value::as_str).map(str::to_string),
        };
        spec.check(path)?;
        Ok(spec)
    }

    fn check(&self, path: &Path) -> Result<()> {
        let bad = |msg: String| Err(Error::file(path, msg));
        if self.num_heads == 0 || self.num_kv_heads == 0 || self.head_dim == 0 || self.hidden_size == 0 {
            return bad("hidden_size, num_attention_heads, num_key_value_heads and head_dim must be > 0".into());
        }
        if self.num_heads % self.num_kv_heads != 0 {
            return bad(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_heads, self.num_kv_heads
            ));
        }
        if self.head_dim % 2 != 0 {
            return bad(format!("head_dim ({}) must be even for rotary embeddings", self.head_dim));
        }
        if self.vocab_size == 0 || self.num_layers == 0 || self.intermediate_size == 0 {
            return bad("vocab_size, num_hidden_layers and intermediate_size must be > 0".into());
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
        let per_layer: usize = Target::ALL
            .iter()
            .map(|&t| {
                let (o, i) = self.linear_shape(t);
                o * i
            })
            .sum();
        (per_layer * self.num_layers) as u64
    }

    /// Every parameter of the model, as `transformers` counts them.
    pub fn total_params(&self) -> u64 {
        let d = self.hidden_size as u64;
        let embed = self.vocab_size as u64 * d;
        let head = if self.tie_word_embeddings { 0 } else { embed };
        let biases: u64 =
            Target::ALL.iter().filter(|&&t| self.has_bias(t)).map(|&t| self.linear_shape(t).0 as u64).sum::<u64>() * self.num_layers as u64;
        let norms = (2 * self.num_layers as u64 + 1) * d;
        self.linear_params() + embed + head + biases + norms
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

    /// Rotary inverse frequencies (head_dim / 2 of them), with rope scaling applied, computed as
    /// transformers does (f32 powers) but returned in f64.
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let half = self.head_dim / 2;
        let base: Vec<f64> = (0..half)
            .map(|i| {
                let exponent = (2 * i) as f32 / self.head_dim as f32;
                1.0 / (self.rope_theta as f32).powf(exponent) as f64
            })
            .collect();
        match &self.rope_scaling {
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

    /// Positions are divided by this before the rotation (linear scaling), else 1.
    pub fn rope_position_scale(&self) -> f64 {
        match self.rope_scaling {
            Some(RopeScaling::Linear { factor }) => 1.0 / factor,
            _ => 1.0,
        }
    }

    /// A one-line description for `inspect` and the studio.
    pub fn summary(&self) -> String {
        format!(
            "{} ({:?}): {} layers, hidden {}, intermediate {}, heads {}/{} kv, head_dim {}, vocab {}, {} params{}",
            self.model_type,
            self.family,
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

    /// The names `by_shape_name` knows, for menus and messages.
    pub const SHAPE_NAMES: [&str; 3] = ["llama3-8b", "llama3.2-3b", "llama3.2-1b"];

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
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
