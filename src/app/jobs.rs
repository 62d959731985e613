//! Work that may take longer than a frame runs here, on its own thread, and comes back as a
//! `Msg` on one channel that the app drains with `try_recv` at the start of each frame. Every
//! sender wakes the window with `request_repaint`, so an idle studio sleeps instead of polling.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, unbounded};
use eframe::egui;

use crate::model::tokenizer::TokenizerBundle;
use crate::session::Event;

use super::budget::{Fixes, Machine};
use super::dataset::DatasetView;
use super::export::ExportProgress;
use super::model::ModelInfo;
use super::preflight::PreflightReport;
use super::runs::{RunRecord, ViewedRun};

/// What a file chooser was opened for; the answer is routed by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    ModelFolder,
    DatasetFile,
    AdapterFolder,
    OpenConfig,
    SaveConfigAs,
    OutputFolder,
    ExportFolder,
}

/// A result posted back to the window.
#[derive(Debug)]
pub enum Msg {
    Model {
        path: PathBuf,
        result: Result<ModelInfo, String>,
    },
    Dataset {
        key: u64,
        result: Result<DatasetView, String>,
    },
    Preflight {
        key: u64,
        result: Result<PreflightReport, String>,
    },
    Export(ExportProgress),
    Runs {
        dir: PathBuf,
        records: Vec<RunRecord>,
    },
    RunOpened(Result<ViewedRun, String>),
    Picked {
        purpose: Pick,
        path: Option<PathBuf>,
    },
    /// What this machine has (GPU, RAM), probed once at start-up.
    Machine(Machine),
    /// "Largest that fits" for the memory budget's inputs `key`.
    BudgetFixes {
        key: u64,
        result: Result<Fixes, String>,
    },
    /// An event of the session started as `generation` (older generations are ignored).
    Session {
        generation: u64,
        event: Event,
    },
}

pub struct Jobs {
    tx: Sender<Msg>,
    rx: Receiver<Msg>,
    ctx: egui::Context,
    running: Arc<AtomicUsize>,
}

impl Jobs {
    pub fn new(ctx: egui::Context) -> Self {
        let (tx, rx) = unbounded();
        Jobs { tx, rx, ctx, running: Arc::new(AtomicUsize::new(0)) }
    }

    /// Run `work` on a new thread; its message is posted and the window woken. `work` gets a
    /// sender of its own for progress messages.
    pub fn spawn(&self, name: &str, work: impl FnOnce(&Sender<Msg>) -> Msg + Send + 'static) {
        let tx = self.tx.clone();
        let ctx = self.ctx.clone();
        let running = Arc::clone(&self.running);
        running.fetch_add(1, Ordering::SeqCst);
        let spawned = std::thread::Builder::new().name(format!("studio-{name}")).spawn(move || {
            let msg = work(&tx);
            let _ = tx.send(msg);
            running.fetch_sub(1, Ordering::SeqCst);
            ctx.request_repaint();
        });
        if spawned.is_err() {
            self.running.fetch_sub(1, Ordering::SeqCst);
        }
    }

    /// Background jobs still working (tests wait for zero).
    pub fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }

    /// Messages that arrived since the last frame, without waiting.
    pub fn drain(&self) -> Vec<Msg> {
        self.rx.try_iter().collect()
    }

    /// Forward a session's events to the window, waking it after each one. The thread ends when
    /// the session thread hangs up (after `Finished` or `Failed`) or the window is gone.
    pub fn forward_session(&self, events: Receiver<Event>, generation: u64) {
        let tx = self.tx.clone();
        let ctx = self.ctx.clone();
        let _ = std::thread::Builder::new().name("studio-session-events".into()).spawn(move || {
            for event in events.iter() {
                if tx.send(Msg::Session { generation, event }).is_err() {
                    break;
                }
                ctx.request_repaint();
            }
        });
    }

    /// Open a native file chooser on a worker thread: rfd's dialogs block their caller until the
    /// person answers, which must never be the frame.
    pub fn pick(&self, purpose: Pick, start_in: Option<PathBuf>) {
        self.spawn("file-dialog", move |_| {
            let mut d = rfd::FileDialog::new();
            if let Some(dir) = start_in.filter(|p| p.is_dir()) {
                d = d.set_directory(dir);
            }
            let path = match purpose {
                Pick::ModelFolder => d.set_title("Choose a Hugging Face model folder").pick_folder(),
                Pick::AdapterFolder => d.set_title("Choose a PEFT LoRA adapter folder").pick_folder(),
                Pick::OutputFolder => d.set_title("Choose the folder that holds runs").pick_folder(),
                Pick::ExportFolder => d.set_title("Export into this folder").pick_folder(),
                Pick::DatasetFile => d
                    .set_title("Choose a dataset")
                    .add_filter("datasets", &["jsonl", "ndjson", "json", "csv", "tsv", "parquet", "txt"])
                    .add_filter("all files", &["*"])
                    .pick_file(),
                Pick::OpenConfig => d.set_title("Open a run config").add_filter("TOML", &["toml"]).pick_file(),
                Pick::SaveConfigAs => {
                    d.set_title("Save the run config").set_file_name("run.toml").add_filter("TOML", &["toml"]).save_file()
                }
            };
            Msg::Picked { purpose, path }
        });
    }
}

