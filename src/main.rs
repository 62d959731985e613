//! The `tunestudio` command line: parsing and dispatch only; the work happens in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tunestudio::config::DeviceChoice;
use tunestudio::session::{self, Event, StartOptions};
use tunestudio::{Error, Result, RunConfig};

#[derive(Parser)]
#[command(name = "tunestudio", version, about = "QLoRA fine-tuning studio for Llama-family models")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Fine-tune with a run config (TOML); prints one line per step.
    Train {
        /// The run config (e.g. assets/demo/run.toml); not needed with --resume.
        config: Option<PathBuf>,
        /// Folder that holds run folders (overrides output.dir).
        #[arg(long)]
        output: Option<PathBuf>,
        /// Stop after this many optimizer steps (overrides train.max_steps).
        #[arg(long)]
        max_steps: Option<u64>,
        /// cpu, cuda or auto (overrides train.device).
        #[arg(long)]
        device: Option<DeviceChoice>,
        /// Continue the run in this folder from its newest checkpoint.
        #[arg(long)]
        resume: Option<PathBuf>,
        /// Print each step as a JSON object instead of a line of text.
        #[arg(long)]
        json: bool,
    },
    /// Open the studio window (the same as no subcommand), optionally with a run config.
    Studio {
        /// A run config to open instead of the demo.
        config: Option<PathBuf>,
    },
    /// The memory plan (VRAM budget) of a run: every term, the peak, fits or not, what fits.
    Plan {
        /// A run config; or use --model / --shape.
        config: Option<PathBuf>,
        /// A model folder (only config.json is read).
        #[arg(long)]
        model: Option<PathBuf>,
        /// A named shape instead of a folder: llama3-8b, llama3.2-3b, llama3.2-1b.
        #[arg(long)]
        shape: Option<String>,
        #[arg(long)]
        seq: Option<usize>,
        #[arg(long)]
        batch: Option<usize>,
        #[arg(long)]
        rank: Option<usize>,
        /// Plan for a card of this size (e.g. 24GiB) instead of the detected one.
        #[arg(long, value_parser = parse_size)]
        gpu_mem: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Describe a model folder: architecture, parameters, dtypes, untrained tokens.
    Inspect {
        model: PathBuf,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None => studio(None),
        Some(Command::Studio { config }) => studio(config),
        Some(Command::Train { config, output, max_steps, device, resume, json }) => train(config, output, max_steps, device, resume, json),
        Some(Command::Plan { config, model, shape, seq, batch, rank, gpu_mem, json }) => tunestudio::commands::plan::run(tunestudio::commands::plan::PlanArgs {
            config: config.as_deref(),
            model: model.as_deref(),
            shape: shape.as_deref(),
            seq,
            batch,
            rank,
            gpu_mem,
            json,
        }),
        Some(Command::Inspect { model, json }) => tunestudio::commands::inspect::run(&model, json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(feature = "gui")]
fn studio(config: Option<PathBuf>) -> Result<()> {
    tunestudio::app::run(tunestudio::app::StudioOptions { config, ..Default::default() })
}

#[cfg(not(feature = "gui"))]
fn studio(_config: Option<PathBuf>) -> Result<()> {
    Err(Error::msg("this build has no studio window (built without the `gui` feature); try `tunestudio train assets/demo/run.toml`"))
}

fn parse_size(s: &str) -> std::result::Result<u64, String> {
    tunestudio::util::parse_bytes(s).ok_or_else(|| format!("`{s}` is not a size such as 24GiB or 80GB"))
}

fn train(config: Option<PathBuf>, output: Option<PathBuf>, max_steps: Option<u64>, device: Option<DeviceChoice>, resume: Option<PathBuf>, json: bool) -> Result<()> {
    let mut cfg = match (&config, &resume) {
        (Some(path), _) => RunConfig::load(path)?,
        (None, Some(_)) => RunConfig::default(),
        (None, None) => return Err(Error::msg("give a run config (e.g. assets/demo/run.toml) or --resume <run-dir>")),
    };
    if let Some(o) = output {
        cfg.output.dir = o;
    }
    if let Some(s) = max_steps {
        cfg.train.max_steps = Some(s);
    }
    if let Some(d) = device {
        cfg.train.device = d;
    }
    let handle = session::start(cfg, StartOptions { resume, ..Default::default() });
    let mut outcome = Ok(());
    for event in handle.events.iter() {
        match event {
            Event::Log(m) => eprintln!("{m}"),
            Event::Loaded(info) => {
                if json {
                    println!("{}", serde_json::json!({"event": "loaded", "info": *info}));
                }
                eprintln!("model    {}", info.model);
                eprintln!("device   {}", info.device.name);
                eprintln!(
                    "data     {} rows ({} skipped, {} truncated), {} trained tokens, {} steps/epoch",
                    info.dataset.rows_used, info.dataset.rows_skipped, info.dataset.truncated_rows, info.dataset.trained_tokens, info.steps_per_epoch
                );
                eprintln!("lora     {} trainable parameters", tunestudio::util::fmt_count(info.trainable_params as u64));
                eprintln!("run      {}  (steps {}..{}, loaded in {:.1}s)", info.run_dir.display(), info.start_step + 1, info.total_steps, info.load_secs);
            }
            Event::Step(m) => {
                if json {
                    println!("{}", serde_json::to_string(&m).expect("json"));
                } else {
                    println!(
                        "step {:>5}/{:<5} loss {:>8.4}  lr {:>9.3e}  grad-norm {:>8.4}  {:>9.0} tok/s  elapsed {:>8}  ETA {:>8}",
                        m.step,
                        m.total_steps,
                        m.loss,
                        m.lr,
                        m.grad_norm,
                        m.tokens_per_s,
                        tunestudio::util::fmt_duration(m.elapsed_s),
                        tunestudio::util::fmt_duration(m.eta_s)
                    );
                }
            }
            Event::Checkpoint { step, dir } => eprintln!("checkpoint at step {step}: {}", dir.display()),
            Event::Paused { step } => eprintln!("paused at step {step}"),
            Event::Resumed { step } => eprintln!("resumed at step {step}"),
            Event::Finished(f) => {
                eprintln!(
                    "{} after {} steps{}; adapter: {}",
                    if f.stopped { "stopped" } else { "done" },
                    f.steps,
                    f.final_loss.map(|l| format!(", final loss {l:.4}")).unwrap_or_default(),
                    f.adapter_dir.display()
                );
            }
            Event::Failed { message, last_checkpoint, run_dir } => {
                if let Some(c) = last_checkpoint {
                    eprintln!("last good checkpoint: {} (continue with: tunestudio train --resume {})", c.display(), run_dir.as_ref().map(|d| d.display().to_string()).unwrap_or_default());
                }
                outcome = Err(Error::Msg(message));
            }
        }
    }
    handle.join();
    outcome
}
