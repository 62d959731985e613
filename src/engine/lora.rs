//! LoRA parameters on the host: initialisation, names, and the PEFT key layout. The device copies
//! live in `engine::Trainer`; this is what checkpoints, exports and imports read and write.

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::{LoraConfig, Target};
use crate::model::ModelSpec;

/// One adapted linear: `A` is `[r, in]`, `B` is `[out, r]`, both f32.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraPair {
    pub a: Vec<f32>,
    pub b: Vec<f32>,
}

/// Every adapted linear of the model, `layers[l][target]`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraWeights {
    pub rank: usize,
    pub layers: Vec<BTreeMap<Target, LoraPair>>,
}

impl LoraWeights {
    /// PEFT's default initialisation: `A ~ U(−1/√in, 1/√in)` (Kaiming-uniform with a = √5),
    /// `B = 0`, so the adapted model starts equal to the base. One RNG stream per (layer, target)
    /// keeps the draw independent of which other targets are enabled.
    pub fn init(spec: &ModelSpec, cfg: &LoraConfig, seed: u64) -> Self {
        let layers = (0..spec.num_layers)
            .map(|l| {
                cfg.targets
                    .iter()
                    .map(|&t| {
                        let (out, inp) = spec.linear_shape(t);
                        let stream = seed ^ ((l as u64) << 32) ^ ((t as u64 + 1) << 56);
                        let mut rng = ChaCha8Rng::seed_from_u64(stream);
                        let bound = 1.0 / (inp as f32).sqrt();
                        let a = (0..cfg.r * inp).map(|_| rng.random_range(-bound..bound)).collect();
                        (t, LoraPair { a, b: vec![0.0; out * cfg.r] })
                    })
                    .collect()
            })
            .collect();
        LoraWeights { rank: cfg.r, layers }
    }

    pub fn num_params(&self) -> usize {
        self.layers.iter().flat_map(|m| m.values()).map(|p| p.a.len() + p.b.len()).sum()
    }

    pub fn targets(&self) -> Vec<Target> {
        let mut t: Vec<Target> = self.layers.iter().flat_map(|m| m.keys().copied()).collect();
        t.sort();
        t.dedup();
        t
    }
}

/// PEFT's key for a LoRA matrix: `base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight`
/// (`…model.language_model.layers.N…` for the text model of a multimodal folder).
pub fn peft_key(spec: &ModelSpec, layer: usize, target: Target, which: char) -> String {
    format!("{}layers.{layer}.{}.{}.lora_{which}.weight", spec.peft_decoder_prefix(), target.hf_parent(), target.hf_name())
}
