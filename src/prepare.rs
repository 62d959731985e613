//! The one preparation pipeline: config → model (spec, tokenizer, weights) → dataset (the
//! held-out split, batches, steps) → untrained tokens → plan target → plan. Everything that
//! prepares a run goes through these stages, so each decision is made once:
//! - the session (`session::run`) trains on what they return ([`Purpose::Train`]: too many bad
//!   rows, or an evaluation split that cannot be made, stop the run);
//! - the preflight report (`crate::preflight::PreflightReport`, printed by `tunestudio preflight`
//!   and viewed by the studio's dialog as `app::state::preflight::PreflightView`) reports them
//!   ([`Purpose::Report`]: those problems become reasons in the verdict);
//! - `tunestudio eval` reads its model and dataset through [`Model::open`] and [`dataset`].
//!
//! The stages are functions rather than one call because the session does things between them
//! (taking its run folder, reconciling a continued adapter, stopping early on a finished resume)
//! and opens its backend before the plan target is known; the preflight only checks the backend.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use crate::RunConfig;
use crate::backend::host_memory;
use crate::config::{DatasetConfig, DeviceChoice};
use crate::data::{
    Batcher, DatasetReport, Example, PreparedDataset, dataset_template, eval_sets, prepare_dataset, prepare_dataset_unchecked,
};
use crate::device::{Gpu, Machine, Opened, Request, plan_target};
use crate::engine::plan::{self, MemoryPlan, PlanInput, PlanTarget};
use crate::error::{Error, Result};
use crate::model::chat_template::{ChatTemplate, Message};
use crate::model::tokenizer::TokenizerBundle;
use crate::model::untrained::{self, RowKind, UNTRAINED_EPS};
use crate::model::{ModelSpec, WeightStore};

/// What the preparation is for: a run that will train, or a report that says what would happen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// The session: too many bad rows, or an evaluation split that cannot be made, are errors.
    Train,
    /// The preflight report: those become reasons in its verdict, and every usable example is
    /// kept (in file order) for the statistics and the examples shown.
    Report,
}

/// Stage 1: the model folder, read whole (checked, `config.json`, tokenizer, memory-mapped
/// weights).
pub struct Model {
    pub spec: ModelSpec,
    pub tok: TokenizerBundle,
    pub store: WeightStore,
}

impl Model {
    pub fn open(dir: &Path) -> Result<Model> {
        let spec = crate::model::spec_of_folder(dir)?;
        let tok = TokenizerBundle::load(dir)?;
        let store = WeightStore::open(dir)?;
        Ok(Model { spec, tok, store })
    }
}

/// Stage 2a: the dataset read, rendered and tokenized; [`Purpose::Train`] refuses one with more
/// than `dataset.max_bad_fraction` bad rows (listing them), [`Purpose::Report`] returns it as it
/// is (`DatasetReport::too_bad` says whether a run would refuse).
pub fn dataset(cfg: &DatasetConfig, tok: &TokenizerBundle, max_seq_len: usize, purpose: Purpose) -> Result<PreparedDataset> {
    match purpose {
        Purpose::Train => prepare_dataset(cfg, tok, max_seq_len),
        Purpose::Report => prepare_dataset_unchecked(cfg, tok, max_seq_len),
    }
}

/// Stage 2: the rows a run trains and evaluates on, batched as it will read them.
pub struct Data {
    pub report: DatasetReport,
    /// The chat template the rows were rendered with (none for raw text).
    pub template: Option<ChatTemplate>,
    /// Every usable example in file order: kept for [`Purpose::Report`]; a run moves them into
    /// `train` and `eval` (empty here).
    pub all: Vec<Example>,
    /// The rows trained on (`dataset.eval_split` held out of them), in file order.
    pub train: Arc<Vec<Example>>,
    /// The held-out rows, or the evaluation file's; empty without evaluation.
    pub eval: Vec<Example>,
    /// Why the evaluation split cannot be made ([`Purpose::Report`] only: a run stops with it);
    /// then `train` holds every row.
    pub eval_problem: Option<Error>,
    pub batcher: Batcher,
    /// Optimizer steps per epoch (at least 1) and of the whole run (`train.max_steps`, else
    /// epochs × steps per epoch).
    pub steps_per_epoch: u64,
    pub total_steps: u64,
}

