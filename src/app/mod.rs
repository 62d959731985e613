//! The studio window (eframe/egui). `AppState` (state/) is plain data the panels read and edit;
//! panels (panels/) return `Action`s instead of doing work, and `StudioApp` carries the actions
//! out: it starts workers (`jobs`) and the training session, and folds the `Msg`s that come back
//! into the state at the start of each frame. Nothing here computes on tensors or waits for
//! another thread: results arrive over channels drained with `try_recv`, and every sender wakes
//! the window.
//!
//! Layers, each importing only those below it (ARCHITECTURE.md has the map):
//! `mod.rs` (StudioApp, the frame, pages composed) → `panels/` (one per page, none importing
//! another) → `widgets` → `msg` (Action, Msg, Pick) → `state/` (one module per panel: state,
//! view model, worker functions) → `fields` (field docs, problems) and `jobs` (generic workers).

pub mod fields;
pub mod jobs;
pub mod msg;
pub mod panels;
pub mod state;
pub mod widgets;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use eframe::egui::{self, Key, KeyboardShortcut, Modifiers, RichText, ViewportCommand};

use crate::RunConfig;
use crate::session::{self, Control, Event, SessionHandle, StartOptions};

use jobs::{Debounce, DebounceState, Jobs, Load};
pub use msg::{Action, Answer, ChatAction, Msg, Pick};
use state::chat::{ChatCommand, ChatEvent, ChatWorker};
pub use state::{AppState, Page, START_KEYS, start_blocker, status_line, toolbar_status, window_title};
use state::{Confirm, Lasts};
use state::{dataset, export, memory as budget, model, preflight, runs, training::Phase};

/// How often the window redraws while only the training plots change (steps can come at dozens
/// per second; every redraw takes CPU time from the training thread).
pub const PLOT_REFRESH: Duration = Duration::from_millis(250);

/// How often the window redraws while only an answer's text grows (a burst of tokens makes one
/// frame; the text still reads as streaming).
pub const TOKEN_REFRESH: Duration = Duration::from_millis(40);

const START: KeyboardShortcut = KeyboardShortcut::new(Modifiers::COMMAND, Key::Enter);
const STOP: KeyboardShortcut = KeyboardShortcut::new(Modifiers::SHIFT, Key::F5);
const SAVE: KeyboardShortcut = KeyboardShortcut::new(Modifiers::COMMAND, Key::S);
const OPEN: KeyboardShortcut = KeyboardShortcut::new(Modifiers::COMMAND, Key::O);

/// How the studio starts.
#[derive(Debug, Clone)]
pub struct StudioOptions {
    /// A run config to open; `None` opens the demo.
    pub config: Option<PathBuf>,
    /// Where `recent_models.json` lives.
    pub settings_dir: PathBuf,
    /// Overrides the config's `output.dir` (tests write runs into a temporary folder).
    pub output_dir: Option<PathBuf>,
    /// The Hugging Face hub cache whose models the Model page lists (`None`: none).
    pub hf_cache: Option<PathBuf>,
}

impl Default for StudioOptions {
    fn default() -> Self {
        StudioOptions { config: None, settings_dir: crate::assets::config_dir(), output_dir: None, hf_cache: state::model::hf_cache_dir() }
    }
}

/// What a path dropped on the window is for.
#[derive(Debug, Clone, PartialEq)]
pub enum Dropped {
    Model(PathBuf),
    Dataset(PathBuf),
    Config(PathBuf),
    Unknown(PathBuf),
}

pub fn classify_drop(path: &Path) -> Dropped {
    if path.is_dir() {
        if path.join("config.json").is_file() { Dropped::Model(path.to_path_buf()) } else { Dropped::Unknown(path.to_path_buf()) }
    } else if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("toml")) {
        Dropped::Config(path.to_path_buf())
    } else if path.is_file() {
        Dropped::Dataset(path.to_path_buf())
    } else {
        Dropped::Unknown(path.to_path_buf())
    }
}

/// The folder a file chooser opens in: the one holding the current value, else the config's
/// folder, else the working folder. Always an existing, absolute folder: given none (or a
/// relative one) the choosers open on "Recent".
fn chooser_folder(purpose: Pick, s: &AppState) -> Option<PathBuf> {
    let parent = |p: &Path| p.parent().map(Path::to_path_buf);
    let near = match purpose {
        Pick::ModelFolder => parent(&s.config.model.path),
        Pick::AdapterFolder => s.config.model.adapter.as_deref().and_then(parent).or_else(|| parent(&s.config.model.path)),
        Pick::DatasetFile => parent(&s.config.dataset.path),
        Pick::EvalFile => match &s.config.dataset.eval_split {
            Some(crate::config::EvalSplit::File(f)) => parent(f),
            _ => parent(&s.config.dataset.path),
        },
        Pick::OutputFolder => Some(s.config.output.dir.clone()),
        Pick::ExportFolder => Some(s.export.dest.clone()),
        Pick::OpenConfig | Pick::SaveConfigAs => s.config_path.as_deref().and_then(parent),
    };
    let config_dir = s.config_path.as_deref().and_then(parent);
    [near, config_dir, std::env::current_dir().ok()]
        .into_iter()
        .flatten()
        .filter(|p| !p.as_os_str().is_empty() && p.is_dir())
        .find_map(|p| std::path::absolute(p).ok())
}

/// Show `dir` in the desktop's file manager (without waiting for it).
fn open_in_file_manager(dir: &Path) -> std::io::Result<()> {
    let opener = if cfg!(target_os = "macos") {
        "open"
    } else if cfg!(windows) {
        "explorer"
    } else {
        "xdg-open"
    };
    std::process::Command::new(opener).arg(dir).spawn().map(drop)
}

/// Load a config file for the editor; relative paths in it are taken from its folder.
fn load_config(path: &Path) -> crate::Result<RunConfig> {
    let mut cfg = RunConfig::load(path)?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let base = if base.is_relative() { std::env::current_dir().unwrap_or_default().join(base) } else { base };
    crate::assets::absolutize(&mut cfg, &base);
    Ok(cfg)
}

