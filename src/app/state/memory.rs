//! The memory budget's state (the VRAM preview): the run's `engine::plan` — every buffer the
//! engine and its backend will allocate, from the model's shape and the run's settings, no GPU
//! touched — as stacked terms against the card's total and free memory (and the host's RAM for
//! what offloading pins there), the verdict, the largest sequence length, batch size and LoRA
//! rank that fit, and the machine the plan is for (this one, or a common card you do not have).
//!
//! The plan is one call of a pure function, made in the frame that changed a setting (so the bar
//! follows a dragged slider without lag); the "largest that fits" numbers are binary searches
//! over many plans and run on a worker (`fixes`). `view`, `verdict`, `bar` and `fixes` are the
//! view model; `panels::budget` and the memory bar of `widgets` draw it.

use eframe::egui::Color32;

use crate::backend::card::{self, CardProfile};
use crate::config::{CheckpointPolicy, DeviceChoice, RunConfig, Target};
use crate::device::Request;
use crate::engine::plan::{self, BackendKind, PlanInput, PlanTarget, Term, largest_fitting, suggestions};
use crate::model::ModelSpec;
use crate::util::fmt_bytes;

use crate::app::jobs::{Load, key_of};
use crate::app::state::AppState;

/// Which machine the budget is planned for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Card {
    /// Where the run would train now (as `train.device` and the detected GPU decide).
    #[default]
    ThisMachine,
    /// A card users train on (`backend::card::PROFILES`): planned as that card, idle.
    Profile(&'static CardProfile),
}

impl Card {
    /// A profile by its key (`rtx4090`).
    pub fn profile(key: &str) -> Card {
        Card::Profile(card::profile_named(key).expect("a known card profile"))
    }

    pub fn label(self, machine: Option<&Machine>) -> String {
        match self {
            Card::Profile(p) => profile_label(p),
            Card::ThisMachine => match machine {
                None => "this machine (looking…)".into(),
                Some(m) => match &m.gpu {
                    Some(g) => format!("this machine: {} ({})", g.card.name, fmt_bytes(g.card.memory_bytes)),
                    None => format!(
                        "this machine: CPU{}",
                        m.host.as_ref().map(|h| format!(" ({} RAM)", fmt_bytes(h.total_bytes))).unwrap_or_default()
                    ),
                },
            },
        }
    }
}

/// "RTX 4090 · 24 GiB" as the picker lists a profile (the memory the driver reports, which the
/// plan holds against, a little under the size sold); a card the engine cannot run says so.
pub fn profile_label(p: &CardProfile) -> String {
    let short = p.name.trim_start_matches("NVIDIA ").trim_start_matches("GeForce ");
    let gib = format!("{:.1}", p.memory_mib as f64 / 1024.0);
    let gib = gib.trim_end_matches(".0");
    if p.supported() { format!("{short} · {gib} GiB") } else { format!("{short} · {gib} GiB (cannot run)") }
}

/// Hover text of a profile in the picker: its compute capability, or why it cannot run.
pub fn profile_help(p: &CardProfile) -> String {
    let l = p.limits();
    match l.check_supported() {
        Ok(()) => format!("{} — plan for this card, idle", l.describe()),
        Err(r) => r.to_string(),
    }
}

pub use crate::backend::{HostMemory, host_memory};
pub use crate::device::{Machine, probe_machine};

/// The plan target for `card` with the config's device choice and memory cap: the one
/// construction (`prepare::target`), fed with what the studio probed of this machine. A
/// profile's pinned host memory is held against this machine's RAM (a card previewed in this
/// machine).
pub fn target(card: Card, cfg: &RunConfig, machine: Option<&Machine>) -> PlanTarget {
    let cap = cfg.memory.gpu_mem.map(|b| b.bytes());
    let none = Machine::default();
    let machine = machine.unwrap_or(&none);
    let req = match card {
        Card::ThisMachine => Request { device: cfg.train.device, card: None, memory_cap: cap },
        Card::Profile(p) => Request { device: DeviceChoice::Cuda, card: Some(p), memory_cap: cap },
    };
    crate::prepare::target(&req, crate::prepare::Place::Probed(machine))
}

