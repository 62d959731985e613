//! The `tunestudio` command line: parsing and dispatch only; the work happens in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tunestudio::Result;

#[derive(Parser)]
#[command(name = "tunestudio", version, about = "QLoRA fine-tuning studio for Llama-family models")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Fine-tune with a run config (TOML); prints one line per step.
    Train(tunestudio::commands::train::TrainArgs),
    /// Open the studio window (the same as no subcommand), optionally with a run config.
    Studio {
        /// A run config to open instead of the demo.
        config: Option<PathBuf>,
    },
    /// The memory plan (VRAM budget) of a run: every term, the peak, fits or not, what fits.
    /// Exit code 0: fits; 2: does not fit (on the card or in host RAM); 1: an error.
    Plan {
        /// A run config; or use --model / --shape.
        config: Option<PathBuf>,
        /// A model folder (only config.json is read).
        #[arg(long)]
        model: Option<PathBuf>,
        /// A named shape instead of a folder: llama3-8b, llama3.2-3b, llama3.2-1b, qwen3-8b, gemma3-4b.
        #[arg(long)]
        shape: Option<String>,
        #[arg(long)]
        seq: Option<usize>,
        #[arg(long)]
        batch: Option<usize>,
        #[arg(long)]
        rank: Option<usize>,
        /// Plan as this card (rtx3060, rtx4090, l4, a10, a100-40, h100-80, ...) instead of the
        /// detected one; works without a GPU.
        #[arg(long)]
        card: Option<String>,
        /// A cap on the run's GPU memory, e.g. 24GiB; a unit is required (overrides memory.gpu_mem); with no GPU
        /// here and no --card, plans for a card of this size.
        #[arg(long, value_parser = tunestudio::commands::parse_size)]
        gpu_mem: Option<u64>,
        /// The RAM that pinned host memory (offloaded activations) may take, e.g. 64GiB; by
        /// default what this machine has available.
        #[arg(long, value_parser = tunestudio::commands::parse_size)]
        host_mem: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Time training steps of a model shape on the GPU with random weights (no files needed).
    Bench(tunestudio::commands::bench::BenchArgs),
    /// Time prefill and decode on the GPU with random weights of a real shape: the NF4 base with a
    /// LoRA adapter on all seven linears, switched on, batch 1 (the Chat page's path).
    BenchGenerate(tunestudio::commands::bench::BenchGenerateArgs),
    /// Describe a model folder: architecture, parameters, dtypes, untrained tokens.
    Inspect {
        model: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// What a run would check and decide before training, without training: data, lengths,
    /// examples, tokenizer checks, untrained tokens, and a verdict (exit 1 only if it cannot start).
    Preflight {
        config: PathBuf,
        /// Check the run as this card would run it (see `train --card`).
        #[arg(long)]
        card: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Mean per-token loss and perplexity of a model (optionally with a PEFT adapter) on a dataset.
    Eval(tunestudio::commands::eval::EvalArgs),
    /// Answer one prompt with a model (a run folder, or a model folder and --adapter), streamed.
    Generate(tunestudio::commands::generate::GenerateArgs),
    /// Talk to a model on the terminal (a run folder, or a model folder and --adapter).
    Chat(tunestudio::commands::chat::ChatArgs),
    /// Export a run: its PEFT adapter, or the base model with the adapter merged in.
    Export {
        #[command(subcommand)]
        what: ExportCommand,
    },
}

#[derive(Subcommand)]
enum ExportCommand {
    /// The run's PEFT adapter (with trained token rows as PEFT trainable tokens).
    Adapter {
        run: PathBuf,
        /// Destination folder (must not exist); without it `<run>/adapter` is rewritten.
        #[arg(long)]
        to: Option<PathBuf>,
    },
    /// The base model with the adapter folded in, as one GGUF file (f16, bf16, q8_0, q4_k_m) for
    /// llama.cpp, Ollama and LM Studio, with an Ollama Modelfile beside it.
    Gguf(tunestudio::commands::export_gguf::ExportGgufArgs),
    /// The base model with the adapter folded in, as a 16-bit Hugging Face folder.
    Merged(tunestudio::commands::export::ExportMergedArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None => studio(None),
        Some(Command::Studio { config }) => studio(config),
        Some(Command::Train(args)) => tunestudio::commands::train::run(args),
        Some(Command::Plan { config, model, shape, seq, batch, rank, card, gpu_mem, host_mem, json }) => {
            let fits = tunestudio::commands::card_profile(card).and_then(|card| {
                tunestudio::commands::plan::run(tunestudio::commands::plan::PlanArgs {
                    config: config.as_deref(),
                    model: model.as_deref(),
                    shape: shape.as_deref(),
                    seq,
                    batch,
                    rank,
                    card,
                    gpu_mem,
                    host_mem,
                    json,
                })
            });
            // Exit code 2: the plan was made and the run does not fit (README, "Command line").
            match fits {
                Ok(Some(false)) => return ExitCode::from(2),
                other => other.map(|_| ()),
            }
        }
        Some(Command::Bench(args)) => tunestudio::commands::bench::run(&args),
        Some(Command::BenchGenerate(args)) => tunestudio::commands::bench::run_generate(&args),
        Some(Command::Inspect { model, json }) => tunestudio::commands::inspect::run(&model, json),
        Some(Command::Preflight { config, card, json }) => {
            tunestudio::commands::card_profile(card).and_then(|card| tunestudio::commands::preflight::run(&config, card, json))
        }
        Some(Command::Eval(args)) => tunestudio::commands::eval::run(args),
        Some(Command::Generate(args)) => tunestudio::commands::generate::run(&args),
        Some(Command::Chat(args)) => tunestudio::commands::chat::run(&args),
        Some(Command::Export { what: ExportCommand::Adapter { run, to } }) => {
            tunestudio::commands::export::run_adapter(&run, to.as_deref())
        }
        Some(Command::Export { what: ExportCommand::Gguf(args) }) => tunestudio::commands::export_gguf::run(&args),
        Some(Command::Export { what: ExportCommand::Merged(args) }) => tunestudio::commands::export::run_merged(&args),
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
    Err(tunestudio::Error::op(
        "the studio window",
        "this build has none (built without the `gui` feature); try `tunestudio train assets/demo/run.toml`",
    ))
}
