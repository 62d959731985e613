//! The Runs panel: every run under the output folders the person has trained into, with what sets
//! them apart (dataset, rows, lr, rank, smoothed loss, best eval loss, speed, memory); rename one,
//! open one for its curves, resume a stopped one, export its adapter, or tick several to overlay
//! their curves and see where their configs differ.

use std::path::Path;

use eframe::egui::{self, Color32, Key, RichText, Ui};
use egui_plot::{Legend, Line, Plot, PlotPoints, Points};

use crate::app::jobs::Load;
use crate::app::msg::Action;
use crate::app::state::AppState;
use crate::app::state::runs::{COLUMNS, Comparison, RunRecord, row_view};
use crate::app::widgets;

/// Distinct colours for overlaid runs, reused in order.
const RUN_COLORS: [Color32; 6] = [
    Color32::from_rgb(60, 140, 240),
    Color32::from_rgb(230, 120, 50),
    Color32::from_rgb(80, 180, 100),
    Color32::from_rgb(200, 80, 160),
    Color32::from_rgb(150, 120, 220),
    Color32::from_rgb(200, 180, 60),
];

pub fn ui(ui: &mut Ui, state: &mut AppState, actions: &mut Vec<Action>) {
    let runs = &mut state.runs;
    ui.horizontal_wrapped(|ui| {
        ui.heading("Runs");
        let folders = runs.dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join("\n");
        let where_from = match runs.dirs.len() {
            1 => folders.clone(),
            n => format!("from {n} output folders"),
        };
        ui.weak(where_from).on_hover_text(format!("Output folders trained into (remembered):\n{folders}"));
        if ui.button("⟳ Refresh").clicked() {
            actions.push(Action::RefreshRuns);
        }
        let n = runs.selected.len();
        if ui
            .add_enabled(n >= 2, egui::Button::new(format!("Compare {n} selected")))
            .on_hover_text("overlay the ticked runs' loss curves and list where their configs differ")
            .on_disabled_hover_text("tick two runs or more to compare them")
            .clicked()
        {
            actions.push(Action::CompareRuns);
        }
    });
    let live_dir = state.training.run_dir().map(Path::to_path_buf);
    let live_active = state.training.phase.is_active();
    let records = match &runs.records {
        Load::Empty | Load::Loading => {
            ui.spinner();
            return;
        }
        Load::Failed(e) => {
            widgets::error_box(ui, e);
            return;
        }
        Load::Ready(records) if records.is_empty() => {
            ui.label("No runs yet. Finished, stopped and failed runs of every output folder trained into appear here.");
            return;
        }
        Load::Ready(records) => records.clone(),
    };
    let list_height = if runs.comparison.is_some() { (ui.available_height() * 0.4).max(120.0) } else { f32::INFINITY };
    // Solid bars: a floating horizontal bar would cover the last row's boxes and buttons.
    ui.spacing_mut().scroll = egui::style::ScrollStyle::solid();
    egui::ScrollArea::both().id_salt("runs-list").max_height(list_height).auto_shrink([false, true]).show(ui, |ui| {
        egui::Grid::new("runs-grid").num_columns(COLUMNS.len() + 3).striped(true).spacing([12.0, 6.0]).show(ui, |ui| {
            ui.label("");
            let (name, rest) = COLUMNS.split_first().expect("columns");
            ui.strong(name.0).on_hover_text(name.1);
            ui.label("");
            for (h, why) in rest {
                ui.strong(*h).on_hover_text(*why);
            }
            ui.strong("Updated (UTC)");
            ui.end_row();
            for r in &records {
                row(ui, r, &mut state.runs, live_dir.as_deref(), live_active, actions);
                ui.end_row();
            }
        });
    });
    let runs = &mut state.runs;
    match &runs.comparison {
        None => {}
        Some(c) => {
            ui.separator();
            let mut close = false;
            ui.horizontal(|ui| {
                ui.strong("Comparison");
                close = ui.button("Close").clicked();
            });
            match c {
                Load::Empty | Load::Loading => {
                    ui.spinner();
                }
                Load::Failed(e) => widgets::error_box(ui, e),
                Load::Ready(c) => comparison(ui, c),
            }
            if close {
                runs.comparison = None;
            }
        }
    }
}

