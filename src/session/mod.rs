//! The training session: a background thread that loads the model and data, runs the engine step
//! by step, writes the run folder, and talks to its owner (the CLI or the studio) only through
//! channels: `Event`s out, `Control`s in. It never blocks its owner.

// Checkpoints are a file format below `generate` (which answers from a run's checkpoint) and
// `session` (which samples during training through `generate`); the old path stays valid.
pub use crate::checkpoint;
pub mod guard;
pub mod lock;
pub mod samples;
pub mod telemetry;

use std::path::{Path, PathBuf};
use std::time::Instant;

use crossbeam_channel::{Receiver, Sender, TryRecvError, unbounded};
use serde::Serialize;

use crate::adapter::{AdapterFiles, load_peft};
use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, DeviceInfo, LossSum};
use crate::config::{EvalSplit, RunConfig};
use crate::data::{Batch, Batcher, DatasetReport};
use crate::device::Opened;
use crate::engine::lora::LoraWeights;
use crate::engine::plan::PlanTarget;
use crate::engine::schedule::Schedule;
use crate::engine::{EngineOptions, TokenRows, Trainer};
use crate::error::{Error, IoContext, Result};
use crate::model::{ModelSpec, WeightStore};
use crate::prepare::{self, Place, Purpose, TokenAction};
use checkpoint::{CheckpointState, RunStatus, StepMetrics};
use lock::RunLock;

