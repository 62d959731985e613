//! Small pieces every panel uses: a config field row (label with its tooltip, the widget tied to
//! the label for screen readers and tests, the problem marked in place), path fields, message
//! boxes, and the memory plan's bar (the budget panel, the preflight dialog and the monitor
//! draw the same one).

use std::path::PathBuf;

use eframe::egui::{self, Color32, RichText, Stroke, Ui};

use super::fields::{self, Problems};
use super::msg::Action;
use super::state::memory::{BudgetView, HostMemory, bar, term_color, verdict};
use crate::engine::plan::Term;
use crate::util::fmt_bytes;

/// One row of a two-column grid: the field's label (tooltip: what it does and its default) and
/// the widget `add` draws. A field with a problem gets a red outline and the message beside it.
pub fn field(ui: &mut Ui, problems: &Problems, key: &str, add: impl FnOnce(&mut Ui) -> egui::Response) -> egui::Response {
    let doc = fields::doc(key);
    let tip = fields::tooltip(key);
    let label = ui.label(doc.label).on_hover_text(&tip);
    let msgs = problems.get(key);
    let inner = ui.horizontal(|ui| {
        if msgs.is_some() {
            let red = ui.visuals().error_fg_color;
            let w = &mut ui.visuals_mut().widgets;
            for v in [&mut w.inactive, &mut w.hovered, &mut w.active] {
                v.bg_stroke = Stroke::new(1.5, red);
            }
        }
        let r = add(ui).labelled_by(label.id).on_hover_text(&tip);
        if let Some(msgs) = msgs {
            let red = ui.visuals().error_fg_color;
            ui.add(egui::Label::new(RichText::new(format!("⚠ {}", msgs.join("; "))).color(red)).wrap());
        }
        r
    });
    inner.inner
}

/// A number field: integers step by `speed`; floats show `fmt` and accept any float typed in.
/// No clamping: an out-of-range value stays visible and is marked, rather than silently fixed.
pub fn drag_usize(value: &mut usize, speed: f64) -> egui::DragValue<'_> {
    egui::DragValue::new(value).speed(speed)
}

pub fn drag_u64(value: &mut u64, speed: f64) -> egui::DragValue<'_> {
    egui::DragValue::new(value).speed(speed)
}

#[derive(Debug, Clone, Copy)]
pub enum Fmt {
    /// Up to 4 decimals.
    Plain,
    /// `2.00e-4`, for learning rates and epsilons that span decades.
    Sci,
}

pub fn drag_f64(value: &mut f64, fmt: Fmt) -> egui::DragValue<'_> {
    // Dragging moves by about 1% of the value, so a learning rate and a beta both feel right.
    let speed = (value.abs() * 0.01).max(1e-6);
    let d = egui::DragValue::new(value).speed(speed).custom_parser(|s| s.trim().parse::<f64>().ok());
    match fmt {
        Fmt::Plain => d.max_decimals(4),
        Fmt::Sci => d.custom_formatter(|v, _| format!("{v:.2e}")),
    }
}

/// A drop-down over the values of a config enum.
pub fn combo<T: PartialEq + Copy>(ui: &mut Ui, id: &str, value: &mut T, options: &[(T, &str)]) -> egui::Response {
    let current = options.iter().find(|(v, _)| v == value).map(|(_, l)| *l).unwrap_or("?");
    let r = egui::ComboBox::from_id_salt(id).selected_text(current).show_ui(ui, |ui| {
        for (v, l) in options {
            ui.selectable_value(value, *v, *l);
        }
    });
    r.response
}

