//! The preflight report: everything a run would check and decide before its first step, without
//! training. It reads the model's tokenizer and embedding rows and prepares the dataset exactly as
//! the session does, and collects the dataset statistics, rendered examples and tokenizer checks
//! of `data::preflight`, the untrained token rows the data or template uses and what will be done
//! about them, and a verdict. `tunestudio preflight` prints it; the session shares
//! `untrained_tokens` so both decide the untrained-token fix the same way.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;

use crate::RunConfig;
use crate::config::{DatasetFormat, TrainOn};
use crate::data::preflight::{DatasetStats, Finding, Level, MarkedExample, Marking, dataset_stats, sample_examples, tokenizer_checks};
use crate::data::{Batcher, Example, LIST_SKIPPED, MaskSource, SkippedRow, dataset_template, eval_sets, prepare_dataset_unchecked};
use crate::error::{Error, Result};
use crate::model::chat_template::{ChatTemplate, Message};
use crate::model::tokenizer::TokenizerBundle;
use crate::model::untrained::{self, RowKind, UNTRAINED_EPS};
use crate::model::{ModelSpec, WeightStore};

/// One untrained token row (not BOS, EOS or PAD) and where it occurs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UntrainedToken {
    pub id: u32,
    /// The vocabulary entry (`<|reserved_special_token_0|>`).
    pub text: String,
    /// Zero, or collapsed onto a vector it shares with other tokens.
    pub kind: RowKind,
    /// Examples (after rendering, tokenizing and truncation) that contain it.
    pub data_rows: usize,
    /// The dataset row of the first such example.
    pub first_row: Option<usize>,
    /// Whether the chat template writes it (rendered on a short probe conversation, with and
    /// without the generation prompt).
    pub in_template: bool,
}

impl UntrainedToken {
    /// Used by the data or the template: its rows must be fixed before training.
    pub fn used(&self) -> bool {
        self.data_rows > 0 || self.in_template
    }
}

/// What a run does about untrained token rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenAction {
    /// No untrained rows (other than BOS/EOS/PAD).
    None,
    /// There are some, but nothing uses them: listed and left alone.
    LeaveAlone,
    /// Used ones start at the mean of the trained rows and are trained with the adapter.
    Fix,
    /// Used ones, and `dataset.fix_untrained_tokens = false`: the run refuses to start.
    Refuse,
}

/// Untrained token rows of the model, checked against the data and the template.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UntrainedTokens {
    /// A row is untrained when, in each matrix checked, every |value| ≤ eps (`zero`) or it is
    /// bit for bit the same as another row (`collapsed`).
    pub eps: f32,
    /// The matrices whose rows must both be untrained (`embed_tokens`, and `lm_head` unless tied).
    pub matrices: Vec<&'static str>,
    /// Every untrained row, BOS/EOS/PAD included (the fix's mean leaves all of them out).
    pub all_ids: Vec<u32>,
    /// BOS, EOS and PAD ids, which are never listed or fixed.
    pub excluded_ids: Vec<u32>,
    /// The untrained rows that are not BOS/EOS/PAD, by id.
    pub tokens: Vec<UntrainedToken>,
    /// Ids of `tokens` the data or template uses: the ones the fix is about.
    pub used_ids: Vec<u32>,
    /// The matrices the fix trains (with the adapter, saved as PEFT trainable tokens).
    pub fix_trains: Vec<&'static str>,
    pub action: TokenAction,
}

impl UntrainedTokens {
    /// Whether the fix also trains `lm_head` rows (an untied head).
    pub fn fix_trains_head(&self) -> bool {
        self.fix_trains.contains(&"lm_head")
    }

    /// `id text` of each used token, for messages.
    pub fn used_names(&self) -> Vec<String> {
        self.tokens.iter().filter(|t| t.used()).map(|t| format!("{} {}", t.id, t.text)).collect()
    }