pub struct StudioApp {
    pub state: AppState,
    jobs: Jobs<Msg>,
    session: Option<SessionHandle>,
    /// The thread that holds the Chat page's model, started when the page first needs it.
    chat: Option<ChatWorker>,
    model_watch: Debounce,
    dataset_watch: Debounce,
    runs_watch: Debounce,
    /// "Largest that fits" starts once the budget's inputs hold still (not on every frame of a drag).
    fixes_watch: Debounce,
    dataset_key: u64,
    title: String,
    close_after_stop: bool,
    /// The person agreed to close the window (or nothing needed asking).
    quit_confirmed: bool,
    /// The action waiting for the answer to `state.confirm`.
    pending: Option<Action>,
    /// `StudioOptions::output_dir`, applied to every config opened.
    output_override: Option<PathBuf>,
}

impl StudioApp {
    pub fn new(cc: &eframe::CreationContext<'_>, options: StudioOptions) -> Self {
        let mut notices = Vec::new();
        let (mut config, path, is_demo) = match &options.config {
            Some(p) => match load_config(p) {
                Ok(c) => (c, Some(p.clone()), false),
                Err(e) => {
                    notices.push(format!("Could not open {}: {e}", p.display()));
                    (RunConfig::default(), None, false)
                }
            },
            None => match crate::assets::demo_config() {
                Ok((p, c)) => (c, Some(p), true),
                Err(e) => {
                    notices.push(format!("The built-in demo could not be prepared: {e}"));
                    (RunConfig::default(), None, false)
                }
            },
        };
        if let Some(o) = &options.output_dir {
            config.output.dir = o.clone();
        }
        let mut state = AppState::new(config, path, is_demo, options.settings_dir.clone());
        for n in notices {
            state.notify(n, Lasts::UntilDismissed);
        }
        state.export.dest = crate::assets::data_dir().join("exports");
        state.budget.machine = Load::Loading;
        let delay = Duration::from_millis(300);
        let jobs = Jobs::new(cc.egui_ctx.clone());
        jobs.spawn("machine", |_| Msg::Machine(budget::probe_machine()));
        state.model.cache_dir = options.hf_cache.clone();
        if let Some(root) = options.hf_cache.clone() {
            state.model.cached = Load::Loading;
            jobs.spawn("hf-cache", move |_| Msg::HfCache(model::scan_hf_cache(&root)));
        }
        StudioApp {
            state,
            jobs,
            session: None,
            chat: None,
            model_watch: Debounce::new(delay),
            dataset_watch: Debounce::new(delay),
            runs_watch: Debounce::new(delay),
            fixes_watch: Debounce::new(Duration::from_millis(150)),
            dataset_key: 0,
            title: String::new(),
            close_after_stop: false,
            quit_confirmed: false,
            pending: None,
            output_override: options.output_dir,
        }
    }

    /// Workers still running, and edits waiting to start one (tests wait for this to reach zero:
    /// a changed sequence length re-reads the dataset only after its debounce delay).
    pub fn jobs_running(&self) -> usize {
        let waiting = [&self.model_watch, &self.dataset_watch, &self.runs_watch, &self.fixes_watch];
        self.jobs.running() + waiting.iter().filter(|w| w.is_waiting()).count()
    }

    /// Carry out one action, first asking when it would lose something (unsaved edits, a run).
    pub fn act(&mut self, action: Action, ctx: &egui::Context) {
        if let Some(question) = self.question_before(&action) {
            self.state.confirm = Some(question);
            self.pending = Some(action);
            return;
        }
        self.carry_out(action, ctx);
    }

    /// What to ask before `action`, if anything.
    fn question_before(&self, action: &Action) -> Option<Confirm> {
        let s = &self.state;
        let doing = match action {
            Action::Pick(Pick::OpenConfig) | Action::LoadConfig(_) => "open another config",
            Action::LoadDemo => "open the demo",
            Action::Quit if s.training.phase.is_active() => return Some(Confirm::QuitDuringRun),
            Action::Quit => "quit",
            _ => return None,
        };
        s.has_unsaved_edits().then(|| Confirm::DiscardEdits { doing: doing.into() })
    }

    /// Save the config to its own file; `false` when it has none (a Save As chooser opens) or
    /// the save failed.
    fn save_config(&mut self) -> bool {
        let s = &mut self.state;
        match (&s.config_path, s.config_is_demo) {
            (Some(p), false) => match s.config.save_keeping_comments(p) {
                Ok(()) => {
                    s.saved_config = s.config.clone();
                    true
                }
                Err(e) => {
                    s.notify(format!("Could not save the config: {e}"), Lasts::UntilDismissed);
                    false
                }
            },
            _ => {
                self.pick(Pick::SaveConfigAs, None);
                false
            }
        }
    }

