//! The question asked before an action would lose something: unsaved edits to the config
//! (opening another one, the demo, quitting), or a run that is still training when the window
//! closes. Each answer is an `Action::Answer`; Escape or a click outside cancels.

use eframe::egui::{self, RichText};

use crate::app::msg::{Action, Answer};
use crate::app::state::{AppState, Confirm};

pub fn dialog(ctx: &egui::Context, state: &AppState, actions: &mut Vec<Action>) {
    let Some(question) = &state.confirm else { return };
    let modal = egui::Modal::new(egui::Id::unique("confirm")).show(ctx, |ui| {
        ui.set_max_width(480.0);
        match question {
            Confirm::DiscardEdits { doing } => {
                ui.heading("Unsaved edits");
                ui.add_space(4.0);
                ui.label(format!("The config {} has edits that are not saved. They are lost if you {doing} now.", state.config_name()));
                ui.add_space(8.0);
                ui.horizontal(|ui| {
                    // The demo's own file is never overwritten: its edits are saved with "Save config as…".
                    let can_save = state.config_path.is_some() && !state.config_is_demo;
                    if can_save && ui.button(RichText::new("Save and go on").strong()).clicked() {
                        actions.push(Action::Answer(Answer::Save));
                    }
                    if ui.button("Discard the edits").clicked() {
                        actions.push(Action::Answer(Answer::Discard));
                    }
                    if ui.button("Cancel").on_hover_text("Escape").clicked() {
                        actions.push(Action::Answer(Answer::Cancel));
                    }
                });
                if state.config_path.is_none() || state.config_is_demo {
                    ui.weak("To keep them, cancel and use File ▸ Save config as…");
                }
            }
            Confirm::QuitDuringRun => {
                ui.heading("A run is training");
                ui.add_space(4.0);
                ui.label(
                    "Quitting stops it after the current step and saves its adapter and a checkpoint, so it can be resumed from the Runs page.",
                );
                ui.add_space(8.0);
                ui.horizontal(|ui| {
                    if ui.button(RichText::new("Stop, save and quit").strong()).clicked() {
                        actions.push(Action::Answer(Answer::StopAndQuit));
                    }
                    if ui.button("Keep training").on_hover_text("Escape").clicked() {
                        actions.push(Action::Answer(Answer::Cancel));
                    }
                });
            }
        }
    });
    if modal.should_close() {
        actions.push(Action::Answer(Answer::Cancel));
    }
}
