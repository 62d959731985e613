//! The memory budget in the Preflight dialog: the run's `engine::plan` (every buffer the engine
//! and its backend allocate, from the model's shape and the run's settings, no GPU touched) as
//! one stacked bar against the card, with the terms listed and, when it does not fit, the
//! cheapest changes that would make it fit. `from_plan` builds the plain `Budget` on the
//! preflight worker; `segments` and `headline` are the view model.
//!
//! LEAD: the planned target follows `train.device` the way the session does today (auto plans
//! for the detected GPU, else the CPU). When the CUDA engine lands and the session picks the
//! device differently, change `target_for` to match it.

use eframe::egui::{self, Color32, RichText, Ui};

use crate::config::DeviceChoice;
use crate::engine::plan::{self, BackendKind, PlanInput, PlanTarget};
use crate::model::ModelSpec;
use crate::util::fmt_bytes;

/// The inputs of the budget panel: named buffers and the card they must fit on.
#[derive(Debug, Clone, PartialEq)]
pub struct Budget {
    /// e.g. "NVIDIA H100 80GB HBM3", or "CPU".
    pub device: String,
    /// `(term, bytes)` of device memory: base weights, LoRA parameters, optimizer states, …
    pub items: Vec<(String, u64)>,
    /// Usable memory on the card; `None` on the CPU, where nothing is planned against a size.
    pub capacity_bytes: Option<u64>,
    /// Whether the plan fits the card; `None` when there is no card.
    pub fits: Option<bool>,
    /// The checkpointing policy the plan resolved to, and changes that would make it fit.
    pub notes: Vec<String>,
}

/// The plan a target device would get, as the session will choose the device.
fn target_for(cfg: &crate::RunConfig) -> PlanTarget {
    let gpu = || crate::backend::cuda::probe().ok().and_then(|d| d.total_memory_bytes.map(|t| (d.name, t)));
    match cfg.train.device {
        DeviceChoice::Cpu => PlanTarget::cpu(),
        DeviceChoice::Auto | DeviceChoice::Cuda => match gpu() {
            Some((name, total)) => PlanTarget::gpu(&name, total),
            None => PlanTarget::cpu(),
        },
    }
}

/// The memory plan of `cfg` on the device it will run on, with `token_rows` embedding rows
/// trained by the untrained-token fix.
pub fn from_plan(spec: &ModelSpec, cfg: &crate::RunConfig, token_rows: usize) -> Option<Budget> {
    let mut input = PlanInput::from_config(cfg);
    input.token_rows = token_rows;
    let target = target_for(cfg);
    let p = plan::plan(spec, &input, &target);
    let on_gpu = target.kind == BackendKind::Cuda;
    let mut notes = vec![format!("checkpointing: {:?}", p.checkpointing).to_lowercase()];
    if p.pinned_host_bytes > 0 {
        notes.push(format!("{} of layer inputs in pinned host memory", fmt_bytes(p.pinned_host_bytes)));
    }
    if on_gpu && !p.fits {
        notes.extend(plan::suggestions(spec, &input, &target).into_iter().map(|s| format!("{} → {}", s.change, fmt_bytes(s.peak_bytes))));
    }
    Some(Budget {
        device: target.name.clone(),
        items: p.terms.iter().map(|(k, v)| (k.replace('_', " "), *v)).collect(),
        capacity_bytes: if on_gpu { target.total_bytes } else { None },
        fits: on_gpu.then_some(p.fits),
        notes,
    })
}

#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    pub label: String,
    pub bytes: u64,
    /// Width of the segment as a fraction of the bar (the card, or the total when no card).
    pub fraction: f32,
}

/// One segment per non-empty item, largest first; the bar spans the card's capacity (or the
/// total when there is none, or when the plan exceeds the card, so nothing is drawn off the end).
pub fn segments(b: &Budget) -> Vec<Segment> {
    let total: u64 = b.items.iter().map(|(_, n)| n).sum();
    let span = b.capacity_bytes.unwrap_or(total).max(total).max(1);
    let mut items: Vec<&(String, u64)> = b.items.iter().filter(|(_, n)| *n > 0).collect();
    items.sort_by(|x, y| y.1.cmp(&x.1));
    items.into_iter().map(|(l, n)| Segment { label: l.clone(), bytes: *n, fraction: *n as f32 / span as f32 }).collect()
}

