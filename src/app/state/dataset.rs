//! The Dataset panel's state: the file read and encoded as training will read it
//! (`prepare_view` runs on a worker with the session's own `prepare_dataset`, so what the preview
//! shows is what training sees), rendered examples split into prompt, trained and cut-off spans,
//! the length statistics, and every skipped row with its reason.

use std::path::PathBuf;

use crate::config::{DatasetFormat, EvalSplit, RunConfig};
use crate::data::encode::Encoder;
use crate::data::preflight::LengthStats;
use crate::data::{IGNORE_INDEX, SkippedRow, format, prepare_dataset_unchecked, read};

use crate::app::jobs::Load;

/// Rendered examples kept for the preview.
const PREVIEW_ROWS: usize = 12;
/// Records looked at for column names.
const COLUMN_SCAN: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    /// Prompt, system turn, template scaffolding: read, not learned.
    Prompt,
    /// Contributes to the loss.
    Trained,
    /// Past `max_seq_len`: cut off before training.
    Cut,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    pub text: String,
    pub kind: SpanKind,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Preview {
    /// The row in the file (1-based, as an editor shows it).
    pub row: usize,
    pub tokens: usize,
    pub trained: usize,
    pub segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DatasetView {
    pub path: PathBuf,
    pub file_kind: String,
    pub format: DatasetFormat,
    pub template: String,
    /// Which tokens are trained, in words.
    pub mask: String,
    /// Why training would refuse this data (too many unusable rows, none usable), with the
    /// report still here so the rows can be read.
    pub refusal: Option<String>,
    /// Column names of the first records, for the mapping menus.
    pub columns: Vec<String>,
    pub rows_total: usize,
    pub rows_used: usize,
    pub skipped: Vec<SkippedRow>,
    pub truncated_rows: usize,
    pub trained_tokens: usize,
    pub total_tokens: usize,
    pub max_seq_len: usize,
    /// Token counts per used row before truncation (the data module's statistics and histogram).
    pub lengths: LengthStats,
    pub previews: Vec<Preview>,
    /// The rows held out to evaluate on, as `dataset.eval_split` says; `None` without a split.
    pub held_out: Option<HeldOut>,
}

/// The evaluation rows of `dataset.eval_split`, as the run will take them (`data::eval_sets`).
#[derive(Debug, Clone, PartialEq)]
pub enum HeldOut {
    /// `rows` of the usable rows (`data::held_out_rows`), not trained on.
    Fraction { fraction: f64, rows: usize },
    /// The usable rows of another file; every row of the dataset is trained on.
    File { path: PathBuf, rows: usize },
    /// The split cannot be made: why (too few rows, a file that cannot be read).
    Unusable(String),
}

/// The evaluation rows `cfg` asks for, counted as the session will split them.
fn held_out(cfg: &RunConfig, tok: &crate::model::tokenizer::TokenizerBundle, rows_used: usize) -> Option<HeldOut> {
    Some(match cfg.dataset.eval_split.as_ref()? {
        EvalSplit::Fraction(f) if rows_used >= 2 => HeldOut::Fraction { fraction: *f, rows: crate::data::held_out_rows(rows_used, *f) },
        EvalSplit::Fraction(_) => HeldOut::Unusable(format!("holding rows out needs at least 2 usable rows; the dataset has {rows_used}")),
        EvalSplit::File(path) => {
            let eval_cfg = crate::config::DatasetConfig { path: path.clone(), fingerprint: None, eval_split: None, ..cfg.dataset.clone() };
            match prepare_dataset_unchecked(&eval_cfg, tok, cfg.train.max_seq_len) {
                Ok(d) if d.report.rows_used > 0 => HeldOut::File { path: path.clone(), rows: d.report.rows_used },
                Ok(_) => HeldOut::Unusable(format!("{} has no usable row to evaluate on", path.display())),
                Err(e) => HeldOut::Unusable(e.to_string()),
            }
        }
    })
}

#[derive(Debug, Default)]
pub struct DatasetState {
    pub view: Load<DatasetView>,
    /// Which preview is shown.
    pub preview_index: usize,
}

/// Read and encode the dataset as training would, and render the first rows for the preview.
pub fn prepare_view(cfg: &RunConfig) -> crate::Result<DatasetView> {
    let tok = super::model::tokenizer(&cfg.model.path)?;
    let max = cfg.train.max_seq_len;
    let (_, records) = read::read_records(&cfg.dataset.path)?;
    let mut columns: Vec<String> = Vec::new();
    for r in records.iter().take(COLUMN_SCAN) {
        if let Ok(serde_json::Value::Object(m)) = &r.value {
            for k in m.keys() {
                if !columns.contains(k) {
                    columns.push(k.clone());
                }
            }
        }
    }
    // The report even of data training would refuse: the panel lists the rows that are bad.
    let prepared = prepare_dataset_unchecked(&cfg.dataset, &tok, max)?;
    let report = prepared.report;
    // Raw text renders no template (as in training), so a model whose template does not compile
    // still previews a text dataset.
    let template = crate::data::dataset_template(&cfg.dataset, &tok, report.format)?;
    let encoder = Encoder { tok: &tok, template: template.as_ref(), train_on: cfg.dataset.train_on, max_tokens: None };
    let mut previews = Vec::new();
    for rec in &records {
        if previews.len() >= PREVIEW_ROWS {
            break;
        }
        let Ok(value) = &rec.value else { continue };
        let Ok(sample) = format::to_sample(report.format, &cfg.dataset.columns, value) else { continue };
        let Ok(enc) = encoder.encode(&sample, true) else { continue };
        let Some(text) = enc.text else { continue };
        let is_text = matches!(sample, format::Sample::Text(_));
        let crate::model::tokenizer::Encoded { ids, offsets } = tok.encode_with_offsets(&text, false)?;
        // Raw text gets BOS in front (and EOS behind) outside the text, so its body starts one
        // token later; every body token is trained.
        let (labels, keep) = if is_text {
            (ids.iter().map(|&t| t as i32).collect::<Vec<_>>(), max.saturating_sub(1))
        } else if ids.len() == enc.labels.len() {
            (enc.labels.clone(), max)
        } else {
            continue;
        };
        let trained = labels.iter().take(keep).skip(1).filter(|&&l| l != IGNORE_INDEX).count();
        previews.push(Preview { row: rec.row, tokens: enc.input_ids.len(), trained, segments: segments(&text, &offsets, &labels, keep) });
    }
    Ok(DatasetView {
        path: cfg.dataset.path.clone(),
        file_kind: report.file_kind.clone(),
        format: report.format,
        template: report.template.clone(),
        mask: report.mask.words().to_string(),
        refusal: report.too_bad(cfg.dataset.max_bad_fraction),
        columns,
        rows_total: report.rows_total,
        rows_used: report.rows_used,
        skipped: report.rows_skipped.clone(),
        truncated_rows: report.truncated_rows,
        trained_tokens: report.trained_tokens,
        total_tokens: report.total_tokens,
        max_seq_len: report.max_seq_len,
        lengths: LengthStats::of(&report.lengths.iter().map(|l| l.original_tokens).collect::<Vec<_>>(), report.max_seq_len),
        previews,
        held_out: held_out(cfg, &tok, report.rows_used),
    })
}

/// The field a refusal of the data belongs to: the share of bad rows is "Max unusable rows";
/// a file with no usable row at all is the file's problem.
pub fn refusal_field(view: &DatasetView) -> &'static str {
    if view.rows_used == 0 { "dataset.path" } else { "dataset.max_bad_fraction" }
}

