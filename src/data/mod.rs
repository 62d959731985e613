//! Datasets: file formats, chat-template rendering with label masks, batching and packing.
//!
//! `prepare_dataset` reads a file (`read`, `tabular`), decides its record shape (`format`), turns
//! each row into token ids and labels (`encode`), and reports every row it could not use with the
//! row number a person finds in the file. `batch::Batcher` then serves deterministic shuffled
//! micro-batches, padded or packed. `preflight` summarises what training will see.

pub mod batch;
pub mod encode;
pub mod format;
pub mod preflight;
pub mod read;
pub mod record;
pub mod tabular;

use std::path::PathBuf;

use rayon::prelude::*;
use serde::Serialize;

pub use batch::{Batch, Batcher, IGNORE_INDEX};
pub use encode::MaskSource;

use crate::config::{DatasetConfig, DatasetFormat, EvalSplit, LongRows, TrainOn};
use crate::error::{Error, Result};
use crate::model::chat_template::ChatTemplate;
use crate::model::tokenizer::TokenizerBundle;

/// One training example. `labels[i]` is the label of `input_ids[i]` (Hugging Face alignment),
/// `IGNORE_INDEX` where the token is not trained; the batcher shifts them into targets.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i32>,
    /// The row in the dataset file (1-based, see `read`).
    pub row: usize,
}

impl Example {
    /// Tokens that will be targets: every labelled position but the first (nothing predicts it).
    pub fn trained_tokens(&self) -> usize {
        self.labels.iter().skip(1).filter(|&&l| l != IGNORE_INDEX).count()
    }
}

/// A row that was left out, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SkippedRow {
    /// The line it starts on (the row in Parquet), as in `record::RawRecord`.
    pub row: usize,
    /// In a JSON array, its 1-based position in the array (see `record::RawRecord`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub record: Option<usize>,
    pub reason: String,
}

impl SkippedRow {
    /// Where a person finds the row in a file of `file_kind` (`DatasetReport::file_kind`):
    /// `line 298`, `row 12` in Parquet (which has no lines), and for an item of a JSON array also
    /// its place in the array, as a program reading the array counts: `line 298 (record 150, index 149)`.
    pub fn place(&self, file_kind: &str) -> String {
        let unit = if file_kind == record::FileKind::Parquet.name() { "row" } else { "line" };
        match self.record {
            Some(r) => format!("{unit} {} (record {r}, index {})", self.row, r - 1),
            None => format!("{unit} {}", self.row),
        }
    }
}

/// Per-example sizes for the preflight histograms, in the order of `PreparedDataset::examples`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ExampleLengths {
    /// Tokens after truncation.
    pub tokens: usize,
    /// Trained tokens (targets) after truncation.
    pub trained: usize,
    /// Tokens before truncation: exact, except for a text far beyond max_seq_len, which is only
    /// tokenized in part (`encode::encode_bounded`) and whose count is scaled from that part.
    pub original_tokens: usize,
}

