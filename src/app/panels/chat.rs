//! The Chat page: talk to the fine-tuned model, or to it and its base side by side (same prompt,
//! same seed), streamed token by token, with the speed of each answer. The model is a run at one
//! of its checkpoints or the Model page's folder and adapter; answering happens on the chat
//! worker (`state::chat`), so the window and a run that trains never wait for it.

use eframe::egui::{self, Key, Modifiers, RichText, Ui};

use crate::app::jobs::Load;
use crate::app::msg::{Action, ChatAction};
use crate::app::state::AppState;
use crate::app::state::chat::{AnswerView, ChatSource};
use crate::app::widgets;

pub const INPUT_ID: &str = "chat-input";

pub fn ui(ui: &mut Ui, state: &mut AppState, actions: &mut Vec<Action>) {
    ui.horizontal(|ui| {
        ui.heading("Chat");
        ui.weak("try the fine-tuned model; compare it with the base");
    });
    source_row(ui, state, actions);
    settings(ui, state);
    ui.separator();
    let input_height = 92.0;
    let c = &state.chat;
    egui::ScrollArea::vertical()
        .id_salt("chat-turns")
        .max_height((ui.available_height() - input_height).max(80.0))
        .stick_to_bottom(true)
        .auto_shrink([false, false])
        .show(ui, |ui| {
            if c.turns.is_empty() {
                ui.add_space(8.0);
                ui.weak(match &c.model {
                    Load::Ready(_) => "Type a message below; Enter sends it, Shift+Enter starts a new line.",
                    _ => "Type a message below: the model loads when you send it (or press Load).",
                });
            }
            for t in &c.turns {
                ui.add_space(6.0);
                ui.label(RichText::new("You").strong());
                ui.add(egui::Label::new(&t.user).wrap());
                ui.add_space(4.0);
                if t.answers.len() == 2 {
                    ui.columns(2, |cols| {
                        for (col, a) in cols.iter_mut().zip(&t.answers) {
                            answer(col, a, c.answering);
                        }
                    });
                } else if let Some(a) = t.answers.first() {
                    answer(ui, a, c.answering);
                }
                ui.separator();
            }
        });
    input_row(ui, state, actions);
}

fn source_row(ui: &mut Ui, state: &mut AppState, actions: &mut Vec<Action>) {
    let records = state.runs.records.ready().cloned().unwrap_or_default();
    let c = &mut state.chat;
    let config_label = ChatSource::from_config(&state.config).label();
    ui.horizontal_wrapped(|ui| {
        ui.label("Model");
        let selected = match &c.run {
            Some(d) => records.iter().find(|r| &r.dir == d).map(|r| format!("run {}", r.name)).unwrap_or_else(|| d.display().to_string()),
            None => format!("Model page: {config_label}"),
        };
        egui::ComboBox::from_id_salt("chat-source")
            .selected_text(selected)
            .width(300.0)
            .show_ui(ui, |ui| {
                if ui.selectable_label(c.run.is_none(), format!("Model page: {config_label}")).clicked() {
                    c.run = None;
                    c.step = None;
                }
                for r in &records {
                    let state = r.status.as_ref().map(|s| s.state.clone()).unwrap_or_else(|_| "unreadable".into());
                    let usable = !r.checkpoints.is_empty() || r.has_adapter;
                    let text = format!("run {} ({state}{})", r.name, if usable { "" } else { ", no checkpoint yet" });
                    if ui.add_enabled(usable, egui::Button::selectable(c.run.as_ref() == Some(&r.dir), text)).clicked() {
                        c.run = Some(r.dir.clone());
                        c.step = None;
                    }
                }
            })
            .response
            .on_hover_text("A run answers with its newest checkpoint (or another one, next); the Model page's choice with its adapter.");
        if let Some(r) = c.run.as_ref().and_then(|d| records.iter().find(|r| &r.dir == d))
            && !r.checkpoints.is_empty()
        {
            let newest = *r.checkpoints.last().expect("not empty");
            let text = |s: Option<u64>| match s {
                None => format!("newest (step {newest})"),
                Some(s) => format!("step {s}"),
            };
            egui::ComboBox::from_id_salt("chat-step").selected_text(text(c.step)).show_ui(ui, |ui| {
                ui.selectable_value(&mut c.step, None, text(None));
                for &s in r.checkpoints.iter().rev() {
                    ui.selectable_value(&mut c.step, Some(s), text(Some(s)));
                }
            });
        }
        let source = c.source(&state.config);
        let loading = c.model.is_loading();
        let current = c.model.ready().is_some_and(|m| m.source == source);
        let label = if current { "Reload" } else { "Load" };
        if ui.add_enabled(!loading && !c.answering, egui::Button::new(label)).on_hover_text("load this model for answering").clicked() {
            actions.push(Action::Chat(ChatAction::Load));
        }
        match &c.model {
            Load::Loading => {
                ui.spinner();
                ui.label("loading…");
            }
            Load::Ready(m) => {
                let what = if m.has_adapter { "with the adapter" } else { "no adapter: the base model answers" };
                let stale = if current { "" } else { " · the choice changed: Load to switch" };
                // Middle dots, not parentheses: the source and the device have their own.
                ui.label(format!("loaded {} · {} · {what} · {:.1} s{stale}", m.source.label(), m.device, m.load_secs))
                    .on_hover_text(m.adapter.as_ref().map(|a| a.display().to_string()).unwrap_or_default());
            }
            Load::Failed(e) => {
                ui.colored_label(ui.visuals().error_fg_color, "could not load").on_hover_text(e);
            }
            Load::Empty => {}
        }
    });
    if let Load::Failed(e) = &state.chat.model {
        widgets::error_box(ui, e);
    }
}

