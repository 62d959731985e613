//! The preflight report: everything a run would check and decide before its first step, without
//! training. It goes through the session's own stages (`crate::prepare`, for a report): the model
//! folder, the dataset and its held-out split, the untrained token rows the data or template uses
//! and what will be done about them, the plan target and the memory plan; and adds the dataset
//! statistics, rendered examples and tokenizer checks of `data::preflight`, the device check and a
//! verdict. `tunestudio preflight` prints it; the studio's dialog shows it as
//! `app::state::preflight::PreflightView`.

use std::path::PathBuf;

use serde::Serialize;

use crate::RunConfig;
use crate::config::{DatasetFormat, TrainOn};
use crate::data::preflight::{DatasetStats, Finding, Level, MarkedExample, Marking, dataset_stats, sample_examples, tokenizer_checks};
use crate::data::{LIST_SKIPPED, MaskSource, PreparedDataset, SkippedRow};
use crate::device::{Machine, Request};
use crate::engine::plan::MemoryPlan;
use crate::error::Result;
use crate::prepare::{self, Place, Purpose, TokenAction, UntrainedTokens};

/// The dataset as the run will read it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DatasetSection {
    pub path: PathBuf,
    /// `JSONL`, `CSV`, `Parquet`, …
    pub file_kind: String,
    /// The record shape used.
    pub format: DatasetFormat,
    /// Whether `dataset.format` named it (true) or it was detected from the rows (false).
    pub format_overridden: bool,
    /// `model`, `model:<name>`, `builtin:<name>`, or none for raw text.
    pub template: String,
    pub mask: MaskSource,
    pub train_on: TrainOn,
    pub packing: bool,
    pub max_seq_len: usize,
    pub rows_total: usize,
    pub rows_used: usize,
    pub rows_skipped: usize,
    /// The first `LIST_SKIPPED` skipped rows with their reasons (`row` is the line in the file,
    /// the row for Parquet).
    pub skipped: Vec<SkippedRow>,
    pub max_bad_fraction: f64,
    /// Rows the run evaluates on (`dataset.eval_split`), held out of `rows_used` or read from
    /// their own file; 0 without evaluation.
    pub eval_rows: usize,
}

/// Whether the run can start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Readiness {
    Ready,
    /// Starts, after changing something (the untrained-token fix).
    ReadyWithFixes,
    CannotStart,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    pub status: Readiness,
    /// Why the run cannot start (empty unless `cannot_start`).
    pub reasons: Vec<String>,
    /// What the run will change before training.
    pub fixes: Vec<String>,
    /// Tokenizer findings of level `warning`.
    pub warnings: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PreflightReport {
    pub model: PathBuf,
    pub dataset: DatasetSection,
    pub stats: DatasetStats,
    /// Optimizer steps the run will make (`train.max_steps`, else epochs × steps per epoch).
    pub total_steps: u64,
    /// The first, the median-length and the longest example, trained text marked.
    pub examples: Vec<MarkedExample>,
    pub tokenizer_checks: Vec<Finding>,
    pub untrained_tokens: UntrainedTokens,
    /// Where the run would train, checked by opening the backend: the card, or why the CUDA engine
    /// cannot start (then the run cannot start until the CPU is chosen).
    pub device: crate::device::DeviceCheck,
    /// The memory plan on the plan target of this machine (`prepare::target`), with the token
    /// rows the untrained-token fix trains.
    pub plan: MemoryPlan,
    pub verdict: Verdict,
}

impl PreflightReport {
    /// Everything the session checks before its first step, for a validated config. Errors are
    /// what stops even the report (an unreadable model or dataset file); a dataset with too many
    /// bad rows, or untrained tokens the run would refuse, come back as a `cannot_start` verdict.
    pub fn build(cfg: &RunConfig, marking: Marking) -> Result<Self> {
        Self::build_for(cfg, marking, None, None)
    }