/// What the session reports, in order.
#[derive(Debug, Clone)]
pub enum Event {
    /// Free-form progress ("loading weights…").
    Log(String),
    Loaded(Box<LoadedInfo>),
    Step(StepMetrics),
    Checkpoint {
        step: u64,
        dir: PathBuf,
    },
    Paused {
        step: u64,
    },
    Resumed {
        step: u64,
    },
    /// The sample prompts answered by the weights after `step` (`[samples]`), in prompt order,
    /// and the seconds answering them took (left out of the elapsed time and the ETA).
    Samples {
        step: u64,
        samples: Vec<samples::Sample>,
        secs: f64,
    },
    /// A telemetry reading of the GPU (about once a second during a CUDA run, where NVML reads it).
    Gpu(crate::backend::nvml::GpuSample),
    Finished(Finished),
    /// The run could not go on; `message` says what to do.
    Failed {
        message: String,
        run_dir: Option<PathBuf>,
        last_checkpoint: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct LoadedInfo {
    pub run_dir: PathBuf,
    pub device: DeviceInfo,
    /// What the run was planned for (`device::plan_target`): the card, other processes, the cap.
    pub target: PlanTarget,
    pub model: String,
    pub trainable_params: usize,
    pub total_steps: u64,
    /// Optimizer steps already done (a resumed run starts after them).
    pub start_step: u64,
    pub steps_per_epoch: u64,
    pub dataset: DatasetSummary,
    pub keeps_all_activations: bool,
    /// The checkpointing mix the Trainer runs (the plan's choice, or `StartOptions::mix`).
    pub mix: crate::engine::plan::Mix,
    pub load_secs: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct DatasetSummary {
    pub format: String,
    pub rows_used: usize,
    pub rows_skipped: usize,
    pub truncated_rows: usize,
    pub trained_tokens: usize,
    /// Rows held out to evaluate on (`dataset.eval_split`): of `rows_used` for a fraction, from
    /// their own file otherwise; 0 without an evaluation set.
    pub eval_rows: usize,
}

impl From<&DatasetReport> for DatasetSummary {
    fn from(r: &DatasetReport) -> Self {
        DatasetSummary {
            format: format!("{:?}", r.format).to_lowercase(),
            rows_used: r.rows_used,
            rows_skipped: r.rows_skipped.len(),
            truncated_rows: r.truncated_rows,
            trained_tokens: r.trained_tokens,
            eval_rows: 0,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Finished {
    pub run_dir: PathBuf,
    pub adapter_dir: PathBuf,
    pub steps: u64,
    pub final_loss: Option<f64>,
    /// Stopped by the user before the last step (resumable).
    pub stopped: bool,
    /// The lowest evaluation loss and its step, whose checkpoint (`best_checkpoint`) is kept.
    pub best: Option<checkpoint::BestEval>,
    pub best_checkpoint: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Pause,
    Resume,
    Stop,
    SaveNow,
}

#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// Continue the run in this folder from its newest checkpoint.
    pub resume: Option<PathBuf>,
    /// Start the run in this folder again from step 0 with the given config: for a run folder
    /// that holds no checkpoint (killed or failed before its first save).
    pub restart: Option<PathBuf>,
    /// On resume, go on although the dataset file changed since the run started.
    pub allow_changed_data: bool,
    /// On resume with a new `max_steps`, spread the learning-rate schedule over the new length
    /// instead of keeping the original one.
    pub reschedule: bool,
    /// Behave as if Stop was pressed right after this step (scripts and tests).
    pub stop_after_step: Option<u64>,
    /// Decide and plan as this card (`train --card`); `None`: `TUNESTUDIO_CARD`, else the device.
    pub card: Option<&'static crate::backend::card::CardProfile>,
    /// With `train.device = auto`: train on the CPU when the card found cannot run the CUDA
    /// engine, saying why in the run's first lines (`train --device auto`). Otherwise that stops
    /// the run with the reason.
    pub cpu_fallback: bool,
    /// Run this checkpointing mix instead of the one the plan chooses (tests that train the
    /// same run under every mix); the plan is built for it and must fit.
    pub mix: Option<crate::engine::plan::Mix>,
}

pub struct SessionHandle {
    pub events: Receiver<Event>,
    pub control: Sender<Control>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SessionHandle {
    pub fn send(&self, c: Control) {
        let _ = self.control.send(c);
    }

    /// Wait for the thread to end (after `Finished` or `Failed`).
    pub fn join(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Start a run on a background thread.
pub fn start(config: RunConfig, options: StartOptions) -> SessionHandle {
    let (etx, erx) = unbounded();
    let (ctx, crx) = unbounded();
    let thread = std::thread::Builder::new()
        .name("tunestudio-session".into())
        .spawn(move || {
            // The run folder and its lock, filled in as soon as the run has them; the lock is
            // held until the outcome is written.
            let mut folder = RunFolder::default();
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(config, options, &etx, &crx, &mut folder)));
            let failure = match result {
                Ok(Ok(f)) => {
                    let _ = etx.send(Event::Finished(f));
                    None
                }
                Ok(Err(e)) => Some(e.to_string()),
                Err(p) => Some(format!(
                    "internal error: {}",
                    p.downcast_ref::<String>().map(String::as_str).or(p.downcast_ref::<&str>().copied()).unwrap_or("panic")
                )),
            };
            if let Some(message) = failure {
                let run_dir = folder.dir.clone();
                let last_checkpoint = run_dir.as_deref().and_then(checkpoint::latest_dir);
                if let (Some(d), Some(_)) = (&run_dir, &folder.lock)
                    && let Ok(mut st) = RunStatus::load(d)
                {
                    st.state = "failed".into();
                    st.error = Some(message.clone());
                    st.updated = now();
                    let _ = st.save(d);
                }
                let _ = etx.send(Event::Failed { message, run_dir, last_checkpoint });
            }
            drop(folder);
        })
        .expect("spawning the session thread");
    SessionHandle { events: erx, control: ctx, thread: Some(thread) }
}

fn now() -> String {
    let (d, t) = crate::util::utc_now();
    format!("{d}T{t}Z")
}

/// The run folder a session works in, with the lock that makes it the only process there.
#[derive(Default)]
struct RunFolder {
    dir: Option<PathBuf>,
    lock: Option<RunLock>,
}

/// Why a run folder cannot take a new run, and what to do instead.
fn occupied(dir: &Path) -> Error {
    if let Some(who) = RunLock::holder(dir) {
        return Error::file(
            dir,
            format!("is in use by {who}: two processes never share a run folder; wait for it, or pick another output.run_name"),
        );
    }
    let d = dir.display();
    match checkpoint::list(dir).last() {
        Some(step) => Error::file(
            dir,
            format!(
                "already holds a run (checkpoint at step {step}): continue it with `tunestudio train --resume {d}`, or pick another output.run_name"
            ),
        ),
        None if dir.join(checkpoint::STATUS_FILE).exists() || dir.join(checkpoint::CONFIG_FILE).exists() => Error::file(
            dir,
            format!(
                "already holds a run that saved no checkpoint: start it again in place with `tunestudio train --restart {d}`, or pick another output.run_name"
            ),
        ),
        None => Error::file(dir, "already exists and is not empty: pick another output.run_name"),
    }
}

/// Whether a folder holds nothing but (possibly) its lock file.
fn is_unused(dir: &Path) -> bool {
    std::fs::read_dir(dir).map(|mut it| it.all(|e| e.is_ok_and(|e| e.file_name() == lock::LOCK_FILE))).unwrap_or(false)
}

/// The folder a new run writes to, created and locked: `output.dir/run_name`, or a default name
/// `<model>-<dataset>-<date>-<time>` with `-2`, `-3`, … when taken. The folder is created with `create_dir`,
/// which exactly one process can win, and a run never moves into a folder that holds anything.
fn new_run_dir(cfg: &RunConfig) -> Result<(PathBuf, RunLock)> {
    let out = &cfg.output.dir;
    std::fs::create_dir_all(out).with_path(out)?;
    if cfg.output.run_name.is_empty() {
        let base = default_run_name(cfg);
        for n in 1u32.. {
            let dir = if n == 1 { out.join(&base) } else { out.join(format!("{base}-{n}")) };
            match std::fs::create_dir(&dir) {
                Ok(()) => return Ok((dir.clone(), RunLock::acquire(&dir, "train")?)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::file(&dir, e)),
            }
        }
        unreachable!("some suffix is free")
    }
    let dir = out.join(&cfg.output.run_name);
    match std::fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && is_unused(&dir) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Err(occupied(&dir)),
        Err(e) => return Err(Error::file(&dir, e)),
    }
    let lock = RunLock::acquire(&dir, "train")?;
    // Another process may have created the folder and written a run into it in between.
    if !is_unused(&dir) {
        drop(lock);
        return Err(occupied(&dir));
    }
    Ok((dir, lock))
}

fn best_step(status: &RunStatus) -> Option<u64> {
    status.best.map(|b| b.step)
}

/// The mean loss per trained token over the held-out batches, as a forward in evaluation mode:
/// no LoRA dropout, and the dropout masks of training (keyed by the micro-batch counter) go on as
/// if the evaluation had not happened, so evaluating does not change the run.
fn evaluate<B: Backend>(trainer: &mut Trainer<B>, batches: &[Batch]) -> Result<f64> {
    let (micro, dropout) = (trainer.micro_counter(), trainer.opts.lora.dropout);
    trainer.opts.lora.dropout = 0.0;
    let total = batches
        .iter()
        .try_fold(LossSum::default(), |a, b| trainer.evaluate(b).map(|l| LossSum { sum: a.sum + l.sum, count: a.count + l.count }));
    trainer.opts.lora.dropout = dropout;
    trainer.set_micro_counter(micro);
    let total = total?;
    Ok(total.sum / total.count.max(1) as f64)
}

/// `<model>-<dataset>-<date>-<time>`: the folder's name says what was trained on what, so runs
/// read apart in a list (the studio can rename them afterwards). The names are `model_name` and
/// `dataset_name`, said once when the dataset's already starts with the model's (the demo:
/// `demo-train-…`).
pub fn default_run_name(cfg: &RunConfig) -> String {
    let model = model_name(&cfg.model.path);
    let dataset = dataset_name(&cfg.dataset.path);
    let (d, t) = crate::util::utc_now();
    let what = if dataset == model || dataset.starts_with(&format!("{model}-")) { dataset } else { format!("{model}-{dataset}") };
    format!("{what}-{}-{}", d.replace('-', ""), t.replace(':', ""))
}

/// A shard's name without its `-00000-of-00001`.
fn unsharded(name: &str) -> &str {
    let digits = |x: &str| !x.is_empty() && x.bytes().all(|c| c.is_ascii_digit());
    let mut parts = name.rsplitn(4, '-');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(b), Some("of"), Some(a), Some(head)) if digits(a) && digits(b) && !head.is_empty() => head,
        _ => name,
    }
}

/// A folder or file name that says nothing of what it holds: `model/`, a split's file
/// (`train.jsonl`, `train-00000-of-00001.parquet`), a hub snapshot's revision hash.
fn says_nothing(name: &str) -> bool {
    const GENERIC: [&str; 26] = [
        "model",
        "models",
        "weights",
        "checkpoint",
        "checkpoints",
        "base",
        "hf",
        "snapshots",
        "main",
        "final",
        "output",
        "merged",
        "data",
        "dataset",
        "datasets",
        "train",
        "training",
        "test",
        "eval",
        "evaluation",
        "validation",
        "valid",
        "val",
        "dev",
        "all",
        "default",
    ];
    let n = unsharded(name).to_ascii_lowercase();
    GENERIC.contains(&n.as_str()) || (n.len() >= 7 && n.bytes().all(|c| c.is_ascii_hexdigit())) || matches!(n.as_str(), "/" | "." | "..")
}

/// The name of a Hugging Face cache entry (`models--org--name`, `datasets--org--name`) among
/// `path`'s folders: `name`.
fn hub_repo_name(path: &Path) -> Option<String> {
    path.components().rev().find_map(|c| {
        let c = c.as_os_str().to_string_lossy();
        let rest = c.strip_prefix("models--").or_else(|| c.strip_prefix("datasets--"))?;
        rest.rsplit("--").next().filter(|n| !n.is_empty()).map(str::to_string)
    })
}

/// What a model folder is called in run names: a hub cache snapshot by its repo's name, else
/// the nearest of its folders (itself first) whose name says something (`…/demo/model` → `demo`).
pub fn model_name(path: &Path) -> String {
    if let Some(n) = hub_repo_name(path) {
        return n;
    }
    let names: Vec<String> = path.components().rev().take(3).map(|c| c.as_os_str().to_string_lossy().to_string()).collect();
    names.into_iter().find(|n| !says_nothing(n)).unwrap_or_else(|| "model".into())
}

/// What a dataset file is called in run names: its stem, and when that is only a split's name,
/// the nearest folder above that says something in front (`…/demo/data/train.jsonl` →
/// `demo-train`; a hub cache's dataset by its repo's name).
pub fn dataset_name(path: &Path) -> String {
    let stem = path.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_else(|| "data".into());
    if !says_nothing(&stem) {
        return stem;
    }
    let above = hub_repo_name(path).or_else(|| {
        path.parent()?.components().rev().take(3).map(|c| c.as_os_str().to_string_lossy().to_string()).find(|n| !says_nothing(n))
    });
    let split = unsharded(&stem);
    match above {
        Some(a) => format!("{a}-{split}"),
        None => split.to_string(),
    }
}

/// Names of leftovers that writes in progress leave when a process dies: `.<name>.tmp-<pid>`,
/// `.<name>.old-<pid>` (`util::write_atomic`, `util::write_dir_atomic`), `.<name>.removing-<pid>`
/// (checkpoint pruning) and `.<name>.partial-<pid>` (merged exports). Returns `<name>` and the kind.
fn leftover(file_name: &str) -> Option<(&str, &str)> {
    let rest = file_name.strip_prefix('.')?;
    let (head, pid) = rest.rsplit_once('-')?;
    if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (name, kind) = head.rsplit_once('.')?;
    matches!(kind, "tmp" | "old" | "removing" | "partial").then_some((name, kind))
}

/// Remove what a process that died while writing into the run folder left behind (the caller
/// holds the lock, so no live process is writing): temporary files and folders, checkpoint
/// folders that are incomplete, and half-finished removals. A folder that was being replaced
/// when the process died (`.X.old-PID` with no `X`) is put back instead. Returns what was done.
pub fn clean_stale(run_dir: &Path) -> Vec<String> {
    let mut done = Vec::new();
    for dir in [run_dir.to_path_buf(), run_dir.join(checkpoint::CHECKPOINTS_DIR)] {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let path = e.path();
            let remove = |what: &str, done: &mut Vec<String>| {
                let r = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
                if r.is_ok() {
                    done.push(format!("removed {what} {}", path.display()));
                }
            };
            if let Some((original, kind)) = leftover(&name) {
                let target = dir.join(original);
                if kind == "old" && !target.exists() && std::fs::rename(&path, &target).is_ok() {
                    done.push(format!("restored {} from an interrupted replacement", target.display()));
                } else {
                    remove("the leftover", &mut done);
                }
            } else if dir != run_dir
                && name.starts_with("step-")
                && checkpoint::list(run_dir).iter().all(|s| format!("step-{s:06}") != name)
            {
                remove("the incomplete checkpoint", &mut done);
            }
        }
    }
    done
}

/// Everything a run needs before the first step, independent of the backend.
struct Prepared {
    cfg: RunConfig,
    run_dir: PathBuf,
    spec: ModelSpec,
    batcher: Batcher,
    report: DatasetReport,
    total_steps: u64,
    steps_per_epoch: u64,
    lora_init: Option<LoraWeights>,
    /// Starting values of untrained token rows the data uses (the fix), when there are any.
    token_fix: Option<TokenRows>,
    resume: Option<checkpoint::Checkpoint>,
    started: Instant,
    /// The held-out rows in batches of `train.batch_size` (empty: no evaluation).
    eval: Vec<Batch>,
    /// Rows trained on (the dataset's usable rows less the held-out ones).
    train_rows: usize,
    eval_rows: usize,
    /// What `[samples]` answers (empty: no samples).
    sample_prompts: Vec<samples::SamplePrompt>,
}

fn run(
    mut cfg: RunConfig,
    options: StartOptions,
    events: &Sender<Event>,
    control: &Receiver<Control>,
    folder: &mut RunFolder,
) -> Result<Finished> {
    let started = Instant::now();
    let log = |m: String| {
        let _ = events.send(Event::Log(m));
    };
    let mut take_folder = |dir: PathBuf, lock: RunLock| {
        if let Some(note) = lock.stale_note() {
            log(note);
        }
        for what in clean_stale(&dir) {
            log(what);
        }
        folder.dir = Some(dir.clone());
        folder.lock = Some(lock);
        dir
    };
    let mut data_changed = None;
    // A new run's folder is made once the device has started (below).
    let (run_dir, resume) = match (&options.resume, &options.restart) {
        (Some(_), Some(_)) => return Err(Error::arg("--resume/--restart", "resume or restart a run folder, not both")),
        (Some(dir), None) => {
            if !dir.join(checkpoint::CONFIG_FILE).is_file() {
                return Err(Error::file(dir, "is not a run folder (no config.toml): give the folder `tunestudio train` printed"));
            }
            let dir = take_folder(dir.clone(), RunLock::acquire(dir, "resume")?);
            if checkpoint::latest_dir(&dir).is_none() {
                return Err(Error::file(
                    &dir,
                    format!(
                        "has no checkpoint to resume from (it stopped before its first save): start it again in place with `tunestudio train --restart {}`",
                        dir.display()
                    ),
                ));
            }
            // A checkpoint that is there but cannot be read says why (a damaged file, NaN weights).
            let ckpt = checkpoint::load_latest(&dir)?;
            let saved = RunConfig::load(&dir.join(checkpoint::CONFIG_FILE))?;
            // Only how long to train and the memory cap (a property of the machine, not of the
            // run) may change on resume; everything else must match the run.
            let (max_steps, cap) = (cfg.train.max_steps, cfg.memory.gpu_mem);
            cfg = saved;
            if max_steps.is_some() && max_steps != cfg.train.max_steps {
                cfg.train.max_steps = max_steps;
                if options.reschedule {
                    cfg.schedule.steps = None;
                } else if cfg.schedule.steps.is_none() {
                    // The schedule keeps the span it was planned with (lr continues as before).
                    cfg.schedule.steps = Some(ckpt.state.total_steps);
                }
            }
            if cap.is_some() {
                cfg.memory.gpu_mem = cap;
            }
            let recorded = cfg.dataset.fingerprint.clone();
            let now = cfg.dataset.path.is_file().then(|| crate::config::Fingerprint::of_file(&cfg.dataset.path)).transpose()?;
            if let (Some(then), Some(now)) = (&recorded, &now)
                && then != now
            {
                if !options.allow_changed_data {
                    return Err(Error::file(
                        &cfg.dataset.path,
                        format!(
                            "has changed since the run started ({then} then, {now} now): resuming on other data would not continue the same run; restore the file, or pass --allow-changed-data to go on with it as it is"
                        ),
                    ));
                }
                data_changed =
                    Some(format!("the dataset changed since the run started ({then} then, {now} now): going on with it as it is"));
            }
            cfg.dataset.fingerprint = now.or(recorded);
            log(format!("resuming {} from step {}", dir.display(), ckpt.state.step));
            (Some(dir), Some(ckpt))
        }
        (None, Some(dir)) => {
            let lock = RunLock::acquire(dir, "restart")?;
            if let Some(step) = checkpoint::list(dir).last() {
                return Err(Error::file(
                    dir,
                    format!(
                        "holds a checkpoint at step {step}: continue it with `tunestudio train --resume {}` (--restart is for a run folder without one)",
                        dir.display()
                    ),
                ));
            }
            let dir = take_folder(dir.clone(), lock);
            cfg.make_absolute();
            cfg.validate()?;
            for f in [checkpoint::METRICS_FILE, checkpoint::STATUS_FILE, "token_fix.json"] {
                let p = dir.join(f);
                if p.exists() {
                    std::fs::remove_file(&p).with_path(&p)?;
                }
            }
            for d in [checkpoint::ADAPTER_DIR, checkpoint::CHECKPOINTS_DIR] {
                let p = dir.join(d);
                if p.exists() {
                    std::fs::remove_dir_all(&p).with_path(&p)?;
                }
            }
            log(format!("restarting {} from step 0", dir.display()));
            (Some(dir), None)
        }
        (None, None) => {
            cfg.make_absolute();
            cfg.validate()?;
            // A wrong model folder is said before a run folder is made for it (which waits for
            // the device, below).
            crate::model::check_folder(&cfg.model.path)?;
            (None, None)
        }
    };
    cfg.validate()?;

    // The device first, so that what it decided is in the run's first lines, and a device that
    // cannot start leaves no run folder behind (and a resumed one as it was).
    let request = crate::device::Request::of_config(&cfg, options.card)?;
    let opened = crate::device::open(&request, options.cpu_fallback).map_err(|u| u.into_error())?;
    match &opened {
        Opened::Cpu { fallback: Some(u), .. } => {
            log(format!("warning: {}", u.message()));
            log("warning: training on the CPU instead (--device auto), which is far slower".into());
        }
        Opened::Cpu { note: Some(n), .. } => log(n.clone()),
        _ => {}
    }
    let run_dir = match run_dir {
        Some(dir) => dir,
        None => {
            let (dir, lock) = new_run_dir(&cfg)?;
            take_folder(dir, lock)
        }
    };
    if resume.is_none() && cfg.dataset.path.is_file() {
        cfg.dataset.fingerprint = Some(crate::config::Fingerprint::of_file(&cfg.dataset.path)?);
    }
    if let Some(m) = data_changed {
        log(m);
    }

    log(format!("reading {}", cfg.model.path.display()));
    let model = prepare::Model::open(&cfg.model.path)?;
    let mut lora_init = None;
    if let Some(adapter) = cfg.model.adapter.clone() {
        let a = load_peft(&adapter, &model.spec)?;
        let mut wanted = cfg.lora.targets.clone();
        wanted.sort();
        if a.lora.r != cfg.lora.r || a.lora.targets != wanted || a.lora.alpha != cfg.lora.alpha {
            log(format!(
                "continuing from {}: using its r = {}, alpha = {}, targets from the adapter",
                adapter.display(),
                a.lora.r,
                a.lora.alpha
            ));
            cfg.lora.r = a.lora.r;
            cfg.lora.alpha = a.lora.alpha;
            cfg.lora.targets = a.lora.targets.clone();
            cfg.lora.rslora = a.lora.rslora;
        }
        lora_init = Some(a.weights);
    }
    log(format!("preparing {}", cfg.dataset.path.display()));
    let data = prepare::Data::prepare(&cfg, &model.tok, Purpose::Train)?;
    for s in data.report.rows_skipped.iter().take(5) {
        log(format!("skipped {}: {}", s.place(&data.report.file_kind), s.reason));
    }
    let pad_id = model.tok.pad_id();
    // The held-out rows, else the training rows, give the sample prompts when none are typed.
    let sample_prompts = samples::prompts(&cfg, if data.eval.is_empty() { &data.train } else { &data.eval }, &model.tok)?;
    if !sample_prompts.is_empty() {
        log(format!(
            "answering {} sample prompt{} every {} steps and after the last (samples.jsonl)",
            sample_prompts.len(),
            if sample_prompts.len() == 1 { "" } else { "s" },
            cfg.samples.every
        ));
    }
    let eval: Vec<Batch> = data
        .eval
        .chunks(cfg.train.batch_size.max(1))
        .map(|c| {
            let pairs: Vec<(&[u32], &[i32])> = c.iter().map(|e| (e.input_ids.as_slice(), e.labels.as_slice())).collect();
            Batch::from_examples(&pairs, pad_id, None)
        })
        .collect();
    let (train_rows, eval_rows) = (data.train.len(), data.eval.len());
    if !eval.is_empty() {
        let every = if cfg.train.eval_every == 0 {
            "about ten times over the run".to_string()
        } else {
            format!("every {} steps", cfg.train.eval_every)
        };
        match &cfg.dataset.eval_split {
            Some(EvalSplit::File(f)) => log(format!("evaluating on the {eval_rows} rows of {} {every}", f.display())),
            _ => log(format!("holding out {eval_rows} rows to evaluate on {every}; training on {train_rows}")),
        }
    }
    let (steps_per_epoch, total_steps) = (data.steps_per_epoch, data.total_steps);
    if let Some(c) = resume.as_ref().filter(|c| c.state.step >= total_steps) {
        log(format!(
            "{} has already made {} of its {total_steps} steps: nothing to train; to train further, resume it with --max-steps N (N > {})",
            run_dir.display(),
            c.state.step,
            c.state.step
        ));
        return Ok(Finished {
            adapter_dir: run_dir.join(checkpoint::ADAPTER_DIR),
            steps: c.state.step,
            final_loss: checkpoint::read_metrics(&run_dir).last().map(|m| m.loss),
            stopped: false,
            best: None,
            best_checkpoint: None,
            run_dir,
        });
    }
    if let Some(span) = cfg.schedule.steps.filter(|&s| s < total_steps && cfg.schedule.kind != crate::config::ScheduleKind::Constant) {
        log(format!(
            "the learning-rate schedule spans {span} steps and ends at lr 0, so steps {}–{total_steps} learn nothing; resume with --reschedule to spread it over {total_steps} steps",
            span + 1
        ));
    }
    cfg.save(&run_dir.join(checkpoint::CONFIG_FILE))?;

    let token_fix = if resume.is_some() { None } else { untrained_token_fix(&cfg, &model, &data, &run_dir, &log)? };
    let prepared = Prepared {
        cfg,
        run_dir,
        spec: model.spec,
        batcher: data.batcher,
        report: data.report,
        total_steps,
        steps_per_epoch,
        lora_init,
        token_fix,
        resume,
        started,
        eval,
        train_rows,
        eval_rows,
        sample_prompts,
    };
    let target = prepare::target(&request, Place::Opened(&opened));
    match opened {
        // Samples answer on a backend of their own on the same card, decided as the run's (its
        // profile): generation's buffers and a second copy of the base weights, counted in the
        // plan's `samples` term (not held to the cap by that backend itself).
        Opened::Cuda(gpu) => {
            let sample_options = crate::backend::cuda::CudaOptions { card: request.card, memory_limit_bytes: None };
            train_on(*gpu, prepared, &target, &options, events, control, &|| {
                crate::backend::cuda::CudaBackend::with_options(&sample_options)
            })
        }
        Opened::Cpu { .. } => {
            train_on(CpuBackend::<f32>::new(), prepared, &target, &options, events, control, &|| Ok(CpuBackend::<f32>::new()))
        }
    }
}

/// Untrained token rows the data or template uses (`prepare::untrained`, the same decision the
/// preflight report shows): refuse, or (with `dataset.fix_untrained_tokens`) start them at the
/// mean of the trained rows and train them with the adapter. What was changed is written to
/// `token_fix.json` in the run folder.
fn untrained_token_fix(
    cfg: &RunConfig,
    model: &prepare::Model,
    data: &prepare::Data,
    run_dir: &Path,
    log: &dyn Fn(String),
) -> Result<Option<TokenRows>> {
    let (spec, store) = (&model.spec, &model.store);
    let u = prepare::untrained(cfg, model, data)?;
    match u.action {
        TokenAction::None => return Ok(None),
        TokenAction::LeaveAlone => {
            log(format!(
                "{} untrained token rows exist; neither the data nor the chat template uses them, so they are left alone",
                u.tokens.len()
            ));
            return Ok(None);
        }
        TokenAction::Refuse => return Err(u.refusal().expect("refuse has a refusal")),
        TokenAction::Fix => {}
    }
    let ids = u.used_ids.clone();
    let names = u.used_names();
    let d = spec.hidden_size;
    let embed_mean = crate::model::untrained::mean_of_trained_rows(store, "model.embed_tokens.weight", spec, &u.all_ids)?;
    let head_mean = if u.fix_trains_head() {
        Some(crate::model::untrained::mean_of_trained_rows(store, "lm_head.weight", spec, &u.all_ids)?)
    } else {
        None
    };
    let rows = TokenRows {
        ids: ids.clone(),
        embed: ids.iter().flat_map(|_| embed_mean.iter().copied()).collect(),
        head: head_mean.map(|h| ids.iter().flat_map(|_| h.iter().copied()).collect()),
    };
    debug_assert_eq!(rows.embed.len(), ids.len() * d);
    let record = serde_json::json!({
        "fixed_token_ids": ids,
        "tokens": names,
        "initial_value": "mean of trained rows: (sum of all rows - sum of untrained rows) / trained rows, in f32",
        "untrained_rows_total": u.all_ids.len(),
        "trained_with_adapter": u.fix_trains,
    });
    crate::util::write_atomic(&run_dir.join("token_fix.json"), serde_json::to_string_pretty(&record).expect("json").as_bytes())?;
    log(format!(
        "untrained tokens used by the data or template: {}; starting them at the mean of the trained rows and training them",
        names.join(", ")
    ));
    Ok(Some(rows))
}

/// An out-of-memory at set-up (every buffer is allocated before the first step) becomes a message
/// with the plan's numbers and the cheapest changes that fit.
fn explain_oom(e: Error, spec: &ModelSpec, input: &crate::engine::plan::PlanInput, target: &PlanTarget) -> Error {
    use crate::engine::plan;
    use crate::util::fmt_bytes;
    let Error::OutOfMemory { during, advice } = e else { return e };
    let (Some(total), Some(room)) = (target.total_bytes, target.available_bytes()) else { return Error::OutOfMemory { during, advice } };
    let p = plan::plan(spec, input, target);
    let fixes: Vec<String> =
        plan::suggestions(spec, input, target).into_iter().map(|s| format!("{} ({})", s.change, fmt_bytes(s.peak_bytes))).collect();
    let pinned = match (target.host_bytes, p.host_fits) {
        (Some(h), false) => format!(" and {} of pinned host memory with {} of RAM available", fmt_bytes(p.pinned_host_bytes), fmt_bytes(h)),
        _ => String::new(),
    };
    let others =
        if target.others_bytes > 0 { format!(", {} of it used by other processes", fmt_bytes(target.others_bytes)) } else { String::new() };
    let cap = target.cap_bytes.map(|c| format!(" under the memory cap of {}", fmt_bytes(c))).unwrap_or_default();
    let advice = format!(
        "the plan needs {} of the {} left on {} ({}{others}){cap}{pinned} (checkpointing {:?}); {}",
        fmt_bytes(p.peak_bytes),
        fmt_bytes(room),
        target.name,
        fmt_bytes(total),
        p.checkpointing,
        if fixes.is_empty() { advice } else { format!("to fit: {}", fixes.join("; or ")) }
    );
    Error::OutOfMemory { during, advice }
}

fn train_on<B: Backend>(
    backend: B,
    p: Prepared,
    target: &PlanTarget,
    options: &StartOptions,
    events: &Sender<Event>,
    control: &Receiver<Control>,
    sample_backend: &dyn Fn() -> Result<B>,
) -> Result<Finished> {
    let send = |e: Event| {
        let _ = events.send(e);
    };
    let cfg = &p.cfg;
    let device = backend.device();
    // Read about once a second while the run lasts (dropped, and joined, when this returns).
    let _telemetry = device.pci_bus_id.clone().and_then(|pci| telemetry::Sampler::start(pci, p.started, events.clone()));
    send(Event::Log(format!("loading weights on {}", device.name)));
    let store = WeightStore::open(&cfg.model.path)?;
    let mut opts = EngineOptions {
        lora: cfg.lora.clone(),
        optim: cfg.optim.clone(),
        quantization: cfg.model.quantization,
        batch_size: cfg.train.batch_size,
        max_seq_len: cfg.train.max_seq_len,
        checkpointing: cfg.memory.checkpointing,
        seed: cfg.train.seed,
        mlp_chunk_rows: 0,
        saved_attention: crate::engine::plan::SavedAttention::Off,
        cached_weight_layers: 0,
        hold_mlp_weights: false,
    };
    let init = p.resume.as_ref().map(|c| &c.weights).or(p.lora_init.as_ref());
    let rows = p.resume.as_ref().and_then(|c| c.token_rows.as_ref()).or(p.token_fix.as_ref());
    let input = prepare::plan_input(cfg, rows.map_or(0, |r| r.ids.len()));
    // `auto` is the fastest policy that fits what this card leaves us (other processes, the cap).
    let planned = match options.mix {
        Some(mix) => crate::engine::plan::plan_resolved(&p.spec, &input, target, mix),
        None => crate::engine::plan::plan(&p.spec, &input, target),
    };
    opts.checkpointing = planned.checkpointing;
    opts.saved_attention = planned.attention;
    opts.cached_weight_layers = planned.cached_weight_layers;
    opts.hold_mlp_weights = planned.hold_mlp_weights;
    if cfg.memory.checkpointing == crate::config::CheckpointPolicy::Auto {
        send(Event::Log(format!(
            "checkpointing auto: {} (plan {})",
            planned.checkpointing_label(&p.spec),
            crate::util::fmt_bytes(planned.peak_bytes)
        )));
    }
    if !p.sample_prompts.is_empty() {
        // In the plan (its `samples` term, held against the card with the rest), said here too:
        // on a card it is a second copy of the model.
        send(Event::Log(format!(
            "samples: {} of the plan's {} on {} (their own copy of the model, a cache for {} prompt{} of up to {} tokens); set samples.every = 0 to give it back to training",
            crate::util::fmt_bytes(samples::planned_bytes(&planned)),
            crate::util::fmt_bytes(planned.peak_bytes),
            target.name,
            p.sample_prompts.len(),
            if p.sample_prompts.len() == 1 { "" } else { "s" },
            input.samples.map_or(0, |s| s.positions),
        )));
    }
    // The layers whose activations the plan keeps (all of them, or some under `layer`).
    let kept = (planned.checkpointing == crate::config::CheckpointPolicy::Layer).then_some(planned.kept_layers);
    let mut trainer = Trainer::with_kept_layers(backend, p.spec.clone(), &store, opts, init, kept)
        .map_err(|e| explain_oom(e, &p.spec, &input, target))?;
    if let Some(rows) = rows {
        trainer.set_token_rows(rows)?;
    }
    let mut elapsed_before = 0.0;
    if let Some(c) = &p.resume {
        trainer.set_optimizer_state(&c.optimizer)?;
        trainer.set_micro_counter(c.state.micro_counter);
        checkpoint::truncate_metrics(&p.run_dir, c.state.step)?;
        samples::truncate(&p.run_dir, c.state.step)?;
        elapsed_before = checkpoint::read_metrics(&p.run_dir).last().map_or(0.0, |m| m.elapsed_s);
    }
    let trainable = trainer.lora_weights()?.num_params();
    let model_name = cfg.model.path.display().to_string();
    let mut status = RunStatus {
        state: "running".into(),
        step: trainer.step,
        total_steps: p.total_steps,
        last_loss: None,
        device: device.name.clone(),
        model: model_name.clone(),
        started: now(),
        updated: now(),
        error: None,
        rows: Some(p.train_rows),
        // A resumed run keeps the best evaluation it had (its checkpoint is at or before the
        // newest, which the resume starts from).
        best: p.resume.as_ref().and_then(|_| RunStatus::load(&p.run_dir).ok()?.best),
    };
    status.save(&p.run_dir)?;
    send(Event::Loaded(Box::new(LoadedInfo {
        run_dir: p.run_dir.clone(),
        device: device.clone(),
        target: target.clone(),
        model: p.spec.summary(),
        trainable_params: trainable,
        total_steps: p.total_steps,
        start_step: trainer.step,
        steps_per_epoch: p.steps_per_epoch,
        dataset: DatasetSummary { eval_rows: p.eval_rows, ..DatasetSummary::from(&p.report) },
        keeps_all_activations: trainer.keeps_all_activations(),
        mix: trainer.mix(),
        load_secs: p.started.elapsed().as_secs_f64(),
    })));

    let schedule = Schedule::new(&cfg.schedule, cfg.optim.lr, cfg.schedule.steps.unwrap_or(p.total_steps));
    let ga = cfg.train.grad_accum as u64;
    let bpe = p.batcher.batches_per_epoch().max(1) as u64;
    let loop_start = Instant::now();
    let first_step = trainer.step;
    let mut last_saved = p.resume.as_ref().map(|c| c.state.step);
    let mut last_loss = None;
    let mut paused = false;
    let mut guard = guard::DivergenceGuard::new(p.spec.vocab_size);
    let mut paused_unsaved = std::time::Duration::ZERO;
    // Time spent paused, left out of the elapsed time and the ETA (issue 17: a paused hour
    // showed as an hour of training).
    let mut paused_since: Option<Instant> = None;
    let mut paused_total = std::time::Duration::ZERO;
    // Time spent answering the samples, left out of the elapsed time and the ETA as paused time
    // is: they are a view of the run, and a run with samples every step would otherwise show a
    // training time and a remaining time that are mostly generation.
    let mut sampling_total = std::time::Duration::ZERO;
    // Training time since the last checkpoint (paused time does not count).
    let mut unsaved_since = Instant::now();
    let save_interval = std::time::Duration::from_secs_f64(cfg.train.save_every_minutes * 60.0);
    let save = |trainer: &Trainer<B>, last_saved: &mut Option<u64>, best: Option<u64>| -> Result<()> {
        if *last_saved == Some(trainer.step) || trainer.step == 0 {
            return Ok(());
        }
        let state = CheckpointState {
            step: trainer.step,
            micro_counter: trainer.micro_counter(),
            total_steps: p.total_steps,
            slots: vec![],
            token_ids: vec![],
            head_rows: false,
        };
        let (weights, rows) = (trainer.lora_weights()?, trainer.token_rows()?);
        let adapter = AdapterFiles { spec: &p.spec, weights: &weights, lora: &cfg.lora, base_model: &model_name, tokens: rows.as_ref() };
        let keep = checkpoint::Retention { best, only_best: cfg.train.keep_only_best };
        let dir = checkpoint::save(&p.run_dir, adapter, &trainer.optimizer_state()?, &state, keep)?;
        *last_saved = Some(trainer.step);
        send(Event::Checkpoint { step: trainer.step, dir });
        Ok(())
    };

    let mut sampler = samples::Sampler::<B>::new(p.sample_prompts.clone(), cfg.samples.max_new_tokens);
    let mut stopped = false;
    while trainer.step < p.total_steps {
        // Controls are handled between steps: a step is never interrupted half-way.
        let mut save_now = false;
        loop {
            let c = if paused { control.recv().ok() } else { control.try_recv().map_err(|e| e == TryRecvError::Disconnected).ok() };
            match c {
                Some(Control::Pause) if !paused => {
                    paused = true;
                    paused_since = Some(Instant::now());
                    paused_unsaved = unsaved_since.elapsed();
                    status.state = "paused".into();
                    status.save(&p.run_dir)?;
                    send(Event::Paused { step: trainer.step });
                }
                Some(Control::Resume) if paused => {
                    paused = false;
                    paused_total += paused_since.take().map_or(std::time::Duration::ZERO, |t| t.elapsed());
                    unsaved_since = Instant::now() - paused_unsaved;
                    status.state = "running".into();
                    status.save(&p.run_dir)?;
                    send(Event::Resumed { step: trainer.step });
                }
                Some(Control::Stop) => {
                    stopped = true;
                    break;
                }
                Some(Control::SaveNow) => save_now = true,
                Some(_) => {}
                None if paused => {
                    // The owner hung up while paused: stop cleanly.
                    stopped = true;
                    break;
                }
                None => break,
            }
        }
        if save_now {
            save(&trainer, &mut last_saved, best_step(&status))?;
            unsaved_since = Instant::now();
        }
        if stopped {
            break;
        }

        let k = trainer.step;
        let micro: Vec<Batch> = (0..ga)
            .map(|j| {
                let g = k * ga + j;
                p.batcher.batch(g / bpe, (g % bpe) as usize)
            })
            .collect();
        let t0 = Instant::now();
        let stats = match trainer.train_step(&micro, schedule.lr(k)) {
            Ok(s) => s,
            Err(e) => {
                // The update is the step's last phase, so the masters still hold step k: keep them.
                if trainer.step == k {
                    let _ = save(&trainer, &mut last_saved, best_step(&status));
                }
                return Err(e);
            }
        };
        let step_secs = t0.elapsed().as_secs_f64();
        let done = (trainer.step - first_step) as f64;
        let elapsed = loop_start.elapsed().saturating_sub(paused_total + sampling_total).as_secs_f64();
        let eta = elapsed / done * (p.total_steps - trainer.step) as f64;
        let m = StepMetrics {
            step: trainer.step,
            total_steps: p.total_steps,
            epoch: (trainer.step * ga) as f64 / bpe as f64,
            loss: stats.loss,
            lr: stats.lr,
            grad_norm: stats.grad_norm,
            tokens: stats.tokens,
            trained_tokens: stats.trained_tokens,
            tokens_per_s: stats.tokens as f64 / step_secs.max(1e-9),
            elapsed_s: elapsed_before + elapsed,
            eta_s: eta,
            memory_bytes: trainer
                .backend
                .device()
                .free_memory_bytes
                .and_then(|f| trainer.backend.device().total_memory_bytes.map(|t| t - f))
                .or_else(crate::util::process_rss_bytes),
            eval_loss: None,
        };
        let mut m = m;
        let mut new_best = false;
        if !p.eval.is_empty() && cfg.train.evaluates_at(trainer.step, p.total_steps) {
            let l = evaluate(&mut trainer, &p.eval)?;
            m.eval_loss = Some(l);
            if l.is_finite() && status.best.is_none_or(|b| l < b.eval_loss) {
                status.best = Some(checkpoint::BestEval { step: trainer.step, eval_loss: l });
                new_best = true;
            }
        }
        checkpoint::append_metrics(&p.run_dir, &m)?;
        last_loss = Some(stats.loss);
        send(Event::Step(m));
        if cfg.train.stop_on_divergence
            && let Some(why) = guard.check(trainer.step, stats.loss, stats.grad_norm)
        {
            // No checkpoint of this state: it is the diverged one. The last one saved is kept.
            return Err(Error::Diverged { step: trainer.step, why });
        }
        if !sampler.is_empty() && cfg.samples.due_at(trainer.step, p.total_steps) {
            let t = Instant::now();
            let answered = sampler.answer(&trainer, cfg, &p.spec, &store, sample_backend);
            sampling_total += t.elapsed();
            match answered {
                Ok(s) => {
                    samples::append(&p.run_dir, &s)?;
                    send(Event::Samples { step: trainer.step, samples: s, secs: t.elapsed().as_secs_f64() });
                }
                Err(e) => {
                    // Samples are a view of the run, not part of it: the run goes on without them.
                    send(Event::Log(format!(
                        "warning: the samples at step {} failed ({e}); training goes on without samples",
                        trainer.step
                    )));
                    sampler = samples::Sampler::new(Vec::new(), 0);
                }
            }
        }
        let by_steps = cfg.train.save_every > 0 && trainer.step % cfg.train.save_every == 0;
        let by_time = cfg.train.save_every_minutes > 0.0 && unsaved_since.elapsed() >= save_interval;
        // A new best evaluation is checkpointed at once, so the best weights are on disk.
        if by_steps || by_time || new_best {
            save(&trainer, &mut last_saved, best_step(&status))?;
            unsaved_since = Instant::now();
        }
        status.step = trainer.step;
        status.last_loss = last_loss;
        status.updated = now();
        status.save(&p.run_dir)?;
        if options.stop_after_step == Some(trainer.step) && trainer.step < p.total_steps {
            stopped = true;
            break;
        }
    }

    save(&trainer, &mut last_saved, best_step(&status))?;
    let adapter_dir = p.run_dir.join(checkpoint::ADAPTER_DIR);
    let (weights, rows) = (trainer.lora_weights()?, trainer.token_rows()?);
    AdapterFiles { spec: &p.spec, weights: &weights, lora: &cfg.lora, base_model: &model_name, tokens: rows.as_ref() }
        .save(&adapter_dir)?;
    status.state = if stopped { "stopped".into() } else { "done".into() };
    status.step = trainer.step;
    status.updated = now();
    status.save(&p.run_dir)?;
    let best_checkpoint = status.best.map(|b| checkpoint::step_dir(&p.run_dir, b.step));
    Ok(Finished {
        run_dir: p.run_dir.clone(),
        adapter_dir,
        steps: trainer.step,
        final_loss: last_loss,
        stopped,
        best: status.best,
        best_checkpoint,
    })
}