    fn carry_out(&mut self, action: Action, ctx: &egui::Context) {
        let s = &mut self.state;
        match action {
            Action::Pick(p) => {
                let start_in = chooser_folder(p, s);
                self.pick(p, start_in);
            }
            Action::SetModel(p) => {
                s.config.model.path = p;
                s.page = Page::Model;
            }
            Action::SetDataset(p) => {
                s.config.dataset.path = p;
                s.page = Page::Dataset;
            }
            Action::LoadConfig(p) => match load_config(&p) {
                Ok(mut c) => {
                    if let Some(o) = &self.output_override {
                        c.output.dir = o.clone();
                    }
                    // What was said about the previous config no longer holds.
                    s.notices.clear();
                    s.saved_config = c.clone();
                    s.config = c;
                    s.config_path = Some(p);
                    s.config_is_demo = false;
                }
                Err(e) => s.notify(format!("Could not open the config: {e}"), Lasts::UntilDismissed),
            },
            Action::LoadDemo => match crate::assets::demo_config() {
                Ok((p, mut c)) => {
                    if let Some(o) = &self.output_override {
                        c.output.dir = o.clone();
                    }
                    s.notices.clear();
                    s.saved_config = c.clone();
                    s.config = c;
                    s.config_path = Some(p);
                    s.config_is_demo = true;
                }
                Err(e) => s.notify(format!("The built-in demo could not be prepared: {e}"), Lasts::UntilDismissed),
            },
            Action::SaveConfig => {
                self.save_config();
            }
            Action::Start => {
                if let Some(why) = start_blocker(s) {
                    s.notify(format!("Cannot start: {why}"), Lasts::WhileStartBlocked);
                    return;
                }
                let key = jobs::key_of(&[&s.config.to_toml()]);
                s.preflight = preflight::PreflightState { open: true, key, report: Load::Loading };
                let cfg = s.config.clone();
                let machine = s.budget.machine.ready().cloned();
                self.jobs.spawn("preflight", move |_| Msg::Preflight { key, result: jobs::guarded(|| preflight::check(&cfg, machine)) });
            }
            Action::AcceptFixAndStart => {
                s.config.dataset.fix_untrained_tokens = true;
                // The report asked for this very change: it still holds for the config.
                s.preflight.key = jobs::key_of(&[&s.config.to_toml()]);
                self.act(Action::ConfirmStart, ctx);
            }
            Action::ConfirmStart => {
                // The config changed since the check (a field's edit committed in the frame
                // that pressed Start, seen under Xvfb: the dialog said 60 steps, the run made
                // 600): check again rather than start what nobody was shown.
                if s.preflight.open && jobs::key_of(&[&s.config.to_toml()]) != s.preflight.key {
                    s.preflight.open = false;
                    self.carry_out(Action::Start, ctx);
                    return;
                }
                s.preflight.open = false;
                let cfg = s.config.clone();
                self.start_session(cfg, None);
            }
            Action::UseCpu => {
                s.config.train.device = crate::config::DeviceChoice::Cpu;
                s.preflight.open = false;
                self.act(Action::Start, ctx);
            }
            Action::CancelPreflight => s.preflight.open = false,
            Action::Pause => {
                if let Some(h) = &self.session {
                    h.send(Control::Pause);
                    s.training.pause_requested = true;
                }
            }
            Action::Resume => {
                if let Some(h) = &self.session {
                    h.send(Control::Resume);
                }
            }
            Action::Stop => {
                if let Some(h) = &self.session {
                    h.send(Control::Stop);
                    s.training.phase = Phase::Stopping;
                    s.training.push_log("stop requested: finishing the current step and saving".into());
                }
            }
            Action::SaveNow => {
                if let Some(h) = &self.session {
                    h.send(Control::SaveNow);
                    s.training.push_log("checkpoint requested".into());
                }
            }
            Action::RefreshRuns => self.refresh_runs(),
            Action::OpenRun(dir) => {
                self.jobs.spawn("open-run", move |_| Msg::RunOpened(jobs::guarded(|| runs::open(&dir))));
            }
            Action::RenameRun(dir, name) => {
                s.runs.renaming = None;
                self.jobs.spawn("rename-run", move |_| Msg::Renamed(jobs::guarded(|| runs::rename(&dir, &name))));
            }
            Action::CompareRuns => {
                let dirs = s.runs.selected.clone();
                let smoothing = s.training.smoothing;
                s.runs.comparison = Some(Load::Loading);
                self.jobs.spawn("compare-runs", move |_| Msg::Compared(jobs::guarded(|| runs::compare(&dirs, smoothing))));
            }
            Action::ResumeRun(dir) => {
                if s.training.phase.is_active() {
                    s.notify("A run is in progress: stop it before resuming another.", Lasts::WhileRunActive);
                    return;
                }
                // The session reads the run's own config; only an explicit step limit carries over.
                self.start_session(RunConfig::default(), Some(dir));
            }
            Action::ExportFrom(dir) => {
                s.export.source = Some(dir);
                s.export.result = None;
                s.page = Page::Export;
            }
            Action::Export(kind) => {
                let (Some(src), dest) = (s.export.source.clone(), s.export.dest.clone()) else { return };
                s.export.progress = Some((0.0, "starting".into()));
                s.export.result = None;
                // The Modelfile's PARAMETER lines are the Chat page's sampling settings.
                let sampling = s.chat.params.clone();
                self.jobs.spawn("export", move |tx| {
                    let progress = |fraction: f32, what: &str| {
                        let _ = tx.send(Msg::Export(export::ExportProgress::Step { fraction, what: what.to_string() }));
                    };
                    Msg::Export(export::ExportProgress::Done(jobs::guarded(|| match kind {
                        export::ExportKind::Adapter => export::export_adapter(&src, &dest, &progress),
                        export::ExportKind::Merged(dtype) => export::export_merged(&src, &dest, dtype, &progress),
                        export::ExportKind::Gguf(quant) => export::export_gguf(&src, &dest, quant, sampling, &progress),
                    })))
                });
            }
            Action::ChatWith(dir) => {
                s.chat.run = Some(dir);
                s.chat.step = None;
                self.carry_out(Action::GoTo(Page::Chat), ctx);
            }
            Action::Chat(a) => self.chat_action(a),
            Action::ApplyBudget(setting, value) => budget::apply(&mut s.config, setting, value),
            Action::BackToLive => s.training.viewing = None,
            Action::GoTo(p) => {
                s.page = p;
                if p == Page::Chat && s.chat.run.is_none() && s.chat.model == Load::Empty {
                    // After (or during) a run, the Chat page starts on it.
                    s.chat.run = s.training.run_dir().map(Path::to_path_buf);
                }
                if p == Page::Runs || p == Page::Export || p == Page::Chat {
                    self.refresh_runs();
                }
            }
            Action::DismissNotice(i) => {
                if i < s.notices.len() {
                    s.notices.remove(i);
                }
            }
            Action::Answer(answer) => {
                let question = s.confirm.take();
                let then = self.pending.take();
                match (answer, question, then) {
                    (Answer::Save, Some(Confirm::DiscardEdits { .. }), Some(then)) => {
                        // Without a file of its own the config goes to Save As, and `then` waits
                        // for another try.
                        let saved = self.save_config();
                        if saved {
                            self.carry_out(then, ctx);
                        }
                    }
                    (Answer::Discard, Some(Confirm::DiscardEdits { .. }), Some(then)) => self.carry_out(then, ctx),
                    (Answer::StopAndQuit, Some(Confirm::QuitDuringRun), _) if s.training.phase.is_active() => {
                        self.close_after_stop = true;
                        s.notify("Stopping the run; the window closes once the adapter is saved.", Lasts::WhileRunActive);
                        self.carry_out(Action::Stop, ctx);
                    }
                    // The run ended while the question was up: nothing is left to stop.
                    (Answer::StopAndQuit, Some(Confirm::QuitDuringRun), _) => self.act(Action::Quit, ctx),
                    _ => {}
                }
            }
            Action::OpenFolder(dir) => {
                if let Err(e) = open_in_file_manager(&dir) {
                    s.notify(format!("Could not open {}: {e}", dir.display()), Lasts::UntilDismissed);
                }
            }
            Action::CopyText(text) => ctx.copy_text(text),
            Action::Quit => {
                self.quit_confirmed = true;
                ctx.send_viewport_cmd(ViewportCommand::Close);
            }
        }
    }

