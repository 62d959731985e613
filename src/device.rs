//! Where a run trains, and what its memory plan is for.
//!
//! The device choice (`train.device`: auto, cpu, cuda), a card profile (`--card`,
//! `TUNESTUDIO_CARD`) and a memory cap (`--gpu-mem`, `memory.gpu_mem`) meet this machine here, in
//! two functions every caller shares:
//! - [`plan_target`], the one constructor of the memory plan's `PlanTarget`: the card (or the
//!   profile's), what other processes hold on it (NVML), the measured CUDA context, the cap and the
//!   host's RAM. The session, `plan`, `bench`, the preflight and the studio's budget all call it,
//!   so they do the same arithmetic.
//! - [`open`], which opens the backend a request asks for and never falls back to the CPU in
//!   silence: when CUDA was asked for, or `auto` found a card, and the CUDA engine cannot start,
//!   the caller gets the reason ([`Unavailable`]) and decides (the CLI exits with it unless
//!   `--device auto` allows the CPU; the studio's preflight offers the CPU as a choice).
//!
//! This module sits above `engine::plan` and `backend`; neither imports it.

use crate::backend::card::{self, CardLimits, CardProfile};
use crate::backend::cuda::{self, CudaBackend, CudaOptions};
use crate::backend::{DeviceInfo, HostMemory};
use crate::config::{DeviceChoice, RunConfig};
use crate::engine::plan::{BackendKind, DEFAULT_CUDA_CONTEXT_BYTES, PlanTarget};
use crate::error::{Error, Result};
use crate::util::fmt_bytes;

/// What a run (or a plan) asks for: where, as which card, under which cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Request {
    pub device: DeviceChoice,
    /// Decide and plan as this card (`--card`, `TUNESTUDIO_CARD`); implies CUDA.
    pub card: Option<&'static CardProfile>,
    /// A hard cap on our process's device memory, context included.
    pub memory_cap: Option<u64>,
}

impl Request {
    /// The request of a run config, with the profile given on the command line (`card`) or, when
    /// none is, by `TUNESTUDIO_CARD`. `Err` names the variable's bad value.
    pub fn of_config(cfg: &RunConfig, card: Option<&'static CardProfile>) -> Result<Self> {
        let card = match card {
            Some(p) => Some(p),
            None => card::profile_from_env().map_err(|e| Error::op("the card profile", e))?,
        };
        Ok(Request { device: cfg.train.device, card, memory_cap: cfg.memory.gpu_mem.map(|b| b.bytes()) })
    }

    /// Whether CUDA was asked for outright (a profile names a GPU).
    pub fn wants_cuda(&self) -> bool {
        self.device == DeviceChoice::Cuda || self.card.is_some()
    }
}

/// A GPU of this machine, as plans see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gpu {
    /// Its limits: the device's own, or a profile's when a backend runs as one.
    pub card: CardLimits,
    /// Held by other processes and the driver, when known (NVML, or the driver's free memory).
    pub others_bytes: Option<u64>,
    /// What a run's CUDA context takes on it: measured by an earlier backend, else the default.
    pub context_bytes: u64,
    /// NVML's name of the card (for telemetry).
    pub pci_bus_id: Option<String>,
}

impl Gpu {
    /// The card `cuda::probe` found. Without NVML, other processes are what the driver does not
    /// report free, less the probe's own context.
    pub fn from_probe(d: &DeviceInfo, context_bytes: u64) -> Option<Gpu> {
        let card = d.card.clone()?;
        let total = d.total_memory_bytes.unwrap_or(card.memory_bytes);
        let others = d.others_bytes.or_else(|| {
            d.free_memory_bytes
                .map(|free| total.saturating_sub(free).saturating_sub(DEFAULT_CUDA_CONTEXT_BYTES.min(total - free.min(total))))
        });
        Some(Gpu { card, others_bytes: others, context_bytes, pci_bus_id: d.pci_bus_id.clone() })
    }

    /// The card an open CUDA backend runs on (a profile's limits under one), with what other
    /// processes hold on it now: NVML's count, else the card's use less our context and buffers.
    pub fn of_backend(be: &CudaBackend) -> Gpu {
        let d = crate::backend::Backend::device(be);
        let context_bytes = be.context_bytes().unwrap_or_else(|| cuda::planned_context_bytes(&be.card().name));
        let nvml = d.pci_bus_id.as_deref().and_then(crate::backend::nvml::card_memory);
        let others = match nvml {
            Some(m) => Some(m.others_bytes()),
            None => be.device_memory_in_use().ok().map(|used| used.saturating_sub(context_bytes + be.memory_used() as u64)),
        };
        Gpu { card: be.card().clone(), others_bytes: others, context_bytes, pci_bus_id: d.pci_bus_id }
    }
}

