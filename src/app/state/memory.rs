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

use crate::config::{CheckpointPolicy, DeviceChoice, RunConfig, Target};
use crate::engine::plan::{self, BackendKind, PlanInput, PlanTarget, Term, largest_fitting, suggestions};
use crate::model::ModelSpec;
use crate::util::fmt_bytes;

use crate::app::jobs::{Load, key_of};
use crate::app::state::AppState;

/// The cards the picker offers, in GB as sold (each taken as that many GiB).
pub const CARD_PRESETS_GB: [u32; 7] = [8, 12, 16, 24, 40, 48, 80];

/// Which machine the budget is planned for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Card {
    /// Where the run would train now (as `train.device` and the detected GPU decide).
    #[default]
    ThisMachine,
    /// A card of this many GB (another machine).
    Preset(u32),
}

impl Card {
    pub fn label(self, machine: Option<&Machine>) -> String {
        match self {
            Card::Preset(gb) => format!("{gb} GB card"),
            Card::ThisMachine => match machine {
                None => "this machine (looking…)".into(),
                Some(m) => match &m.gpu {
                    Some(g) => format!("this machine: {} ({})", g.name, fmt_bytes(g.total_bytes)),
                    None => format!(
                        "this machine: CPU{}",
                        m.host.as_ref().map(|h| format!(" ({} RAM)", fmt_bytes(h.total_bytes))).unwrap_or_default()
                    ),
                },
            },
        }
    }

    /// Cards people train on with that much memory, for the picker's hover text.
    pub fn examples(gb: u32) -> &'static str {
        match gb {
            8 => "RTX 3070, RTX 4060",
            12 => "RTX 3060, RTX 4070",
            16 => "RTX 4080, T4, V100 16GB",
            24 => "RTX 3090, RTX 4090, A10, L4",
            40 => "A100 40GB",
            48 => "RTX A6000, L40S",
            80 => "A100 80GB, H100",
            _ => "",
        }
    }
}

pub use crate::backend::{HostMemory, host_memory};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpu {
    pub name: String,
    pub total_bytes: u64,
    /// Free before our own context (what a run could have).
    pub free_bytes: u64,
    /// What a run's context takes on this card (measured by an earlier run, else the default).
    pub context_bytes: u64,
}

/// What this machine has: probed once on a worker when the studio opens.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Machine {
    pub gpu: Option<Gpu>,
    /// Why there is no GPU (shown in the hover text).
    pub no_gpu_reason: String,
    pub host: Option<HostMemory>,
}

/// Look for a GPU (creates and drops a CUDA context: a worker's job) and read the host's memory.
pub fn probe_machine() -> Machine {
    let host = host_memory();
    match crate::backend::cuda::probe() {
        Ok(d) => {
            let total = d.total_memory_bytes.unwrap_or(0);
            let free = crate::backend::cuda::free_for_run(&d).unwrap_or(total);
            let context_bytes = crate::backend::cuda::planned_context_bytes(&d.name);
            Machine {
                gpu: Some(Gpu { name: d.name, total_bytes: total, free_bytes: free, context_bytes }),
                no_gpu_reason: String::new(),
                host,
            }
        }
        Err(e) => Machine { gpu: None, no_gpu_reason: e.to_string(), host },
    }
}

/// The plan target for `card`: a preset card, or what the session would train on here. A
/// card's pinned host memory is held against this machine's RAM (a preset previews the card in
/// this machine).
pub fn target(card: Card, device: DeviceChoice, machine: Option<&Machine>) -> PlanTarget {
    let host = machine.and_then(|m| m.host.as_ref());
    match card {
        Card::Preset(gb) => {
            let article = if gb == 8 || gb == 18 || (80..90).contains(&gb) { "an" } else { "a" };
            PlanTarget::gpu(&format!("{article} {gb} GB card"), u64::from(gb) << 30).with_host(host)
        }
        Card::ThisMachine => match (device, machine.and_then(|m| m.gpu.as_ref())) {
            (DeviceChoice::Auto | DeviceChoice::Cuda, Some(g)) => {
                PlanTarget { free_bytes: Some(g.free_bytes), context_bytes: g.context_bytes, ..PlanTarget::gpu(&g.name, g.total_bytes) }
                    .with_host(host)
            }
            _ => cpu_target(host),
        },
    }
}