    fn chat_action(&mut self, a: ChatAction) {
        match a {
            ChatAction::Load => self.chat_load(),
            ChatAction::Send => {
                let c = &self.state.chat;
                let source = c.source(&self.state.config);
                if !c.model.ready().is_some_and(|m| m.source == source) {
                    // Load first; the message goes once the model is ready.
                    if !(c.model.is_loading() && c.requested.as_ref() == Some(&source)) {
                        self.chat_load();
                    }
                    self.state.chat.send_when_loaded = true;
                    return;
                }
                if let Some(reqs) = self.state.chat.begin_turn() {
                    self.chat_worker().send(ChatCommand::Answer(reqs));
                }
            }
            ChatAction::Stop => {
                if let Some(w) = &self.chat {
                    w.stop();
                }
            }
            ChatAction::Clear => self.state.chat.clear(),
        }
    }

    fn chat_load(&mut self) {
        let source = self.state.chat.source(&self.state.config);
        self.state.chat.model = Load::Loading;
        self.state.chat.requested = Some(source.clone());
        self.chat_worker().send(ChatCommand::Load(source));
    }

    fn chat_worker(&mut self) -> &ChatWorker {
        if self.chat.is_none() {
            let (worker, events) = ChatWorker::start();
            self.jobs.forward("chat-events", events, Msg::Chat, |e| match e {
                ChatEvent::Stream(crate::generate::StreamEvent::Token { .. }) => TOKEN_REFRESH,
                _ => Duration::ZERO,
            });
            self.chat = Some(worker);
        }
        self.chat.as_ref().expect("started")
    }

    fn start_session(&mut self, cfg: RunConfig, resume: Option<PathBuf>) {
        let t = &mut self.state.training;
        let generation = t.generation + 1;
        let what = match &resume {
            Some(d) => format!("resuming {}", d.display()),
            None => format!("starting a run of {} on {}", cfg.model.path.display(), cfg.dataset.path.display()),
        };
        t.begin(generation, what);
        // The plan of this run, to draw the measured memory against once the device is known.
        if resume.is_none()
            && let Some(info) = self.state.model.info.ready().filter(|i| i.path == cfg.model.path)
        {
            self.state.training.plan_input = Some(Box::new((info.spec.clone(), cfg.clone())));
        }
        // Remember where runs go, so the runs list finds them whichever config is open later.
        let out_dir = resume.as_deref().and_then(Path::parent).unwrap_or(&cfg.output.dir).to_path_buf();
        if self.state.runs.folders.push(&out_dir) {
            // Losing the list costs only the list; not worth stopping the run for.
            let _ = self.state.runs.folders.save(&self.state.settings_dir);
        }
        let handle = session::start(cfg, StartOptions { resume, ..Default::default() });
        self.jobs.forward(
            "session-events",
            handle.events.clone(),
            move |event| Msg::Session { generation, event },
            |event| match event {
                // A step only moves the plots: redraw at a bounded rate and leave the cores to training.
                Event::Step(_) => PLOT_REFRESH,
                _ => Duration::ZERO,
            },
        );
        self.session = Some(handle);
        self.state.page = Page::Monitor;
    }

    /// Open a native file chooser on a worker: rfd's dialogs block their caller until the person
    /// answers, which must never be the frame.
    fn pick(&self, purpose: Pick, start_in: Option<PathBuf>) {
        self.jobs.spawn("file-dialog", move |_| Msg::Picked { purpose, path: purpose.ask(start_in.as_deref()) });
    }

    fn refresh_runs(&mut self) {
        let dirs = self.state.runs.folders.with(&self.state.config.output.dir);
        if self.state.runs.records.ready().is_none() {
            self.state.runs.records = Load::Loading;
        }
        self.jobs.spawn("runs", move |_| Msg::Runs { records: runs::scan(&dirs), dirs });
    }