/// Run `f`, turning an error or a panic into the one-line message the window shows: a worker
/// that fails must never take the studio down with it.
pub fn guarded<T>(f: impl FnOnce() -> crate::Result<T>) -> Result<T, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(p) => Err(format!(
            "internal error: {}",
            p.downcast_ref::<String>().map(String::as_str).or(p.downcast_ref::<&str>().copied()).unwrap_or("panic")
        )),
    }
}

/// The tokenizer of the model folder last asked for. Loading a real tokenizer.json takes a
/// noticeable fraction of a second and the dataset preview asks for it on every edit.
pub fn tokenizer(model_dir: &Path) -> crate::Result<Arc<TokenizerBundle>> {
    static CACHE: Mutex<Option<(PathBuf, Arc<TokenizerBundle>)>> = Mutex::new(None);
    if let Some((p, t)) = CACHE.lock().ok().and_then(|c| c.clone())
        && p == model_dir
    {
        return Ok(t);
    }
    let t = Arc::new(TokenizerBundle::load(model_dir)?);
    if let Ok(mut c) = CACHE.lock() {
        *c = Some((model_dir.to_path_buf(), Arc::clone(&t)));
    }
    Ok(t)
}

/// A stable key for "the inputs of this job", to drop results that an edit has made stale.
pub fn key_of(parts: &[&dyn Hashable]) -> u64 {
    let mut h = DefaultHasher::new();
    for p in parts {
        p.feed(&mut h);
    }
    h.finish()
}

/// Object-safe hashing for `key_of`.
pub trait Hashable {
    fn feed(&self, h: &mut DefaultHasher);
}

impl<T: Hash> Hashable for T {
    fn feed(&self, h: &mut DefaultHasher) {
        self.hash(h);
    }
}

/// Fires once per new key, after the key has held still for `delay`: typing a path or dragging
/// a number starts one job when the hand stops, not one per keystroke.
#[derive(Debug)]
pub struct Debounce {
    delay: Duration,
    pending: Option<(u64, Instant)>,
    fired: Option<u64>,
}

impl Debounce {
    pub fn new(delay: Duration) -> Self {
        Debounce { delay, pending: None, fired: None }
    }

    /// `Some(wait)` while a change is waiting (ask for a repaint after `wait`); `None` otherwise.
    /// Returns `Ready` when `key` should be acted on now.
    pub fn poll(&mut self, key: u64, now: Instant) -> DebounceState {
        if self.fired == Some(key) {
            self.pending = None;
            return DebounceState::Idle;
        }
        match self.pending {
            Some((k, since)) if k == key => {
                let waited = now.saturating_duration_since(since);
                if waited >= self.delay {
                    self.fired = Some(key);
                    self.pending = None;
                    DebounceState::Ready
                } else {
                    DebounceState::Waiting(self.delay - waited)
                }
            }
            _ => {
                // The first sighting of a key fires at once when nothing ran before (start-up),
                // so the first preview does not wait.
                if self.fired.is_none() {
                    self.fired = Some(key);
                    return DebounceState::Ready;
                }
                self.pending = Some((key, now));
                DebounceState::Waiting(self.delay)
            }
        }
    }

    /// Forget what fired, so the same key runs again (a "reload" button).
    pub fn reset(&mut self) {
        self.fired = None;
        self.pending = None;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DebounceState {
    Idle,
    Waiting(Duration),
    Ready,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debounce_waits_for_the_key_to_hold_still() {
        let mut d = Debounce::new(Duration::from_millis(100));
        let t0 = Instant::now();
        assert_eq!(d.poll(1, t0), DebounceState::Ready, "first key runs at once");
        assert_eq!(d.poll(1, t0), DebounceState::Idle);
        assert!(matches!(d.poll(2, t0), DebounceState::Waiting(_)));
        assert!(matches!(d.poll(3, t0 + Duration::from_millis(50)), DebounceState::Waiting(_)), "a new edit restarts the wait");
        assert!(matches!(d.poll(3, t0 + Duration::from_millis(120)), DebounceState::Waiting(_)));
        assert_eq!(d.poll(3, t0 + Duration::from_millis(160)), DebounceState::Ready);
        assert_eq!(d.poll(3, t0 + Duration::from_millis(500)), DebounceState::Idle);
        d.reset();
        assert_eq!(d.poll(3, t0), DebounceState::Ready);
    }

    #[test]
    fn guarded_turns_panics_into_messages() {
        let r: Result<(), String> = guarded(|| panic!("boom"));
        assert_eq!(r.unwrap_err(), "internal error: boom");
        let r: Result<(), String> = guarded(|| Err(crate::Error::config("lora.r", "bad")));
        assert_eq!(r.unwrap_err(), "config field `lora.r`: bad");
    }
}
