//! `tunestudio train`: a run config (or a run folder to resume or restart) trained on a session
//! thread; its events printed one line each, the steps as JSON objects with `--json`.

use std::path::PathBuf;

use crate::RunConfig;
use crate::config::DeviceChoice;
use crate::error::{Error, Result};
use crate::session::{self, Event, StartOptions};

use super::parse_size;

#[derive(Debug, Clone, clap::Args)]
pub struct TrainArgs {
    /// The run config (e.g. assets/demo/run.toml); not needed with --resume.
    pub config: Option<PathBuf>,
    /// Folder that holds run folders (overrides output.dir).
    #[arg(long)]
    pub output: Option<PathBuf>,
    /// Stop after this many optimizer steps (overrides train.max_steps).
    #[arg(long)]
    pub max_steps: Option<u64>,
    /// Overrides train.device. Given as `auto`, a card the CUDA engine
    /// cannot start on falls back to the CPU (said in the run's first lines); otherwise that
    /// stops the run with the reason.
    #[arg(long, value_enum)]
    pub device: Option<DeviceChoice>,
    /// Decide as this card would: its limits, its PTX and its memory (rtx4090, l4, a100-40,
    /// ...; `TUNESTUDIO_CARD` does the same).
    #[arg(long)]
    pub card: Option<String>,
    /// A hard cap on the GPU memory this run may use, context included, e.g. 24GiB
    /// (overrides memory.gpu_mem): the plan targets it and the allocator enforces it.
    #[arg(long, value_parser = parse_size)]
    pub gpu_mem: Option<u64>,
    /// Continue the run in this folder from its newest checkpoint.
    #[arg(long, conflicts_with = "restart")]
    pub resume: Option<PathBuf>,
    /// Start the run in this folder again from step 0, in place: for a run that stopped
    /// before its first checkpoint. Uses the folder's config.toml unless a config is given.
    #[arg(long)]
    pub restart: Option<PathBuf>,
    /// With --resume: go on although the dataset file changed since the run started.
    #[arg(long, requires = "resume")]
    pub allow_changed_data: bool,
    /// With --resume and --max-steps: spread the learning-rate schedule over the new length
    /// (by default the original schedule is kept).
    #[arg(long, requires = "resume")]
    pub reschedule: bool,
    /// Print each step as a JSON object instead of a line of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: TrainArgs) -> Result<()> {
    let json = a.json;
    let card = super::card_profile(a.card.clone())?;
    let mut cfg = match (&a.config, &a.resume, &a.restart) {
        (Some(path), None, _) => RunConfig::load(path)?,
        (Some(_), Some(_), _) => {
            return Err(Error::arg(
                "--resume",
                "it continues a run with its own config.toml: give the run folder alone (and --max-steps to extend it)",
            ));
        }
        (None, Some(_), _) => RunConfig::default(),
        (None, None, Some(dir)) => RunConfig::load(&dir.join(crate::session::checkpoint::CONFIG_FILE))?,
        (None, None, None) => {
            return Err(Error::arg("train", "give a run config (e.g. assets/demo/run.toml), --resume <run-dir> or --restart <run-dir>"));
        }
    };
    if let Some(o) = a.output {
        cfg.output.dir = o;
    }
    if let Some(s) = a.max_steps {
        cfg.train.max_steps = Some(s);
    }
    if let Some(d) = a.device {
        cfg.train.device = d;
    }
    if let Some(cap) = a.gpu_mem {
        cfg.memory.gpu_mem = Some(crate::config::ByteSize(cap));
    }
    // Only an explicit `--device auto` lets a card that cannot run fall back to the CPU.
    let cpu_fallback = a.device == Some(DeviceChoice::Auto);
    let options = StartOptions {
        resume: a.resume,
        restart: a.restart,
        allow_changed_data: a.allow_changed_data,
        reschedule: a.reschedule,
        card,
        cpu_fallback,
        ..Default::default()
    };
    let handle = session::start(cfg, options);
    // Ctrl+C (or SIGTERM) stops at the next step boundary with a checkpoint, as Stop does in the
    // studio; a second one ends the process at once.
    let control = handle.control.clone();
    let stopping = std::sync::atomic::AtomicBool::new(false);
    let _ = ctrlc::set_handler(move || {
        if stopping.swap(true, std::sync::atomic::Ordering::SeqCst) {
            std::process::exit(130);
        }
        eprintln!("stopping after this step (saving a checkpoint); press Ctrl+C again to quit at once");
        let _ = control.send(session::Control::Stop);
    });
    let outcome = print_events(handle.events.iter(), json);
    handle.join();
    outcome
}