    /// Fold a worker's or the session's message into the state.
    fn handle(&mut self, msg: Msg, ctx: &egui::Context) {
        let s = &mut self.state;
        match msg {
            Msg::Model { path, result } => {
                if path != s.config.model.path {
                    return;
                }
                if result.is_ok() {
                    s.model.recent.push(&path);
                    // Losing the recent list is not worth bothering the person about.
                    let _ = s.model.recent.save(&s.settings_dir);
                }
                s.model.info = match result {
                    Ok(i) => Load::Ready(*i),
                    Err(e) => Load::Failed(e),
                };
            }
            Msg::Dataset { key, result } => {
                if key == self.dataset_key {
                    s.dataset.view = match result {
                        Ok(v) => Load::Ready(v),
                        Err(e) => Load::Failed(e),
                    };
                }
            }
            Msg::Preflight { key, result } => {
                if key == s.preflight.key && s.preflight.open {
                    s.preflight.report = match result {
                        Ok(r) => Load::Ready(r),
                        Err(e) => Load::Failed(e),
                    };
                }
            }
            Msg::Export(export::ExportProgress::Step { fraction, what }) => s.export.progress = Some((fraction, what)),
            Msg::Export(export::ExportProgress::Done(r)) => {
                s.export.progress = None;
                let done = r.is_ok();
                s.export.result = Some(r);
                if done {
                    // The run's list of exports (read with the runs) has a new line.
                    self.refresh_runs();
                }
            }
            Msg::Machine(m) => s.budget.machine = Load::Ready(m),
            Msg::HfCache(models) => s.model.cached = Load::Ready(models),
            Msg::BudgetFixes { key, result } => {
                s.budget.fixes_pending = None;
                let fixes = result.unwrap_or_else(|e| budget::Fixes {
                    max_seq_len: None,
                    seq_cap: 0,
                    batch_size: None,
                    batch_cap: 0,
                    batch_cap_is_data: false,
                    lora_r: None,
                    rank_cap: 0,
                    suggestions: vec![format!("(the search failed: {e})")],
                });
                s.budget.fixes = Some((key, fixes));
            }
            Msg::Runs { dirs, records } => {
                s.runs.dirs = dirs;
                // Ticks on runs that are gone (renamed, deleted) would compare nothing.
                s.runs.selected.retain(|d| records.iter().any(|r| &r.dir == d));
                s.runs.records = Load::Ready(records);
            }
            Msg::Renamed(result) => {
                if let Err(e) = result {
                    s.notify(format!("Could not rename the run: {e}"), Lasts::UntilDismissed);
                }
                self.refresh_runs();
            }
            Msg::Compared(result) => {
                s.runs.comparison = Some(match result {
                    Ok(c) => Load::Ready(c),
                    Err(e) => Load::Failed(e),
                });
            }
            Msg::RunOpened(Ok(v)) => {
                s.training.viewing = Some(v);
                s.page = Page::Monitor;
            }
            Msg::RunOpened(Err(e)) => s.notify(format!("Could not open the run: {e}"), Lasts::UntilDismissed),
            Msg::Picked { path: None, .. } => {}
            Msg::Picked { purpose, path: Some(p) } => match purpose {
                Pick::ModelFolder => s.config.model.path = p,
                Pick::AdapterFolder => s.config.model.adapter = Some(p),
                Pick::DatasetFile => s.config.dataset.path = p,
                Pick::EvalFile => s.config.dataset.eval_split = Some(crate::config::EvalSplit::File(p)),
                Pick::OutputFolder => s.config.output.dir = p,
                Pick::ExportFolder => s.export.dest = p,
                // Unsaved edits were asked about when the chooser opened.
                Pick::OpenConfig => self.carry_out(Action::LoadConfig(p), ctx),
                Pick::SaveConfigAs => match s.config.save(&p) {
                    Ok(()) => {
                        s.saved_config = s.config.clone();
                        s.config_path = Some(p);
                        s.config_is_demo = false;
                    }
                    Err(e) => s.notify(format!("Could not save the config: {e}"), Lasts::UntilDismissed),
                },
            },
            Msg::Chat(e) => {
                let loaded = matches!(&e, ChatEvent::Loaded { result: Ok(_), .. });
                s.chat.apply(e);
                if loaded && s.chat.send_when_loaded && s.chat.model.ready().is_some() {
                    s.chat.send_when_loaded = false;
                    self.chat_action(ChatAction::Send);
                }
            }
            Msg::Session { generation, event } => {
                if generation != s.training.generation {
                    return;
                }
                let ended = matches!(event, Event::Finished(_) | Event::Failed { .. });
                if let (Event::Loaded(info), Some(input)) = (&event, &s.training.plan_input) {
                    // The session's own target: the card it opened, as it planned the run.
                    let host = s.budget.machine.ready().and_then(|m| m.host.as_ref());
                    s.training.plan = Some(budget::view(&input.0, &input.1, &info.target, host, 0));
                }
                s.training.apply(event);
                if ended {
                    // The session thread is ending on its own; dropping the handle detaches it.
                    self.session = None;
                    if let Some(d) = self.state.training.run_dir() {
                        self.state.export.source = Some(d.to_path_buf());
                    }
                    self.refresh_runs();
                    if std::mem::take(&mut self.close_after_stop) {
                        self.act(Action::Quit, ctx);
                    }
                }
            }
        }
    }

    /// Start the model and dataset readers when their inputs have settled.
    fn watch_inputs(&mut self, ctx: &egui::Context) {
        let now = Instant::now();
        let s = &mut self.state;
        let model_path = s.config.model.path.clone();
        match self.model_watch.poll(jobs::key_of(&[&model_path]), now) {
            DebounceState::Ready if !model_path.as_os_str().is_empty() => {
                s.model.info = Load::Loading;
                self.jobs.spawn("model", move |_| Msg::Model {
                    result: jobs::guarded(|| model::describe(&model_path).map(Box::new)),
                    path: model_path,
                });
            }
            DebounceState::Ready => s.model.info = Load::Empty,
            DebounceState::Waiting(d) => ctx.request_repaint_after(d),
            DebounceState::Idle => {}
        }
        // The preview needs the model's tokenizer: wait for the model to load.
        let model_ok = s.model.info.ready().is_some_and(|i| i.path == s.config.model.path);
        let key = jobs::key_of(&[
            &toml::to_string(&s.config.dataset).unwrap_or_default(),
            &s.config.model.path,
            &s.config.train.max_seq_len,
            &model_ok,
        ]);
        match self.dataset_watch.poll(key, now) {
            DebounceState::Ready if model_ok && !s.config.dataset.path.as_os_str().is_empty() => {
                self.dataset_key = key;
                s.dataset.view = Load::Loading;
                let cfg = s.config.clone();
                self.jobs.spawn("dataset", move |_| Msg::Dataset { key, result: jobs::guarded(|| dataset::prepare_view(&cfg)) });
            }
            DebounceState::Ready => {
                self.dataset_key = key;
                s.dataset.view = Load::Empty;
            }
            DebounceState::Waiting(d) => ctx.request_repaint_after(d),
            DebounceState::Idle => {}
        }
        match self.runs_watch.poll(jobs::key_of(&[&s.config.output.dir]), now) {
            DebounceState::Ready => self.refresh_runs(),
            DebounceState::Waiting(d) => ctx.request_repaint_after(d),
            DebounceState::Idle => {}
        }
    }

