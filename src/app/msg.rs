//! The studio's messages, below every panel: `Action` is what a panel asks the app to do,
//! `Msg` what a worker or the session posts back, `Pick` what a file chooser was opened for.
//! Panels push `Action`s and never do work themselves; `StudioApp` (mod.rs) carries them out and
//! folds `Msg`s into the state. The payloads are the state's own types (`state::*`), so this
//! module imports no panel.

use std::path::{Path, PathBuf};

use crate::session::Event;

use super::state::Page;
use super::state::chat::ChatEvent;
use super::state::dataset::DatasetView;
use super::state::export::{ExportKind, ExportProgress};
use super::state::memory::{Fixes, Machine, Setting};
use super::state::model::{CachedModel, ModelInfo};
use super::state::preflight::PreflightView;
use super::state::runs::{Comparison, RunRecord, ViewedRun};

/// What a panel asks the app to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Pick(Pick),
    SetModel(PathBuf),
    SetDataset(PathBuf),
    LoadConfig(PathBuf),
    SaveConfig,
    LoadDemo,
    Start,
    ConfirmStart,
    AcceptFixAndStart,
    /// The preflight's way out when the CUDA engine cannot start: `train.device = cpu`, checked again.
    UseCpu,
    CancelPreflight,
    Pause,
    Resume,
    Stop,
    SaveNow,
    RefreshRuns,
    OpenRun(PathBuf),
    /// Rename a run's folder (the name typed in the runs list).
    RenameRun(PathBuf, String),
    /// Overlay the runs ticked in the runs list and diff their configs.
    CompareRuns,
    ResumeRun(PathBuf),
    ExportFrom(PathBuf),
    Export(ExportKind),
    /// Open the Chat page on this run (its newest checkpoint).
    ChatWith(PathBuf),
    Chat(ChatAction),
    /// "Largest that fits" in the memory budget: set this setting to this value.
    ApplyBudget(Setting, usize),
    BackToLive,
    GoTo(Page),
    DismissNotice(usize),
    /// The answer to the question the window asked (`state::Confirm`).
    Answer(Answer),
    /// Open a folder in the desktop's file manager.
    OpenFolder(PathBuf),
    CopyText(String),
    Quit,
}

/// What the Chat page asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChatAction {
    /// Load the model the page names.
    Load,
    /// Send the typed message (loading the model first when it is not loaded).
    Send,
    /// End the answer under way.
    Stop,
    /// Start a new conversation.
    Clear,
}

/// How the person answered a `state::Confirm` question.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Save the config, then do what was asked.
    Save,
    /// Drop the edits and do what was asked.
    Discard,
    /// Stop the run (saving its adapter), then close the window.
    StopAndQuit,
    /// Do nothing.
    Cancel,
}

/// What a file chooser was opened for; the answer is routed by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    ModelFolder,
    DatasetFile,
    /// `dataset.eval_split` as a file of its own.
    EvalFile,
    AdapterFolder,
    OpenConfig,
    SaveConfigAs,
    OutputFolder,
    ExportFolder,
}

impl Pick {
    /// Ask with the native chooser, starting in `start_in`. Blocks until the person answers:
    /// call it on a worker, never in a frame.
    pub fn ask(self, start_in: Option<&Path>) -> Option<PathBuf> {
        let mut d = rfd::FileDialog::new();
        if let Some(dir) = start_in.filter(|p| p.is_dir()) {
            d = d.set_directory(dir);
        }
        match self {
            Pick::ModelFolder => d.set_title("Choose a Hugging Face model folder").pick_folder(),
            Pick::AdapterFolder => d.set_title("Choose a PEFT LoRA adapter folder").pick_folder(),
            Pick::OutputFolder => d.set_title("Choose the folder that holds runs").pick_folder(),
            Pick::ExportFolder => d.set_title("Export into this folder").pick_folder(),
            Pick::EvalFile => d
                .set_title("Choose the rows to evaluate on")
                .add_filter("datasets", &["jsonl", "ndjson", "json", "csv", "tsv", "parquet", "txt"])
                .add_filter("all files", &["*"])
                .pick_file(),
            Pick::DatasetFile => d
                .set_title("Choose a dataset")
                .add_filter("datasets", &["jsonl", "ndjson", "json", "csv", "tsv", "parquet", "txt"])
                .add_filter("all files", &["*"])
                .pick_file(),
            Pick::OpenConfig => d.set_title("Open a run config").add_filter("TOML", &["toml"]).pick_file(),
            Pick::SaveConfigAs => d.set_title("Save the run config").set_file_name("run.toml").add_filter("TOML", &["toml"]).save_file(),
        }
    }
}

/// A result posted back to the window.
#[derive(Debug)]
pub enum Msg {
    Model {
        path: PathBuf,
        /// Boxed: a model's description is larger than every other message together.
        result: Result<Box<ModelInfo>, String>,
    },
    Dataset {
        key: u64,
        result: Result<DatasetView, String>,
    },
    Preflight {
        key: u64,
        result: Result<PreflightView, String>,
    },
    Export(ExportProgress),
    Runs {
        dirs: Vec<PathBuf>,
        records: Vec<RunRecord>,
    },
    Renamed(Result<PathBuf, String>),
    Compared(Result<Comparison, String>),
    RunOpened(Result<ViewedRun, String>),
    Picked {
        purpose: Pick,
        path: Option<PathBuf>,
    },
    /// The models in the Hugging Face cache, listed once at start-up.
    HfCache(Vec<CachedModel>),
    /// What this machine has (GPU, RAM), probed once at start-up.
    Machine(Machine),
    /// "Largest that fits" for the memory budget's inputs `key`.
    BudgetFixes {
        key: u64,
        result: Result<Fixes, String>,
    },
    /// What the chat worker did.
    Chat(ChatEvent),
    /// An event of the session started as `generation` (older generations are ignored).
    Session {
        generation: u64,
        event: Event,
    },
}
