//! The Preflight dialog, between pressing Start and the first step: what will run (model, data,
//! steps, device), the tokenizer and data checks, the untrained-token report with the fix to
//! accept, the memory budget, and either a Start button or the reason the run cannot start (for
//! a GPU the CUDA engine cannot start on, with the CPU offered as an explicit choice). It
//! draws the `PreflightView` a worker gathered (`state::preflight::check`).

use eframe::egui::{self, RichText, Ui};

use crate::app::jobs::Load;
use crate::app::msg::Action;
use crate::app::state::AppState;
use crate::app::state::preflight::{Level, Verdict, untrained_lines, verdict};
use crate::app::widgets;

fn level_line(ui: &mut Ui, level: Level, text: &str) {
    match level {
        Level::Ok => widgets::ok_line(ui, text),
        Level::Info => {
            ui.add(egui::Label::new(format!("ℹ {text}")).wrap());
        }
        Level::Warn => widgets::warning_line(ui, text),
        Level::Block => {
            let c = ui.visuals().error_fg_color;
            ui.add(egui::Label::new(RichText::new(format!("✖ {text}")).color(c)).wrap());
        }
    }
}

/// The modal dialog; drawn only while `state.preflight.open`.
pub fn dialog(ctx: &egui::Context, state: &mut AppState, actions: &mut Vec<Action>) {
    if !state.preflight.open {
        return;
    }
    let fix = state.config.dataset.fix_untrained_tokens;
    let modal = egui::Modal::new(egui::Id::unique("preflight")).show(ctx, |ui| {
        ui.set_width(640.0);
        ui.heading("Before the first step");
        ui.add_space(4.0);
        match &state.preflight.report {
            Load::Empty | Load::Loading => {
                ui.horizontal(|ui| {
                    ui.spinner();
                    ui.label("Checking the model, the tokenizer and the data…");
                });
                ui.add_space(8.0);
                if ui.button("Cancel").clicked() {
                    actions.push(Action::CancelPreflight);
                }
            }
            Load::Failed(e) => {
                ui.label("The run cannot start:");
                widgets::error_box(ui, e);
                ui.add_space(8.0);
                if ui.button("Close").clicked() {
                    actions.push(Action::CancelPreflight);
                }
            }
            Load::Ready(r) => {
                let r = r.clone();
                // As tall as the report (up to the window): the area the modal had while the
                // check ran is a spinner's height, and a scroll area sized from it would stay
                // that small, hiding the report behind a scroll bar (so `min_scrolled_height`).
                let height = (ctx.content_rect().height() - 220.0).max(240.0);
                egui::ScrollArea::vertical().max_height(height).min_scrolled_height(height).show(ui, |ui| {
                    egui::Grid::new("preflight-summary").num_columns(2).spacing([12.0, 4.0]).show(ui, |ui| {
                        for (k, v) in [("Model", &r.model), ("Data", &r.data), ("Steps", &r.steps), ("Device", &r.device)] {
                            ui.strong(k);
                            ui.add(egui::Label::new(v.as_str()).wrap());
                            ui.end_row();
                        }
                    });
                    ui.separator();
                    ui.strong("Tokenizer and data checks");
                    for c in &r.checks {
                        level_line(ui, c.level, &c.text);
                    }
                    ui.separator();
                    ui.strong("Untrained tokens");
                    for (l, t) in untrained_lines(&r, fix) {
                        level_line(ui, l, &t);
                    }
                    ui.separator();
                    widgets::memory_summary(ui, r.budget.as_ref(), None);
                });
                ui.separator();
                let v = verdict(&r, fix);
                ui.horizontal(|ui| {
                    match &v {
                        Verdict::Ready => {
                            if ui.button(RichText::new("▶ Start training").strong()).on_hover_text("Enter").clicked() {
                                actions.push(Action::ConfirmStart);
                            }
                        }
                        Verdict::NeedsFix => {
                            if ui.button("Accept the fix and start").clicked() {
                                actions.push(Action::AcceptFixAndStart);
                            }
                        }
                        Verdict::CpuOffered(_) => {
                            if ui
                                .button("Train on the CPU instead")
                                .on_hover_text("Set the device to CPU and check the run again (far slower than a GPU)")
                                .clicked()
                            {
                                actions.push(Action::UseCpu);
                            }
                        }
                        Verdict::Blocked(_) => {
                            ui.add_enabled(false, egui::Button::new("▶ Start training"));
                        }
                    }
                    if ui.button("Cancel").on_hover_text("Escape").clicked() {
                        actions.push(Action::CancelPreflight);
                    }
                });
                match &v {
                    Verdict::Blocked(reason) => level_line(ui, Level::Block, &format!("Cannot start: {reason}")),
                    Verdict::CpuOffered(reason) => level_line(ui, Level::Block, &format!("Cannot start on the GPU: {reason}")),
                    _ => {}
                }
            }
        }
    });
    if modal.should_close() {
        actions.push(Action::CancelPreflight);
    }
}