/// Split `text` into runs of prompt, trained and cut-off text from each token's byte range and
/// label. Tokens past `keep` are cut; bytes no token covers take the kind of the text before them.
pub fn segments(text: &str, offsets: &[(usize, usize)], labels: &[i32], keep: usize) -> Vec<Segment> {
    let n = text.len();
    let mut kind: Vec<Option<SpanKind>> = vec![None; n];
    for (i, &(a, b)) in offsets.iter().enumerate() {
        let k = if i >= keep {
            SpanKind::Cut
        } else if labels.get(i).is_some_and(|&l| l != IGNORE_INDEX) {
            SpanKind::Trained
        } else {
            SpanKind::Prompt
        };
        for slot in kind.iter_mut().take(b.min(n)).skip(a.min(n)) {
            *slot = Some(k);
        }
    }
    let mut out: Vec<Segment> = Vec::new();
    let mut last = SpanKind::Prompt;
    for (i, ch) in text.char_indices() {
        let k = kind[i].unwrap_or(last);
        last = k;
        match out.last_mut() {
            Some(s) if s.kind == k => s.text.push(ch),
            _ => out.push(Segment { text: ch.to_string(), kind: k }),
        }
    }
    out
}

/// The one-line summary above the preview, with the rows held out to evaluate on.
pub fn summary(v: &DatasetView) -> String {
    let frac = if v.total_tokens == 0 { 0.0 } else { 100.0 * v.trained_tokens as f64 / v.total_tokens as f64 };
    let eval = match &v.held_out {
        Some(HeldOut::Fraction { fraction, rows }) => {
            format!(" ({rows} held out to evaluate on, {:.0}%; {} trained on)", 100.0 * fraction, v.rows_used.saturating_sub(*rows))
        }
        _ => String::new(),
    };
    let file = match &v.held_out {
        Some(HeldOut::File { path, rows }) => format!(
            " · evaluated on the {rows} usable rows of {}",
            path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().to_string())
        ),
        _ => String::new(),
    };
    format!(
        "{} {} rows: {} used{eval}, {} skipped, {} truncated to {} tokens{file} · {} tokens, {} trained ({frac:.0}%) · per row: median {}, p95 {}, max {}",
        v.rows_total,
        v.file_kind,
        v.rows_used,
        v.skipped.len(),
        v.truncated_rows,
        v.max_seq_len,
        v.total_tokens,
        v.trained_tokens,
        v.lengths.p50,
        v.lengths.p95,
        v.lengths.max
    )
}

