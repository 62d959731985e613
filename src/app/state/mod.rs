//! What the window shows, as plain data, and the work that produces it: one module per panel
//! with its state and view model (what to show, computed apart from drawing, so the tests check
//! it without pixels) and the functions its workers run. Nothing here draws, and nothing here
//! imports a panel or a message: the panels (`app::panels`) read this, `app::msg` carries it.

pub mod chat;
pub mod curves;
pub mod dataset;
pub mod export;
pub mod memory;
pub mod model;
pub mod preflight;
pub mod runs;
pub mod training;

use std::path::PathBuf;

use crate::RunConfig;

use super::fields::{self, Problems};
use super::jobs::Load;
use training::Phase;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Page {
    Model,
    Dataset,
    Hyper,
    Monitor,
    Runs,
    Chat,
    Export,
}

impl Page {
    pub const ALL: [Page; 7] = [Page::Model, Page::Dataset, Page::Hyper, Page::Monitor, Page::Runs, Page::Chat, Page::Export];

    pub fn title(self) -> &'static str {
        match self {
            Page::Model => "Model",
            Page::Dataset => "Dataset",
            Page::Hyper => "Hyperparameters",
            Page::Monitor => "Training",
            Page::Runs => "Runs",
            Page::Chat => "Chat",
            Page::Export => "Export",
        }
    }
}

/// A message above the page, and how long it stays up besides being dismissed.
#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    pub text: String,
    pub lasts: Lasts,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lasts {
    UntilDismissed,
    /// Why Start was refused: gone once Start is possible.
    WhileStartBlocked,
    /// About the run in progress: gone once it has ended.
    WhileRunActive,
}

/// A question asked before an action that would lose something.
#[derive(Debug, Clone, PartialEq)]
pub enum Confirm {
    /// The config has edits that are not saved; `doing` says what was asked for ("open another
    /// config"). The app keeps the action itself until the answer comes.
    DiscardEdits { doing: String },
    /// The window is closing while a run trains.
    QuitDuringRun,
}

/// Everything the window shows, as plain data.
#[derive(Debug)]
pub struct AppState {
    pub page: Page,
    pub config: RunConfig,
    /// The file the config came from or was last saved to.
    pub config_path: Option<PathBuf>,
    /// The config as last loaded or saved, to show unsaved edits.
    pub saved_config: RunConfig,
    /// Whether `config_path` is the demo's own file (saving it asks for a new name instead).
    pub config_is_demo: bool,
    pub model: model::ModelState,
    pub dataset: dataset::DatasetState,
    pub preflight: preflight::PreflightState,
    pub training: training::TrainingState,
    pub runs: runs::RunsState,
    pub export: export::ExportState,
    pub chat: chat::ChatState,
    pub budget: memory::BudgetState,
    /// Messages for the person (errors from workers, notes), each shown once; dismissable.
    pub notices: Vec<Notice>,
    /// A question the window asks before going on (unsaved edits, quitting during a run).
    pub confirm: Option<Confirm>,
    pub settings_dir: PathBuf,
}

impl AppState {
    pub fn new(config: RunConfig, config_path: Option<PathBuf>, config_is_demo: bool, settings_dir: PathBuf) -> Self {
        let recent = model::Recent::load(&settings_dir);
        let folders = runs::RunFolders::load(&settings_dir);
        AppState {
            page: Page::Model,
            saved_config: config.clone(),
            config,
            config_path,
            config_is_demo,
            model: model::ModelState { recent, ..Default::default() },
            dataset: Default::default(),
            preflight: Default::default(),
            training: Default::default(),
            runs: runs::RunsState { folders, ..Default::default() },
            export: Default::default(),
            chat: Default::default(),
            budget: Default::default(),
            notices: Vec::new(),
            confirm: None,
            settings_dir,
        }
    }

    pub fn config_name(&self) -> String {
        match &self.config_path {
            Some(_) if self.config_is_demo => "demo".into(),
            Some(p) => p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default(),
            None => "untitled".into(),
        }
    }

    /// Show `text` above the page, unless it is up already.
    pub fn notify(&mut self, text: impl Into<String>, lasts: Lasts) {
        let text = text.into();
        if !self.notices.iter().any(|n| n.text == text) {
            self.notices.push(Notice { text, lasts });
        }
    }

    /// Take down the notices whose reason has gone (called every frame).
    pub fn expire_notices(&mut self) {
        let startable = start_blocker(self).is_none();
        let running = self.training.phase.is_active();
        self.notices.retain(|n| match n.lasts {
            Lasts::UntilDismissed => true,
            Lasts::WhileStartBlocked => !startable,
            Lasts::WhileRunActive => running,
        });
    }

    /// Whether the config differs from the file it was loaded from or saved to.
    pub fn has_unsaved_edits(&self) -> bool {
        self.config != self.saved_config
    }