/// The stacking order and colour of each term (fixed, so a colour keeps its meaning while
/// sliders move). Other processes come first: their memory is taken before ours.
pub const TERMS: [(Term, &str, Color32); 12] = [
    (Term::OtherProcesses, "used by other processes", Color32::from_gray(85)),
    (Term::CudaContext, "CUDA context", Color32::from_rgb(130, 130, 140)),
    (Term::BaseWeights, "base weights", Color32::from_rgb(86, 156, 214)),
    (Term::DequantizedWeights, "weights dequantized once", Color32::from_rgb(140, 190, 235)),
    (Term::LoraParams, "LoRA weights", Color32::from_rgb(120, 190, 120)),
    (Term::LoraGrads, "LoRA gradients", Color32::from_rgb(90, 160, 90)),
    (Term::OptimizerStates, "AdamW states", Color32::from_rgb(200, 200, 110)),
    (Term::SavedActivations, "saved activations", Color32::from_rgb(214, 157, 86)),
    (Term::LayerActivations, "layer activations", Color32::from_rgb(230, 120, 90)),
    (Term::Workspace, "workspace", Color32::from_rgb(190, 120, 190)),
    (Term::BackendWorkspace, "kernel scratch", Color32::from_rgb(120, 190, 200)),
    (Term::Samples, "samples during training", Color32::from_rgb(230, 180, 200)),
];

/// The colour of `term` on the bar.
pub fn term_color(term: Term) -> Color32 {
    TERMS.iter().find(|(t, _, _)| *t == term).map_or(Color32::GRAY, |(_, _, c)| *c)
}

#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    pub term: Term,
    pub label: &'static str,
    pub color: Color32,
    pub bytes: u64,
}

/// The plan of one run on one target, as the panel shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetView {
    /// "NVIDIA H100 80GB HBM3", "NVIDIA L4 (profile l4)" or "CPU".
    pub device: String,
    pub on_gpu: bool,
    /// The policy the plan used (`auto` resolved), and whether it was resolved from auto.
    pub checkpointing: CheckpointPolicy,
    /// The policy in words, with the layers kept when `auto` kept only some.
    pub checkpointing_label: String,
    pub auto: bool,
    /// Non-empty terms in stacking order, other processes first.
    pub segments: Vec<Segment>,
    /// Ours, what must fit: device bytes (on the CPU, everything, pinned included).
    pub peak_bytes: u64,
    pub total_bytes: Option<u64>,
    /// Held by other processes (on the CPU, RAM not available).
    pub others_bytes: u64,
    /// The memory cap (`memory.gpu_mem`), when one is set.
    pub cap_bytes: Option<u64>,
    /// What the run may have: the card less other processes, within the cap.
    pub available_bytes: Option<u64>,
    /// Layer inputs (and, in memory mode, the embedding) in pinned host memory; 0 on the CPU.
    pub pinned_host_bytes: u64,
    pub host: Option<HostMemory>,
    /// `None` when nothing is known to hold it against.
    pub fits: Option<bool>,
    /// Why the CUDA engine cannot run on this card at all (a card below compute capability 8.0).
    pub refusal: Option<String>,
    /// The predicted speed and ETA on this card (`engine::cost`), in words; `None` on the CPU and
    /// for a card of unknown speed.
    pub predicted: Option<String>,
}

/// The plan of `cfg` (with `token_rows` embedding rows trained by the untrained-token fix) on
/// `target`. One `engine::plan` call: cheap enough for the frame that changed a setting.
pub fn view(spec: &ModelSpec, cfg: &RunConfig, target: &PlanTarget, host: Option<&HostMemory>, token_rows: usize) -> BudgetView {
    let mut input = PlanInput::from_config(cfg);
    input.token_rows = token_rows;
    let p = plan::plan(spec, &input, target);
    let on_gpu = target.kind == BackendKind::Cuda;
    let segments = TERMS
        .iter()
        .filter_map(|&(term, label, color)| {
            // On the CPU, what others hold is RAM, not a card's memory.
            let label = if term == Term::OtherProcesses && !on_gpu { "RAM used by other programs" } else { label };
            p.terms.get(term.name()).filter(|&&b| b > 0).map(|&bytes| Segment { term, label, color, bytes })
        })
        .collect();
    // On the CPU "pinned host" is the same RAM as everything else. On a card, the plan holds
    // the device bytes against the card and the pinned bytes against the target's host RAM.
    let (peak, pinned) = if on_gpu { (p.peak_bytes, p.pinned_host_bytes) } else { (p.peak_bytes + p.pinned_host_bytes, 0) };
    let available = target.available_bytes();
    BudgetView {
        device: target.name.clone(),
        on_gpu,
        checkpointing: p.checkpointing,
        checkpointing_label: p.checkpointing_label(spec),
        auto: cfg.memory.checkpointing == CheckpointPolicy::Auto,
        segments,
        peak_bytes: peak,
        total_bytes: target.total_bytes,
        others_bytes: target.others_bytes,
        cap_bytes: target.cap_bytes,
        available_bytes: available,
        pinned_host_bytes: pinned,
        host: host.cloned(),
        fits: available.map(|_| p.fits),
        refusal: target.card.as_ref().and_then(|c| c.check_supported().err()).map(|r| r.reason),
        predicted: p.step.as_ref().map(|s| s.summary(cfg.train.max_steps, cfg.train.grad_accum)),
    }
}