    /// The error a run stops with when the data uses untrained rows and the fix is off.
    pub fn refusal(&self) -> Option<Error> {
        (self.action == TokenAction::Refuse).then(|| {
            Error::config(
                "dataset.fix_untrained_tokens",
                format!(
                    "the data or chat template uses token rows that were never trained ({}); their embeddings are zero or one vector shared by several tokens, and the loss would become NaN/inf or every such token would be learned from the same start. Set dataset.fix_untrained_tokens = true to start them at the mean of the trained rows and train them, or remove them from the data",
                    self.used_names().join(", ")
                ),
            )
        })
    }
}

/// Token ids the template writes around a short conversation (system turn or not, with and
/// without the generation prompt). Renders a template refuses (no system role) are skipped.
fn template_token_ids(tok: &TokenizerBundle, template: &ChatTemplate) -> BTreeSet<u32> {
    let system = Message::new("system", "You are a helpful assistant.");
    let user = Message::new("user", "Hello.");
    let assistant = Message::new("assistant", "Hi.");
    let probes = [
        (vec![system.clone(), user.clone(), assistant.clone()], false),
        (vec![system, user.clone()], true),
        (vec![user.clone(), assistant], false),
        (vec![user], true),
    ];
    probes
        .iter()
        .filter_map(|(messages, gen_prompt)| template.render(messages, *gen_prompt).ok())
        .filter_map(|r| tok.encode(&r.text, false).ok())
        .flatten()
        .collect()
}

/// Untrained rows of the model (`model::untrained::detect`), minus BOS/EOS/PAD, each with where
/// the examples and the template use it, and what the run will do (`fix` is
/// `dataset.fix_untrained_tokens`).
pub fn untrained_tokens(
    store: &WeightStore,
    spec: &ModelSpec,
    tok: &TokenizerBundle,
    examples: &[Example],
    template: Option<&ChatTemplate>,
    fix: bool,
) -> Result<UntrainedTokens> {
    let mut excluded: Vec<u32> = [tok.bos_id(), tok.eos_id(), Some(tok.pad_id())].into_iter().flatten().collect();
    excluded.extend(spec.eos_token_ids.iter().copied());
    excluded.sort_unstable();
    excluded.dedup();
    let all_rows = untrained::classify(store, spec, &[])?;
    let all_ids: Vec<u32> = all_rows.iter().map(|r| r.id).collect();
    let candidates: Vec<u32> = all_ids.iter().copied().filter(|i| !excluded.contains(i)).collect();
    // (`classify` returns rows in id order.)
    let kind_of = |id: u32| all_rows.binary_search_by_key(&id, |r| r.id).map_or(RowKind::Zero, |i| all_rows[i].kind);

    // Per candidate: examples that contain it and the first one's row (token ids of the examples,
    // not the batcher's rows, which hold example indices).
    let mut in_data: BTreeMap<u32, (usize, usize)> = BTreeMap::new();
    if !candidates.is_empty() {
        for ex in examples {
            let present: BTreeSet<u32> = ex.input_ids.iter().copied().filter(|id| candidates.binary_search(id).is_ok()).collect();
            for id in present {
                in_data.entry(id).and_modify(|(n, _)| *n += 1).or_insert((1, ex.row));
            }
        }
    }
    let in_template = match template {
        Some(t) if !candidates.is_empty() => template_token_ids(tok, t),
        _ => BTreeSet::new(),
    };
    let tokens: Vec<UntrainedToken> = candidates
        .iter()
        .map(|&id| UntrainedToken {
            id,
            text: tok.token_text(id).unwrap_or_default(),
            kind: kind_of(id),
            data_rows: in_data.get(&id).map_or(0, |&(n, _)| n),
            first_row: in_data.get(&id).map(|&(_, row)| row),
            in_template: in_template.contains(&id),
        })
        .collect();
    let used_ids: Vec<u32> = tokens.iter().filter(|t| t.used()).map(|t| t.id).collect();
    let has_head = store.contains("lm_head.weight");
    let action = match (tokens.is_empty(), used_ids.is_empty(), fix) {
        (true, _, _) => TokenAction::None,
        (false, true, _) => TokenAction::LeaveAlone,
        (false, false, true) => TokenAction::Fix,
        (false, false, false) => TokenAction::Refuse,
    };
    Ok(UntrainedTokens {
        eps: UNTRAINED_EPS,
        matrices: if has_head { vec!["embed_tokens", "lm_head"] } else { vec!["embed_tokens (tied to lm_head)"] },
        all_ids,
        excluded_ids: excluded,
        tokens,
        used_ids,
        fix_trains: if has_head && !spec.tie_word_embeddings { vec!["embed_tokens", "lm_head"] } else { vec!["embed_tokens"] },
        action,
    })
}

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
    pub verdict: Verdict,
}

