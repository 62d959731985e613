//! Export: write a run's LoRA adapter as a PEFT folder into a folder the person chooses, with
//! progress and the resulting path. The adapter is read back and checked against the base
//! model's shapes before it is written, so what lands is known to load. A run that has no
//! `adapter/` yet (failed, or interrupted) is exported from its newest checkpoint.

use std::path::{Path, PathBuf};

use crossbeam_channel::Sender;
use eframe::egui::{self, RichText, Ui};

use crate::RunConfig;
use crate::export::adapter::{load_peft, save_peft};
use crate::model::ModelSpec;
use crate::session::checkpoint;

use super::jobs::{Msg, Pick};
use super::widgets;
use super::{Action, AppState};

#[derive(Debug, Clone, PartialEq)]
pub enum ExportProgress {
    Step { fraction: f32, what: String },
    Done(Result<PathBuf, String>),
}

#[derive(Debug, Default)]
pub struct ExportState {
    /// The run whose adapter is exported.
    pub source: Option<PathBuf>,
    /// The folder the adapter folder is created in.
    pub dest: PathBuf,
    pub progress: Option<(f32, String)>,
    pub result: Option<Result<PathBuf, String>>,
}

impl ExportState {
    pub fn busy(&self) -> bool {
        self.progress.is_some()
    }
}

/// `parent/<run>-adapter`, or `-2`, `-3`, … when taken: an export never replaces a folder.
pub fn target_dir(parent: &Path, run_name: &str) -> PathBuf {
    let base = format!("{run_name}-adapter");
    let mut p = parent.join(&base);
    let mut n = 2;
    while p.exists() {
        p = parent.join(format!("{base}-{n}"));
        n += 1;
    }
    p
}

/// Read, check and write the adapter of `run_dir` into a new folder under `parent`.
pub fn export_adapter(run_dir: &Path, parent: &Path, tx: &Sender<Msg>) -> crate::Result<PathBuf> {
    let step = |fraction: f32, what: &str| {
        let _ = tx.send(Msg::Export(ExportProgress::Step { fraction, what: what.into() }));
    };
    if parent.as_os_str().is_empty() {
        return Err(crate::Error::msg("choose a destination folder first"));
    }
    step(0.05, "reading the run's config");
    let cfg = RunConfig::load(&run_dir.join(checkpoint::CONFIG_FILE))?;
    step(0.15, "reading the base model's shapes");
    let spec = ModelSpec::from_dir(&cfg.model.path)?;
    step(0.35, "reading the adapter");
    let adapter_dir = run_dir.join(checkpoint::ADAPTER_DIR);
    let (weights, lora, base) = if adapter_dir.join(crate::export::adapter::CONFIG_FILE).is_file() {
        let a = load_peft(&adapter_dir, &spec)?;
        (a.weights, a.lora, a.base_model)
    } else {
        let c = checkpoint::load_latest(run_dir)?;
        (c.weights, cfg.lora.clone(), cfg.model.path.display().to_string())
    };
    let name = run_dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "run".into());
    std::fs::create_dir_all(parent).map_err(|e| crate::Error::file(parent, e))?;
    let dest = target_dir(parent, &name);
    step(0.6, "writing adapter_model.safetensors");
    save_peft(&dest, &weights, &lora, &base)?;
    step(0.9, "checking the written adapter loads");
    load_peft(&dest, &spec)?;
    Ok(dest)
}

pub fn ui(ui: &mut Ui, state: &mut AppState, actions: &mut Vec<Action>) {
    ui.heading("Export");
    ui.label("Write a run's LoRA adapter as a PEFT folder (adapter_config.json + adapter_model.safetensors), loadable with peft's PeftModel.from_pretrained.");
    ui.add_space(6.0);
    let runs: Vec<PathBuf> = state.runs.records.ready().map(|r| r.iter().filter(|r| r.has_adapter || !r.checkpoints.is_empty()).map(|r| r.dir.clone()).collect()).unwrap_or_default();
    let e = &mut state.export;
    if e.source.is_none() {
        e.source = runs.first().cloned();
    }
    egui::Grid::new("export-grid").num_columns(2).spacing([12.0, 8.0]).show(ui, |ui| {
        let label = ui.label("Run");
        let shown = e.source.as_ref().and_then(|p| p.file_name()).map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "no run with an adapter yet".into());
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
        if ui.add_enabled(ready, egui::Button::new("Export adapter")).on_disabled_hover_text(why).clicked() {
            actions.push(Action::Export);
        }
        ui.add_enabled(false, egui::Button::new("Export merged 16-bit weights"))
            .on_disabled_hover_text("Merged safetensors and GGUF come with the interop work; not in this build yet.");
    });
    if let Some((f, what)) = &e.progress {
        ui.add(egui::ProgressBar::new(*f).text(what.as_str()).show_percentage());
    }
    match &e.result {
        Some(Ok(p)) => {
            widgets::ok_line(ui, "Exported to:");
            ui.add(egui::Label::new(RichText::new(p.display().to_string()).monospace()).selectable(true));
        }
        Some(Err(msg)) => widgets::error_box(ui, msg),
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_dir_never_reuses_a_folder() {
        let d = tempfile::tempdir().unwrap();
        let a = target_dir(d.path(), "run");
        assert_eq!(a, d.path().join("run-adapter"));
        std::fs::create_dir(&a).unwrap();
        assert_eq!(target_dir(d.path(), "run"), d.path().join("run-adapter-2"));
    }
}