/// The verdict line and whether it is good news.
pub fn verdict(v: &BudgetView) -> (String, bool) {
    if let Some(why) = &v.refusal {
        return (format!("Cannot train on {}: {why}", v.device), false);
    }
    let what = if v.on_gpu { format!("on {}", v.device) } else { "in RAM (CPU training)".to_string() };
    let room = |r: u64| {
        if v.cap_bytes == Some(r) {
            format!("the {} cap", fmt_bytes(r))
        } else if !v.on_gpu {
            format!("{} available", fmt_bytes(r))
        } else if v.others_bytes > 0 {
            format!("{} free", fmt_bytes(r))
        } else {
            fmt_bytes(r)
        }
    };
    let others =
        if v.on_gpu && v.others_bytes > 0 { format!("; {} used by other processes", fmt_bytes(v.others_bytes)) } else { String::new() };
    match (v.fits, v.available_bytes) {
        (Some(true), Some(r)) => (
            format!("Fits: {} of {} {what} ({} to spare{others})", fmt_bytes(v.peak_bytes), room(r), fmt_bytes(r - v.peak_bytes.min(r))),
            true,
        ),
        (Some(false), Some(r)) if v.peak_bytes > r => (
            format!("Does not fit: needs {}, {} {what} ({} over{others})", fmt_bytes(v.peak_bytes), room(r), fmt_bytes(v.peak_bytes - r)),
            false,
        ),
        (Some(false), _) => {
            (format!("Does not fit: {} of pinned host memory, more than the RAM available", fmt_bytes(v.pinned_host_bytes)), false)
        }
        _ => (format!("{} planned {what}", fmt_bytes(v.peak_bytes)), true),
    }
}

/// Where things sit on the bar, as fractions of its width.
#[derive(Debug, Clone, PartialEq)]
pub struct Bar {
    /// The bytes the full width stands for: the card (or RAM), or more when the plan or the
    /// measurement is larger, so nothing is drawn off the end.
    pub scale_bytes: u64,
    /// Each segment's extent, other processes first, then ours.
    pub segments: Vec<(f32, f32)>,
    /// The memory cap, measured from the end of other processes' memory (where ours starts).
    pub cap_at: Option<f32>,
    pub total_at: Option<f32>,
    /// The card's use now (the driver's figure, other processes included).
    pub measured_at: Option<f32>,
}

pub fn bar(v: &BudgetView, measured: Option<u64>) -> Bar {
    let stacked: u64 = v.segments.iter().map(|s| s.bytes).sum();
    let scale = v.total_bytes.unwrap_or(0).max(stacked).max(measured.unwrap_or(0)).max(1);
    let f = |b: u64| b as f32 / scale as f32;
    let mut x = 0u64;
    let segments = v
        .segments
        .iter()
        .map(|s| {
            let from = f(x);
            x += s.bytes;
            (from, f(x))
        })
        .collect();
    let ours_from = if v.on_gpu { v.others_bytes } else { 0 };
    Bar {
        scale_bytes: scale,
        segments,
        cap_at: v.cap_bytes.filter(|&c| v.total_bytes.is_none_or(|t| ours_from + c < t)).map(|c| f(ours_from + c)),
        total_at: v.total_bytes.map(f),
        measured_at: measured.map(f),
    }
}

/// The largest settings that fit with everything else fixed, and the changes that make a
/// non-fitting run fit: binary searches over `engine::plan`, run on a worker.
#[derive(Debug, Clone, PartialEq)]
pub struct Fixes {
    pub max_seq_len: Option<usize>,
    /// The search's upper end for the sequence length: the model's context length.
    pub seq_cap: usize,
    pub batch_size: Option<usize>,
    /// The search's upper end for the batch: the dataset's rows per step (a larger effective
    /// batch than the dataset only repeats rows), else the config's limit.
    pub batch_cap: usize,
    /// Whether `batch_cap` comes from the dataset (not from the config's limit).
    pub batch_cap_is_data: bool,
    pub lora_r: Option<usize>,
    /// The search's upper end for the rank: the full rank of the smallest adapted linear.
    pub rank_cap: usize,
    pub suggestions: Vec<String>,
}

