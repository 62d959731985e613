//! The Model panel: choose a Hugging Face model folder (chooser, drop, recent list) and see what
//! it holds before anything is loaded on a device. It draws the `ModelInfo` a worker produced
//! (`state::model::describe`).

use eframe::egui;

use crate::app::jobs::Load;
use crate::app::msg::{Action, Pick};
use crate::app::state::{AppState, model};
use crate::app::widgets;

pub fn ui(ui: &mut egui::Ui, state: &mut AppState, actions: &mut Vec<Action>) {
    ui.heading("Model");
    ui.label("A Hugging Face model folder: config.json, *.safetensors and tokenizer.json. Drop one anywhere on the window.");
    ui.add_space(6.0);
    let problems = state.problems();
    egui::Grid::new("model-grid").num_columns(2).spacing([12.0, 8.0]).show(ui, |ui| {
        widgets::path_field(ui, &problems, "model.path", &mut state.config.model.path, Some(Action::Pick(Pick::ModelFolder)), actions);
        ui.end_row();
        widgets::optional_path_field(
            ui,
            &problems,
            "model.adapter",
            &mut state.config.model.adapter,
            Action::Pick(Pick::AdapterFolder),
            actions,
        );
        ui.end_row();
    });
    if !state.model.recent.models.is_empty() {
        ui.add_space(6.0);
        ui.horizontal_wrapped(|ui| {
            ui.label("Recent:");
            for p in &state.model.recent.models {
                // Called as runs are: a hub snapshot by its repo, the demo's `model/` by `demo`.
                let name = crate::session::model_name(p);
                if ui.button(name).on_hover_text(p.display().to_string()).clicked() {
                    actions.push(Action::SetModel(p.clone()));
                }
            }
        });
    }
    cached_models(ui, state, actions);
    ui.separator();
    match &state.model.info {
        Load::Empty => {
            ui.weak("No model folder chosen yet.");
        }
        Load::Loading => {
            ui.horizontal(|ui| {
                ui.spinner();
                ui.label("Reading the model folder…");
            });
        }
        // The reason is at the Model folder field, above: said once.
        Load::Failed(_) => {
            ui.weak("Nothing to show: the folder could not be read (the reason is at the Model folder field).");
        }
        Load::Ready(info) => {
            egui::Grid::new("model-info").num_columns(2).striped(true).spacing([16.0, 6.0]).show(ui, |ui| {
                for (k, v) in model::info_rows(info) {
                    ui.strong(k);
                    ui.add(egui::Label::new(v).wrap());
                    ui.end_row();
                }
            });
            for w in &info.tokenizer_warnings {
                widgets::warning_line(ui, w);
            }
        }
    }
}

/// The models already downloaded with Hugging Face tools, by repo id: one click trains one.
fn cached_models(ui: &mut egui::Ui, state: &AppState, actions: &mut Vec<Action>) {
    let Some(dir) = &state.model.cache_dir else { return };
    ui.add_space(6.0);
    ui.horizontal_wrapped(|ui| {
        ui.label("On this machine:").on_hover_text(format!("Models in the Hugging Face cache, {}", dir.display()));
        match &state.model.cached {
            Load::Ready(models) if models.is_empty() => {
                ui.weak(format!(
                    "none yet: a model downloaded with `hf download ORG/NAME` appears here (Hugging Face cache {})",
                    dir.display()
                ));
            }
            Load::Ready(models) => {
                for m in models {
                    let current = state.config.model.path == m.path;
                    if ui.selectable_label(current, &m.repo_id).on_hover_text(m.path.display().to_string()).clicked() {
                        actions.push(Action::SetModel(m.path.clone()));
                    }
                }
            }
            _ => {
                ui.spinner();
            }
        }
    });
}