    fn shortcuts(&mut self, ctx: &egui::Context) {
        let typing = ctx.egui_wants_keyboard_input();
        if self.state.confirm.is_some() {
            return; // the question's own buttons (and Escape) answer it
        }
        // Stop first: egui matches F5 ignoring Shift, so Start would also take Shift+F5.
        let (stop, start, pause, save, open, enter) = ctx.input_mut(|i| {
            (
                i.consume_shortcut(&STOP),
                i.consume_shortcut(&START) || i.consume_key(Modifiers::NONE, Key::F5),
                i.consume_key(Modifiers::NONE, Key::F6),
                i.consume_shortcut(&SAVE),
                i.consume_shortcut(&OPEN),
                !typing && i.key_pressed(Key::Enter),
            )
        });
        let s = &self.state;
        // In the chat's message field Ctrl+Enter sends, as in other chat windows.
        let chat_typing = s.page == Page::Chat && ctx.memory(|m| m.has_focus(egui::Id::unique(panels::chat::INPUT_ID)));
        if chat_typing && start {
            self.act(Action::Chat(ChatAction::Send), ctx);
            return;
        }
        if s.preflight.open {
            let ready = s
                .preflight
                .report
                .ready()
                .is_some_and(|r| preflight::verdict(r, s.config.dataset.fix_untrained_tokens) == preflight::Verdict::Ready);
            if (start || enter) && ready {
                self.act(Action::ConfirmStart, ctx);
            }
            return;
        }
        let phase = s.training.phase;
        if start {
            self.act(Action::Start, ctx);
        }
        if stop && phase.is_active() {
            self.act(Action::Stop, ctx);
        }
        if pause {
            match phase {
                Phase::Running => self.act(Action::Pause, ctx),
                Phase::Paused => self.act(Action::Resume, ctx),
                _ => {}
            }
        }
        if save {
            self.act(Action::SaveConfig, ctx);
        }
        if open {
            self.act(Action::Pick(Pick::OpenConfig), ctx);
        }
    }

    fn drops(&mut self, ctx: &egui::Context) {
        let dropped: Vec<PathBuf> = ctx.input(|i| i.raw.dropped_files.iter().map(|f| f.path().to_path_buf()).collect());
        for p in dropped {
            match classify_drop(&p) {
                Dropped::Model(p) => self.act(Action::SetModel(p), ctx),
                Dropped::Dataset(p) => self.act(Action::SetDataset(p), ctx),
                Dropped::Config(p) => self.act(Action::LoadConfig(p), ctx),
                Dropped::Unknown(p) => self.state.notify(
                    format!("{} is neither a model folder (with config.json), a dataset file nor a run config (.toml).", p.display()),
                    Lasts::UntilDismissed,
                ),
            }
        }
    }

    fn toolbar(&mut self, ui: &mut egui::Ui, actions: &mut Vec<Action>) {
        let s = &self.state;
        ui.horizontal(|ui| {
            let blocker = start_blocker(s);
            // Filled with the accent colour when it can be pressed, so enabled and disabled differ
            // at a glance, not only by a shade of grey.
            let button = if blocker.is_none() {
                egui::Button::new(RichText::new("▶ Start").strong().color(ui.visuals().selection.stroke.color))
                    .fill(ui.visuals().selection.bg_fill)
            } else {
                egui::Button::new(RichText::new("▶ Start").strong())
            };
            let start = ui.add_enabled(blocker.is_none(), button).on_hover_text(format!("Check the run and start training ({START_KEYS})"));
            let start = match &blocker {
                Some(why) => start.on_disabled_hover_text(format!("Start is disabled: {why}")),
                None => start,
            };
            if start.clicked() {
                actions.push(Action::Start);
            }
            let phase = s.training.phase;
            let has_session = self.session.is_some();
            if phase == Phase::Paused {
                if ui.add_enabled(has_session, egui::Button::new("⏵ Resume")).on_hover_text("F6").clicked() {
                    actions.push(Action::Resume);
                }
            } else {
                let can_pause = has_session && phase == Phase::Running && !s.training.pause_requested;
                if ui.add_enabled(can_pause, egui::Button::new("⏸ Pause")).on_hover_text("Pause after the current step (F6)").clicked() {
                    actions.push(Action::Pause);
                }
            }
            let can_stop = has_session && matches!(phase, Phase::Loading | Phase::Running | Phase::Paused);
            if ui
                .add_enabled(can_stop, egui::Button::new("⏹ Stop"))
                .on_hover_text("Stop after the current step and save the adapter (Shift+F5)")
                .clicked()
            {
                actions.push(Action::Stop);
            }
            let can_save = has_session && matches!(phase, Phase::Running | Phase::Paused);
            if ui
                .add_enabled(can_save, egui::Button::new("💾 Save now"))
                .on_hover_text("Write a resumable checkpoint after the current step")
                .clicked()
            {
                actions.push(Action::SaveNow);
            }
            ui.separator();
            let p = state::training::progress(&s.training.metrics, s.training.loaded.as_ref().map(|l| l.total_steps), phase);
            let status = toolbar_status(s);
            ui.label(RichText::new(status).strong());
            if phase != Phase::Idle {
                ui.add(egui::ProgressBar::new(p.fraction).desired_width(220.0).text(p.text.split(" · ").next().unwrap_or("").to_string()));
            }
        });
    }