    /// Every problem that stops a start, by field: the config's own checks plus what the workers
    /// found (a model folder that does not load, a dataset that cannot be used).
    pub fn problems(&self) -> Problems {
        let mut out = fields::config_problems(&self.config);
        if let Load::Failed(e) = &self.model.info {
            out.entry("model.path".into()).or_default().push(e.clone());
        }
        match &self.dataset.view {
            Load::Failed(e) => out.entry("dataset.path".into()).or_default().push(e.clone()),
            Load::Ready(v) => {
                if let Some(why) = &v.refusal {
                    out.entry(dataset::refusal_field(v).into()).or_default().push(why.clone());
                }
            }
            Load::Empty | Load::Loading => {}
        }
        out
    }
}

/// Why Start is disabled, or `None` when it is not.
pub fn start_blocker(s: &AppState) -> Option<String> {
    if s.training.phase.is_active() {
        return Some("a run is in progress".into());
    }
    if s.preflight.open {
        return Some("the preflight check is open".into());
    }
    if let Some(p) = fields::first_problem(&s.problems()) {
        return Some(p);
    }
    if s.model.info.is_loading() {
        return Some("still reading the model folder".into());
    }
    None
}

/// The keys that start a run, as the toolbar, the menu and the status bar name them.
pub const START_KEYS: &str = "Ctrl+Enter or F5";

/// The toolbar's word for where things stand, beside the progress bar.
pub fn toolbar_status(s: &AppState) -> &'static str {
    let phase = s.training.phase;
    if s.training.pause_requested && phase == Phase::Running {
        "pausing…"
    } else if s.preflight.open {
        // Start is disabled while the dialog is up because the dialog is the way on, not
        // because something is wrong: "not ready" here read as a fault.
        if s.preflight.report.is_loading() { "checking…" } else { "checked" }
    } else if !phase.is_active() && start_blocker(s).is_some() {
        "not ready"
    } else {
        phase.label()
    }
}

/// The status bar's line, and whether it is a warning: what is happening and the keys that act
/// on it now (Resume while paused, the dialog's keys while the preflight check is open).
pub fn status_line(s: &AppState) -> (String, bool) {
    let t = &s.training;
    let step = t.metrics.last().map_or(0, |m| m.step);
    if s.preflight.open {
        let line = match &s.preflight.report {
            Load::Empty | Load::Loading => "Checking the model, the tokenizer and the data before the first step…".to_string(),
            Load::Failed(_) => "The check failed: the dialog says why. Escape closes it.".to_string(),
            Load::Ready(r) => match preflight::verdict(r, s.config.dataset.fix_untrained_tokens) {
                preflight::Verdict::Ready => "Checked: Enter starts training, Escape goes back.".to_string(),
                preflight::Verdict::NeedsFix => "Checked: accept the untrained-token fix to start, or Escape to go back.".to_string(),
                preflight::Verdict::CpuOffered(_) => "The CUDA engine cannot start here: train on the CPU instead, or Escape.".to_string(),
                preflight::Verdict::Blocked(_) => "The run cannot start: the dialog says why. Escape goes back.".to_string(),
            },
        };
        return (line, false);
    }
    let line = match t.phase {
        Phase::Loading => "Loading the model and the data · Stop Shift+F5".to_string(),
        Phase::Running if t.pause_requested => format!("Pausing after step {} · Stop Shift+F5", step + 1),
        Phase::Running => "Training · Pause F6 · Stop Shift+F5".to_string(),
        Phase::Paused => format!("Paused after step {step} · Resume F6 · Stop Shift+F5 · Save now writes a checkpoint"),
        Phase::Stopping => "Stopping: finishing the current step and saving the adapter…".to_string(),
        Phase::Idle | Phase::Done | Phase::Stopped | Phase::Failed => match start_blocker(s) {
            // One line, whatever the reason's length: the field it names carries the rest.
            Some(why) => {
                let first = why.lines().next().unwrap_or_default();
                let more = if why.lines().nth(1).is_some() { " …" } else { "" };
                return (format!("Start is disabled: {first}{more}"), true);
            }
            None => format!("Ready: {} checks the run and starts training.", START_KEYS),
        },
    };
    (line, false)
}

/// "TuneStudio — demo — training 12/60".
pub fn window_title(s: &AppState) -> String {
    let dirty = if s.config != s.saved_config { " •" } else { "" };
    let mut t = format!("TuneStudio — {}{dirty}", s.config_name());
    let tr = &s.training;
    if tr.phase != Phase::Idle {
        t.push_str(&format!(" — {}", tr.phase.label()));
        if let Some(m) = tr.metrics.last() {
            t.push_str(&format!(" {}/{}", m.step, m.total_steps));
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn title_and_blocker_follow_the_state() {
        let mut c = RunConfig::default();
        c.model.path = "m".into();
        c.dataset.path = "d".into();
        let mut s = AppState::new(c, None, false, std::env::temp_dir().join("tunestudio-test-settings"));
        assert_eq!(window_title(&s), "TuneStudio — untitled");
        assert_eq!(start_blocker(&s), None);
        s.config.lora.r = 0;
        assert!(window_title(&s).ends_with('•'), "edited config is marked");
        assert!(start_blocker(&s).unwrap().contains("lora.r"));
        s.config.lora.r = 8;
        s.training.begin(1, "x".into());
        assert_eq!(start_blocker(&s).unwrap(), "a run is in progress");
        assert!(window_title(&s).contains("loading"));
    }
}