    /// [`PreflightReport::build`] for a run that decides as the profiled `card` (`--card`; `None`:
    /// `TUNESTUDIO_CARD`, else the device), planned on `machine` (probed here when `None`).
    pub fn build_for(
        cfg: &RunConfig,
        marking: Marking,
        card: Option<&'static crate::backend::card::CardProfile>,
        machine: Option<Machine>,
    ) -> Result<Self> {
        cfg.validate()?;
        let request = Request::of_config(cfg, card)?;
        let device = crate::device::check(&request);
        // The session's stages, in its order, for a report (`Purpose::Report`).
        let model = prepare::Model::open(&cfg.model.path)?;
        let mut data = prepare::Data::prepare(cfg, &model.tok, Purpose::Report)?;
        let untrained = prepare::untrained(cfg, &model, &data)?;
        let machine = machine.unwrap_or_else(crate::device::probe_machine);
        let target = prepare::target(&request, Place::Probed(&machine));
        let plan = prepare::plan(&model.spec, cfg, prepare::fixed_token_rows(&untrained), &target);

        let all = PreparedDataset { examples: std::mem::take(&mut data.all), report: data.report.clone() };
        let (r, tok) = (&data.report, &model.tok);
        let dataset = DatasetSection {
            path: r.path.clone(),
            file_kind: r.file_kind.clone(),
            format: r.format,
            format_overridden: cfg.dataset.format != DatasetFormat::Auto,
            template: r.template.clone(),
            mask: r.mask,
            train_on: cfg.dataset.train_on,
            packing: cfg.dataset.packing,
            max_seq_len: r.max_seq_len,
            rows_total: r.rows_total,
            rows_used: r.rows_used,
            rows_skipped: r.rows_skipped.len(),
            skipped: r.rows_skipped.iter().take(LIST_SKIPPED).cloned().collect(),
            max_bad_fraction: cfg.dataset.max_bad_fraction,
            eval_rows: data.eval.len(),
        };
        let stats = dataset_stats(&all, &data.batcher, cfg.train.grad_accum);

        // Raw text trains without a template, but inference will use the model's: check that one.
        let checked_template = match &data.template {
            Some(t) => Ok(t.clone()),
            None => tok.resolve_template(&cfg.dataset.template),
        };
        let tokenizer_checks = match &checked_template {
            Ok(t) => tokenizer_checks(tok, t),
            Err(e) => vec![Finding {
                level: Level::Info,
                code: "no_template",
                message: format!(
                    "the data is raw text, and the model's chat template cannot be used ({e}): chat inference will need another"
                ),
            }],
        };

        let mut reasons: Vec<String> = data.eval_problem.iter().map(|e| e.to_string()).collect();
        if let Err(e) = model.store.check_finite() {
            reasons.push(e.to_string());
        }
        if let Some(why) = r.too_bad(cfg.dataset.max_bad_fraction) {
            reasons.push(why);
        }
        if let Some(e) = untrained.refusal() {
            reasons.push(e.to_string());
        }
        if let Some(why) = &device.refusal {
            reasons.push(why.clone());
        }
        let mut fixes = Vec::new();
        if untrained.action == TokenAction::Fix {
            fixes.push(format!(
                "untrained tokens {} start at the mean of the trained rows of {} and are trained with the adapter (saved as PEFT trainable tokens)",
                untrained.used_names().join(", "),
                untrained.fix_trains.join(" and ")
            ));
        }
        let status = match (reasons.is_empty(), fixes.is_empty()) {
            (false, _) => Readiness::CannotStart,
            (true, false) => Readiness::ReadyWithFixes,
            (true, true) => Readiness::Ready,
        };
        let warnings = tokenizer_checks.iter().filter(|f| f.level == Level::Warning).count();
        Ok(PreflightReport {
            model: cfg.model.path.clone(),
            dataset,
            stats,
            total_steps: data.total_steps,
            examples: sample_examples(&all, tok, marking),
            tokenizer_checks,
            untrained_tokens: untrained,
            device,
            plan,
            verdict: Verdict { status, reasons, fixes, warnings },
        })
    }
}