/// What this machine has: its GPU (or why there is none) and its RAM.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Machine {
    pub gpu: Option<Gpu>,
    /// Why there is no GPU (empty when there is one).
    pub no_gpu_reason: String,
    pub host: Option<HostMemory>,
}

/// Look for a GPU (creates and drops a CUDA context: a worker's job, not a frame's) and read the
/// host's memory.
pub fn probe_machine() -> Machine {
    let host = crate::backend::host_memory();
    match cuda::probe() {
        Ok(d) => {
            let context = cuda::planned_context_bytes(&d.name);
            match Gpu::from_probe(&d, context) {
                Some(gpu) => Machine { gpu: Some(gpu), no_gpu_reason: String::new(), host },
                None => Machine { gpu: None, no_gpu_reason: "the driver did not report the card's limits".into(), host },
            }
        }
        Err(e) => Machine { gpu: None, no_gpu_reason: e.to_string(), host },
    }
}

/// The plan target of `req` on `machine`: the one place the card, other processes, the context,
/// the cap and the host meet.
///
/// - `cpu` (or `auto` with no GPU and no profile): the host's RAM; what other processes use of
///   it is their term.
/// - A profile: that card as if idle (the processes on this machine's card are not on it), with
///   this machine's measured context (the same driver) or the default.
/// - This machine's card: its memory, what other processes hold on it, its measured context.
/// - CUDA asked for with no GPU here: a card of the cap's size, or one of unknown size.
///
/// A card's pinned host memory is held against this machine's RAM; the cap applies to every GPU
/// target.
pub fn plan_target(req: &Request, machine: &Machine) -> PlanTarget {
    let host = machine.host.as_ref();
    let gpu = machine.gpu.as_ref();
    let on_gpu = match req.device {
        DeviceChoice::Cpu => false,
        DeviceChoice::Cuda => true,
        DeviceChoice::Auto => gpu.is_some() || req.card.is_some(),
    };
    if !on_gpu {
        return PlanTarget {
            total_bytes: host.map(|h| h.total_bytes),
            others_bytes: host.map_or(0, |h| h.total_bytes.saturating_sub(h.available_bytes)),
            ..PlanTarget::cpu()
        };
    }
    let card_target = |card: CardLimits, others: u64, context: u64| PlanTarget {
        kind: BackendKind::Cuda,
        name: match card.profile {
            Some(p) => format!("{} (profile {p})", card.name),
            None => card.name.clone(),
        },
        total_bytes: Some(card.memory_bytes),
        card: Some(card),
        others_bytes: others,
        cap_bytes: req.memory_cap,
        context_bytes: context,
        host_bytes: None,
    };
    let target = match (req.card, gpu) {
        (Some(p), g) => card_target(p.limits(), 0, g.map_or(DEFAULT_CUDA_CONTEXT_BYTES, |g| g.context_bytes)),
        (None, Some(g)) => {
            // A backend running as a profile reports the profile's limits: its card is not this one.
            let others = if g.card.profile.is_some() { 0 } else { g.others_bytes.unwrap_or(0) };
            card_target(g.card.clone(), others, g.context_bytes)
        }
        (None, None) => match req.memory_cap {
            Some(cap) => PlanTarget { cap_bytes: Some(cap), ..PlanTarget::gpu(&format!("a {} card", fmt_bytes(cap)), cap) },
            None => PlanTarget { total_bytes: None, ..PlanTarget::gpu("no GPU detected", 0) },
        },
    };
    target.with_host(host)
}

/// Why the CUDA engine cannot start for a request that wanted it: CUDA was asked for, or `auto`
/// found a card.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unavailable {
    pub device: DeviceChoice,
    /// The card found, described, when there is one.
    pub card: Option<String>,
    /// What went wrong, as the backend said it.
    pub reason: String,
}

impl Unavailable {
    /// One line: what was asked, what is wrong, what to do.
    pub fn message(&self) -> String {
        let what = match (&self.card, self.device) {
            (Some(c), DeviceChoice::Auto) => format!("train.device is auto and found {c}, but the CUDA engine cannot start on it"),
            (Some(c), _) => format!("the CUDA engine cannot start on {c}"),
            (None, _) => "CUDA was asked for, but there is no usable CUDA device".to_string(),
        };
        format!("{what}: {}", self.reason_and_advice())
    }

