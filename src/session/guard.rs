//! Divergence: a run whose numbers say it has stopped learning is stopped as failed instead of
//! finishing "done" with a useless adapter. A non-finite loss or gradient is refused by the engine
//! itself; this watches what stays finite but is just as broken:
//! - the gradient norm is exactly 0 for `ZERO_GRAD_STEPS` steps in a row (LoRA always has
//!   trainable parameters, so a zero gradient means activations were flattened, e.g. by an
//!   overflow);
//! - the loss climbs to near ln(vocab), the loss of a uniform guess, after having been well
//!   below it: the median of the last `WINDOW` losses reaches `COLLAPSED` × ln(vocab) while the
//!   first step's loss (the base model's: LoRA starts as a no-op) or a median before was under
//!   `HEALTHY` × ln(vocab). The predictions have collapsed. A model trained from random weights
//!   starts near ln(vocab) and is never "well below" it, so it cannot trip this;
//! - the loss rises far above its best: the median of the last `WINDOW` losses exceeds
//!   `RISE_FACTOR` × the lowest such median and by more than `RISE_MARGIN` nats. Medians ignore
//!   a noisy batch or two; the margin keeps small losses late in an overfitting run from tripping.
//!
//! The thresholds are far outside what the demo and ordinary runs do (`tests/session.rs` runs the
//! demo's whole schedule through it), and `train.stop_on_divergence = false` turns it off.

use std::collections::VecDeque;

pub const ZERO_GRAD_STEPS: u32 = 5;
pub const WINDOW: usize = 5;
pub const COLLAPSED: f64 = 0.8;
pub const HEALTHY: f64 = 0.5;
pub const RISE_FACTOR: f64 = 3.0;
pub const RISE_MARGIN: f64 = 1.0;

#[derive(Debug, Clone)]
pub struct DivergenceGuard {
    ln_vocab: f64,
    zero_grad_since: Option<u64>,
    zero_grad_steps: u32,
    first_loss: Option<f64>,
    recent: VecDeque<f64>,
    /// The lowest windowed median so far and the step it ended at.
    best_median: Option<(f64, u64)>,
}

fn median(v: &VecDeque<f64>) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().collect();
    s.sort_by(f64::total_cmp);
    s[s.len() / 2]
}

impl DivergenceGuard {
    pub fn new(vocab_size: usize) -> Self {
        DivergenceGuard {
            ln_vocab: (vocab_size.max(2) as f64).ln(),
            zero_grad_since: None,
            zero_grad_steps: 0,
            first_loss: None,
            recent: VecDeque::with_capacity(WINDOW),
            best_median: None,
        }
    }

