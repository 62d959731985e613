//! Test data shared by the integration tests: random weights in a model's exact shape, served
//! through the engine's `WeightSource` as a model folder's would be. Test data, so it lives here
//! and not in the product (`tunestudio bench` has its own NF4 weights in `bench.rs`).

#![allow(dead_code)]

use tunestudio::config::Target;
use tunestudio::engine::model::{WeightSource, linear_name};
use tunestudio::error::{Error, Result};
use tunestudio::model::ModelSpec;

/// Random weights in a model's exact shape (no files needed).
/// Linears ~ N(0, std²) (Box–Muller on a seeded ChaCha stream), norms at 1 ± jitter.
pub struct RandomWeights {
    pub spec: ModelSpec,
    pub tensors: std::collections::BTreeMap<String, Vec<f32>>,
}

impl RandomWeights {
    pub fn new(spec: &ModelSpec, seed: u64, std: f32) -> Self {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut normal = |n: usize, std: f32| -> Vec<f32> {
            (0..n)
                .map(|_| {
                    let u1: f32 = rng.random_range(1e-7f32..1.0);
                    let u2: f32 = rng.random();
                    std * (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
                })
                .collect()
        };
        let (v, d) = (spec.vocab_size, spec.hidden_size);
        let mut tensors = std::collections::BTreeMap::new();
        tensors.insert("model.embed_tokens.weight".to_string(), normal(v * d, std));
        if !spec.tie_word_embeddings {
            tensors.insert("lm_head.weight".to_string(), normal(v * d, std));
        }
        // Norms apply `offset + w` ≈ 1 (Gemma stores w around 0).
        let base = 1.0 - spec.norm_weight_offset;
        let norm = |x: Vec<f32>| x.into_iter().map(|e| base + e).collect::<Vec<f32>>();
        tensors.insert("model.norm.weight".to_string(), norm(normal(d, 0.1)));
        for l in 0..spec.num_layers {
            for name in spec.layer_norm_names() {
                tensors.insert(format!("model.layers.{l}.{name}.weight"), norm(normal(d, 0.1)));
            }
            for name in spec.qk_norm_names() {
                tensors.insert(format!("model.layers.{l}.self_attn.{name}.weight"), norm(normal(spec.head_dim, 0.1)));
            }
            for t in Target::ALL {
                let (o, i) = spec.linear_shape(t);
                tensors.insert(format!("{}.weight", linear_name(l, t)), normal(o * i, std));
                if spec.has_bias(t) {
                    tensors.insert(format!("{}.bias", linear_name(l, t)), normal(o, std));
                }
            }
        }
        RandomWeights { spec: spec.clone(), tensors }
    }
}

impl WeightSource for RandomWeights {
    fn dense(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let t = self.tensors.get(name).ok_or_else(|| Error::tensor(name, None, "is missing"))?;
        if t.len() != shape.iter().product::<usize>() {
            return Err(Error::tensor(name, None, format!("has {} values, expected shape {shape:?}", t.len())));
        }
        Ok(t.clone())
    }
    fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}
