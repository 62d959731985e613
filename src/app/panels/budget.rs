//! The memory budget beside the Hyperparameters: a picker of the machine to plan for (this one
//! or one of the card profiles, where a card the engine cannot run says why), the plan's bar with
//! the verdict and legend (other processes' memory as a term of its own), and the largest sequence
//! length, batch size and LoRA rank that fit, each applied with one click. The state and the
//! plan are `state::memory`'s; the page composes this panel next to the fields it follows.

use eframe::egui::{self, RichText, Ui};

use crate::model::ModelSpec;

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
    ui.horizontal(|ui| {
        let label = ui
            .label("Plan for")
            .on_hover_text("Plan the model folder, or a model you do not have from its named shape (only its dimensions are needed).");
        let mut shape = state.budget.shape.clone();
        let shown = shape.as_deref().map_or_else(|| "the model folder".to_string(), |n| format!("{n} (shape only, no files)"));
        egui::ComboBox::from_id_salt("budget-shape")
            .selected_text(shown)
            .show_ui(ui, |ui| {
                ui.selectable_value(&mut shape, None, "the model folder");
                for &name in ModelSpec::SHAPE_NAMES {
                    ui.selectable_value(&mut shape, Some(name.to_string()), name);
                }
            })
            .response
            .labelled_by(label.id);
        if shape != state.budget.shape {
            state.budget.shape = shape;
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
        // When the search stopped at its useful end rather than at the memory, say which end.
        let rows = if c.dataset.eval_split.is_some() { "every training row" } else { "the whole dataset" };
        let whole_data =
            if c.train.grad_accum > 1 { format!(" ({rows} per step, with accumulation)") } else { format!(" ({rows} per step)") };
        for (setting, name, found, now, cap, why) in [
            (Setting::MaxSeqLen, "seq len", f.max_seq_len, c.train.max_seq_len, f.seq_cap, " (the model's context)"),
            (
                Setting::BatchSize,
                "batch",
                f.batch_size,
                c.train.batch_size,
                if f.batch_cap_is_data { f.batch_cap } else { 0 },
                whole_data.as_str(),
            ),
            (Setting::LoraRank, "rank", f.lora_r, c.lora.r, f.rank_cap, " (full rank of the adapted linears)"),
        ] {
            match found {
                Some(value) => {
                    let text = format!("{name} {value}{}", if value == cap { why } else { "" });
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
