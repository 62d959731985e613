//! `tunestudio plan`: the memory plan as a table, the verdict for a card, the largest settings
//! that fit, and the cheapest change that makes a run fit. The settings are validated as `train`
//! validates them; the verdict names the limit that binds (the card, or the host RAM that
//! offloading pins), and the caller turns "does not fit" into exit code 2.

use std::path::Path;

use serde_json::json;

use crate::RunConfig;
use crate::backend::card::CardProfile;
use crate::config::DeviceChoice;
use crate::config::{MAX_BATCH_SIZE, MAX_LORA_R, MAX_SEQ_LEN, MIN_SEQ_LEN};
use crate::device::{Request, probe_machine};
use crate::engine::plan::{self, PlanInput, Term, largest_fitting, suggestions};
use crate::error::{Error, Result};
use crate::model::ModelSpec;
use crate::util::fmt_bytes;

pub struct PlanArgs<'a> {
    pub config: Option<&'a Path>,
    pub model: Option<&'a Path>,
    pub shape: Option<&'a str>,
    pub seq: Option<usize>,
    pub batch: Option<usize>,
    pub rank: Option<usize>,
    /// Plan as this card (`--card`); `None`: `TUNESTUDIO_CARD`, else this machine's card.
    pub card: Option<&'static CardProfile>,
    /// A cap on the run's device memory (`--gpu-mem`, else the config's `memory.gpu_mem`); with
    /// no GPU here and no profile, a card of this size.
    pub gpu_mem: Option<u64>,
    /// The RAM pinned host memory may take; `None`: this machine's available RAM.
    pub host_mem: Option<u64>,
    pub json: bool,
}