fn row(
    ui: &mut Ui,
    r: &RunRecord,
    runs: &mut crate::app::state::runs::RunsState,
    live: Option<&Path>,
    live_active: bool,
    actions: &mut Vec<Action>,
) {
    let v = row_view(r, live, live_active);
    let mut ticked = runs.selected.contains(&r.dir);
    // No tooltip: it would cover the next row's box.
    if ui.checkbox(&mut ticked, "").changed() {
        runs.toggle(&r.dir);
    }
    match &mut runs.renaming {
        Some((dir, text)) if dir == &r.dir => {
            let edit = ui.add(egui::TextEdit::singleline(text).desired_width(220.0));
            if !edit.has_focus() && !edit.lost_focus() {
                edit.request_focus();
            }
            if edit.lost_focus() {
                if ui.input(|i| i.key_pressed(Key::Enter)) {
                    actions.push(Action::RenameRun(r.dir.clone(), text.clone()));
                } else {
                    // Escape or a click elsewhere: keep the old name.
                    runs.renaming = None;
                }
            }
        }
        _ => {
            ui.horizontal(|ui| {
                ui.label(&v.name).on_hover_text(r.dir.display().to_string());
                if ui.small_button("✏").on_hover_text("rename this run (Enter to confirm, Esc to cancel)").clicked() {
                    runs.renaming = Some((r.dir.clone(), v.name.clone()));
                }
            });
        }
    }
    ui.horizontal(|ui| {
        if ui.button("Open").on_hover_text("show this run's curves").clicked() {
            actions.push(Action::OpenRun(r.dir.clone()));
        }
        if ui.add_enabled(v.can_resume, egui::Button::new("Resume")).on_hover_text("continue from its newest checkpoint").clicked() {
            actions.push(Action::ResumeRun(r.dir.clone()));
        }
        if ui.add_enabled(v.can_export, egui::Button::new("Export…")).on_hover_text("export its adapter").clicked() {
            actions.push(Action::ExportFrom(r.dir.clone()));
        }
        let can_chat = !r.checkpoints.is_empty() || r.has_adapter;
        if ui
            .add_enabled(can_chat, egui::Button::new("Chat"))
            .on_hover_text("talk to it as of its newest checkpoint")
            .on_disabled_hover_text("no checkpoint yet")
            .clicked()
        {
            actions.push(Action::ChatWith(r.dir.clone()));
        }
    });
    for cell in v.cells() {
        ui.label(cell);
    }
    let color = match v.state.as_str() {
        "done" => widgets::ok_color(ui),
        "failed" => ui.visuals().error_fg_color,
        "interrupted" | "stopped" => ui.visuals().warn_fg_color,
        _ => ui.visuals().text_color(),
    };
    let state_label = ui.label(RichText::new(&v.state).color(color));
    if let Ok(Some(err)) = r.status.as_ref().map(|s| s.error.as_ref()) {
        state_label.on_hover_text(err);
    }
    ui.label(&v.updated);
}

/// The ticked runs' smoothed training loss (lines) and evaluation loss (points) on one plot, and
/// the config keys whose values differ, one column per run.
fn comparison(ui: &mut Ui, c: &Comparison) {
    let diff_height = (24.0 + 20.0 * c.diff.len() as f32).min(ui.available_height() * 0.45);
    let plot_height = (ui.available_height() - diff_height - 30.0).max(140.0);
    widgets::value_y_axis(widgets::count_x_axis(Plot::new("compare-loss"), "step"))
        .height(plot_height)
        .legend(Legend::default())
        .allow_scroll(false)
        .show(ui, |p| {
            for (i, r) in c.runs.iter().enumerate() {
                let color = RUN_COLORS[i % RUN_COLORS.len()];
                p.line(Line::new(format!("{} loss", r.name), PlotPoints::from(r.loss_smooth.clone())).color(color).width(2.0));
                if !r.eval_loss.is_empty() {
                    p.points(Points::new(format!("{} eval", r.name), PlotPoints::from(r.eval_loss.clone())).color(color).radius(3.5));
                }
            }
        });
    if c.diff.is_empty() {
        ui.label("The configs are the same.");
        return;
    }
    egui::ScrollArea::both().id_salt("compare-diff").auto_shrink([false, true]).show(ui, |ui| {
        egui::Grid::new("compare-diff-grid").striped(true).spacing([14.0, 4.0]).show(ui, |ui| {
            ui.strong("Config");
            for (i, r) in c.runs.iter().enumerate() {
                ui.label(RichText::new(&r.name).strong().color(RUN_COLORS[i % RUN_COLORS.len()]));
            }
            ui.end_row();
            for (key, values) in &c.diff {
                ui.monospace(key);
                for v in values {
                    ui.label(v);
                }
                ui.end_row();
            }
        });
    });
}