    fn menu(&mut self, ui: &mut egui::Ui, actions: &mut Vec<Action>) {
        egui::MenuBar::new().ui(ui, |ui| {
            ui.menu_button("File", |ui| {
                if ui.button("Open config…   Ctrl+O").clicked() {
                    actions.push(Action::Pick(Pick::OpenConfig));
                }
                if ui.button("Save config   Ctrl+S").clicked() {
                    actions.push(Action::SaveConfig);
                }
                if ui.button("Save config as…").clicked() {
                    actions.push(Action::Pick(Pick::SaveConfigAs));
                }
                ui.separator();
                if ui.button("Open the demo").clicked() {
                    actions.push(Action::LoadDemo);
                }
                ui.separator();
                if ui.button("Quit").clicked() {
                    actions.push(Action::Quit);
                }
            });
            ui.menu_button("View", |ui| {
                ui.label("Theme");
                egui::widgets::global_theme_preference_buttons(ui);
            });
            ui.menu_button("Help", |ui| {
                ui.label(format!("Start: {START_KEYS}"));
                ui.label("Pause / resume: F6");
                ui.label("Stop: Shift+F5");
                ui.label("Save config: Ctrl+S · Open: Ctrl+O");
                ui.label("Drop a model folder, a dataset or a .toml on the window to use it.");
            });
            ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
                let dirty = self.state.config != self.state.saved_config;
                ui.weak(format!("config: {}{}", self.state.config_name(), if dirty { " (edited)" } else { "" }));
            });
        });
    }

    fn nav(&mut self, ui: &mut egui::Ui, actions: &mut Vec<Action>) {
        let problems = self.state.problems();
        ui.add_space(6.0);
        for p in Page::ALL {
            let flag = match p {
                Page::Model => problems.contains_key("model.path") || problems.contains_key("model.adapter"),
                Page::Dataset => problems.keys().any(|k| k.starts_with("dataset.")),
                Page::Hyper => problems.keys().any(|k| !k.starts_with("dataset.") && !k.starts_with("model.path")),
                Page::Monitor => self.state.training.phase == Phase::Failed,
                _ => false,
            };
            let text = if flag { format!("⚠ {}", p.title()) } else { p.title().to_string() };
            if ui.selectable_label(self.state.page == p, text).clicked() {
                actions.push(Action::GoTo(p));
            }
        }
    }
}

impl eframe::App for StudioApp {
    fn logic(&mut self, ctx: &egui::Context, _frame: &mut eframe::Frame) {
        for msg in self.jobs.drain() {
            self.handle(msg, ctx);
        }
        self.watch_inputs(ctx);
        budget::refresh(&mut self.state);
        if let Some((key, spec, cfg, target, rows)) = budget::fixes_wanted(&self.state) {
            match self.fixes_watch.poll(key, Instant::now()) {
                DebounceState::Ready => {
                    self.state.budget.fixes_pending = Some(key);
                    self.jobs.spawn("budget", move |_| Msg::BudgetFixes {
                        key,
                        result: jobs::guarded(|| Ok(budget::fixes(&spec, &cfg, &target, rows))),
                    });
                }
                DebounceState::Waiting(d) => ctx.request_repaint_after(d),
                DebounceState::Idle => {}
            }
        } else {
            self.fixes_watch.cancel();
        }
        self.shortcuts(ctx);
        self.drops(ctx);
        if ctx.input(|i| i.viewport().close_requested()) && !self.quit_confirmed {
            // Closing mid-run would lose the steps since the last checkpoint, closing with
            // unsaved edits would lose them: ask first (or, while a stop is under way, wait).
            if self.close_after_stop || self.question_before(&Action::Quit).is_some() {
                ctx.send_viewport_cmd(ViewportCommand::CancelClose);
                if !self.close_after_stop && self.state.confirm.is_none() {
                    self.act(Action::Quit, ctx);
                }
            } else {
                self.quit_confirmed = true;
            }
        }
        self.state.expire_notices();
        let title = window_title(&self.state);
        if title != self.title {
            ctx.send_viewport_cmd(ViewportCommand::Title(title.clone()));
            self.title = title;
        }
    }

    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        let mut actions = Vec::new();
        egui::Panel::top("menu").show(ui, |ui| self.menu(ui, &mut actions));
        egui::Panel::top("toolbar").show(ui, |ui| {
            ui.add_space(3.0);
            self.toolbar(ui, &mut actions);
            ui.add_space(1.0);
        });
        egui::Panel::bottom("status").show(ui, |ui| {
            ui.horizontal(|ui| {
                let (line, warn) = status_line(&self.state);
                if warn {
                    let c = ui.visuals().warn_fg_color;
                    let why = start_blocker(&self.state).unwrap_or_default();
                    ui.add(egui::Label::new(RichText::new(line).color(c)).truncate()).on_hover_text(why);
                } else {
                    ui.add(egui::Label::new(line).truncate());
                }
                if self.jobs.running() > 0 {
                    ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
                        ui.spinner();
                    });
                }
            });
        });
        egui::Panel::left("nav").resizable(false).exact_size(172.0).show(ui, |ui| self.nav(ui, &mut actions));
        egui::CentralPanel::default().show(ui, |ui| {
            let mut dismiss = None;
            for (i, n) in self.state.notices.iter().enumerate() {
                ui.horizontal(|ui| {
                    let c = ui.visuals().warn_fg_color;
                    if ui.small_button("✖").on_hover_text("dismiss").clicked() {
                        dismiss = Some(i);
                    }
                    ui.add(egui::Label::new(RichText::new(&n.text).color(c)).wrap());
                });
            }
            if let Some(i) = dismiss {
                actions.push(Action::DismissNotice(i));
            }
            let s = &mut self.state;
            match s.page {
                Page::Model => panels::model::ui(ui, s, &mut actions),
                Page::Dataset => panels::dataset::ui(ui, s, &mut actions),
                Page::Hyper => panels::hyper::ui(ui, s, &mut actions, panels::budget::panel),
                Page::Monitor => panels::monitor::ui(ui, s, &mut actions),
                Page::Runs => panels::runs::ui(ui, s, &mut actions),
                Page::Chat => panels::chat::ui(ui, s, &mut actions),
                Page::Export => panels::export::ui(ui, s, &mut actions),
            }
        });
        let ctx = ui.ctx().clone();
        panels::preflight::dialog(&ctx, &mut self.state, &mut actions);
        panels::confirm::dialog(&ctx, &self.state, &mut actions);
        if ctx.input(|i| !i.raw.hovered_files.is_empty()) {
            let rect = ctx.content_rect();
            let painter = ctx.layer_painter(egui::LayerId::new(egui::Order::Foreground, egui::Id::unique("drop-overlay")));
            painter.rect_filled(rect, 0.0, egui::Color32::from_black_alpha(160));
            painter.text(
                rect.center(),
                egui::Align2::CENTER_CENTER,
                "Drop a model folder, a dataset or a run config",
                egui::FontId::proportional(22.0),
                egui::Color32::WHITE,
            );
        }
        for a in actions {
            self.act(a, &ctx);
        }
    }
}

