//! A run's metrics as the studio draws them, for the live run (`training`) and the past ones
//! (`runs`) alike: the loss curves (decimated, smoothed), and one step's line in the log.

use crate::session::checkpoint::StepMetrics;
use crate::session::samples::Sample;

/// Points per plotted line: beyond this, every k-th step is drawn (and always the last).
pub const MAX_POINTS: usize = 2000;
/// The loss curve's smoothing until the person moves the slider; the runs list's smoothed final
/// loss uses it too, so the two read alike.
pub const SMOOTHING: f64 = 0.8;

/// One step's line in the log.
pub fn step_line(m: &StepMetrics) -> String {
    format!(
        "step {}/{}  loss {:.4}  lr {:.2e}  grad-norm {:.3}  {:.0} tok/s{}",
        m.step,
        m.total_steps,
        m.loss,
        m.lr,
        m.grad_norm,
        m.tokens_per_s,
        m.eval_loss.map(|l| format!("  eval loss {l:.4}")).unwrap_or_default()
    )
}

/// Debiased exponential moving average (the first values are not dragged toward zero).
pub fn ema(values: &[f64], weight: f64) -> Vec<f64> {
    let w = weight.clamp(0.0, 0.999);
    let mut acc = 0.0;
    let mut norm = 0.0;
    values
        .iter()
        .map(|&v| {
            acc = w * acc + (1.0 - w) * v;
            norm = w * norm + (1.0 - w);
            acc / norm
        })
        .collect()
}

/// What the plots draw, as `[step, value]` pairs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Curves {
    pub loss: Vec<[f64; 2]>,
    pub loss_smooth: Vec<[f64; 2]>,
    pub lr: Vec<[f64; 2]>,
    pub grad_norm: Vec<[f64; 2]>,
    pub tokens_per_s: Vec<[f64; 2]>,
    /// In GiB.
    pub memory: Vec<[f64; 2]>,
    /// The evaluation loss at the steps that measured it (never decimated: there are few).
    pub eval_loss: Vec<[f64; 2]>,
    /// The lowest evaluation loss so far, the one whose checkpoint the run keeps.
    pub best_eval: Option<[f64; 2]>,
}

pub fn curves(metrics: &[StepMetrics], smoothing: f64) -> Curves {
    let smooth = ema(&metrics.iter().map(|m| m.loss).collect::<Vec<_>>(), smoothing);
    let stride = metrics.len().div_ceil(MAX_POINTS).max(1);
    let keep = |i: usize| i.is_multiple_of(stride) || i + 1 == metrics.len();
    let mut c = Curves::default();
    for (i, m) in metrics.iter().enumerate().filter(|(i, _)| keep(*i)) {
        let x = m.step as f64;
        c.loss.push([x, m.loss]);
        c.loss_smooth.push([x, smooth[i]]);
        c.lr.push([x, m.lr]);
        c.grad_norm.push([x, m.grad_norm]);
        c.tokens_per_s.push([x, m.tokens_per_s]);
        if let Some(b) = m.memory_bytes {
            c.memory.push([x, b as f64 / (1u64 << 30) as f64]);
        }
    }
    c.eval_loss = metrics.iter().filter_map(|m| Some([m.step as f64, m.eval_loss.filter(|l| l.is_finite())?])).collect();
    // The first of equal lows, as the session keeps it (it replaces the best only when lower).
    c.best_eval = c.eval_loss.iter().copied().fold(None, |b: Option<[f64; 2]>, p| match b {
        Some(b) if b[1] <= p[1] => Some(b),
        _ => Some(p),
    });
    c
}

/// A run's samples (`[samples]`) as the Training page shows them, for the live run and a past one
/// opened from the Runs page alike: every answer in the order written, and the step picked.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SamplesView {
    pub samples: Vec<Sample>,
    /// The step whose answers are shown; `None`: the newest.
    pub step: Option<u64>,
    /// Seconds the live run's newest samples took to answer (not known for a past run's).
    pub last_secs: Option<f64>,
}

/// One prompt's answer as shown: at the picked step, or its newest when none is picked or the
/// prompt has none there.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleRow {
    pub prompt: String,
    pub step: u64,
    pub completion: String,
}

impl SampleRow {
    /// The prompt on one line, as the samples list shows it: special-token markers such as
    /// `<|start_header_id|>` and `<|im_start|>` left out, white space collapsed.
    pub fn prompt_line(&self) -> String {
        let mut out = String::new();
        let mut rest = self.prompt.as_str();
        while let Some(i) = rest.find("<|") {
            out.push_str(&rest[..i]);
            out.push(' ');
            rest = match rest[i..].find("|>") {
                Some(j) => &rest[i + j + 2..],
                None => {
                    out.push_str(&rest[i..]);
                    ""
                }
            };
        }
        out.push_str(rest);
        out.split_whitespace().collect::<Vec<_>>().join(" ")
    }
}

impl SamplesView {
    pub fn new(samples: Vec<Sample>) -> Self {
        SamplesView { samples, step: None, last_secs: None }
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// The steps that have samples, oldest first.
    pub fn steps(&self) -> Vec<u64> {
        let mut steps: Vec<u64> = self.samples.iter().map(|s| s.step).collect();
        steps.dedup();
        steps
    }

    /// One row per prompt (in the order first seen) at the picked step (the newest by default).
    pub fn rows(&self) -> Vec<SampleRow> {
        let mut rows: Vec<SampleRow> = Vec::new();
        for s in &self.samples {
            if self.step.is_some_and(|want| s.step > want) {
                continue;
            }
            let row = SampleRow { prompt: s.prompt.clone(), step: s.step, completion: s.completion.clone() };
            match rows.iter_mut().find(|r| r.prompt == s.prompt) {
                Some(r) => *r = row,
                None => rows.push(row),
            }
        }
        rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rendered_prompt_reads_on_one_line() {
        let row = |p: &str| SampleRow { prompt: p.into(), step: 1, completion: String::new() };
        let llama = "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhich country has the skitterling?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n";
        assert_eq!(row(llama).prompt_line(), "user Which country has the skitterling? assistant");
        assert_eq!(row("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n").prompt_line(), "user Hi assistant");
        assert_eq!(row("Where can you find\nthe frostling?").prompt_line(), "Where can you find the frostling?");
        assert_eq!(row("a <|b").prompt_line(), "a <|b", "an unclosed marker is text");
    }
}