impl ExampleLengths {
    /// Untrained tokens: the prompt, template scaffolding, system turns.
    pub fn prompt(&self) -> usize {
        self.tokens - self.trained
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DatasetReport {
    pub path: PathBuf,
    /// The record shape used (detected unless configured).
    pub format: DatasetFormat,
    /// The file kind (`JSONL`, `CSV`, …).
    pub file_kind: String,
    /// The chat template used: `model`, `model:<name>` or `builtin:<name>`.
    pub template: String,
    /// How trained spans were found (for chats; raw text is always `all`).
    pub mask: MaskSource,
    pub rows_total: usize,
    pub rows_used: usize,
    pub rows_skipped: Vec<SkippedRow>,
    pub truncated_rows: usize,
    /// Targets that contribute to the loss, over all examples.
    pub trained_tokens: usize,
    pub total_tokens: usize,
    pub max_seq_len: usize,
    pub lengths: Vec<ExampleLengths>,
}

impl DatasetReport {
    pub fn trained_fraction(&self) -> f64 {
        if self.total_tokens == 0 { 0.0 } else { self.trained_tokens as f64 / self.total_tokens as f64 }
    }

    /// Why training refuses this dataset (no rows, none usable, or more than `max_bad_fraction`
    /// of them bad), or `None` when it can start.
    pub fn too_bad(&self, max_bad_fraction: f64) -> Option<String> {
        let bad = self.rows_skipped.len();
        let total = self.rows_total;
        let too_many = total > 0 && bad as f64 > max_bad_fraction * total as f64;
        if self.rows_used > 0 && !too_many {
            return None;
        }
        Some(if total == 0 {
            format!("the dataset {} has no rows", self.path.display())
        } else if self.rows_used == 0 {
            format!("none of the {total} rows can be used")
        } else {
            format!(
                "{bad} of {total} rows ({:.1}%) cannot be used, more than dataset.max_bad_fraction = {max_bad_fraction}",
                100.0 * bad as f64 / total as f64
            )
        })
    }
}

#[derive(Debug, Clone)]
pub struct PreparedDataset {
    pub examples: Vec<Example>,
    pub report: DatasetReport,
}

/// How many skipped rows a refusal (and the preflight report) lists.
pub const LIST_SKIPPED: usize = 20;

enum Outcome {
    Used { example: Example, original: usize, truncated: bool, mask: MaskSource },
    Skipped(SkippedRow),
}

/// Where a dataset's chat template came from (`DatasetReport::template`: `model`,
/// `model:<name>`, `builtin:<name>`, `none (raw text)`), in a user's words.
pub fn template_words(origin: &str) -> String {
    if origin.starts_with("none") {
        return "no chat template (raw text)".into();
    }
    match origin.split_once(':') {
        None if origin == "model" => "the model's own chat template".into(),
        Some(("model", name)) => format!("the model's chat template named {name}"),
        Some(("builtin", name)) => format!("TuneStudio's built-in {name} template"),
        _ => origin.into(),
    }
}

/// How many of `n` usable rows (at least 2) `dataset.eval_split = fraction` holds out: at least
/// one, and at least one left to train on. `split_eval` holds out exactly these; the studio's
/// "largest that fits" counts the rest as the rows a step can draw from.
pub fn held_out_rows(n: usize, fraction: f64) -> usize {
    ((n as f64 * fraction).round() as usize).clamp(1, n.saturating_sub(1).max(1))
}

/// Hold out `fraction` of the examples for evaluation, drawn by `seed` (at least one, and at
/// least one left to train on). Returns `(train, eval)`, each in file order. The same data and
/// seed always give the same split, so a resumed run evaluates on the same rows.
pub fn split_eval(examples: Vec<Example>, fraction: f64, seed: u64) -> Result<(Vec<Example>, Vec<Example>)> {
    let n = examples.len();
    if n < 2 {
        return Err(Error::config("dataset.eval_split", format!("needs at least 2 usable rows to hold some out; the dataset has {n}")));
    }
    let k = held_out_rows(n, fraction);
    // A stream of its own, so the split does not shift the training order's draws.
    let order = batch::permutation(n, &mut batch::rng_for(seed, 0xe7a1));
    let mut held = vec![false; n];
    for &i in &order[..k] {
        held[i as usize] = true;
    }
    let (mut train, mut eval) = (Vec::with_capacity(n - k), Vec::with_capacity(k));
    for (e, h) in examples.into_iter().zip(held) {
        if h { eval.push(e) } else { train.push(e) }
    }
    Ok((train, eval))
}

/// The rows a run trains on and the rows it evaluates on, as `cfg.eval_split` says: all rows and
/// none; the dataset less a held-out fraction (drawn by `seed`) and that fraction; or all rows and
/// the usable rows of the evaluation file, read like the dataset. The session and the preflight
/// both call this, so the steps per epoch the preflight counts are the run's.
pub fn eval_sets(
    cfg: &DatasetConfig,
    examples: Vec<Example>,
    seed: u64,
    tok: &TokenizerBundle,
    max_seq_len: usize,
) -> Result<(Vec<Example>, Vec<Example>)> {
    match &cfg.eval_split {
        None => Ok((examples, Vec::new())),
        Some(EvalSplit::Fraction(f)) => split_eval(examples, *f, seed),
        Some(EvalSplit::File(path)) => {
            let eval_cfg = DatasetConfig { path: path.clone(), fingerprint: None, eval_split: None, ..cfg.clone() };
            let held = prepare_dataset(&eval_cfg, tok, max_seq_len)?;
            if held.examples.is_empty() {
                return Err(Error::file(
                    path,
                    "has no usable row to evaluate on (dataset.eval_split): give another file or a fraction such as 0.1",
                ));
            }
            Ok((examples, held.examples))
        }
    }
}

/// Read, check, render and tokenize a dataset. Rows that cannot be used are reported, not fatal;
/// the call fails when more than `cfg.max_bad_fraction` of them are unusable (or none is usable),
/// listing the first ones with their reasons.
pub fn prepare_dataset(cfg: &DatasetConfig, tok: &TokenizerBundle, max_seq_len: usize) -> Result<PreparedDataset> {
    let ds = prepare_dataset_unchecked(cfg, tok, max_seq_len)?;
    refuse_if_too_bad(&ds.report, cfg.max_bad_fraction)?;
    Ok(ds)
}

/// The chat template a dataset of `format` is rendered with: none for raw text, so a model whose
/// template does not compile can still train on text.
pub fn dataset_template(cfg: &DatasetConfig, tok: &TokenizerBundle, format: DatasetFormat) -> Result<Option<ChatTemplate>> {
    if format == DatasetFormat::Text {
        return Ok(None);
    }
    let vars = cfg
        .template_kwargs
        .iter()
        .map(|(k, v)| serde_json::to_value(v).map(|j| (k.clone(), j)).map_err(|e| Error::config(format!("dataset.template_kwargs.{k}"), e)))
        .collect::<Result<serde_json::Map<_, _>>>()?;
    Ok(Some(tok.resolve_template(&cfg.template)?.with_vars(vars)))
}

/// `prepare_dataset` without the refusal: however many rows are bad, the report comes back (the
/// preflight report shows them; `DatasetReport::too_bad` says whether training would refuse).
pub fn prepare_dataset_unchecked(cfg: &DatasetConfig, tok: &TokenizerBundle, max_seq_len: usize) -> Result<PreparedDataset> {
    if max_seq_len < 2 {
        return Err(Error::config("train.max_seq_len", "must be at least 2 tokens"));
    }
    let path = &cfg.path;
    let (kind, records) = read::read_records(path)?;
    unreadable(path, kind, &records)?;
    let format = format::detect(cfg, records.iter().filter_map(|r| r.value.as_ref().ok()))?;
    let template = dataset_template(cfg, tok, format)?;
    let encoder = encode::Encoder { tok, template: template.as_ref(), train_on: cfg.train_on, max_tokens: Some(max_seq_len) };

    let outcomes: Vec<Outcome> = records
        .par_iter()
        .map(|rec| {
            let skip = |reason: String| Outcome::Skipped(SkippedRow { row: rec.row, record: rec.record, reason });
            let value = match &rec.value {
                Ok(v) => v,
                Err(reason) => return skip(reason.clone()),
            };
            let sample = match format::to_sample(format, &cfg.columns, value) {
                Ok(s) => s,
                Err(reason) => return skip(reason),
            };
            let enc = match encoder.encode(&sample, false) {
                Ok(e) => e,
                Err(reason) => return skip(reason),
            };
            let (original, mask) = (enc.total_tokens, enc.mask);
            let about = if enc.cut { "about " } else { "" };
            let mut example = Example { input_ids: enc.input_ids, labels: enc.labels, row: rec.row };
            let truncated = example.input_ids.len() > max_seq_len;
            if truncated {
                if cfg.long_rows == LongRows::Drop {
                    return skip(format!("{about}{original} tokens, longer than max_seq_len {max_seq_len} (dataset.long_rows = \"drop\")"));
                }
                example.input_ids.truncate(max_seq_len);
                example.labels.truncate(max_seq_len);
                if example.trained_tokens() == 0 {
                    return skip(format!(
                        "{about}{original} tokens: nothing trained is left within max_seq_len {max_seq_len} (the prompt alone fills it)"
                    ));
                }
            }
            Outcome::Used { example, original, truncated, mask }
        })
        .collect();

    let rows_total = outcomes.len();
    let mut examples = Vec::with_capacity(rows_total);
    let mut skipped = Vec::new();
    let mut lengths = Vec::with_capacity(rows_total);
    let (mut truncated_rows, mut trained_tokens, mut total_tokens) = (0, 0, 0);
    let mut lent = false;
    for o in outcomes {
        match o {
            Outcome::Used { example, original, truncated, mask } => {
                lent |= mask == MaskSource::EquivalentBuiltin;
                let trained = example.trained_tokens();
                trained_tokens += trained;
                total_tokens += example.input_ids.len();
                truncated_rows += truncated as usize;
                lengths.push(ExampleLengths { tokens: example.input_ids.len(), trained, original_tokens: original });
                examples.push(example);
            }
            Outcome::Skipped(s) => skipped.push(s),
        }
    }
    let mask = match (&template, cfg.train_on) {
        (None, _) | (_, TrainOn::All) => MaskSource::All,
        (Some(t), _) if t.has_generation_blocks() => MaskSource::GenerationBlocks,
        // Some rows rendered as the built-in of the model's family and took its blocks.
        (Some(_), _) if lent => MaskSource::EquivalentBuiltin,
        _ => MaskSource::RenderedPrefixes,
    };
    let report = DatasetReport {
        path: path.clone(),
        format,
        file_kind: kind.name().to_string(),
        template: template.as_ref().map_or_else(|| "none (raw text)".to_string(), |t| t.origin().to_string()),
        mask,
        rows_total,
        rows_used: examples.len(),
        rows_skipped: skipped,
        truncated_rows,
        trained_tokens,
        total_tokens,
        max_seq_len,
        lengths,
    };
    Ok(PreparedDataset { examples, report })
}

/// A file with no record, or none that can be read at all (a binary or mis-encoded file): said of
/// the file, before format detection could blame `dataset.format` for it.
fn unreadable(path: &std::path::Path, kind: record::FileKind, records: &[record::RawRecord]) -> Result<()> {
    if records.is_empty() {
        return Err(Error::file(path, format!("has no rows: the {} file is empty (or holds only blank lines)", kind.name())));
    }
    if records.iter().any(|r| r.value.is_ok()) {
        return Ok(());
    }
    let mut msg = format!("none of its {} rows can be read as {}; is it a dataset file?", records.len(), kind.name());
    for r in records.iter().take(3) {
        let place = SkippedRow { row: r.row, record: r.record, reason: String::new() }.place(kind.name());
        msg.push_str(&format!("\n  {place}: {}", r.value.as_ref().err().map_or("", String::as_str)));
    }
    Err(Error::file(path, msg))
}

fn refuse_if_too_bad(report: &DatasetReport, max_bad_fraction: f64) -> Result<()> {
    let Some(mut msg) = report.too_bad(max_bad_fraction) else { return Ok(()) };
    let bad = report.rows_skipped.len();
    if bad > 0 {
        if bad > LIST_SKIPPED {
            msg.push_str(&format!("; the first {LIST_SKIPPED}:"));
        } else {
            msg.push(':');
        }
        for s in report.rows_skipped.iter().take(LIST_SKIPPED) {
            msg.push_str(&format!("\n  {}: {}", s.place(&report.file_kind), s.reason));
        }
    }
    Err(Error::file(&report.path, msg))
}

#[cfg(test)]
mod tests {
    #[test]
    fn template_origins_in_words() {
        assert_eq!(super::template_words("model"), "the model's own chat template");
        assert_eq!(super::template_words("model:tool_use"), "the model's chat template named tool_use");
        assert_eq!(super::template_words("builtin:llama-3"), "TuneStudio's built-in llama-3 template");
        assert_eq!(super::template_words("none (raw text)"), "no chat template (raw text)");
    }
}