/// Print a session's events as `train` does, up to its end: the outcome is the run's.
pub fn print_events(events: impl Iterator<Item = Event>, json: bool) -> Result<()> {
    let mut outcome = Ok(());
    for event in events {
        match event {
            Event::Log(m) => eprintln!("{m}"),
            Event::Loaded(info) => {
                if json {
                    println!("{}", serde_json::json!({"event": "loaded", "info": *info}));
                }
                eprintln!("model    {}", info.model);
                eprintln!("device   {}", info.device.name);
                eprintln!(
                    "data     {} rows ({} skipped, {} truncated){}, {} trained tokens, {} steps/epoch",
                    info.dataset.rows_used,
                    info.dataset.rows_skipped,
                    info.dataset.truncated_rows,
                    if info.dataset.eval_rows > 0 { format!(", {} to evaluate on", info.dataset.eval_rows) } else { String::new() },
                    info.dataset.trained_tokens,
                    info.steps_per_epoch
                );
                eprintln!("lora     {} trainable parameters", crate::util::fmt_count(info.trainable_params as u64));
                eprintln!(
                    "run      {}  (steps {}..{}, loaded in {:.1}s)",
                    info.run_dir.display(),
                    info.start_step + 1,
                    info.total_steps,
                    info.load_secs
                );
            }
            Event::Step(m) => {
                if json {
                    println!("{}", serde_json::to_string(&m).expect("json"));
                } else {
                    println!(
                        "step {:>5}/{:<5} loss {:>8.4}  lr {:>9.3e}  grad-norm {:>8.4}  {:>9.0} tok/s  elapsed {:>8}  ETA {:>8}{}",
                        m.step,
                        m.total_steps,
                        m.loss,
                        m.lr,
                        m.grad_norm,
                        m.tokens_per_s,
                        crate::util::fmt_duration(m.elapsed_s),
                        crate::util::fmt_duration(m.eta_s),
                        m.eval_loss.map(|l| format!("  eval loss {l:.4}")).unwrap_or_default()
                    );
                }
            }
            Event::Checkpoint { step, dir } => eprintln!("checkpoint at step {step}: {}", dir.display()),
            Event::Paused { step } => eprintln!("paused at step {step}"),
            Event::Samples { step, samples, secs } => {
                if !json {
                    eprintln!("samples at step {step} answered in {secs:.2} s (not counted in the elapsed time or the ETA)");
                }
                for s in samples {
                    if json {
                        println!("{}", serde_json::json!({"event": "sample", "sample": s}));
                    } else {
                        eprintln!("sample at step {step}: {:?} -> {:?}", s.prompt, s.completion);
                    }
                }
            }
            Event::Resumed { step } => eprintln!("resumed at step {step}"),
            // The studio plots these; a throttling card is warned about once, as a log line.
            Event::Gpu(_) => {}
            Event::Finished(f) => {
                eprintln!(
                    "{} after {} steps{}; adapter: {}",
                    if f.stopped { "stopped" } else { "done" },
                    f.steps,
                    f.final_loss.map(|l| format!(", final loss {l:.4}")).unwrap_or_default(),
                    f.adapter_dir.display()
                );
                if let (Some(b), Some(dir)) = (f.best, &f.best_checkpoint) {
                    eprintln!(
                        "best eval loss {:.4} at step {}: {} (a PEFT adapter; export it with --adapter)",
                        b.eval_loss,
                        b.step,
                        dir.display()
                    );
                }
            }
            Event::Failed { message, last_checkpoint, run_dir } => {
                if let Some(c) = last_checkpoint {
                    eprintln!(
                        "last good checkpoint: {} (continue with: tunestudio train --resume {})",
                        c.display(),
                        run_dir.as_ref().map(|d| d.display().to_string()).unwrap_or_default()
                    );
                }
                outcome = Err(Error::RunFailed { run_dir, msg: message });
            }
        }
    }
    outcome
}