impl Data {
    pub fn prepare(cfg: &RunConfig, tok: &TokenizerBundle, purpose: Purpose) -> Result<Data> {
        let PreparedDataset { examples, report } = dataset(&cfg.dataset, tok, cfg.train.max_seq_len, purpose)?;
        // `prepare_dataset` rendered with this template already: it cannot fail here.
        let template = dataset_template(&cfg.dataset, tok, report.format)?;
        let (all, split) = match purpose {
            Purpose::Train => (Vec::new(), Ok(eval_sets(&cfg.dataset, examples, cfg.train.seed, tok, cfg.train.max_seq_len)?)),
            Purpose::Report => {
                let split = eval_sets(&cfg.dataset, examples.clone(), cfg.train.seed, tok, cfg.train.max_seq_len);
                (examples, split)
            }
        };
        let (train, eval, eval_problem) = match split {
            Ok((train, eval)) => (train, eval, None),
            Err(e) => (all.clone(), Vec::new(), Some(e)),
        };
        let train = Arc::new(train);
        let batcher =
            Batcher::new(train.clone(), cfg.train.batch_size, cfg.train.max_seq_len, cfg.dataset.packing, cfg.train.seed, tok.pad_id());
        let micro_batches = batcher.batches_per_epoch().max(1) as u64;
        let steps_per_epoch = micro_batches.div_ceil(cfg.train.grad_accum as u64);
        let total_steps = cfg.train.total_steps(steps_per_epoch);
        Ok(Data { report, template, all, train, eval, eval_problem, batcher, steps_per_epoch, total_steps })
    }

    /// Every example the model will read, trained or evaluated on: what the untrained-token fix
    /// is decided over (a token only the held-out rows use needs its row too).
    pub fn read_examples(&self) -> impl Iterator<Item = &Example> {
        self.train.iter().chain(&self.eval)
    }
}

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
    /// The dataset row of the first such example (the smallest row).
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
pub fn untrained_tokens<'a>(
    store: &WeightStore,
    spec: &ModelSpec,
    tok: &TokenizerBundle,
    examples: impl IntoIterator<Item = &'a Example>,
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
                // The smallest row, whatever order the examples come in (a run passes its
                // training rows, then its held-out ones).
                in_data
                    .entry(id)
                    .and_modify(|(n, first)| {
                        *n += 1;
                        *first = (*first).min(ex.row);
                    })
                    .or_insert((1, ex.row));
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

/// Stage 3: the untrained token rows of `model` that `data` or its template uses, and what the
/// run does about them (`dataset.fix_untrained_tokens`).
pub fn untrained(cfg: &RunConfig, model: &Model, data: &Data) -> Result<UntrainedTokens> {
    let examples: Vec<&Example> = data.read_examples().collect();
    untrained_tokens(&model.store, &model.spec, &model.tok, examples, data.template.as_ref(), cfg.dataset.fix_untrained_tokens)
}

/// Where the plan target is read from: this machine as probed (a report, the studio), or the
/// backend a run opened (the card as it runs it, a profile's under one, with what other
/// processes hold on it now and the context it measured).
pub enum Place<'a> {
    Probed(&'a Machine),
    Opened(&'a Opened),
}

/// Stage 4: the plan target of a run of `req`: the one construction of "the plan target for
/// this machine" (`device::plan_target` does the arithmetic).
pub fn target(req: &Request, place: Place<'_>) -> PlanTarget {
    match place {
        Place::Probed(machine) => plan_target(req, machine),
        Place::Opened(Opened::Cuda(gpu)) => {
            // The backend already runs as the profile, if any: its card is the one to plan for.
            let machine = Machine { gpu: Some(Gpu::of_backend(gpu)), no_gpu_reason: String::new(), host: host_memory() };
            plan_target(&Request { device: DeviceChoice::Cuda, card: None, memory_cap: req.memory_cap }, &machine)
        }
        Place::Opened(Opened::Cpu { .. }) => {
            let machine = Machine { host: host_memory(), ..Machine::default() };
            plan_target(&Request { device: DeviceChoice::Cpu, ..Default::default() }, &machine)
        }
    }
}

/// What the plan is asked: the config's settings, with the token rows the untrained-token fix
/// (or a resumed run's checkpoint) trains.
pub fn plan_input(cfg: &RunConfig, token_rows: usize) -> PlanInput {
    PlanInput { token_rows, ..PlanInput::from_config(cfg) }
}

/// Stage 5: the memory plan of the run on `target` (`auto` checkpointing resolved to the fastest
/// policy that fits).
pub fn plan(spec: &ModelSpec, cfg: &RunConfig, token_rows: usize, target: &PlanTarget) -> MemoryPlan {
    plan::plan(spec, &plan_input(cfg, token_rows), target)
}

/// The token rows a run of `cfg` trains for `untrained` (the fix's, when it is on).
pub fn fixed_token_rows(untrained: &UntrainedTokens) -> usize {
    if untrained.action == TokenAction::Fix { untrained.used_ids.len() } else { 0 }
}
