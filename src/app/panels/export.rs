//! The Export page: pick a run and a folder, write the adapter, the merged weights or a GGUF
//! file with its Ollama Modelfile on a worker (`state::export`), with progress and the resulting
//! path.

use std::path::PathBuf;

use eframe::egui::{self, RichText, Ui};

use crate::export::gguf::GgufQuant;
use crate::export::history::ExportRecord;
use crate::export::merged::MergeDtype;

use crate::app::msg::{Action, Pick};
use crate::app::state::AppState;
use crate::app::state::export::ExportKind;
use crate::app::widgets;

pub fn ui(ui: &mut Ui, state: &mut AppState, actions: &mut Vec<Action>) {
    ui.heading("Export");
    ui.label("Write a run's LoRA adapter as a PEFT folder (adapter_config.json + adapter_model.safetensors), loadable with peft's PeftModel.from_pretrained, the base model with the adapter merged in, as a 16-bit Hugging Face folder, or the merged model as GGUF (f16, bf16, q8_0, q4_k_m) with an Ollama Modelfile. Token rows the run trained go with all of them.");
    ui.add_space(6.0);
    let runs: Vec<PathBuf> = state
        .runs
        .records
        .ready()
        .map(|r| r.iter().filter(|r| r.has_adapter || !r.checkpoints.is_empty()).map(|r| r.dir.clone()).collect())
        .unwrap_or_default();
    let e = &mut state.export;
    if e.source.is_none() {
        e.source = runs.first().cloned();
    }
    let earlier: &[(ExportRecord, bool)] =
        state.runs.records.ready().and_then(|r| r.iter().find(|r| Some(&r.dir) == e.source.as_ref())).map_or(&[], |r| &r.exports);
    egui::Grid::new("export-grid").num_columns(2).spacing([12.0, 8.0]).show(ui, |ui| {
        let label = ui.label("Run");
        let shown = e
            .source
            .as_ref()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| "no run with an adapter yet".into());
        egui::ComboBox::from_id_salt("export-source")
            .selected_text(shown)
            .width(360.0)
            .show_ui(ui, |ui| {
                for r in &runs {
                    let name = r.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
                    ui.selectable_value(&mut e.source, Some(r.clone()), name);
                }
            })
            .response
            .labelled_by(label.id);
        ui.end_row();
        let label = ui.label("Into folder");
        ui.horizontal(|ui| {
            let mut text = e.dest.display().to_string();
            if ui.add(egui::TextEdit::singleline(&mut text).desired_width(360.0).hint_text("a folder")).labelled_by(label.id).changed() {
                e.dest = PathBuf::from(text.trim());
            }
            if ui.button("Browse…").clicked() {
                actions.push(Action::Pick(Pick::ExportFolder));
            }
        });
        ui.end_row();
    });
    ui.add_space(6.0);
    ui.horizontal(|ui| {
        let ready = e.source.is_some() && !e.dest.as_os_str().is_empty() && !e.busy();
        let why = if e.busy() {
            "an export is running"
        } else if e.source.is_none() {
            "no run to export yet"
        } else {
            "choose a destination folder"
        };
        if ui.add_enabled(ready, egui::Button::new("Export adapter")).on_hover_text("adapter_config.json + adapter_model.safetensors, for peft").on_disabled_hover_text(why).clicked() {
            actions.push(Action::Export(ExportKind::Adapter));
        }
        ui.separator();
        let merged = ui
            .add_enabled(ready, egui::Button::new("Export merged weights"))
            .on_hover_text("The base model with the adapter merged into every linear, as a Hugging Face folder (safetensors shards, config, tokenizer) that transformers, vLLM or llama.cpp's converter load without peft")
            .on_disabled_hover_text(why);
        egui::ComboBox::from_id_salt("export-dtype").selected_text(e.merged_dtype.name()).width(64.0).show_ui(ui, |ui| {
            ui.selectable_value(&mut e.merged_dtype, MergeDtype::Bf16, "bf16");
            ui.selectable_value(&mut e.merged_dtype, MergeDtype::F16, "f16");
        });
        if merged.clicked() {
            actions.push(Action::Export(ExportKind::Merged(e.merged_dtype)));
        }
        ui.separator();
        let gguf = ui
            .add_enabled(ready, egui::Button::new("Export GGUF"))
            .on_hover_text("The merged model as one .gguf file for llama.cpp, Ollama or LM Studio, with its tokenizer and chat template, and an Ollama Modelfile beside it (its sampling settings are the Chat page's)")
            .on_disabled_hover_text(why);
        egui::ComboBox::from_id_salt("export-gguf-quant").selected_text(e.gguf_quant.name()).width(72.0).show_ui(ui, |ui| {
            for q in GgufQuant::ALL {
                ui.selectable_value(&mut e.gguf_quant, q, q.name());
            }
        });
        if gguf.clicked() {
            actions.push(Action::Export(ExportKind::Gguf(e.gguf_quant)));
        }
    });
    if let Some((f, what)) = &e.progress {
        ui.add(egui::ProgressBar::new(*f).text(what.as_str()).show_percentage());
    }
    match &e.result {
        Some(Ok(p)) => {
            widgets::ok_line(ui, "Exported to:");
            ui.add(egui::Label::new(RichText::new(p.display().to_string()).monospace()).selectable(true));
            ui.horizontal(|ui| {
                if ui.button("📂 Open folder").on_hover_text("Show it in the file manager").clicked() {
                    actions.push(Action::OpenFolder(p.clone()));
                }
                if ui.button("📋 Copy path").clicked() {
                    actions.push(Action::CopyText(p.display().to_string()));
                }
            });
        }
        Some(Err(msg)) => widgets::error_box(ui, msg),
        None => {}
    }
    exports_of_the_run(ui, earlier, actions);
}

/// The selected run's exports (`exports.jsonl`), newest first: when, what, the folder or file
/// (its name; the whole path on hover), and its folder to open or its path to copy.
fn exports_of_the_run(ui: &mut Ui, earlier: &[(ExportRecord, bool)], actions: &mut Vec<Action>) {
    if earlier.is_empty() {
        return;
    }
    ui.add_space(12.0);
    ui.strong(format!("Exports of this run ({})", earlier.len()));
    egui::Grid::new("export-history").num_columns(4).spacing([12.0, 4.0]).striped(true).show(ui, |ui| {
        for (x, present) in earlier.iter().rev() {
            ui.label(format!("{} UTC", x.time.trim_end_matches('Z').replace('T', " ")));
            ui.label(&x.kind);
            let name = x.path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| x.path.display().to_string());
            let path = x.path.display().to_string();
            if *present {
                ui.add(egui::Label::new(RichText::new(name).monospace())).on_hover_text(&path);
            } else {
                ui.weak(format!("{name} (moved or deleted)")).on_hover_text(&path);
            }
            ui.horizontal(|ui| {
                // A GGUF export is a file in a folder of its own: open that folder.
                let folder = match x.path.parent() {
                    Some(parent) if x.kind.starts_with("gguf") => parent.to_path_buf(),
                    _ => x.path.clone(),
                };
                if ui.add_enabled(*present, egui::Button::new("📂")).on_hover_text("Show it in the file manager").clicked() {
                    actions.push(Action::OpenFolder(folder));
                }
                if ui.button("📋").on_hover_text("Copy its path").clicked() {
                    actions.push(Action::CopyText(path));
                }
            });
            ui.end_row();
        }
    });
}