/// Why the evaluation rows cannot be had, when they cannot.
pub fn held_out_problem(v: &DatasetView) -> Option<String> {
    match &v.held_out {
        Some(HeldOut::Unusable(why)) => Some(format!("Evaluation rows (dataset.eval_split): {why}")),
        _ => None,
    }
}

pub fn format_name(f: DatasetFormat) -> &'static str {
    match f {
        DatasetFormat::Auto => "auto",
        DatasetFormat::Alpaca => "Alpaca",
        DatasetFormat::Sharegpt => "ShareGPT",
        DatasetFormat::Messages => "messages (OpenAI)",
        DatasetFormat::Text => "raw text",
        DatasetFormat::Columns => "column mapping",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_follow_labels_and_cut() {
        // "ab cd ef": tokens "ab", " cd", " ef"; the second is trained, the third is past keep.
        let text = "ab cd ef";
        let offsets = [(0, 2), (2, 5), (5, 8)];
        let labels = [IGNORE_INDEX, 7, 8];
        let s = segments(text, &offsets, &labels, 2);
        let kinds: Vec<(&str, SpanKind)> = s.iter().map(|x| (x.text.as_str(), x.kind)).collect();
        assert_eq!(kinds, vec![("ab", SpanKind::Prompt), (" cd", SpanKind::Trained), (" ef", SpanKind::Cut)]);
    }

    #[test]
    fn segments_keep_multibyte_text_whole() {
        let text = "é→ok";
        let offsets = [(0, 2), (2, 5), (5, 7)];
        let labels = [IGNORE_INDEX, IGNORE_INDEX, 3];
        let s = segments(text, &offsets, &labels, 10);
        assert_eq!(s.iter().map(|x| x.text.as_str()).collect::<String>(), text);
        assert_eq!(s.last().unwrap().kind, SpanKind::Trained);
    }
}