/// The target of a run already loaded on `device` (the session's own choice, which `auto` may
/// have resolved either way).
pub fn device_target(device: &crate::backend::DeviceInfo, machine: Option<&Machine>) -> PlanTarget {
    match (device.kind.as_str(), device.total_memory_bytes) {
        ("cuda", Some(total)) => {
            let probed = machine.and_then(|m| m.gpu.as_ref()).filter(|g| g.name == device.name);
            let free = probed.map_or(total, |g| g.free_bytes);
            let context_bytes = probed.map_or(plan::DEFAULT_CUDA_CONTEXT_BYTES, |g| g.context_bytes);
            PlanTarget { free_bytes: Some(free), context_bytes, ..PlanTarget::gpu(&device.name, total) }
                .with_host(machine.and_then(|m| m.host.as_ref()))
        }
        _ => cpu_target(machine.and_then(|m| m.host.as_ref())),
    }
}

/// The CPU backend keeps everything in RAM: the plan is held against the host's memory.
fn cpu_target(host: Option<&HostMemory>) -> PlanTarget {
    PlanTarget {
        name: "CPU".into(),
        total_bytes: host.map(|h| h.total_bytes),
        free_bytes: host.map(|h| h.available_bytes),
        ..PlanTarget::cpu()
    }
}

/// The stacking order and colour of each term (fixed, so a colour keeps its meaning while
/// sliders move).
pub const TERMS: [(Term, &str, Color32); 9] = [
    (Term::CudaContext, "CUDA context", Color32::from_rgb(130, 130, 140)),
    (Term::BaseWeights, "base weights", Color32::from_rgb(86, 156, 214)),
    (Term::LoraParams, "LoRA weights", Color32::from_rgb(120, 190, 120)),
    (Term::LoraGrads, "LoRA gradients", Color32::from_rgb(90, 160, 90)),
    (Term::OptimizerStates, "AdamW states", Color32::from_rgb(200, 200, 110)),
    (Term::SavedActivations, "saved activations", Color32::from_rgb(214, 157, 86)),
    (Term::LayerActivations, "layer activations", Color32::from_rgb(230, 120, 90)),
    (Term::Workspace, "workspace", Color32::from_rgb(190, 120, 190)),
    (Term::BackendWorkspace, "kernel scratch", Color32::from_rgb(120, 190, 200)),
];

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
    /// "NVIDIA H100 80GB HBM3", "a 24 GB card" or "CPU".
    pub device: String,
    pub on_gpu: bool,
    /// The policy the plan used (`auto` resolved), and whether it was resolved from auto.
    pub checkpointing: CheckpointPolicy,
    /// The policy in words, with the layers kept when `auto` kept only some.
    pub checkpointing_label: String,
    pub auto: bool,
    /// Non-empty terms in stacking order.
    pub segments: Vec<Segment>,
    /// What must fit: device bytes (on the CPU, everything, pinned included).
    pub peak_bytes: u64,
    pub total_bytes: Option<u64>,
    pub free_bytes: Option<u64>,
    /// Layer inputs (and, in memory mode, the embedding) in pinned host memory; 0 on the CPU.
    pub pinned_host_bytes: u64,
    pub host: Option<HostMemory>,
    /// `None` when nothing is known to hold it against.
    pub fits: Option<bool>,
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
            p.terms.get(term.name()).filter(|&&b| b > 0).map(|&bytes| Segment { term, label, color, bytes })
        })
        .collect();
    // On the CPU "pinned host" is the same RAM as everything else. On a card, the plan holds
    // the device bytes against the card and the pinned bytes against the target's host RAM.
    let (peak, pinned) = if on_gpu { (p.peak_bytes, p.pinned_host_bytes) } else { (p.peak_bytes + p.pinned_host_bytes, 0) };
    let fits = target.free_bytes.map(|free| if on_gpu { p.fits } else { peak <= free });
    BudgetView {
        device: target.name.clone(),
        on_gpu,
        checkpointing: p.checkpointing,
        checkpointing_label: p.checkpointing_label(spec),
        auto: cfg.memory.checkpointing == CheckpointPolicy::Auto,
        segments,
        peak_bytes: peak,
        total_bytes: target.total_bytes,
        free_bytes: target.free_bytes,
        pinned_host_bytes: pinned,
        host: host.cloned(),
        fits,
    }
}

