//! ┌──────────────────────────────────────────────────────────────────────────────────────────┐
//! │ PLACEHOLDER FOR THE LEAD: the memory budget panel, waiting for `engine::plan`.           │
//! │                                                                                          │
//! │ What is here already: `Budget` (what the panel needs, plain data), `segments` (the pure   │
//! │ view model: one bar segment per buffer, widths as fractions of the card), and `ui`,      │
//! │ which draws the bar and the table. What is missing is the one function that fills a     │
//! │ `Budget` from the plan: see `from_plan` below; `preflight::check` calls it on a worker  │
//! │ and the Preflight dialog draws the result. Nothing else needs to change.                  │
//! └──────────────────────────────────────────────────────────────────────────────────────────┘

use eframe::egui::{self, Color32, RichText, Ui};

use crate::util::fmt_bytes;

/// The inputs of the budget panel: named buffers and the card they must fit on.
#[derive(Debug, Clone, PartialEq)]
pub struct Budget {
    /// e.g. "NVIDIA H100 80GB HBM3".
    pub device: String,
    /// `(name, bytes)` per planned buffer: base weights, LoRA + optimizer, activations, …
    pub items: Vec<(String, u64)>,
    /// Usable memory on the card; `None` when planning for no particular card.
    pub capacity_bytes: Option<u64>,
}

/// The plan for `cfg` on the chosen device, for the Preflight dialog.
///
/// LEAD: replace the body with a call to `engine::plan` (from `ModelSpec` + `RunConfig`, no GPU
/// touched), mapping each planned buffer to `(name, bytes)` and the card's total memory to
/// `capacity_bytes`. Returning `None` shows the "not in this build yet" note.
pub fn from_plan(_spec: &crate::model::ModelSpec, _cfg: &crate::RunConfig) -> Option<Budget> {
    None
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
        None => (format!("{} planned", fmt_bytes(total)), true),
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
        ui.weak("The memory plan (engine::plan) is not in this build yet; the run allocates as it goes.");
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
    egui::Grid::new("budget-items").num_columns(2).show(ui, |ui| {
        for (i, s) in segs.iter().enumerate() {
            ui.label(RichText::new(format!("■ {}", s.label)).color(PALETTE[i % PALETTE.len()]));
            ui.label(fmt_bytes(s.bytes));
            ui.end_row();
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_fractions_of_the_card_largest_first() {
        let b = Budget { device: "card".into(), items: vec![("a".into(), 10), ("b".into(), 30), ("zero".into(), 0)], capacity_bytes: Some(80) };
        let s = segments(&b);
        assert_eq!(s.iter().map(|x| x.label.as_str()).collect::<Vec<_>>(), ["b", "a"]);
        assert!((s[0].fraction - 0.375).abs() < 1e-6);
        assert!(headline(&b).1);
        let over = Budget { capacity_bytes: Some(20), ..b };
        let s = segments(&over);
        assert!((s.iter().map(|x| x.fraction).sum::<f32>() - 1.0).abs() < 1e-6, "an overflowing plan fills the bar, no more");
        assert!(!headline(&over).1);
    }
}