/// A text field bound to a path, with a "Browse…" button that opens a chooser on a worker.
pub fn path_field(ui: &mut Ui, problems: &Problems, key: &str, path: &mut PathBuf, browse: Option<Action>, actions: &mut Vec<Action>) {
    field(ui, problems, key, |ui| {
        let mut text = path.display().to_string();
        let r = ui.add(egui::TextEdit::singleline(&mut text).desired_width(path_width(ui)).hint_text("type a path or use Browse…"));
        if r.changed() {
            *path = PathBuf::from(text.trim());
        }
        if let Some(a) = browse
            && ui.button("Browse…").clicked()
        {
            actions.push(a);
        }
        r
    });
}

/// Wide enough for a real path, leaving room for the buttons beside it in narrow columns.
fn path_width(ui: &Ui) -> f32 {
    (ui.available_width() - 150.0).clamp(160.0, 460.0)
}

/// A path that may be absent (an adapter to continue from): empty text means none.
pub fn optional_path_field(
    ui: &mut Ui,
    problems: &Problems,
    key: &str,
    path: &mut Option<PathBuf>,
    browse: Action,
    actions: &mut Vec<Action>,
) {
    field(ui, problems, key, |ui| {
        let mut text = path.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
        let r = ui.add(egui::TextEdit::singleline(&mut text).desired_width(path_width(ui)).hint_text("none"));
        if r.changed() {
            *path = if text.trim().is_empty() { None } else { Some(PathBuf::from(text.trim())) };
        }
        if ui.button("Browse…").clicked() {
            actions.push(browse);
        }
        if path.is_some() && ui.button("Clear").clicked() {
            *path = None;
        }
        r
    });
}

/// A framed red message: a failure the person must read (wrapped, selectable for copying).
pub fn error_box(ui: &mut Ui, text: &str) {
    let red = ui.visuals().error_fg_color;
    egui::Frame::group(ui.style()).stroke(Stroke::new(1.0, red)).show(ui, |ui| {
        ui.add(egui::Label::new(RichText::new(text).color(red)).wrap().selectable(true));
    });
}

pub fn warning_line(ui: &mut Ui, text: &str) {
    let c = ui.visuals().warn_fg_color;
    ui.add(egui::Label::new(RichText::new(format!("⚠ {text}")).color(c)).wrap());
}

pub fn ok_line(ui: &mut Ui, text: &str) {
    ui.add(egui::Label::new(RichText::new(format!("✔ {text}")).color(ok_color(ui))).wrap());
}

/// Green that reads on both themes.
pub fn ok_color(ui: &Ui) -> Color32 {
    if ui.visuals().dark_mode { Color32::from_rgb(110, 200, 120) } else { Color32::from_rgb(30, 130, 50) }
}

/// The stacked bar (other processes first, then our terms) with the total and cap marks and,
/// when given, the measured memory.
pub fn memory_bar(ui: &mut Ui, v: &BudgetView, measured: Option<u64>) {
    let b = bar(v, measured);
    let width = ui.available_width().clamp(200.0, 640.0);
    let (rect, resp) = ui.allocate_exact_size(egui::vec2(width, 20.0), egui::Sense::hover());
    let painter = ui.painter_at(rect.expand(2.0));
    let x = |f: f32| rect.left() + f * rect.width();
    painter.rect_filled(rect, 3.0, ui.visuals().extreme_bg_color);
    for (s, (from, to)) in v.segments.iter().zip(&b.segments) {
        painter.rect_filled(egui::Rect::from_x_y_ranges(x(*from)..=x(*to), rect.y_range()), 0.0, s.color);
    }
    let fg = ui.visuals().strong_text_color();
    if let Some(t) = b.total_at {
        painter.vline(x(t), rect.expand(2.0).y_range(), Stroke::new(2.0, fg));
    }
    if let Some(c) = b.cap_at {
        painter.vline(x(c), rect.expand(2.0).y_range(), Stroke::new(2.0, ui.visuals().warn_fg_color));
    }
    if let Some(m) = b.measured_at {
        let red = Color32::from_rgb(240, 70, 70);
        painter.vline(x(m), rect.expand(2.0).y_range(), Stroke::new(2.5, red));
    }
    let mut tip = format!("Scale: {} across", fmt_bytes(b.scale_bytes));
    if let Some(c) = v.cap_bytes.filter(|_| b.cap_at.is_some()) {
        tip.push_str(&format!("\nMemory cap: {} (the yellow line)", fmt_bytes(c)));
    }
    for s in &v.segments {
        tip.push_str(&format!("\n{}: {}", s.label, fmt_bytes(s.bytes)));
    }
    resp.on_hover_text(tip);
}

