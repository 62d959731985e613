//! What training will see, before it starts: token-length statistics of the prepared dataset,
//! steps per epoch, a few rendered examples with the trained part marked, and checks of the
//! tokenizer and chat template that catch silent mistakes (double BOS, responses that never end
//! in an end-of-turn token, a template that ignores `add_generation_prompt`).
//! Pure functions over prepared data: the CLI prints them, the studio draws them.

use serde::Serialize;

use crate::config::TrainOn;
use crate::data::encode::Encoder;
use crate::data::format::Sample;
use crate::data::{Batcher, IGNORE_INDEX, PreparedDataset};
use crate::model::chat_template::{ChatTemplate, Message};
use crate::model::tokenizer::{PadSource, TokenizerBundle};

/// Equal-width buckets: bucket `i` counts values in `[i * width, (i + 1) * width)`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Histogram {
    pub width: usize,
    pub counts: Vec<usize>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LengthStats {
    pub min: usize,
    pub max: usize,
    pub mean: f64,
    pub p50: usize,
    pub p95: usize,
    pub histogram: Histogram,
}

/// Buckets per histogram: enough to see a distribution's shape in a terminal line or a small plot.
pub const HISTOGRAM_BUCKETS: usize = 24;

impl LengthStats {
    /// `upper` is the histogram's range (max_seq_len, or the longest value if larger).
    pub fn of(values: &[usize], upper: usize) -> Self {
        let mut sorted = values.to_vec();
        sorted.sort_unstable();
        let pick = |q: f64| -> usize {
            if sorted.is_empty() {
                return 0;
            }
            let i = ((sorted.len() - 1) as f64 * q).round() as usize;
            sorted[i]
        };
        let upper = upper.max(sorted.last().copied().unwrap_or(0)).max(1);
        let width = upper.div_ceil(HISTOGRAM_BUCKETS).max(1);
        let mut counts = vec![0; upper.div_ceil(width) + 1];
        let last = counts.len() - 1;
        for &v in values {
            counts[(v / width).min(last)] += 1;
        }
        while counts.len() > 1 && counts.last() == Some(&0) {
            counts.pop();
        }
        LengthStats {
            min: sorted.first().copied().unwrap_or(0),
            max: sorted.last().copied().unwrap_or(0),
            mean: if values.is_empty() { 0.0 } else { values.iter().sum::<usize>() as f64 / values.len() as f64 },
            p50: pick(0.5),
            p95: pick(0.95),
            histogram: Histogram { width, counts },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DatasetStats {
    /// Untrained tokens per example (after truncation).
    pub prompt: LengthStats,
    /// Trained tokens per example (after truncation).
    pub response: LengthStats,
    /// All tokens per example, before truncation: shows how much `max_seq_len` cuts.
    pub total: LengthStats,
    pub examples: usize,
    pub truncated_rows: usize,
    pub truncated_fraction: f64,
    pub trained_tokens: usize,
    pub total_tokens: usize,
    pub trained_fraction: f64,
    /// Sequences per epoch: examples, or packed rows when packing.
    pub rows_per_epoch: usize,
    pub micro_batches_per_epoch: usize,
    /// Optimizer steps per epoch; a last, short accumulation still makes a step.
    pub steps_per_epoch: usize,
    /// Share of the tokens in epoch 0's batches that are padding (compute spent on nothing).
    pub padding_fraction: f64,
}

/// Statistics of a prepared dataset as `batcher` will serve it.
pub fn dataset_stats(ds: &PreparedDataset, batcher: &Batcher, grad_accum: usize) -> DatasetStats {
    let lengths = &ds.report.lengths;
    let max_seq_len = ds.report.max_seq_len;
    let prompt: Vec<usize> = lengths.iter().map(|l| l.prompt()).collect();
    let response: Vec<usize> = lengths.iter().map(|l| l.trained).collect();
    let total: Vec<usize> = lengths.iter().map(|l| l.original_tokens).collect();
    let n = ds.examples.len();
    let micro = batcher.batches_per_epoch();
    let (real, padded) = batcher.token_counts(0);
    DatasetStats {
        prompt: LengthStats::of(&prompt, max_seq_len),
        response: LengthStats::of(&response, max_seq_len),
        total: LengthStats::of(&total, max_seq_len),
        examples: n,
        truncated_rows: ds.report.truncated_rows,
        truncated_fraction: if n == 0 { 0.0 } else { ds.report.truncated_rows as f64 / n as f64 },
        trained_tokens: ds.report.trained_tokens,
        total_tokens: ds.report.total_tokens,
        trained_fraction: ds.report.trained_fraction(),
        rows_per_epoch: batcher.rows_per_epoch(),
        micro_batches_per_epoch: micro,
        steps_per_epoch: micro.div_ceil(grad_accum.max(1)),
        padding_fraction: if padded == 0 { 0.0 } else { 1.0 - real as f64 / padded as f64 },
    }
}

/// How the trained part of a rendered example is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marking {
    /// `[[` … `]]` around trained text (logs, tests, terminals without colour).
    Plain,
    /// Trained text in green (ANSI escape codes).
    Ansi,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MarkedExample {
    pub row: usize,
    pub tokens: usize,
    pub trained: usize,
    pub text: String,
}

/// One example decoded, with each run of trained tokens marked. Runs are decoded separately, so
/// a character split across a run edge shows as U+FFFD; the ids themselves are untouched.
pub fn mark_example(tok: &TokenizerBundle, ex: &crate::data::Example, marking: Marking) -> MarkedExample {
    let (open, close) = match marking {
        Marking::Plain => ("[[", "]]"),
        Marking::Ansi => ("\x1b[32m", "\x1b[0m"),
    };
    let mut text = String::new();
    let mut start = 0;
    while start < ex.input_ids.len() {
        let trained = ex.labels[start] != IGNORE_INDEX;
        let mut end = start;
        while end < ex.input_ids.len() && (ex.labels[end] != IGNORE_INDEX) == trained {
            end += 1;
        }
        let piece = tok.decode(&ex.input_ids[start..end], false).unwrap_or_else(|e| format!("<{e}>"));
        if trained {
            text.push_str(open);
            text.push_str(&piece);
            text.push_str(close);
        } else {
            text.push_str(&piece);
        }
        start = end;
    }
    MarkedExample { row: ex.row, tokens: ex.input_ids.len(), trained: ex.trained_tokens(), text }
}

/// Three examples worth reading: the first, the median by length, and the longest.
pub fn sample_examples(ds: &PreparedDataset, tok: &TokenizerBundle, marking: Marking) -> Vec<MarkedExample> {
    let n = ds.examples.len();
    if n == 0 {
        return Vec::new();
    }
    let mut by_len: Vec<usize> = (0..n).collect();
    by_len.sort_by_key(|&i| (ds.examples[i].input_ids.len(), i));
    let mut picks = vec![0, by_len[n / 2], by_len[n - 1]];
    picks.dedup();
    let mut seen = std::collections::BTreeSet::new();
    picks.retain(|i| seen.insert(*i));
    picks.into_iter().map(|i| mark_example(tok, &ds.examples[i], marking)).collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Worth knowing; nothing is wrong.
    Info,
    /// Training runs, but probably not as intended.
    Warning,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Finding {
    pub level: Level,
    /// Stable identifier (`double_bos`, `no_eos_in_response`, …) for tests and the GUI.
    pub code: &'static str,
    pub message: String,
}

fn finding(level: Level, code: &'static str, message: impl Into<String>) -> Finding {
    Finding { level, code, message: message.into() }
}

/// Token ranges of the runs of trained labels (one per assistant turn, when turns are apart).
fn trained_spans(labels: &[i32]) -> Vec<std::ops::Range<usize>> {
    let mut spans = Vec::new();
    let mut start = None;
    for (i, &l) in labels.iter().chain([&IGNORE_INDEX]).enumerate() {
        match (l != IGNORE_INDEX, start) {
            (true, None) => start = Some(i),
            (false, Some(s)) => {
                spans.push(s..i);
                start = None;
            }
            _ => {}
        }
    }
    spans
}

/// Checks of the tokenizer and the chat template on a small made-up conversation.
pub fn tokenizer_checks(tok: &TokenizerBundle, template: &ChatTemplate) -> Vec<Finding> {
    let mut out: Vec<Finding> = tok.warnings().iter().map(|w| finding(Level::Warning, "tokenizer_config", w.clone())).collect();
    let convo = vec![Message::new("user", "What is 2 + 2?"), Message::new("assistant", "4")];
    let origin = super::template_words(template.origin());

    // BOS: written by the template, and added again by the tokenizer's post-processor?
    let rendered = template.render(&convo, false);
    let adds_bos = match (tok.bos_id(), tok.encode("x", true)) {
        (Some(bos), Ok(ids)) => ids.first() == Some(&bos),
        _ => false,
    };
    match (&rendered, tok.special_tokens().bos_token.as_deref()) {
        (Ok(r), Some(bos)) if tok.bos_id().is_some() => {
            let writes_bos = r.text.starts_with(bos);
            if writes_bos && adds_bos {
                out.push(finding(
                    Level::Info,
                    "double_bos",
                    format!(
                        "{origin} writes BOS `{bos}` and the tokenizer adds another when encoding with \
                         special tokens: rendered chats must be tokenized without them (TuneStudio does; check any \
                         inference code that does not use the template's tokenization)"
                    ),
                ));
            } else if !writes_bos && adds_bos {
                out.push(finding(
                    Level::Warning,
                    "no_bos_in_template",
                    format!("{origin} does not write BOS `{bos}`, which this model's tokenizer puts at the start of every text"),
                ));
            }
        }
        _ => {}
    }
    if let Err(e) = &rendered {
        out.push(finding(Level::Warning, "template_error", format!("rendering a two-turn chat failed: {e}")));
    }

    // Each trained span (an assistant turn) must hold a token that stops generation. Not
    // necessarily as its last token: ChatML turns end in `<|im_end|>\n`, and the newline after
    // the stop token is trained too.
    let enc = Encoder { tok, template: Some(template), train_on: TrainOn::Responses, max_tokens: None };
    let two_turns = [convo.clone(), vec![Message::new("user", "And 3 + 3?"), Message::new("assistant", "6")]].concat();
    if let Ok(e) = enc.encode(&Sample::Chat(two_turns), false) {
        let stops = tok.stop_ids();
        let spans = trained_spans(&e.labels);
        if let Some(span) = spans.iter().find(|&s| !e.input_ids[s.clone()].iter().any(|id| stops.contains(id))) {
            let last = e.input_ids[span.end - 1];
            out.push(finding(
                Level::Warning,
                "no_eos_in_response",
                format!(
                    "assistant turns end with `{}` and hold no end-of-turn token ({}): the model will not learn to stop",
                    tok.token_text(last).unwrap_or_else(|| last.to_string()),
                    stops.iter().filter_map(|&s| tok.token_text(s)).collect::<Vec<_>>().join(", ")
                ),
            ));
        }
    }

    // One finding per fact: the tokenizer itself does not warn about its pad token.
    match tok.pad_source() {
        // A note, not a warning: harmless here, a trap only for other tools.
        PadSource::Declared if Some(tok.pad_id()) == tok.eos_id() => out.push(finding(
            Level::Info,
            "pad_is_eos",
            "the pad token is the EOS token; training here masks padding by position so EOS is still learned, \
             but tools that mask by token id will never train EOS",
        )),
        PadSource::Declared | PadSource::GenerationConfig => {}
        PadSource::Reserved => out.push(finding(
            Level::Info,
            "pad_reserved",
            format!("no pad token declared: padding with the unused token `{}`", tok.token_text(tok.pad_id()).unwrap_or_default()),
        )),
        PadSource::Eos => out.push(finding(Level::Warning, "pad_missing", "no pad token and no unused special token: padding with EOS")),
    }

    // A template that ignores add_generation_prompt leaves the model unprompted at inference.
    let user_only = &convo[..1];
    if let (Ok(a), Ok(b)) = (template.render(user_only, true), template.render(user_only, false))
        && a.text == b.text
    {
        // Info, not a warning: formats whose user turn ends in the cue (Mistral's `[/INST]`) are
        // right to ignore the flag.
        out.push(finding(
            Level::Info,
            "no_generation_prompt",
            format!(
                "the chat template ({origin}) renders the same with and without add_generation_prompt: fine when the \
                 user turn itself ends in the assistant's cue (Mistral's [/INST]), otherwise the model gets no \
                 assistant header at inference"
            ),
        ));
    }
    out
}
