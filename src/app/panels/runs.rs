//! The Runs panel: every run folder under `output.dir` with its state, progress and final loss;
//! open one to see its curves, resume a stopped one, export its adapter.

use std::path::Path;

use eframe::egui::{self, RichText, Ui};

use crate::app::jobs::Load;
use crate::app::msg::Action;
use crate::app::state::AppState;
use crate::app::state::runs::row_view;
use crate::app::widgets;

pub fn ui(ui: &mut Ui, state: &mut AppState, actions: &mut Vec<Action>) {
    ui.horizontal(|ui| {
        ui.heading("Runs");
        ui.weak(state.config.output.dir.display().to_string());
        if ui.button("⟳ Refresh").clicked() {
            actions.push(Action::RefreshRuns);
        }
    });
    let live_dir = state.training.run_dir().map(Path::to_path_buf);
    let live_active = state.training.phase.is_active();
    match &state.runs.records {
        Load::Empty | Load::Loading => {
            ui.spinner();
        }
        Load::Failed(e) => widgets::error_box(ui, e),
        Load::Ready(records) if records.is_empty() => {
            ui.label("No runs in this folder yet. Finished, stopped and failed runs appear here.");
        }
        Load::Ready(records) => {
            egui::ScrollArea::vertical().auto_shrink([false, false]).show(ui, |ui| {
                egui::Grid::new("runs-grid").num_columns(6).striped(true).spacing([14.0, 6.0]).show(ui, |ui| {
                    for h in ["Run", "State", "Steps", "Final loss", "Updated (UTC)", ""] {
                        ui.strong(h);
                    }
                    ui.end_row();
                    for r in records {
                        let v = row_view(r, live_dir.as_deref(), live_active);
                        ui.label(&v.name).on_hover_text(r.dir.display().to_string());
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
                        ui.label(&v.steps);
                        ui.label(&v.final_loss);
                        ui.label(&v.updated);
                        ui.horizontal(|ui| {
                            if ui.button("Open").on_hover_text("show this run's curves").clicked() {
                                actions.push(Action::OpenRun(r.dir.clone()));
                            }
                            if ui
                                .add_enabled(v.can_resume, egui::Button::new("Resume"))
                                .on_hover_text("continue from its newest checkpoint")
                                .clicked()
                            {
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
                        ui.end_row();
                    }
                });
            });
        }
    }
}