/// The verdict line and whether it is good news.
pub fn verdict(v: &BudgetView) -> (String, bool) {
    let what = if v.on_gpu { format!("on {}", v.device) } else { "in RAM (CPU training)".to_string() };
    let free_word = if v.on_gpu && v.free_bytes != v.total_bytes {
        "free"
    } else if v.on_gpu {
        ""
    } else {
        "available"
    };
    let of = |free: u64| if free_word.is_empty() { fmt_bytes(free) } else { format!("{} {free_word}", fmt_bytes(free)) };
    match (v.fits, v.free_bytes) {
        (Some(true), Some(free)) => (
            format!("Fits: {} of {} {what} ({} to spare)", fmt_bytes(v.peak_bytes), of(free), fmt_bytes(free - v.peak_bytes.min(free))),
            true,
        ),
        (Some(false), Some(free)) if v.peak_bytes > free => (
            format!("Does not fit: needs {}, {} {what} ({} over)", fmt_bytes(v.peak_bytes), of(free), fmt_bytes(v.peak_bytes - free)),
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
    pub segments: Vec<(f32, f32)>,
    pub free_at: Option<f32>,
    pub total_at: Option<f32>,
    pub measured_at: Option<f32>,
}

pub fn bar(v: &BudgetView, measured: Option<u64>) -> Bar {
    let scale = v.total_bytes.unwrap_or(0).max(v.peak_bytes).max(measured.unwrap_or(0)).max(1);
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
    Bar {
        scale_bytes: scale,
        segments,
        free_at: v.free_bytes.filter(|fr| Some(*fr) != v.total_bytes).map(f),
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

/// The dataset's usable rows, when the preview has read them.
fn dataset_rows(state: &AppState) -> Option<usize> {
    state.dataset.view.ready().map(|v| v.rows_used).filter(|&r| r > 0)
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
    let target = target(state.budget.card, state.config.train.device, machine);
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
    let target = target(state.budget.card, state.config.train.device, state.budget.machine.ready());
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
        let t = target(Card::Preset(80), DeviceChoice::Auto, None);
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

    #[test]
    fn the_view_is_the_plan_in_stacking_order() {
        let spec = ModelSpec::llama3_8b();
        let mut cfg = RunConfig::default();
        cfg.train.max_seq_len = 2048;
        cfg.memory.checkpointing = CheckpointPolicy::Layer;
        let t = target(Card::Preset(24), DeviceChoice::Cpu, None);
        assert_eq!(t.total_bytes, Some(24 << 30));
        let v = view(&spec, &cfg, &t, None, 0);
        let p = plan::plan(&spec, &PlanInput::from_config(&cfg), &t);
        assert_eq!(v.peak_bytes, p.peak_bytes);
        assert_eq!(v.segments.iter().map(|s| s.bytes).sum::<u64>(), p.peak_bytes, "the segments add up to the peak");
        assert_eq!(v.segments[0].term, Term::CudaContext);
        assert_eq!(v.fits, Some(p.fits));
        let b = bar(&v, None);
        assert_eq!(b.scale_bytes, 24 << 30);
        assert!((b.segments.last().unwrap().1 - p.peak_bytes as f32 / (24u64 << 30) as f32).abs() < 1e-6);
        assert!(verdict(&v).0.starts_with("Fits: "), "{}", verdict(&v).0);
    }

    #[test]
    fn an_overflowing_plan_and_a_larger_measurement_stay_on_the_bar() {
        let spec = ModelSpec::llama3_8b();
        let mut cfg = RunConfig::default();
        cfg.train.max_seq_len = 32768;
        cfg.train.batch_size = 8;
        cfg.memory.checkpointing = CheckpointPolicy::None;
        let v = view(&spec, &cfg, &target(Card::Preset(8), DeviceChoice::Auto, None), None, 0);
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
        let host = HostMemory { total_bytes: 16 << 30, available_bytes: 10 << 30 };
        let gpu = Machine {
            gpu: Some(Gpu { name: "Card".into(), total_bytes: 24 << 30, free_bytes: 20 << 30, context_bytes: 600 << 20 }),
            no_gpu_reason: String::new(),
            host: Some(host.clone()),
        };
        let t = target(Card::ThisMachine, DeviceChoice::Auto, Some(&gpu));
        assert_eq!(
            (t.kind, t.free_bytes, t.context_bytes),
            (BackendKind::Cuda, Some(20 << 30), 600 << 20),
            "the measured context of this card"
        );
        let t = target(Card::ThisMachine, DeviceChoice::Cpu, Some(&gpu));
        assert_eq!((t.kind, t.total_bytes, t.free_bytes), (BackendKind::Cpu, Some(16 << 30), Some(10 << 30)));
        let cpu_only = Machine { gpu: None, no_gpu_reason: "no driver".into(), host: Some(host) };
        let t = target(Card::ThisMachine, DeviceChoice::Auto, Some(&cpu_only));
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
        let t = target(Card::Preset(24), DeviceChoice::Auto, Some(&machine));
        assert_eq!(t.host_bytes, Some(2 << 30), "a preset card is previewed in this machine");
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
        let t = target(Card::Preset(8), DeviceChoice::Auto, None);
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
            assert!(v < cap, "{setting:?}: an 8 GB card has a limit below {cap}");
            apply(&mut c, setting, v + step);
            assert!(!fits(&c), "{setting:?} = {} does not", v + step);
        }
    }
}