    /// The reason, then what to do.
    fn reason_and_advice(&self) -> String {
        let auto = if self.device == DeviceChoice::Auto { ", or let --device auto fall back to it" } else { "" };
        format!("{}. To train on the CPU instead, set train.device = \"cpu\" (--device cpu){auto}", self.reason.trim_end_matches('.'))
    }

    /// The error a run stops with (its kind names the card, or says there is no CUDA device).
    pub fn into_error(self) -> Error {
        let msg = self.reason_and_advice();
        match self.card {
            Some(card) => Error::Card { card, msg },
            None => Error::NoCuda(msg),
        }
    }
}

/// The backend a request opened.
pub enum Opened {
    Cuda(Box<CudaBackend>),
    /// The CPU: asked for, or `auto` with no GPU on this machine (`note` says why), or `auto`
    /// falling back where allowed (`fallback` holds the reason, to say in the run's first lines).
    Cpu {
        note: Option<String>,
        fallback: Option<Unavailable>,
    },
}

/// The error text of a backend that did not open, without the error kind's own prefix.
fn reason_of(e: &Error) -> String {
    match e {
        Error::Card { msg, .. } => msg.clone(),
        Error::NoCuda(m) => m.clone(),
        other => other.to_string(),
    }
}

/// Open what `req` asks for. `cpu_fallback`: `auto` may train on the CPU when it found a card the
/// engine cannot start on (the CLI's explicit `--device auto`); otherwise that is an
/// [`Unavailable`] for the caller to show.
pub fn open(req: &Request, cpu_fallback: bool) -> std::result::Result<Opened, Unavailable> {
    if req.device == DeviceChoice::Cpu {
        return Ok(Opened::Cpu { note: None, fallback: None });
    }
    // A profile of a card the engine cannot run is refused by its own name, GPU or not.
    // A profile asks for CUDA outright: its refusal is never `auto`'s to fall back from.
    let asked = if req.wants_cuda() { DeviceChoice::Cuda } else { req.device };
    if let Some(refusal) = req.card.and_then(|p| p.limits().check_supported().err()) {
        return Err(Unavailable { device: asked, card: Some(refusal.card), reason: refusal.reason });
    }
    let found = cuda::probe();
    if let (Err(e), false) = (&found, req.wants_cuda()) {
        // `auto` without a GPU: the CPU is what auto means.
        return Ok(Opened::Cpu { note: Some(format!("no usable GPU: {}", reason_of(e))), fallback: None });
    }
    let card_of = |d: &DeviceInfo| {
        let mut limits = d.card.clone()?;
        if let Some(p) = req.card {
            limits = card::emulate(p, &limits);
        }
        Some(limits.describe())
    };
    let card = found.as_ref().ok().and_then(card_of);
    let opened = CudaBackend::with_options(&CudaOptions { card: req.card, memory_limit_bytes: req.memory_cap });
    match opened {
        Ok(be) => Ok(Opened::Cuda(Box::new(be))),
        Err(e) => {
            let card = match &e {
                Error::Card { card, .. } => Some(card.clone()),
                _ => card,
            };
            let why = Unavailable { device: asked, card, reason: reason_of(&e) };
            if why.device == DeviceChoice::Auto && why.card.is_some() && cpu_fallback {
                Ok(Opened::Cpu { note: None, fallback: Some(why) })
            } else {
                Err(why)
            }
        }
    }
}

/// Where a run of `req` would train, checked by opening the backend (and closing it): what the
/// preflight reports before Start.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeviceCheck {
    pub requested: DeviceChoice,
    /// The profile the run decides as, if any.
    pub card_profile: Option<String>,
    pub memory_cap_bytes: Option<u64>,
    /// `cuda` or `cpu`; `None` when the run cannot start.
    pub trains_on: Option<String>,
    /// The card, described ("NVIDIA L4 (compute capability 8.9, 22 GiB)"), or "CPU".
    pub device: String,
    /// Why `auto` chose the CPU (no GPU here).
    pub note: Option<String>,
    /// Why the CUDA engine cannot start, with what to do (one line); the CPU is the way out.
    pub refusal: Option<String>,
}