/// RAM taken by other programs on the host bar.
const OTHERS_GREY: Color32 = Color32::from_gray(110);

pub fn memory_legend(ui: &mut Ui, v: &BudgetView, measured: Option<u64>) {
    ui.horizontal_wrapped(|ui| {
        ui.spacing_mut().item_spacing.x = 10.0;
        // One item never breaks across lines; the row wraps between items.
        let item = |ui: &mut Ui, text: String, color: Color32| ui.add(egui::Label::new(RichText::new(text).color(color).small()).extend());
        for s in &v.segments {
            item(ui, format!("■ {} {}", s.label, fmt_bytes(s.bytes)), s.color);
        }
        if let Some(m) = measured {
            item(ui, format!("| measured now {}", fmt_bytes(m)), Color32::from_rgb(240, 70, 70)).on_hover_text(if v.on_gpu {
                "Used on the card, from the driver (other processes included)."
            } else {
                "The process's resident memory: also the mapped model file, the tokenizer and this window."
            });
        }
    });
    let mut line = format!("checkpointing: {}{}", v.checkpointing_label, if v.auto { " (chosen by auto)" } else { "" });
    if v.pinned_host_bytes > 0 {
        line.push_str(&format!(
            " · pinned host memory {}{}",
            fmt_bytes(v.pinned_host_bytes),
            v.host.as_ref().map(|h| format!(" of {} RAM available here", fmt_bytes(h.available_bytes))).unwrap_or_default()
        ));
    }
    ui.weak(line);
    if let Some(pred) = v.predicted.as_ref().filter(|_| v.refusal.is_none()) {
        ui.weak(format!("predicted: {pred}")).on_hover_text(
            "From the work of one step and the card's datasheet speeds, at full rows of max_seq_len \
             (shorter rows train faster). Measured against bench on H100/H200 only.",
        );
    }
    if let Some(h) = v.host.as_ref().filter(|_| v.pinned_host_bytes > 0) {
        host_bar(ui, v.pinned_host_bytes, h);
    }
}

/// What offloading pins in host memory, against this machine's RAM.
fn host_bar(ui: &mut Ui, pinned: u64, h: &HostMemory) {
    let width = ui.available_width().clamp(200.0, 640.0);
    let (rect, resp) = ui.allocate_exact_size(egui::vec2(width, 8.0), egui::Sense::hover());
    let painter = ui.painter_at(rect);
    let scale = h.total_bytes.max(pinned).max(1) as f32;
    let x = |b: u64| rect.left() + b as f32 / scale * rect.width();
    painter.rect_filled(rect, 2.0, ui.visuals().extreme_bg_color);
    painter.rect_filled(egui::Rect::from_x_y_ranges(x(h.available_bytes)..=x(h.total_bytes), rect.y_range()), 0.0, OTHERS_GREY);
    painter.rect_filled(egui::Rect::from_x_y_ranges(rect.left()..=x(pinned), rect.y_range()), 0.0, term_color(Term::SavedActivations));
    resp.on_hover_text(format!(
        "Host RAM: {} pinned of {} ({} available)",
        fmt_bytes(pinned),
        fmt_bytes(h.total_bytes),
        fmt_bytes(h.available_bytes)
    ));
}

