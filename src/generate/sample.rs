//! Choosing the next token from the logits, on the host: repetition penalty, then temperature,
//! top-k, top-p and min-p (the order `transformers` applies them in), then a draw from a seeded
//! stream, or the most likely token when the temperature is 0.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// How to pick tokens and when to stop counting them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SamplingParams {
    /// 0 picks the most likely token (greedy); otherwise logits are divided by it.
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the most likely tokens whose probabilities sum to at least `top_p` (1: all).
    pub top_p: f32,
    /// Keep tokens at least `min_p` times as likely as the most likely one (0: all).
    pub min_p: f32,
    /// Divides positive (multiplies negative) logits of tokens already in the prompt or answer
    /// (1: off), as `transformers` does.
    pub repetition_penalty: f32,
    /// Seeds the draws: the same seed, prompt and settings give the same answer.
    pub seed: u64,
    pub max_new_tokens: usize,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { temperature: 0.7, top_k: 50, top_p: 0.95, min_p: 0.0, repetition_penalty: 1.0, seed: 0, max_new_tokens: 256 }
    }
}

impl SamplingParams {
    /// Always the most likely token.
    pub fn greedy(max_new_tokens: usize) -> Self {
        SamplingParams { temperature: 0.0, top_k: 0, top_p: 1.0, min_p: 0.0, repetition_penalty: 1.0, seed: 0, max_new_tokens }
    }

    /// The first setting out of range, named as the CLI flag and the studio field name it.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, why: String| Err(Error::config(format!("sampling.{field}"), why));
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            return bad("temperature", format!("is {}; use 0 (greedy) or a positive number such as 0.7", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", format!("is {}; use a value in (0, 1] (1 keeps every token)", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", format!("is {}; use a value in [0, 1] (0 keeps every token)", self.min_p));
        }
        if !(self.repetition_penalty > 0.0 && self.repetition_penalty.is_finite()) {
            return bad("repetition_penalty", format!("is {}; use a positive number (1 is off)", self.repetition_penalty));
        }
        if self.max_new_tokens == 0 {
            return bad("max_new_tokens", "is 0; ask for at least one token".into());
        }
        Ok(())
    }
}

/// Picks tokens for one sequence with its own seeded stream.
pub struct Sampler {
    params: SamplingParams,
    rng: ChaCha8Rng,
    /// Scratch: (logit, token) candidates.
    cand: Vec<(f32, u32)>,
}

/// Candidates kept before a full sort when only top-p or min-p filter: the probabilities beyond
/// the first few hundred of a 100K vocabulary rarely matter, and a full sort per token would cost
/// more than the GPU's forward.
const PREFILTER: usize = 1024;

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(params.seed);
        Sampler { params, rng, cand: Vec::new() }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The next token after `history` (prompt and answer so far). `logits` is changed in place
    /// (penalty, temperature).
    pub fn next(&mut self, logits: &mut [f32], history: &[u32]) -> u32 {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let mut seen = vec![false; logits.len()];
            for &t in history {
                if let Some(l) = logits.get_mut(t as usize)
                    && !std::mem::replace(&mut seen[t as usize], true)
                {
                    *l = if *l > 0.0 { *l / p.repetition_penalty } else { *l * p.repetition_penalty };
                }
            }
        }
        if p.temperature == 0.0 {
            return argmax(logits);
        }
        let inv_t = 1.0 / p.temperature;
        self.cand.clear();
        self.cand.extend(logits.iter().enumerate().filter(|(_, l)| l.is_finite()).map(|(i, &l)| (l * inv_t, i as u32)));
        if self.cand.is_empty() {
            return argmax(logits);
        }
        let by_logit_desc = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        // Keep the top k (or a prefilter's worth), then sort what is left.
        let keep = if p.top_k > 0 {
            p.top_k
        } else if p.top_p < 1.0 || p.min_p > 0.0 {
            PREFILTER
        } else {
            usize::MAX
        };
        if keep < self.cand.len() {
            self.cand.select_nth_unstable_by(keep - 1, by_logit_desc);
            self.cand.truncate(keep);
        }
        self.cand.sort_unstable_by(by_logit_desc);
        // Softmax over the whole vocabulary's mass (the prefilter must not inflate what it kept).
        let max = self.cand[0].0;
        let total: f64 = if p.top_k == 0 && keep != usize::MAX {
            logits.iter().filter(|l| l.is_finite()).map(|&l| ((l * inv_t - max) as f64).exp()).sum()
        } else {
            self.cand.iter().map(|c| ((c.0 - max) as f64).exp()).sum()
        };
        let probs: Vec<f64> = self.cand.iter().map(|c| ((c.0 - max) as f64).exp() / total).collect();
        let mut n = probs.len();
        if p.top_p < 1.0 {
            let mut cum = 0.0;
            n = probs
                .iter()
                .position(|&q| {
                    cum += q;
                    cum >= p.top_p as f64
                })
                .map_or(n, |i| i + 1);
        }
        if p.min_p > 0.0 {
            let floor = probs[0] * p.min_p as f64;
            n = n.min(probs.iter().take_while(|&&q| q >= floor).count().max(1));
        }
        let kept: f64 = probs[..n].iter().sum();
        let mut u = self.rng.random::<f64>() * kept;
        for (q, c) in probs[..n].iter().zip(&self.cand) {
            u -= q;
            if u < 0.0 {
                return c.1;
            }
        }
        self.cand[n - 1].1
    }
}