pub fn check(req: &Request) -> DeviceCheck {
    let base = DeviceCheck {
        requested: req.device,
        card_profile: req.card.map(|p| p.key.to_string()),
        memory_cap_bytes: req.memory_cap,
        trains_on: None,
        device: String::new(),
        note: None,
        refusal: None,
    };
    match open(req, false) {
        Ok(Opened::Cuda(be)) => DeviceCheck { trains_on: Some("cuda".into()), device: be.card().describe(), ..base },
        Ok(Opened::Cpu { note, .. }) => DeviceCheck { trains_on: Some("cpu".into()), device: "CPU".into(), note, ..base },
        Err(u) => {
            DeviceCheck { device: u.card.clone().unwrap_or_else(|| "no usable CUDA device".into()), refusal: Some(u.message()), ..base }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::plan::{self, PlanInput};
    use crate::model::ModelSpec;

    const GIB: u64 = 1 << 30;

    fn h200(others: u64) -> Machine {
        let card = card::profile_named("h200").unwrap().limits();
        let card = CardLimits { profile: None, ..card };
        Machine {
            gpu: Some(Gpu { card, others_bytes: Some(others), context_bytes: 600 << 20, pci_bus_id: None }),
            no_gpu_reason: String::new(),
            host: Some(HostMemory { total_bytes: 128 * GIB, available_bytes: 100 * GIB }),
        }
    }

    fn input(seq: usize) -> PlanInput {
        let mut cfg = RunConfig::default();
        cfg.lora.r = 32;
        cfg.train.batch_size = 1;
        cfg.train.max_seq_len = seq;
        cfg.memory.checkpointing = crate::config::CheckpointPolicy::Layer;
        PlanInput::from_config(&cfg)
    }

    #[test]
    fn other_processes_are_their_own_term_and_leave_ours_as_on_an_idle_card() {
        let spec = ModelSpec::llama3_8b();
        let req = Request { device: DeviceChoice::Auto, ..Default::default() };
        let idle = plan::plan(&spec, &input(2048), &plan_target(&req, &h200(0)));
        let busy = plan::plan(&spec, &input(2048), &plan_target(&req, &h200(10 * GIB)));
        let ours = |p: &plan::MemoryPlan| {
            let mut t = p.terms.clone();
            t.remove("other_processes");
            t
        };
        assert_eq!(ours(&busy), ours(&idle), "our own terms do not see the other process");
        assert_eq!(busy.peak_bytes, idle.peak_bytes);
        assert_eq!(busy.terms.get("other_processes"), Some(&(10 * GIB)));
        assert_eq!(idle.terms.get("other_processes"), None);
        assert_eq!(busy.terms["cuda_context"], 600 << 20, "the measured context");
        // The verdict accounts for it: a run that needs most of the card fits only when idle.
        let t = plan_target(&req, &h200(0));
        let seq = plan::largest_fitting(&spec, &input(2048), &t, 64, 1 << 20, |i, v| i.max_seq_len = v).unwrap();
        let at = |others| plan::plan(&spec, &input(seq), &plan_target(&req, &h200(others)));
        assert!(at(0).fits && !at(10 * GIB).fits);
        assert_eq!(plan_target(&req, &h200(10 * GIB)).available_bytes(), Some(t.total_bytes.unwrap() - 10 * GIB));
    }

    #[test]
    fn a_cap_bounds_what_we_may_take_and_a_profile_is_that_card_idle() {
        let req = Request { device: DeviceChoice::Auto, card: None, memory_cap: Some(24 * GIB) };
        let t = plan_target(&req, &h200(10 * GIB));
        assert_eq!((t.cap_bytes, t.available_bytes()), (Some(24 * GIB), Some(24 * GIB)));
        let crowded = plan_target(&req, &h200(130 * GIB));
        assert!(crowded.available_bytes().unwrap() < 24 * GIB, "the card's room, when smaller than the cap");

        let l4 = card::profile_named("l4").unwrap();
        let t = plan_target(&Request { card: Some(l4), ..Default::default() }, &h200(10 * GIB));
        assert_eq!((t.others_bytes, t.total_bytes), (0, Some(23_034 << 20)), "the L4 is not the card the others use");
        assert_eq!(t.card.as_ref().map(|c| c.compute_capability), Some((8, 9)));
        assert_eq!(t.context_bytes, 600 << 20, "this machine's driver measured the context");
        assert!(t.name.contains("profile l4"), "{}", t.name);
        let nowhere = plan_target(&Request { card: Some(l4), ..Default::default() }, &Machine::default());
        assert_eq!((nowhere.kind, nowhere.context_bytes), (BackendKind::Cuda, DEFAULT_CUDA_CONTEXT_BYTES));
        // A backend running as a profile reports the profile's card: its memory, no others.
        let mut emulated = h200(10 * GIB);
        emulated.gpu.as_mut().unwrap().card = card::emulate(l4, &emulated.gpu.as_ref().unwrap().card);
        assert_eq!(plan_target(&Request::default(), &emulated).others_bytes, 0);
    }

    #[test]
    fn the_device_choice_picks_the_target() {
        let cpu_only = Machine { gpu: None, no_gpu_reason: "no driver".into(), host: h200(0).host };
        let t = plan_target(&Request::default(), &cpu_only);
        assert_eq!((t.kind, t.total_bytes, t.available_bytes()), (BackendKind::Cpu, Some(128 * GIB), Some(100 * GIB)));
        assert_eq!(t.others_bytes, 28 * GIB, "RAM not available is other processes'");
        let t = plan_target(&Request { device: DeviceChoice::Cpu, ..Default::default() }, &h200(0));
        assert_eq!(t.kind, BackendKind::Cpu);
        let t = plan_target(&Request { device: DeviceChoice::Cuda, ..Default::default() }, &cpu_only);
        assert_eq!((t.kind, t.total_bytes), (BackendKind::Cuda, None), "CUDA asked for, no GPU: unknown size");
        let t = plan_target(&Request { device: DeviceChoice::Cuda, memory_cap: Some(24 * GIB), ..Default::default() }, &cpu_only);
        assert_eq!((t.total_bytes, t.available_bytes()), (Some(24 * GIB), Some(24 * GIB)));
        assert_eq!(t.host_bytes, Some(100 * GIB), "a card's pinned memory is held against this host");
    }

    #[test]
    fn without_nvml_others_are_what_the_driver_does_not_report_free() {
        let card = card::profile_named("rtx4090").unwrap().limits();
        let d = DeviceInfo {
            kind: "cuda".into(),
            name: card.name.clone(),
            total_memory_bytes: Some(24 * GIB),
            free_memory_bytes: Some(20 * GIB),
            others_bytes: None,
            pci_bus_id: None,
            card: Some(card),
        };
        let g = Gpu::from_probe(&d, 500 << 20).unwrap();
        assert_eq!(g.others_bytes, Some(4 * GIB - DEFAULT_CUDA_CONTEXT_BYTES), "the probe's own context is not another process");
        let g = Gpu::from_probe(&DeviceInfo { others_bytes: Some(GIB), ..d }, 500 << 20).unwrap();
        assert_eq!(g.others_bytes, Some(GIB), "NVML's count when there is one");
    }

    #[test]
    fn refusals_say_what_was_asked_what_is_wrong_and_what_to_do() {
        let auto = Unavailable {
            device: DeviceChoice::Auto,
            card: Some("Tesla T4 (compute capability 7.5, 15 GiB)".into()),
            reason: "no bf16".into(),
        };
        let m = auto.message();
        assert!(
            m.starts_with("train.device is auto and found Tesla T4") && m.contains("no bf16") && m.contains("train.device = \"cpu\""),
            "{m}"
        );
        assert!(!m.contains('\n'));
        let none = Unavailable { device: DeviceChoice::Cuda, card: None, reason: "the driver found no GPU".into() };
        assert!(matches!(none.clone().into_error(), Error::NoCuda(_)));
        assert!(none.message().contains("no usable CUDA device: the driver found no GPU"), "{}", none.message());
        let t4 = open(&Request { card: card::profile_named("t4").ok(), ..Default::default() }, true).err().expect("refused");
        assert!(t4.card.as_deref().is_some_and(|c| c.contains("Tesla T4")) && t4.reason.contains("bf16"), "{t4:?}");
    }

    /// On a machine without a GPU: `cpu` and `auto` open the CPU (auto says why), `cuda` and a
    /// profile are refused with the reason, and no fallback flag turns a missing GPU into a card.
    #[test]
    fn opening_without_a_gpu_never_falls_back_in_silence() {
        if cuda::probe().is_ok() {
            return; // a GPU host: the GPU tests cover opening
        }
        assert!(matches!(open(&Request { device: DeviceChoice::Cpu, ..Default::default() }, false), Ok(Opened::Cpu { note: None, .. })));
        match open(&Request::default(), false) {
            Ok(Opened::Cpu { note: Some(n), fallback: None }) => assert!(n.starts_with("no usable GPU: "), "{n}"),
            _ => panic!("auto without a GPU trains on the CPU and says why"),
        }
        for req in [
            Request { device: DeviceChoice::Cuda, ..Default::default() },
            Request { card: card::profile_named("l4").ok(), ..Default::default() },
        ] {
            let Err(u) = open(&req, true) else { panic!("{req:?} must not open the CPU") };
            assert!(u.message().contains("train.device = \"cpu\""), "{}", u.message());
        }
        let c = check(&Request { device: DeviceChoice::Cuda, ..Default::default() });
        assert!(c.trains_on.is_none() && c.refusal.is_some(), "{c:?}");
    }
}