/// Upper ends of the searches: the config's own allowed ranges.
const MAX_BATCH: usize = 1024;
const MAX_RANK: usize = 1024;

/// The largest settings that fit `target`, each bounded by what is useful as well as by memory:
/// the sequence by the model's context, the batch by `rows` (the dataset's usable rows, when
/// known) per step, the rank by the adapted linears' full rank.
pub fn fixes(spec: &ModelSpec, cfg: &RunConfig, target: &PlanTarget, rows: Option<usize>) -> Fixes {
    let input = PlanInput::from_config(cfg);
    let seq_cap = spec.max_position_embeddings.max(64);
    let seq = largest_fitting(spec, &input, target, 64, seq_cap, |i, v| i.max_seq_len = v)
        .map(|s| if s < seq_cap && s >= 128 { s / 64 * 64 } else { s });
    let batch_cap = rows.map_or(MAX_BATCH, |r| (r / cfg.train.grad_accum.max(1)).clamp(1, MAX_BATCH));
    let batch = largest_fitting(spec, &input, target, 1, batch_cap, |i, v| i.batch_size = v);
    let rank_cap = full_rank(spec, &cfg.lora.targets).clamp(1, MAX_RANK);
    let rank = largest_fitting(spec, &input, target, 1, rank_cap, |i, v| i.lora.r = v);
    let suggestions =
        suggestions(spec, &input, target).into_iter().map(|s| format!("{} (peak {})", s.change, fmt_bytes(s.peak_bytes))).collect();
    Fixes {
        max_seq_len: seq,
        seq_cap,
        batch_size: batch,
        batch_cap,
        batch_cap_is_data: rows.is_some(),
        lora_r: rank,
        rank_cap,
        suggestions,
    }
}

/// The highest rank a LoRA update can have on `targets`: an update of a `d_out × d_in` linear
/// has rank at most min(d_in, d_out), so a larger r only adds memory.
pub fn full_rank(spec: &ModelSpec, targets: &[Target]) -> usize {
    let (h, q, kv, m) = (spec.hidden_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim, spec.intermediate_size);
    targets
        .iter()
        .map(|t| match t {
            Target::Q | Target::O => h.min(q),
            Target::K | Target::V => h.min(kv),
            Target::Gate | Target::Up | Target::Down => h.min(m),
        })
        .min()
        .unwrap_or(h)
}

/// A setting "largest that fits" can apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setting {
    MaxSeqLen,
    BatchSize,
    LoraRank,
}

pub fn apply(cfg: &mut RunConfig, setting: Setting, value: usize) {
    match setting {
        Setting::MaxSeqLen => cfg.train.max_seq_len = value,
        Setting::BatchSize => cfg.train.batch_size = value,
        Setting::LoraRank => cfg.lora.r = value,
    }
}

/// The panel's state: the card picked, what this machine has, and the last plans.
#[derive(Debug, Default)]
pub struct BudgetState {
    pub card: Card,
    pub machine: Load<Machine>,
    /// The plan of the edited config on the picked card, with the key of its inputs.
    pub view: Option<(u64, BudgetView)>,
    /// The last "largest that fits" from the worker, with the key it was computed for.
    pub fixes: Option<(u64, Fixes)>,
    /// The key a worker is computing now.
    pub fixes_pending: Option<u64>,
    /// Plan for this named shape (`ModelSpec::SHAPE_NAMES`) instead of the model folder: a model
    /// the person does not have yet.
    pub shape: Option<String>,
}

/// Everything a view depends on, as one key.
pub fn key(spec_source: &str, cfg: &RunConfig, target: &PlanTarget, host: Option<&HostMemory>, rows: Option<usize>) -> u64 {
    let input = PlanInput::from_config(cfg);
    key_of(&[&spec_source, &format!("{input:?}|{target:?}|{host:?}|{rows:?}")])
}

/// The model the budget plans for, with a name for it: the named shape when one is picked,
/// else the loaded model folder.
pub fn planned_model(state: &AppState) -> Option<(String, ModelSpec)> {
    if let Some(name) = &state.budget.shape {
        return ModelSpec::by_shape_name(name).map(|s| (format!("shape {name}"), s));
    }
    let info = state.model.info.ready().filter(|i| i.path == state.config.model.path)?;
    Some((info.path.display().to_string(), info.spec.clone()))
}