impl PreflightReport {
    /// Everything the session checks before its first step, for a validated config. Errors are
    /// what stops even the report (an unreadable model or dataset file); a dataset with too many
    /// bad rows, or untrained tokens the run would refuse, come back as a `cannot_start` verdict.
    pub fn build(cfg: &RunConfig, marking: Marking) -> Result<Self> {
        Self::build_for(cfg, marking, None)
    }

    /// [`PreflightReport::build`] for a run that decides as the profiled `card` (`--card`; `None`:
    /// `TUNESTUDIO_CARD`, else the device).
    pub fn build_for(cfg: &RunConfig, marking: Marking, card: Option<&'static crate::backend::card::CardProfile>) -> Result<Self> {
        cfg.validate()?;
        let device = crate::device::check(&crate::device::Request::of_config(cfg, card)?);
        let spec = crate::model::spec_of_folder(&cfg.model.path)?;
        let tok = TokenizerBundle::load(&cfg.model.path)?;
        let store = WeightStore::open(&cfg.model.path)?;
        let data = prepare_dataset_unchecked(&cfg.dataset, &tok, cfg.train.max_seq_len)?;
        let template = dataset_template(&cfg.dataset, &tok, data.report.format)?;

        let r = &data.report;
        let mut dataset = DatasetSection {
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
            eval_rows: 0,
        };
        // The steps are counted over the rows the run trains on, as the session splits them.
        let mut eval_problem = None;
        let train = match eval_sets(&cfg.dataset, data.examples.clone(), cfg.train.seed, &tok, cfg.train.max_seq_len) {
            Ok((train, eval)) => {
                dataset.eval_rows = eval.len();
                train
            }
            Err(e) => {
                eval_problem = Some(e.to_string());
                data.examples.clone()
            }
        };
        let examples = Arc::new(train);
        let batcher =
            Batcher::new(examples, cfg.train.batch_size, cfg.train.max_seq_len, cfg.dataset.packing, cfg.train.seed, tok.pad_id());
        let stats = dataset_stats(&data, &batcher, cfg.train.grad_accum);
        let total_steps = cfg.train.total_steps(stats.steps_per_epoch.max(1) as u64);

        // Raw text trains without a template, but inference will use the model's: check that one.
        let checked_template = match &template {
            Some(t) => Ok(t.clone()),
            None => tok.resolve_template(&cfg.dataset.template),
        };
        let tokenizer_checks = match &checked_template {
            Ok(t) => tokenizer_checks(&tok, t),
            Err(e) => vec![Finding {
                level: Level::Info,
                code: "no_template",
                message: format!(
                    "the data is raw text, and the model's chat template cannot be used ({e}): chat inference will need another"
                ),
            }],
        };
        let untrained = untrained_tokens(&store, &spec, &tok, &data.examples, template.as_ref(), cfg.dataset.fix_untrained_tokens)?;

        let mut reasons: Vec<String> = eval_problem.into_iter().collect();
        if let Err(e) = store.check_finite() {
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
            total_steps,
            examples: sample_examples(&data, &tok, marking),
            tokenizer_checks,
            untrained_tokens: untrained,
            device,
            verdict: Verdict { status, reasons, fixes, warnings },
        })
    }
}