fn settings(ui: &mut Ui, state: &mut AppState) {
    let c = &mut state.chat;
    let adapter = c.model.ready().is_none_or(|m| m.has_adapter);
    ui.horizontal(|ui| {
        ui.add_enabled(adapter, egui::Checkbox::new(&mut c.side_by_side, "Side by side with the base model"))
            .on_hover_text("Each turn is answered by the fine-tuned model and by the base (the same weights without the adapter), with the same settings and seed, in one batched pass.")
            .on_disabled_hover_text("The loaded model has no adapter.");
    });
    egui::CollapsingHeader::new("System message and sampling").id_salt("chat-settings").show(ui, |ui| {
        ui.horizontal(|ui| {
            ui.label("System");
            ui.add(
                egui::TextEdit::multiline(&mut c.system)
                    .id_salt("chat-system")
                    .desired_rows(2)
                    .desired_width(f32::INFINITY)
                    .hint_text("optional; changing it starts a new conversation"),
            );
        });
        let p = &mut c.params;
        egui::Grid::new("chat-sampling").num_columns(8).spacing([10.0, 4.0]).show(ui, |ui| {
            ui.label("Temperature").on_hover_text("0 always picks the most likely token (greedy)");
            ui.add(egui::DragValue::new(&mut p.temperature).range(0.0..=2.0).speed(0.01).max_decimals(2));
            ui.label("Top-k").on_hover_text("keep the k most likely tokens (0: all)");
            ui.add(egui::DragValue::new(&mut p.top_k).range(0..=1000));
            ui.label("Top-p").on_hover_text("keep the most likely tokens whose probabilities add up to p (1: all)");
            ui.add(egui::DragValue::new(&mut p.top_p).range(0.01..=1.0).speed(0.01).max_decimals(2));
            ui.label("Min-p").on_hover_text("keep tokens at least p times as likely as the most likely one (0: all)");
            ui.add(egui::DragValue::new(&mut p.min_p).range(0.0..=1.0).speed(0.01).max_decimals(2));
            ui.end_row();
            ui.label("Repetition penalty").on_hover_text("above 1 makes tokens already said less likely (1: off)");
            ui.add(egui::DragValue::new(&mut p.repetition_penalty).range(0.5..=2.0).speed(0.01).max_decimals(2));
            ui.label("Seed").on_hover_text("the same seed, prompt and settings give the same answer");
            ui.add(egui::DragValue::new(&mut p.seed));
            ui.label("Max new tokens");
            ui.add(egui::DragValue::new(&mut p.max_new_tokens).range(1..=32768));
            if ui.button("Greedy").on_hover_text("temperature 0: the most likely token every time").clicked() {
                p.temperature = 0.0;
            }
            ui.end_row();
        });
        ui.horizontal(|ui| {
            ui.label("Stop strings").on_hover_text("one per line (\\n for a new line); the answer ends before the first that appears");
            ui.add(egui::TextEdit::multiline(&mut c.stop).id_salt("chat-stop").desired_rows(1).desired_width(260.0));
        });
    });
}

fn answer(ui: &mut Ui, a: &AnswerView, answering: bool) {
    ui.horizontal(|ui| {
        let who = if a.who.is_empty() { "Assistant".to_string() } else { format!("Assistant · {}", a.who) };
        ui.label(RichText::new(who).strong());
        if a.finish.is_none() && answering {
            ui.spinner();
        }
        ui.weak(a.stats());
    });
    ui.add(egui::Label::new(if a.text.is_empty() && a.finish.is_none() { "…" } else { a.text.as_str() }).wrap().selectable(true));
}

fn input_row(ui: &mut Ui, state: &mut AppState, actions: &mut Vec<Action>) {
    let c = &mut state.chat;
    if let Some(e) = &c.error {
        ui.colored_label(ui.visuals().error_fg_color, format!("The answer failed: {e}"));
    }
    let id = egui::Id::unique(INPUT_ID);
    // Enter sends; Shift+Enter is a new line. Taken before the text field sees it.
    let send_key = ui.memory(|m| m.has_focus(id)) && ui.input_mut(|i| i.consume_key(Modifiers::NONE, Key::Enter));
    ui.horizontal(|ui| {
        let w = ui.available_width() - 150.0;
        ui.add(
            egui::TextEdit::multiline(&mut c.input)
                .id(id)
                .desired_rows(3)
                .desired_width(w.max(120.0))
                .hint_text("Message (Enter sends, Shift+Enter for a new line)"),
        );
        ui.vertical(|ui| {
            if c.answering {
                if ui.button("■ Stop").on_hover_text("end the answer here (what it said stays)").clicked() {
                    actions.push(Action::Chat(ChatAction::Stop));
                }
            } else if ui.add_enabled(!c.input.trim().is_empty(), egui::Button::new("Send")).clicked() {
                actions.push(Action::Chat(ChatAction::Send));
            }
            if ui.add_enabled(!c.answering && !c.turns.is_empty(), egui::Button::new("New chat")).clicked() {
                actions.push(Action::Chat(ChatAction::Clear));
            }
            if ui.add_enabled(!c.turns.is_empty(), egui::Button::new("Copy")).on_hover_text("copy the conversation as text").clicked() {
                actions.push(Action::CopyText(c.transcript()));
            }
        });
    });
    if send_key && !c.answering && !c.input.trim().is_empty() {
        actions.push(Action::Chat(ChatAction::Send));
    }
}