/// The index of the largest logit (the lowest index among equals, as `torch.argmax`).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] || logits[best].is_nan() {
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, min_p: 0.0, ..SamplingParams::default() };
        f(&mut p);
        p
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut s = Sampler::new(SamplingParams::greedy(4));
        assert_eq!(s.next(&mut [0.0, 3.0, 3.0, -1.0], &[]), 1);
    }

    #[test]
    fn repetition_penalty_follows_transformers() {
        let mut s = Sampler::new(SamplingParams { repetition_penalty: 2.0, ..SamplingParams::greedy(1) });
        let mut l = [4.0, 3.0, -1.0];
        // Token 0 seen twice is penalised once: 4 → 2, so token 1 wins; negatives are multiplied.
        assert_eq!(s.next(&mut l, &[0, 0, 2]), 1);
        assert_eq!(l, [2.0, 3.0, -2.0]);
    }

    #[test]
    fn filters_leave_only_allowed_tokens() {
        let logits = [5.0f32, 4.0, 3.0, 0.0, -2.0];
        let draw = |p: SamplingParams| -> std::collections::BTreeSet<u32> {
            let mut s = Sampler::new(p);
            (0..400).map(|_| s.next(&mut logits.clone(), &[])).collect()
        };
        assert_eq!(draw(params(|p| p.top_k = 2)), [0, 1].into());
        // Softmax of [5, 4, 3, 0, -2] is about [.66, .24, .09, .004, .0006].
        assert_eq!(draw(params(|p| p.top_p = 0.8)), [0, 1].into());
        assert_eq!(draw(params(|p| p.min_p = 0.1)), [0, 1, 2].into());
        assert!(draw(params(|_| {})).len() >= 3, "no filter: the three likely tokens all come out in 400 draws");
    }

    #[test]
    fn the_same_seed_draws_the_same_tokens() {
        let logits: Vec<f32> = (0..300).map(|i| ((i * 37 % 101) as f32) / 20.0).collect();
        let run = |seed| {
            let mut s = Sampler::new(params(|p| {
                p.seed = seed;
                p.top_p = 0.9;
            }));
            (0..50).map(|_| s.next(&mut logits.clone(), &[])).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn frequencies_follow_the_softmax() {
        let mut s = Sampler::new(params(|p| p.temperature = 0.5));
        let mut counts = [0usize; 2];
        for _ in 0..20000 {
            counts[s.next(&mut [0.0f32, (2.0f32).ln() * 0.5], &[]) as usize] += 1;
        }
        // Logits [0, ln2 / 2] at temperature 0.5 are [0, ln 2]: probabilities 1/3 and 2/3.
        let share = counts[1] as f64 / 20000.0;
        assert!((share - 2.0 / 3.0).abs() < 0.02, "{share}");
    }

    #[test]
    fn settings_out_of_range_name_their_field() {
        let e = SamplingParams { top_p: 0.0, ..SamplingParams::default() }.validate().unwrap_err().to_string();
        assert!(e.contains("top_p"), "{e}");
        let e = SamplingParams { temperature: -1.0, ..SamplingParams::default() }.validate().unwrap_err().to_string();
        assert!(e.contains("temperature"), "{e}");
    }
}