/// The rows a run trains on, when the preview has read the dataset: its usable rows less those
/// `dataset.eval_split` holds out (an evaluation file of its own holds none of them out).
fn dataset_rows(state: &AppState) -> Option<usize> {
    let used = state.dataset.view.ready().map(|v| v.rows_used).filter(|&r| r > 0)?;
    Some(training_rows(used, state.config.dataset.eval_split.as_ref()))
}

/// The passes over the training rows a step limit makes, when the rows are known and a step
/// draws whole rows (no packing): what the Epochs field shows while the limit overrides it
/// (it showed the config's own epochs, 1.00, for 600 steps over 315 rows).
pub fn epochs_of_step_limit(state: &AppState) -> Option<f64> {
    let c = &state.config;
    let steps = c.train.max_steps?;
    if c.dataset.packing {
        return None;
    }
    let rows = dataset_rows(state)? as u64;
    let per_epoch = rows.div_ceil(c.train.batch_size.max(1) as u64).div_ceil(c.train.grad_accum.max(1) as u64);
    Some(steps as f64 / per_epoch.max(1) as f64)
}

/// `used` usable rows less the evaluation rows `split` holds out of them, as the session splits.
pub fn training_rows(used: usize, split: Option<&crate::config::EvalSplit>) -> usize {
    match split {
        Some(crate::config::EvalSplit::Fraction(f)) if used >= 2 => used - crate::data::held_out_rows(used, *f),
        _ => used,
    }
}

/// Why there is no plan to show, or `None` when there is one.
pub fn no_plan_reason(state: &AppState) -> Option<&'static str> {
    if planned_model(state).is_none() {
        return Some("The plan appears once the model folder is loaded (or plan for a named shape).");
    }
    let c = &state.config;
    if c.train.batch_size == 0 || c.train.max_seq_len < 2 || c.lora.r == 0 {
        return Some("Fix the marked fields to see the plan.");
    }
    None
}

/// Bring `state.budget.view` up to date with the config: a plan is made only when an input
/// changed. Called at the start of a frame and again by the panel, after the fields it follows
/// have been drawn, so an edit shows in the same frame.
pub fn refresh(state: &mut AppState) {
    if no_plan_reason(state).is_some() {
        state.budget.view = None;
        return;
    }
    let Some((source, spec)) = planned_model(state) else { return };
    let machine = state.budget.machine.ready();
    let target = target(state.budget.card, &state.config, machine);
    let host = machine.and_then(|m| m.host.as_ref());
    let k = key(&source, &state.config, &target, host, dataset_rows(state));
    if state.budget.view.as_ref().is_some_and(|(vk, _)| *vk == k) {
        return;
    }
    let v = view(&spec, &state.config, &target, host, 0);
    state.budget.view = Some((k, v));
}

/// The inputs of the "largest that fits" worker when the current plan has none (or an old one)
/// and no worker is on it: `(key, spec, config, target, dataset rows)`.
pub fn fixes_wanted(state: &AppState) -> Option<(u64, ModelSpec, RunConfig, PlanTarget, Option<usize>)> {
    let (k, _) = state.budget.view.as_ref()?;
    if state.budget.fixes.as_ref().is_some_and(|(fk, _)| fk == k) || state.budget.fixes_pending.is_some() {
        return None;
    }
    let (_, spec) = planned_model(state)?;
    let target = target(state.budget.card, &state.config, state.budget.machine.ready());
    Some((*k, spec, state.config.clone(), target, dataset_rows(state)))
}