    /// Look at one finished step; `Some(why)` when the run has diverged. `why` says what was seen
    /// and what to change.
    pub fn check(&mut self, step: u64, loss: f64, grad_norm: f64) -> Option<String> {
        const ADVICE: &str = "lower optim.lr, keep gradient clipping on (optim.max_grad_norm, e.g. 1.0), add warm-up \
                              (schedule.warmup_steps) or lower lora.alpha";
        if grad_norm == 0.0 {
            self.zero_grad_steps += 1;
            let since = *self.zero_grad_since.get_or_insert(step);
            if self.zero_grad_steps >= ZERO_GRAD_STEPS {
                return Some(format!(
                    "the gradient norm has been exactly 0 since step {since} ({} steps) although the adapter has trainable \
                     parameters: the model's activations have overflowed or collapsed and nothing is learned any more; {ADVICE}",
                    self.zero_grad_steps
                ));
            }
        } else {
            self.zero_grad_steps = 0;
            self.zero_grad_since = None;
        }

        let first = *self.first_loss.get_or_insert(loss);
        if self.recent.len() == WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back(loss);
        if self.recent.len() == WINDOW {
            let m = median(&self.recent);
            let from = step + 1 - WINDOW as u64;
            let low = self.best_median.map_or(first, |(b, _)| b.min(first));
            if m >= COLLAPSED * self.ln_vocab && low < HEALTHY * self.ln_vocab {
                return Some(format!(
                    "the loss has risen to {m:.4} (median of steps {from}–{step}), near or above {:.4} = ln(vocabulary size), the \
                     loss of a uniform guess, after having been {low:.4}: the model's predictions have collapsed; {ADVICE}",
                    self.ln_vocab
                ));
            }
            match self.best_median {
                Some((best, at)) if m > RISE_FACTOR * best && m > best + RISE_MARGIN => {
                    return Some(format!(
                        "the loss has risen to {m:.4} (median of steps {from}–{step}) from its best of {best:.4} (median of the \
                         {WINDOW} steps to {at}): the run has diverged; {ADVICE}"
                    ));
                }
                Some((best, _)) if m >= best => {}
                _ => self.best_median = Some((m, step)),
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn first_trip(g: &mut DivergenceGuard, steps: &[(f64, f64)]) -> Option<(u64, String)> {
        steps.iter().enumerate().find_map(|(i, &(loss, gn))| g.check(i as u64 + 1, loss, gn).map(|w| (i as u64 + 1, w)))
    }

    #[test]
    fn the_probe_run_trips_and_ordinary_curves_do_not() {
        // The probe: lr 1.0, alpha 1e6, no warm-up or clipping on the demo (vocab 1587),
        // as it ran before RMSNorm's overflow was fixed (flattened to the uniform loss) and after
        // (the loss stays near the uniform guess with small gradients).
        let uniform = (1587f64).ln();
        let mut before = vec![(1.0181, 34321.0), (12.9292, 381.4)];
        before.extend(std::iter::repeat_n((uniform, 0.0), 30));
        let (step, why) = first_trip(&mut DivergenceGuard::new(1587), &before).unwrap();
        assert_eq!(step, 5, "{why}");
        assert!(why.contains("ln(vocabulary size)") && why.contains("optim.lr"), "{why}");
        let after: Vec<(f64, f64)> =
            [1.0181, 12.9292, 9.3162, 8.5517, 8.6322, 7.9797, 7.1341, 7.4407, 7.1252, 7.5933, 6.5574].iter().map(|&l| (l, 0.2)).collect();
        let (step, why) = first_trip(&mut DivergenceGuard::new(1587), &after).unwrap();
        assert_eq!(step, 5, "{why}");
        // Zero gradients alone trip after ZERO_GRAD_STEPS.
        let mut stuck: Vec<(f64, f64)> = vec![(2.0, 1.0)];
        stuck.extend(std::iter::repeat_n((2.0, 0.0), 10));
        let (step, why) = first_trip(&mut DivergenceGuard::new(1587), &stuck).unwrap();
        assert_eq!(step, 1 + ZERO_GRAD_STEPS as u64, "{why}");
        assert!(why.contains("exactly 0 since step 2"), "{why}");

        // A falling curve with noise, then an overfitting tail near zero with spikes: never trips.
        let mut ok: Vec<(f64, f64)> = (0..300).map(|i| (2.0 * (-(i as f64) / 40.0).exp() + 0.02, 0.5)).collect();
        ok[150].0 = 3.0;
        ok[151].0 = 2.5;
        ok[250].0 = 0.9;
        assert_eq!(first_trip(&mut DivergenceGuard::new(32000), &ok), None);

        // A rise from 1.2 to 5: trips once the median of five steps is there.
        let mut rise: Vec<(f64, f64)> = (0..20).map(|_| (1.2, 0.5)).collect();
        rise.extend((0..20).map(|_| (5.0, 30.0)));
        let (step, why) = first_trip(&mut DivergenceGuard::new(32000), &rise).unwrap();
        assert_eq!(step, 23, "{why}");
        assert!(why.contains("risen to 5.0000") && why.contains("optim.lr"), "{why}");

        // A random-init model starts at the uniform loss: not a collapse.
        let start: Vec<(f64, f64)> = (0..10).map(|_| ((1000f64).ln(), 1.0)).collect();
        assert_eq!(first_trip(&mut DivergenceGuard::new(1000), &start), None);
    }
}
