//! The Runs panel: every run folder under `output.dir` with its state, progress and final loss;
//! open one to see its curves, resume a stopped one, export its adapter. `scan` and `open` read
//! the folders on a worker; `row_view` decides what each row offers.

use std::path::{Path, PathBuf};

use eframe::egui::{self, RichText, Ui};

use crate::session::checkpoint::{self, RunStatus, StepMetrics};

use super::widgets::Load;
use super::{Action, AppState};

#[derive(Debug, Clone, PartialEq)]
pub struct RunRecord {
    pub dir: PathBuf,
    pub name: String,
    /// `run.json`, or why it could not be read.
    pub status: Result<RunStatus, String>,
    pub final_loss: Option<f64>,
    pub checkpoints: Vec<u64>,
    pub has_adapter: bool,
}

/// A past run opened for its curves.
#[derive(Debug, Clone, PartialEq)]
pub struct ViewedRun {
    pub dir: PathBuf,
    pub name: String,
    pub status: String,
    pub total_steps: u64,
    pub metrics: Vec<StepMetrics>,
}

/// Run folders (those with a `run.json`) under `dir`, newest first.
pub fn scan(dir: &Path) -> Vec<RunRecord> {
    let mut out: Vec<RunRecord> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.join(checkpoint::STATUS_FILE).is_file())
        .map(|d| {
            let metrics = checkpoint::read_metrics(&d);
            RunRecord {
                name: d.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default(),
                status: RunStatus::load(&d).map_err(|e| e.to_string()),
                final_loss: metrics.last().map(|m| m.loss),
                checkpoints: checkpoint::list(&d),
                has_adapter: d.join(checkpoint::ADAPTER_DIR).join(crate::export::adapter::CONFIG_FILE).is_file(),
                dir: d,
            }
        })
        .collect();
    out.sort_by(|a, b| {
        let when = |r: &RunRecord| r.status.as_ref().map(|s| s.updated.clone()).unwrap_or_default();
        when(b).cmp(&when(a)).then_with(|| b.name.cmp(&a.name))
    });
    out
}

pub fn open(dir: &Path) -> crate::Result<ViewedRun> {
    let status = RunStatus::load(dir)?;
    Ok(ViewedRun {
        dir: dir.to_path_buf(),
        name: dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default(),
        status: status.state,
        total_steps: status.total_steps,
        metrics: checkpoint::read_metrics(dir),
    })
}

#[derive(Debug, Clone, PartialEq)]
pub struct RowView {
    pub name: String,
    pub state: String,
    pub steps: String,
    pub final_loss: String,
    pub updated: String,
    pub can_resume: bool,
    pub can_export: bool,
}

/// What one row shows and offers. A folder that says `running` or `paused` but is not this
/// window's live run was left by a process that ended: it reads as interrupted and can resume.
pub fn row_view(r: &RunRecord, live_dir: Option<&Path>, live_active: bool) -> RowView {
    let is_live = live_dir.is_some_and(|d| d == r.dir);
    let (state, steps, updated) = match &r.status {
        Ok(s) => {
            let state = match s.state.as_str() {
                "running" | "paused" if !(is_live && live_active) => "interrupted".to_string(),
                other => other.to_string(),
            };
            (state, format!("{} / {}", s.step, s.total_steps), s.updated.replace('T', " ").trim_end_matches('Z').to_string())
        }
        Err(e) => (format!("unreadable: {e}"), "?".into(), String::new()),
    };
    let resumable = matches!(state.as_str(), "stopped" | "failed" | "interrupted");
    RowView {
        name: r.name.clone(),
        can_resume: resumable && !r.checkpoints.is_empty() && !live_active,
        can_export: r.has_adapter || !r.checkpoints.is_empty(),
        state,
        steps,
        final_loss: r.final_loss.map(|l| format!("{l:.4}")).unwrap_or_else(|| "–".into()),
        updated,
    }
}

#[derive(Debug, Default)]
pub struct RunsState {
    pub records: Load<Vec<RunRecord>>,
    /// The folder the records came from.
    pub dir: PathBuf,
}

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
        Load::Failed(e) => super::widgets::error_box(ui, e),
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
                            "done" => super::widgets::ok_color(ui),
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
                        });
                        ui.end_row();
                    }
                });
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(state: &str, checkpoints: Vec<u64>) -> RunRecord {
        RunRecord {
            dir: "/runs/a".into(),
            name: "a".into(),
            status: Ok(RunStatus {
                state: state.into(),
                step: 3,
                total_steps: 10,
                last_loss: Some(1.5),
                device: "cpu".into(),
                model: "m".into(),
                started: "2026-01-01T00:00:00Z".into(),
                updated: "2026-01-01T00:01:00Z".into(),
                error: None,
            }),
            final_loss: Some(1.5),
            checkpoints,
            has_adapter: false,
        }
    }

    #[test]
    fn stale_running_state_reads_as_interrupted_and_resumes() {
        let v = row_view(&record("running", vec![3]), None, false);
        assert_eq!(v.state, "interrupted");
        assert!(v.can_resume && v.can_export);
        assert_eq!(v.updated, "2026-01-01 00:01:00");
        let live = row_view(&record("running", vec![3]), Some(Path::new("/runs/a")), true);
        assert_eq!(live.state, "running");
        assert!(!live.can_resume, "never resume the run that is training now");
    }

    #[test]
    fn done_runs_do_not_resume_and_need_a_checkpoint_to_resume() {
        assert!(!row_view(&record("done", vec![10]), None, false).can_resume);
        assert!(!row_view(&record("stopped", vec![]), None, false).can_resume);
        assert!(row_view(&record("stopped", vec![3]), None, false).can_resume);
        assert_eq!(row_view(&record("stopped", vec![3]), None, false).final_loss, "1.5000");
    }
}