/// "18.2 GiB of 79.1 GiB (23%)", or the overflow, for the line under the bar.
pub fn headline(b: &Budget) -> (String, bool) {
    let total: u64 = b.items.iter().map(|(_, n)| n).sum();
    match b.capacity_bytes {
        Some(cap) if total > cap => (format!("{} needed, {} on {}: does not fit", fmt_bytes(total), fmt_bytes(cap), b.device), false),
        Some(cap) => (format!("{} of {} on {} ({:.0}%)", fmt_bytes(total), fmt_bytes(cap), b.device, 100.0 * total as f64 / cap as f64), true),
        None => (format!("{} planned on the {}", fmt_bytes(total), b.device), true),
    }
}

const PALETTE: [Color32; 6] = [
    Color32::from_rgb(86, 156, 214),
    Color32::from_rgb(214, 157, 86),
    Color32::from_rgb(120, 190, 120),
    Color32::from_rgb(190, 120, 190),
    Color32::from_rgb(200, 200, 110),
    Color32::from_rgb(120, 190, 200),
];

pub fn ui(ui: &mut Ui, budget: Option<&Budget>) {
    ui.strong("Memory budget");
    let Some(b) = budget else {
        ui.weak("No memory plan for this run.");
        return;
    };
    let segs = segments(b);
    let (line, fits) = headline(b);
    let width = ui.available_width().min(560.0);
    let (rect, _) = ui.allocate_exact_size(egui::vec2(width, 18.0), egui::Sense::hover());
    let painter = ui.painter_at(rect);
    painter.rect_filled(rect, 3.0, ui.visuals().extreme_bg_color);
    let mut x = rect.left();
    for (i, s) in segs.iter().enumerate() {
        let w = s.fraction * rect.width();
        painter.rect_filled(egui::Rect::from_min_size(egui::pos2(x, rect.top()), egui::vec2(w, rect.height())), 0.0, PALETTE[i % PALETTE.len()]);
        x += w;
    }
    let color = if fits { ui.visuals().text_color() } else { ui.visuals().error_fg_color };
    ui.label(RichText::new(line).color(color));
    ui.horizontal_wrapped(|ui| {
        for (i, s) in segs.iter().enumerate() {
            ui.label(RichText::new(format!("■ {} {}", s.label, fmt_bytes(s.bytes))).color(PALETTE[i % PALETTE.len()]));
        }
    });
    for n in &b.notes {
        ui.weak(n);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_fractions_of_the_card_largest_first() {
        let b = Budget { device: "card".into(), items: vec![("a".into(), 10), ("b".into(), 30), ("zero".into(), 0)], capacity_bytes: Some(80), fits: Some(true), notes: vec![] };
        let s = segments(&b);
        assert_eq!(s.iter().map(|x| x.label.as_str()).collect::<Vec<_>>(), ["b", "a"]);
        assert!((s[0].fraction - 0.375).abs() < 1e-6);
        assert!(headline(&b).1);
        let over = Budget { capacity_bytes: Some(20), ..b };
        let s = segments(&over);
        assert!((s.iter().map(|x| x.fraction).sum::<f32>() - 1.0).abs() < 1e-6, "an overflowing plan fills the bar, no more");
        assert!(!headline(&over).1);
    }

    #[test]
    fn the_cpu_plan_of_a_small_model_has_every_term() {
        let mut cfg = crate::RunConfig::default();
        cfg.train.device = DeviceChoice::Cpu;
        cfg.train.max_seq_len = 256;
        let spec = ModelSpec { vocab_size: 1000, hidden_size: 64, intermediate_size: 128, num_layers: 2, num_heads: 4, num_kv_heads: 2, head_dim: 16, ..ModelSpec::llama3_8b() };
        let b = from_plan(&spec, &cfg, 0).unwrap();
        assert_eq!(b.device, "CPU");
        assert_eq!(b.capacity_bytes, None);
        assert!(b.items.iter().any(|(k, v)| k == "base weights" && *v > 0), "{:?}", b.items);
        assert!(b.items.iter().any(|(k, _)| k == "optimizer states"));
        assert!(headline(&b).0.ends_with("planned on the CPU"));
    }
}
