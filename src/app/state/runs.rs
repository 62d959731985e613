//! The Runs panel's state: every run folder under `output.dir` (`scan`, on a worker), a past
//! run opened for its curves (`open`), and what each row shows and offers (`row_view`).

use std::path::{Path, PathBuf};

use crate::session::checkpoint::{self, RunStatus, StepMetrics};

use crate::app::jobs::Load;

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
    /// The run's own log, rebuilt from its folder (the live log belongs to the live run).
    pub log: Vec<String>,
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
    let metrics = checkpoint::read_metrics(dir);
    Ok(ViewedRun {
        dir: dir.to_path_buf(),
        name: dir.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default(),
        log: past_log(&status, &metrics, &checkpoint::list(dir)),
        status: status.state,
        total_steps: status.total_steps,
        metrics,
    })
}

/// A finished run's log as the monitor would have shown it, from what its folder keeps: when
/// and where it ran, each step's line, its checkpoints and how it ended.
pub fn past_log(status: &RunStatus, metrics: &[StepMetrics], checkpoints: &[u64]) -> Vec<String> {
    let mut log = vec![format!("{} on {}, started {}", status.model, status.device, status.started.replace('T', " "))];
    for m in metrics {
        log.push(super::training::step_line(m));
        if checkpoints.contains(&m.step) {
            log.push(format!("checkpoint at step {}", m.step));
        }
    }
    log.push(format!("{} at step {} of {} ({})", status.state, status.step, status.total_steps, status.updated.replace('T', " ")));
    if let Some(e) = &status.error {
        log.push(format!("failed: {e}"));
    }
    log
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