/// The budget in the preflight dialog and the monitor: bar, verdict, legend; no picker.
pub fn memory_summary(ui: &mut Ui, v: Option<&BudgetView>, measured: Option<u64>) {
    ui.strong("Memory budget");
    let Some(v) = v else {
        ui.weak("No memory plan for this run.");
        return;
    };
    memory_bar(ui, v, measured);
    let (line, good) = verdict(v);
    let color = if good { ui.visuals().text_color() } else { ui.visuals().error_fg_color };
    ui.label(RichText::new(line).color(color));
    memory_legend(ui, v, measured);
}

/// egui_plot's value step per this many points is what its grid spacers are given
/// (`Plot::grid_spacing`'s minimum, set to the same number by `count_x_axis`).
const GRID_MIN_POINTS: f32 = 8.0;
/// Tick labels on a count axis (steps, seconds) at least this far apart, in points, and fully
/// drawn from the upper end on: a label is 2 to 5 digits wide.
const X_LABEL_SPACING: std::ops::RangeInclusive<f32> = 40.0..=50.0;

/// The grid of a count axis (steps, seconds): labels on a 1-2-5 step at least
/// `X_LABEL_SPACING`'s upper end apart, never finer than 1, with a finer grid between them.
/// `base_step_size` is egui_plot's value per `GRID_MIN_POINTS`. egui_plot's default grid (powers
/// of ten, labels 60 points apart) left a quarter-width plot with one label or none over long
/// stretches of a run: from about 60 to 200 steps, again from 600 to 2000 (seen under Xvfb).
pub fn count_axis_steps(base_step_size: f64) -> [f64; 3] {
    let per_point = base_step_size / GRID_MIN_POINTS as f64;
    let major = nice_ceil((per_point * *X_LABEL_SPACING.end() as f64).max(1.0));
    [major / 5.0, major, major * 5.0]
}

/// Tick labels on a value axis (the small plots' y) at least this far apart, in points: a
/// label is a line high.
const Y_LABEL_SPACING: std::ops::RangeInclusive<f32> = 20.0..=26.0;

/// The grid of a value axis: labels on a 1-2-5 step at least `Y_LABEL_SPACING`'s upper end
/// apart, a finer grid between them. egui_plot's powers of ten left a 120-point plot of tokens/s
/// between 1,300 and 7,000 without a single label, a gradient norm with "1" alone.
pub fn value_axis_steps(base_step_size: f64) -> [f64; 3] {
    let per_point = base_step_size / GRID_MIN_POINTS as f64;
    let want = per_point * *Y_LABEL_SPACING.end() as f64;
    let major = if want.is_finite() && want > 0.0 { nice_ceil(want) } else { 1.0 };
    [major / 5.0, major, major * 5.0]
}

/// The smallest of 1, 2, 5 times a power of ten that is at least `x` (> 0).
fn nice_ceil(x: f64) -> f64 {
    let magnitude = 10f64.powf(x.log10().floor());
    [1.0, 2.0, 5.0, 10.0].into_iter().map(|m| m * magnitude).find(|&s| s >= x * (1.0 - 1e-9)).unwrap_or(10.0 * magnitude)
}

/// A grid mark's label with the decimals of the labelled (major) step, whatever level the mark
/// belongs to: a mark on the coarse grid (5 × major) carries that coarser step, and its own
/// decimals printed 0.25 as "0.2" and 2.5 as "2" beside major labels 0.05 apart.
fn mark_label(mark: egui_plot::GridMark, major: f64) -> String {
    let step = if major.is_finite() && major > 0.0 { major } else { mark.step_size };
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    let v = if mark.value.abs() < step * 1e-6 { 0.0 } else { mark.value };
    format!("{v:.decimals$}")
}