/// Whether the planned run fits (`None`: no card to plan for was detected or given).
pub fn run(a: PlanArgs<'_>) -> Result<Option<bool>> {
    let mut cfg = match a.config {
        Some(p) => RunConfig::load(p)?,
        None => RunConfig::default(),
    };
    if let Some(m) = a.model {
        cfg.model.path = m.to_path_buf();
    }
    let spec = match (a.shape, cfg.model.path.as_os_str().is_empty()) {
        (Some(name), _) => ModelSpec::by_shape_name(name)
            .ok_or_else(|| Error::arg("--shape", format!("unknown shape `{name}` ({})", ModelSpec::SHAPE_NAMES.join(", "))))?,
        (None, false) => {
            crate::model::check_config_folder(&cfg.model.path)?;
            ModelSpec::from_dir(&cfg.model.path)?
        }
        (None, true) => return Err(Error::arg("plan", "give a run config, --model DIR (only config.json is read) or --shape NAME")),
    };
    if let Some(s) = a.seq {
        cfg.train.max_seq_len = s;
    }
    if let Some(b) = a.batch {
        cfg.train.batch_size = b;
    }
    if let Some(r) = a.rank {
        cfg.lora.r = r;
    }
    if let Some(cap) = a.gpu_mem {
        cfg.memory.gpu_mem = Some(crate::config::ByteSize(cap));
    }
    // The same ranges `train` enforces; a value given by flag is named by its flag.
    if let Some(e) = cfg.setting_problems().into_iter().next() {
        let flag = match &e {
            Error::Config { field, .. } if field == "train.max_seq_len" => a.seq.map(|v| format!("--seq {v}")),
            Error::Config { field, .. } if field == "train.batch_size" => a.batch.map(|v| format!("--batch {v}")),
            Error::Config { field, .. } if field == "lora.r" => a.rank.map(|v| format!("--rank {v}")),
            _ => None,
        };
        return Err(match flag {
            Some(f) => Error::arg(f, e),
            None => e,
        });
    }
    let input = PlanInput::from_config(&cfg);
    let mut request = Request::of_config(&cfg, a.card)?;
    // `plan` is the GPU's budget: `auto` plans for a card even where none is found (it says so).
    if request.device == DeviceChoice::Auto {
        request.device = DeviceChoice::Cuda;
    }
    let mut machine = probe_machine();
    if let Some(bytes) = a.host_mem {
        machine.host = Some(crate::backend::HostMemory { total_bytes: bytes, available_bytes: bytes });
    }
    let target = crate::prepare::target(&request, crate::prepare::Place::Probed(&machine));
    if let Some(r) = target.card.as_ref().and_then(|c| c.check_supported().err()) {
        return Err(Error::Card { card: r.card, msg: r.reason });
    }
    let p = plan::plan(&spec, &input, &target);
    let known = target.available_bytes().is_some();
    let largest_seq = known.then(|| largest_fitting(&spec, &input, &target, MIN_SEQ_LEN, MAX_SEQ_LEN, |i, v| i.max_seq_len = v)).flatten();
    let largest_batch = known.then(|| largest_fitting(&spec, &input, &target, 1, MAX_BATCH_SIZE, |i, v| i.batch_size = v)).flatten();
    let largest_rank = known.then(|| largest_fitting(&spec, &input, &target, 1, MAX_LORA_R, |i, v| i.lora.r = v)).flatten();
    let card_fits = target.available_bytes().is_none_or(|room| p.peak_bytes <= room);
    // What stops the run from fitting: the room the card (less other processes, within the cap)
    // leaves us, the host RAM that offloading pins, or both.
    let binding = match (known && !card_fits, !p.host_fits) {
        (true, true) => Some("card_and_host_ram"),
        (true, false) => Some("card"),
        (false, true) => Some("host_ram"),
        (false, false) => None,
    };
    let fixes = if known { suggestions(&spec, &input, &target) } else { vec![] };
    if a.json {
        let v = json!({
            "peak_bytes": p.peak_bytes,
            "terms": p.terms,
            "fits": if known { json!(p.fits) } else { json!(null) },
            "card": target.name,
            "card_limits": target.card,
            "total_bytes": target.total_bytes,
            "others_bytes": target.others_bytes,
            "cap_bytes": target.cap_bytes,
            "available_bytes": target.available_bytes(),
            "context_bytes": target.context_bytes,
            "checkpointing": p.checkpointing,
            "kept_layers": p.kept_layers,
            "saved_attention": p.attention,
            "cached_weight_layers": p.cached_weight_layers,
            "hold_mlp_weights": p.hold_mlp_weights,
            "pinned_host_bytes": p.pinned_host_bytes,
            "host_available_bytes": target.host_bytes,
            "host_fits": p.host_fits,
            "binding": binding,
            "largest": {"max_seq_len": largest_seq, "batch_size": largest_batch, "lora_r": largest_rank},
            "suggestions": fixes,
            "predicted": p.step.as_ref().map(|st| json!({
                "step_s": st.step_s,
                "tokens_per_s": st.tokens_per_s,
                "steps": cfg.train.max_steps,
                "eta_s": cfg.train.max_steps.map(|n| st.eta_s(n, cfg.train.grad_accum)),
                "parts_s": {"gemm": st.gemm_s, "attention": st.attention_s, "memory_bound": st.memory_s, "host_link": st.host_link_s},
                "basis": st.basis,
                "calibrated": st.calibrated,
            })),
        });
        println!("{}", serde_json::to_string_pretty(&v).expect("json"));
        return Ok(known.then_some(p.fits));
    }
    println!("model   {}", spec.summary());
    println!(
        "run     batch {} × seq {}, LoRA r = {} on {} targets, {:?} base, checkpointing {}",
        input.batch_size,
        input.max_seq_len,
        input.lora.r,
        input.lora.targets.len(),
        input.quantization,
        p.checkpointing_label(&spec)
    );
    if let Some(c) = &target.card {
        println!("card    {}", c.describe());
    }
    println!();
    let others = Term::OtherProcesses.name();
    for (name, bytes) in p.terms.iter().filter(|(n, _)| **n != others) {
        println!("  {name:<20} {:>12}", fmt_bytes(*bytes));
    }
    println!("  {:<20} {:>12}", "peak (device)", fmt_bytes(p.peak_bytes));
    if p.others_bytes > 0 {
        println!("  {:<20} {:>12}  (not ours: held by other programs on the card)", others, fmt_bytes(p.others_bytes));
    }
    if p.pinned_host_bytes > 0 {
        let of = target
            .host_bytes
            .map(|h| format!(" of {} RAM available{}", fmt_bytes(h), if p.host_fits { "" } else { ": does NOT fit" }))
            .unwrap_or_default();
        println!("  {:<20} {:>12}{of}", "pinned host memory", fmt_bytes(p.pinned_host_bytes));
    }
    println!();
    match (target.total_bytes, target.available_bytes()) {
        (Some(total), Some(room)) => {
            let mut of = fmt_bytes(total);
            if target.others_bytes > 0 {
                of = format!(
                    "{} left of {of} ({} used by other processes)",
                    fmt_bytes(total.saturating_sub(target.others_bytes)),
                    fmt_bytes(target.others_bytes)
                );
            }
            if let Some(cap) = target.cap_bytes.filter(|&c| c == room) {
                of = format!("the cap of {} on {of}", fmt_bytes(cap));
            }
            let host = || {
                format!(
                    "pinned host memory needs {} but the host has {} of RAM available",
                    fmt_bytes(p.pinned_host_bytes),
                    target.host_bytes.map_or("less".to_string(), fmt_bytes)
                )
            };
            let verdict = match binding {
                None => "fits".to_string(),
                Some("card") => "does NOT fit on the card".to_string(),
                Some("host_ram") => format!("fits on the card, but does NOT fit in host RAM: {}", host()),
                Some(_) => format!("does NOT fit on the card, nor in host RAM: {}", host()),
            };
            println!("{}: {} of {of} → {verdict}", target.name, fmt_bytes(p.peak_bytes));
            let show = |v: Option<usize>| v.map_or("none".to_string(), |x| x.to_string());
            println!(
                "largest that fit (others fixed): max_seq_len {}, batch_size {}, lora.r {}",
                show(largest_seq),
                show(largest_batch),
                show(largest_rank)
            );
            for s in &fixes {
                println!("  to fit: {} → {}", s.change, fmt_bytes(s.peak_bytes));
            }
            if let Some(st) = &p.step {
                println!("predicted: {}", st.summary(cfg.train.max_steps, cfg.train.grad_accum));
            }
        }
        _ => println!(
            "no GPU detected ({}): pass --card NAME (rtx4090, l4, a100-80, …) or --gpu-mem 24GiB to plan for a card",
            machine.no_gpu_reason
        ),
    }
    Ok(known.then_some(p.fits))
}