/// The newest measured memory of the live run, when the budget is for this machine.
pub fn measured_now(state: &AppState) -> Option<u64> {
    let t = &state.training;
    if !t.phase.is_active() || state.budget.card != Card::ThisMachine || state.budget.shape.is_some() {
        return None;
    }
    t.metrics.last().and_then(|m| m.memory_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn largest_that_fits_stops_at_what_is_useful() {
        // The demo's shape: hidden 128, two KV heads of 32, on a card it fits many times over.
        let spec = tiny();
        let cfg = RunConfig::default();
        let t = target(Card::profile("a100-80"), &cfg_with(DeviceChoice::Auto), None);
        let f = fixes(&spec, &cfg, &t, Some(350));
        assert_eq!(
            (f.batch_cap, f.batch_size),
            (350 / cfg.train.grad_accum, Some(350 / cfg.train.grad_accum)),
            "no step larger than the data"
        );
        assert_eq!(full_rank(&spec, &cfg.lora.targets), 32, "k_proj and v_proj are 64 → 32 wide");
        assert_eq!((f.rank_cap, f.lora_r), (32, Some(32)), "no rank above the linears' own");
        let mut mlp_only = cfg.clone();
        mlp_only.lora.targets = vec![Target::Gate, Target::Down];
        assert_eq!(full_rank(&spec, &mlp_only.lora.targets), 64);
        // Without a dataset read yet, the config's own limit.
        assert_eq!(fixes(&spec, &cfg, &t, None).batch_cap, MAX_BATCH);
    }

    #[test]
    fn largest_batch_counts_only_the_rows_trained_on() {
        // The demo's 350 usable rows with a fifth held out to evaluate on: a step can draw from
        // the 280 left, so the batch search must stop there, not at 350.
        let mut cfg = RunConfig::default();
        cfg.dataset.eval_split = Some(crate::config::EvalSplit::Fraction(0.2));
        let mut state = AppState::new(cfg, None, false, std::env::temp_dir().join("tunestudio-test-settings"));
        state.dataset.view = crate::app::jobs::Load::Ready(crate::app::state::dataset::DatasetView {
            path: "d.jsonl".into(),
            file_kind: "jsonl".into(),
            format: crate::config::DatasetFormat::Alpaca,
            template: "llama-3".into(),
            mask: String::new(),
            refusal: None,
            columns: Vec::new(),
            rows_total: 355,
            rows_used: 350,
            skipped: Vec::new(),
            truncated_rows: 0,
            trained_tokens: 0,
            total_tokens: 0,
            max_seq_len: 512,
            lengths: crate::data::preflight::LengthStats::of(&[], 512),
            previews: Vec::new(),
            held_out: None,
        });
        assert_eq!(dataset_rows(&state), Some(280));
        let t = target(Card::profile("a100-80"), &state.config, None);
        let accum = state.config.train.grad_accum;
        let f = fixes(&tiny(), &state.config, &t, dataset_rows(&state));
        assert_eq!((f.batch_cap, f.batch_size), (280 / accum, Some(280 / accum)));
        // An evaluation file of its own holds none of the dataset's rows out.
        state.config.dataset.eval_split = Some(crate::config::EvalSplit::File("held.jsonl".into()));
        assert_eq!(dataset_rows(&state), Some(350));
        state.config.dataset.eval_split = None;
        assert_eq!(dataset_rows(&state), Some(350));
        // The count is the session's own split, for every size and fraction.
        for n in 2..60 {
            for f in [0.01, 0.1, 0.25, 0.5] {
                let examples = (0..n).map(|row| crate::data::Example { input_ids: vec![1], labels: vec![1], row }).collect();
                let (train, _) = crate::data::split_eval(examples, f, 7).unwrap();
                assert_eq!(training_rows(n, Some(&crate::config::EvalSplit::Fraction(f))), train.len(), "n {n}, fraction {f}");
            }
        }
    }

    fn tiny() -> ModelSpec {
        ModelSpec {
            vocab_size: 1000,
            hidden_size: 64,
            intermediate_size: 128,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 16,
            max_position_embeddings: 512,
            ..ModelSpec::llama3_8b()
        }
    }

    fn cfg_with(device: DeviceChoice) -> RunConfig {
        let mut c = RunConfig::default();
        c.train.device = device;
        c
    }

    fn gpu_machine(others: u64) -> Machine {
        let card = crate::backend::card::CardLimits::from_table("Card", (8, 9), 100, 24 << 30);
        Machine {
            gpu: Some(crate::device::Gpu { card, others_bytes: Some(others), context_bytes: 600 << 20, pci_bus_id: None }),
            no_gpu_reason: String::new(),
            host: Some(HostMemory { total_bytes: 16 << 30, available_bytes: 10 << 30 }),
        }
    }

    #[test]
    fn the_view_is_the_plan_in_stacking_order() {
        let spec = ModelSpec::llama3_8b();
        let mut cfg = RunConfig::default();
        cfg.train.max_seq_len = 2048;
        cfg.memory.checkpointing = CheckpointPolicy::Layer;
        let t = target(Card::profile("rtx4090"), &cfg_with(DeviceChoice::Cpu), None);
        assert_eq!(t.total_bytes, Some(24_564 << 20), "a profile plans on its card whatever the device choice");
        let v = view(&spec, &cfg, &t, None, 0);
        let p = plan::plan(&spec, &PlanInput::from_config(&cfg), &t);
        assert_eq!(v.peak_bytes, p.peak_bytes);
        assert_eq!(v.segments.iter().map(|s| s.bytes).sum::<u64>(), p.peak_bytes, "the segments add up to the peak");
        assert_eq!(v.segments[0].term, Term::CudaContext);
        assert_eq!(v.fits, Some(p.fits));
        let b = bar(&v, None);
        assert_eq!(b.scale_bytes, 24_564 << 20);
        assert!((b.segments.last().unwrap().1 - p.peak_bytes as f32 / (24_564u64 << 20) as f32).abs() < 1e-6);
        assert!(verdict(&v).0.starts_with("Fits: "), "{}", verdict(&v).0);
    }

    /// Another program on the card: its memory is the first segment, ours are unchanged, the
    /// verdict counts it and names it.
    #[test]
    fn other_processes_are_a_segment_of_their_own() {
        let spec = ModelSpec::llama3_8b();
        let mut cfg = cfg_with(DeviceChoice::Auto);
        cfg.train.max_seq_len = 2048;
        cfg.memory.checkpointing = CheckpointPolicy::Layer;
        let idle = view(&spec, &cfg, &target(Card::ThisMachine, &cfg, Some(&gpu_machine(0))), None, 0);
        let busy = view(&spec, &cfg, &target(Card::ThisMachine, &cfg, Some(&gpu_machine(10 << 30))), None, 0);
        assert_eq!(busy.segments[0].term, Term::OtherProcesses);
        assert_eq!((busy.segments[0].label, busy.segments[0].bytes), ("used by other processes", 10 << 30));
        assert_eq!(&busy.segments[1..], &idle.segments[..], "our own terms are those of the idle card");
        assert_eq!(busy.peak_bytes, idle.peak_bytes);
        let (line, _) = verdict(&busy);
        assert!(line.contains("14.00 GiB free") && line.contains("10.00 GiB used by other processes"), "{line}");
        let b = bar(&busy, None);
        assert!((b.segments[0].1 - 10.0 / 24.0).abs() < 1e-6, "other processes stack first: {:?}", b.segments[0]);
        // A cap: the verdict names it, and the bar marks it where our memory starts plus the cap.
        cfg.memory.gpu_mem = Some(crate::config::ByteSize(8 << 30));
        let capped = view(&spec, &cfg, &target(Card::ThisMachine, &cfg, Some(&gpu_machine(10 << 30))), None, 0);
        assert_eq!(capped.available_bytes, Some(8 << 30));
        assert!(verdict(&capped).0.contains("the 8.00 GiB cap"), "{}", verdict(&capped).0);
        assert!((bar(&capped, None).cap_at.unwrap() - 18.0 / 24.0).abs() < 1e-6);
    }

    /// The picker's cards are the profiles; one the engine cannot run says so instead of a plan.
    #[test]
    fn every_profile_is_a_card_to_plan_for_and_old_ones_say_why_not() {
        let spec = ModelSpec::llama3_8b();
        let cfg = RunConfig::default();
        for p in crate::backend::card::PROFILES {
            let v = view(&spec, &cfg, &target(Card::Profile(p), &cfg, None), None, 0);
            let (line, good) = verdict(&v);
            assert_eq!(v.total_bytes, Some(p.memory_mib << 20), "{}", p.key);
            if p.supported() {
                assert!(v.refusal.is_none() && !profile_label(p).contains("cannot run"), "{}", p.key);
                assert!(line.contains(p.name), "{line}");
            } else {
                assert!(!good && line.starts_with(&format!("Cannot train on {}", p.name)) && line.contains("bf16"), "{line}");
                assert!(profile_label(p).ends_with("(cannot run)") && profile_help(p).contains("compute capability"), "{}", p.key);
            }
        }
        let label = |k| profile_label(crate::backend::card::profile_named(k).unwrap());
        assert_eq!(
            (label("rtx4090"), label("l4"), label("t4")),
            ("RTX 4090 · 24 GiB".into(), "L4 · 22.5 GiB".into(), "Tesla T4 · 15 GiB (cannot run)".into())
        );
    }

    #[test]
    fn an_overflowing_plan_and_a_larger_measurement_stay_on_the_bar() {
        let spec = ModelSpec::llama3_8b();
        let mut cfg = RunConfig::default();
        cfg.train.max_seq_len = 32768;
        cfg.train.batch_size = 8;
        cfg.memory.checkpointing = CheckpointPolicy::None;
        let v = view(&spec, &cfg, &target(Card::profile("rtx3060"), &cfg, None), None, 0);
        assert_eq!(v.fits, Some(false));
        let (line, good) = verdict(&v);
        assert!(!good && line.starts_with("Does not fit: needs"), "{line}");
        let b = bar(&v, None);
        assert_eq!(b.scale_bytes, v.peak_bytes);
        assert!((b.segments.last().unwrap().1 - 1.0).abs() < 1e-6);
        assert!(b.total_at.unwrap() < 1.0);
        let m = bar(&v, Some(v.peak_bytes * 2));
        assert_eq!(m.measured_at, Some(1.0));
    }

    #[test]
    fn this_machine_follows_the_device_choice() {
        let gpu = gpu_machine(4 << 30);
        let t = target(Card::ThisMachine, &cfg_with(DeviceChoice::Auto), Some(&gpu));
        assert_eq!(
            (t.kind, t.available_bytes(), t.context_bytes),
            (BackendKind::Cuda, Some(20 << 30), 600 << 20),
            "the measured context of this card"
        );
        let t = target(Card::ThisMachine, &cfg_with(DeviceChoice::Cpu), Some(&gpu));
        assert_eq!((t.kind, t.total_bytes, t.available_bytes()), (BackendKind::Cpu, Some(16 << 30), Some(10 << 30)));
        let cpu_only = Machine { gpu: None, no_gpu_reason: "no driver".into(), host: gpu.host.clone() };
        let t = target(Card::ThisMachine, &cfg_with(DeviceChoice::Auto), Some(&cpu_only));
        assert_eq!(t.kind, BackendKind::Cpu);
        let v = view(&tiny(), &RunConfig::default(), &t, cpu_only.host.as_ref(), 0);
        assert!(verdict(&v).0.contains("in RAM"), "{}", verdict(&v).0);
    }

    #[test]
    fn offload_shows_the_host_memory_it_pins() {
        let spec = ModelSpec::llama3_8b();
        let mut cfg = RunConfig::default();
        cfg.train.max_seq_len = 8192;
        cfg.memory.checkpointing = CheckpointPolicy::Offload;
        let host = HostMemory { total_bytes: 64 << 30, available_bytes: 2 << 30 };
        let machine = Machine { gpu: None, no_gpu_reason: "none".into(), host: Some(host.clone()) };
        let t = target(Card::profile("rtx4090"), &cfg, Some(&machine));
        assert_eq!(t.host_bytes, Some(2 << 30), "a profiled card is previewed in this machine");
        let v = view(&spec, &cfg, &t, Some(&host), 0);
        assert!(v.pinned_host_bytes > 2 << 30, "{}", v.pinned_host_bytes);
        assert_eq!(v.fits, Some(false), "the pinned memory does not fit the RAM available");
        assert!(verdict(&v).0.contains("pinned host memory"), "{}", verdict(&v).0);
        // "Largest that fits" is bounded by the RAM too: the offload run is shortened until its
        // pinned layer inputs fit the 2 GiB available (the memory-mode embedding takes 1 GiB of it).
        let f = fixes(&spec, &cfg, &t, None);
        let mut c = cfg.clone();
        apply(&mut c, Setting::MaxSeqLen, f.max_seq_len.expect("a short run fits"));
        let shorter = view(&spec, &c, &t, Some(&host), 0);
        assert!(shorter.fits == Some(true) && shorter.pinned_host_bytes <= 2 << 30, "{shorter:?}");
    }

    #[test]
    fn fixes_are_the_boundaries_and_apply_sets_them() {
        let spec = ModelSpec::llama3_8b();
        let mut cfg = RunConfig::default();
        cfg.train.max_seq_len = 256;
        cfg.train.batch_size = 8;
        cfg.memory.checkpointing = CheckpointPolicy::Layer;
        let t = target(Card::profile("rtx3060"), &cfg, None);
        let f = fixes(&spec, &cfg, &t, None);
        assert_eq!(f.seq_cap, spec.max_position_embeddings);
        let fits = |c: &RunConfig| view(&spec, c, &t, None, 0).fits == Some(true);
        // The sequence length is rounded down to a multiple of 64, the others are exact.
        for (setting, v, step, cap) in [
            (Setting::MaxSeqLen, f.max_seq_len.unwrap(), 64, f.seq_cap),
            (Setting::BatchSize, f.batch_size.unwrap(), 1, f.batch_cap),
            (Setting::LoraRank, f.lora_r.unwrap(), 1, f.rank_cap),
        ] {
            let mut c = cfg.clone();
            apply(&mut c, setting, v);
            assert!(fits(&c), "{setting:?} = {v} fits");
            assert!(v < cap, "{setting:?}: a 12 GB card has a limit below {cap}");
            apply(&mut c, setting, v + step);
            assert!(!fits(&c), "{setting:?} = {} does not", v + step);
        }
    }
}