/// Open the studio window and run until it is closed.
pub fn run(options: StudioOptions) -> crate::Result<()> {
    let mut viewport = egui::ViewportBuilder::default()
        .with_title("TuneStudio")
        .with_app_id("tunestudio")
        .with_inner_size([1280.0, 820.0])
        .with_min_inner_size([640.0, 480.0])
        .with_drag_and_drop(true);
    if let Ok(icon) = eframe::icon_data::from_png_bytes(include_bytes!("../../packaging/icons/tunestudio-256.png")) {
        viewport = viewport.with_icon(icon);
    }
    let native = eframe::NativeOptions { viewport, ..Default::default() };
    eframe::run_native("TuneStudio", native, Box::new(move |cc| Ok(Box::new(StudioApp::new(cc, options))))).map_err(|e| {
        crate::Error::op("the studio window", format!("could not open: {e}. Without a display, use `tunestudio train <run.toml>`."))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The studio's layers, bottom first: a module may name modules of lower layers only (state
    /// modules may also name each other; panels may not). `app` stands for this file.
    const LAYERS: [(&str, u8); 8] =
        [("jobs", 0), ("fields", 0), ("state", 1), ("msg", 2), ("widgets", 3), ("panels", 4), ("app", 5), ("", 5)];

    fn rank(module: &str) -> u8 {
        LAYERS.iter().find(|(m, _)| *m == module).map_or(5, |(_, r)| *r)
    }

    /// The studio modules a source file names (`crate::app::x`, `super::x`), outside its tests,
    /// as top-level module names; `folder` is the file's folder under src/app ("" at the top).
    fn named_modules(folder: &str, source: &str) -> Vec<String> {
        let code = source.split("#[cfg(test)]").next().unwrap_or(source);
        let ident = |rest: &str| rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>();
        let mut out = Vec::new();
        for (i, _) in code.match_indices("crate::app::") {
            out.push(ident(&code[i + "crate::app::".len()..]));
        }
        for (i, _) in code.match_indices("super::") {
            let name = ident(&code[i + "super::".len()..]);
            // In a sub-folder `super::x` is a sibling; at the top it is a module of app (or app itself).
            let top = if folder.is_empty() { name } else { folder.to_string() };
            out.push(if LAYERS.iter().any(|(m, _)| *m == top) { top } else { "app".into() });
        }
        out
    }

    #[test]
    fn layers_import_only_downward() {
        // Every file under src/app, so a new panel is held to the layers without being listed.
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/app");
        let mut files = Vec::new();
        for folder in ["", "state", "panels"] {
            for e in std::fs::read_dir(root.join(folder)).unwrap().flatten() {
                let (path, stem) = (e.path(), e.path().file_stem().unwrap().to_string_lossy().to_string());
                if path.extension().is_some_and(|x| x == "rs") && !(folder.is_empty() && stem == "mod") {
                    let module = if folder.is_empty() { stem } else { folder.to_string() };
                    files.push((module, folder, std::fs::read_to_string(&path).unwrap()));
                }
            }
        }
        assert!(files.len() >= 20, "{} files found under {}", files.len(), root.display());
        let mut wrong = Vec::new();
        for (module, folder, source) in &files {
            let file_rank = rank(module);
            for named in named_modules(folder, source) {
                let ok = rank(&named) < file_rank || (named == "state" && module == "state");
                if !ok {
                    wrong.push(format!("{module} names {named}"));
                }
            }
        }
        assert!(wrong.is_empty(), "imports against the layers: {wrong:?}");
        // The checker itself sees what it must refuse.
        assert_eq!(named_modules("panels", "use super::budget;"), vec!["panels"]);
        assert_eq!(named_modules("", "use super::hyper::doc;"), vec!["app"]);
        assert_eq!(named_modules("", "use crate::app::msg::Action;"), vec!["msg"]);
    }

    #[test]
    fn choosers_open_in_an_absolute_folder_near_the_current_value() {
        let d = tempfile::tempdir().unwrap();
        let data = d.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let mut c = RunConfig::default();
        c.dataset.path = data.join("train.jsonl");
        let mut s = AppState::new(c, Some(d.path().join("run.toml")), false, d.path().join("settings"));
        assert_eq!(chooser_folder(Pick::DatasetFile, &s), Some(data.clone()), "the dataset's own folder");
        // No dataset yet, or one whose folder is gone: the config's folder, never nothing.
        s.config.dataset.path = PathBuf::new();
        assert_eq!(chooser_folder(Pick::DatasetFile, &s), Some(d.path().to_path_buf()));
        s.config.dataset.path = d.path().join("gone/train.jsonl");
        assert_eq!(chooser_folder(Pick::DatasetFile, &s), Some(d.path().to_path_buf()));
        // A relative value is made absolute.
        s.config_path = None;
        s.config.dataset.path = "x.jsonl".into();
        let f = chooser_folder(Pick::DatasetFile, &s).unwrap();
        assert!(f.is_absolute() && f.is_dir(), "{}", f.display());
    }

    #[test]
    fn drops_are_told_apart() {
        let d = tempfile::tempdir().unwrap();
        let model = d.path().join("m");
        std::fs::create_dir(&model).unwrap();
        std::fs::write(model.join("config.json"), "{}").unwrap();
        let data = d.path().join("d.jsonl");
        std::fs::write(&data, "{}").unwrap();
        let cfg = d.path().join("run.toml");
        std::fs::write(&cfg, "").unwrap();
        assert_eq!(classify_drop(&model), Dropped::Model(model.clone()));
        assert_eq!(classify_drop(&data), Dropped::Dataset(data.clone()));
        assert_eq!(classify_drop(&cfg), Dropped::Config(cfg.clone()));
        assert!(matches!(classify_drop(d.path()), Dropped::Unknown(_)));
    }
}