/// A plot's y axis on the grid of `value_axis_steps`.
pub fn value_y_axis<'a>(plot: egui_plot::Plot<'a>) -> egui_plot::Plot<'a> {
    // The spacer learns the major step each frame; the formatter labels with its decimals.
    let major = std::rc::Rc::new(std::cell::Cell::new(f64::NAN));
    let seen = major.clone();
    plot.grid_spacing(GRID_MIN_POINTS..=300.0)
        .y_grid_spacer(egui_plot::uniform_grid_spacer(move |input| {
            let steps = value_axis_steps(input.base_step_size);
            seen.set(steps[1]);
            steps
        }))
        .custom_y_axes(vec![egui_plot::AxisHints::new_y().label_spacing(Y_LABEL_SPACING).formatter(move |m, _| mark_label(m, major.get()))])
}

/// A plot whose x axis counts (steps, seconds): the grid of `count_axis_steps`, `label` under
/// the axis ("" for none).
pub fn count_x_axis<'a>(plot: egui_plot::Plot<'a>, label: &str) -> egui_plot::Plot<'a> {
    plot.grid_spacing(GRID_MIN_POINTS..=300.0)
        .x_grid_spacer(egui_plot::uniform_grid_spacer(|input| count_axis_steps(input.base_step_size)))
        .custom_x_axes(vec![egui_plot::AxisHints::new_x().label(label.to_string()).label_spacing(X_LABEL_SPACING)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_axis_labels_are_apart_enough_and_on_whole_numbers() {
        // Plots 200 to 1200 points wide over 3 to 100,000 steps.
        for width in [200.0f64, 260.0, 600.0, 1200.0] {
            for range in [3.0f64, 12.0, 60.0, 66.0, 150.0, 400.0, 700.0, 2500.0, 100_000.0] {
                let base = range / width * GRID_MIN_POINTS as f64;
                let [fine, major, coarse] = count_axis_steps(base);
                let apart = major / range * width;
                assert!(major >= 1.0 && major.fract() == 0.0, "{major}");
                assert!(
                    apart >= *X_LABEL_SPACING.end() as f64 - 1e-6 || major == 1.0,
                    "{width} pt, {range} steps: labels {apart:.0} pt apart"
                );
                assert!(apart < 130.0 || major == 1.0, "{width} pt, {range} steps: labels {apart:.0} pt apart leave too few");
                // Two labels at least in a quarter-width plot (the small plots at 1280 px).
                assert!(width < 250.0 || range / major >= 1.9, "{width} pt, {range} steps: step {major}");
                assert!(fine < major && coarse > major);
            }
        }
    }

    #[test]
    fn value_axis_labels_are_apart_enough_and_read_right() {
        // A 90-point plot body over the ranges the small plots see.
        for range in [0.002f64, 0.35, 1.7, 40.0, 5700.0, 3.0e9] {
            let base = range / 90.0 * GRID_MIN_POINTS as f64;
            let [fine, major, _] = value_axis_steps(base);
            let apart = major / range * 90.0;
            assert!((26.0 - 1e-6..66.0).contains(&apart), "{range}: labels {apart:.0} pt apart");
            assert!(range / major >= 1.3, "{range}: step {major} leaves one label");
            assert!(fine / range * 90.0 < *Y_LABEL_SPACING.start() as f64, "the fine grid is never labelled");
        }
        let mark = |value, step_size, major| mark_label(egui_plot::GridMark { value, step_size }, major);
        assert_eq!(mark(0.15, 0.05, 0.05), "0.15");
        assert_eq!(mark(0.4, 0.2, 0.2), "0.4");
        assert_eq!(mark(2500.0, 500.0, 500.0), "2500");
        assert_eq!(mark(-1e-19, 0.001, 0.001), "0.000");
        // Marks of the coarse grid (5 × major) read with the major step's decimals.
        assert_eq!(mark(0.25, 0.25, 0.05), "0.25");
        assert_eq!(mark(2.5, 2.5, 0.5), "2.5");
        assert_eq!(mark(1.0, 1.0, 0.2), "1.0");
        assert_eq!(mark(0.3, 0.1, f64::NAN), "0.3", "before the spacer ran: the mark's own step");
    }
}
