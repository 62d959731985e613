//! The memory budget beside the Hyperparameters: a picker of the machine to plan for (this one
//! or one of the card profiles, where a card the engine cannot run says why), the plan's bar with
//! the verdict and legend (other processes' memory as a term of its own), and the largest sequence
//! length, batch size and LoRA rank that fit, each applied with one click. The state and the
//! plan are `state::memory`'s; the page composes this panel next to the fields it follows.

use eframe::egui::{self, RichText, Ui};

use crate::app::msg::Action;
use crate::app::state::AppState;
use crate::app::state::memory::{Card, Setting, measured_now, no_plan_reason, profile_help, profile_label, refresh, verdict};
use crate::app::widgets;
use crate::backend::card::PROFILES;

/// The panel on the Hyperparameters page.
pub fn panel(ui: &mut Ui, state: &mut AppState, actions: &mut Vec<Action>) {
    refresh(state);
    ui.horizontal(|ui| {
        let label = ui.label("Preview for").on_hover_text("Plan the run for this machine, or for a card you do not have (as if idle).");
        let machine = state.budget.machine.ready().cloned();
        let current = state.budget.card.label(machine.as_ref());
        let mut card = state.budget.card;
        egui::ComboBox::from_id_salt("budget-card")
            // Tall enough for every profile without scrolling.
            .height(560.0)
            .selected_text(current)
            .show_ui(ui, |ui| {
                let this = ui.selectable_value(&mut card, Card::ThisMachine, Card::ThisMachine.label(machine.as_ref()));
                if let Some(m) = machine.as_ref().filter(|m| m.gpu.is_none() && !m.no_gpu_reason.is_empty()) {
                    this.on_hover_text(format!("No GPU: {}", m.no_gpu_reason));
                }
                for p in PROFILES {
                    ui.selectable_value(&mut card, Card::Profile(p), profile_label(p)).on_hover_text(profile_help(p));
                }
            })
            .response
            .labelled_by(label.id);
        if card != state.budget.card {
            state.budget.card = card;
            refresh(state);
        }
    });
    if let Some(why) = no_plan_reason(state) {
        ui.weak(why);
        return;
    }
    let Some((k, v)) = state.budget.view.clone() else { return };
    let measured = measured_now(state);
    widgets::memory_bar(ui, &v, measured);
    let (line, good) = verdict(&v);
    let color = if good { widgets::ok_color(ui) } else { ui.visuals().error_fg_color };
    ui.label(RichText::new(line).color(color).strong());
    widgets::memory_legend(ui, &v, measured);
    let fixes = state.budget.fixes.as_ref().filter(|(fk, _)| *fk == k).map(|(_, f)| f);
    ui.horizontal_wrapped(|ui| {
        ui.label("Largest that fits (the rest as set):").on_hover_text("Each found by planning with only that setting changed.");
        let Some(f) = fixes else {
            ui.spinner();
            return;
        };
        let c = &state.config;
        for (setting, name, found, now) in [
            (Setting::MaxSeqLen, "seq len", f.max_seq_len, c.train.max_seq_len),
            (Setting::BatchSize, "batch", f.batch_size, c.train.batch_size),
            (Setting::LoraRank, "rank", f.lora_r, c.lora.r),
        ] {
            match found {
                Some(value) => {
                    let cap = if setting == Setting::MaxSeqLen && value == f.seq_cap { " (the model's context)" } else { "" };
                    let text = format!("{name} {value}{cap}");
                    if value == now {
                        ui.add_enabled(false, egui::Button::new(text)).on_disabled_hover_text("already set");
                    } else if ui.button(text).on_hover_text(format!("Set {name} to {value}")).clicked() {
                        actions.push(Action::ApplyBudget(setting, value));
                    }
                }
                None => {
                    ui.weak(format!("{name}: nothing fits"));
                }
            }
        }
    });
    if let Some(f) = fixes {
        for s in &f.suggestions {
            ui.label(format!("To fit: {s}"));
        }
    }
}
