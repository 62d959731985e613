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
        /// cpu, cuda or auto (overrides train.device). Given as `auto`, a card the CUDA engine
        /// cannot start on falls back to the CPU (said in the run's first lines); otherwise that
        /// stops the run with the reason.
        #[arg(long)]
        device: Option<DeviceChoice>,
        /// Decide as this card would: its limits, its PTX and its memory (rtx4090, l4, a100-40,
        /// ...; `TUNESTUDIO_CARD` does the same).
        #[arg(long)]
        card: Option<String>,
        /// A hard cap on the GPU memory this run may use, context included, e.g. 24GiB
        /// (overrides memory.gpu_mem): the plan targets it and the allocator enforces it.
        #[arg(long, value_parser = parse_size)]
        gpu_mem: Option<u64>,
        /// Continue the run in this folder from its newest checkpoint.
        #[arg(long, conflicts_with = "restart")]
        resume: Option<PathBuf>,
        /// Start the run in this folder again from step 0, in place: for a run that stopped
        /// before its first checkpoint. Uses the folder's config.toml unless a config is given.
        #[arg(long)]
        restart: Option<PathBuf>,
        /// With --resume: go on although the dataset file changed since the run started.
        #[arg(long, requires = "resume")]
        allow_changed_data: bool,
        /// With --resume and --max-steps: spread the learning-rate schedule over the new length
        /// (by default the original schedule is kept).
        #[arg(long, requires = "resume")]
        reschedule: bool,
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
        #[arg(long, value_parser = parse_size)]
        gpu_mem: Option<u64>,
        /// The RAM that pinned host memory (offloaded activations) may take, e.g. 64GiB; by
        /// default what this machine has available.
        #[arg(long, value_parser = parse_size)]
        host_mem: Option<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Time training steps of a model shape on the GPU with random weights (no files needed).
    Bench {
        /// llama3-8b, llama3.2-3b, llama3.2-1b, qwen3-8b or gemma3-4b.
        #[arg(long, default_value = "llama3-8b")]
        shape: String,
        #[arg(long, default_value_t = 2048)]
        seq: usize,
        /// Timed steps (after the warm-up).
        #[arg(long, default_value_t = 10)]
        steps: usize,
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// speed (fastest policy that fits) or memory (offload, least device memory).
        #[arg(long, default_value = "speed")]
        mode: String,
        #[arg(long, default_value_t = 32)]
        rank: usize,
        /// Force a checkpointing policy: auto (the fastest that fits the card or --gpu-mem, keeping as
        /// many layers' activations as fit), none, layer or offload.
        #[arg(long)]
        checkpointing: Option<String>,
        /// After the timed steps, time every kernel and GEMM of one more step.
        #[arg(long)]
        profile: bool,
        /// Decide as this card would: its shared-memory limits, its PTX and its memory (rtx4090,
        /// l4, a100-40, ...; `TUNESTUDIO_CARD` does the same).
        #[arg(long)]
        card: Option<String>,
        /// A hard cap on the device memory this run may use, context included (e.g. 24GiB).
        #[arg(long, value_parser = parse_size)]
        gpu_mem: Option<u64>,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Time prefill and decode on the GPU with random weights of a real shape: the NF4 base with a
    /// LoRA adapter on all seven linears, switched on, batch 1 (the Chat page's path).
    BenchGenerate {
        /// llama3-8b, llama3.2-3b or llama3.2-1b.
        #[arg(long, default_value = "llama3-8b")]
        shape: String,
        #[arg(long, default_value_t = 16)]
        rank: usize,
        #[arg(long, default_value_t = 512)]
        prompt_tokens: usize,
        #[arg(long, default_value_t = 128)]
        new_tokens: usize,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
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
    Eval {
        /// A Hugging Face model folder (also a `*-bnb-4bit` one).
        model: PathBuf,
        /// A PEFT LoRA adapter folder to apply.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// The dataset (JSONL/JSON/…); the tokens scored are those training would learn from.
        #[arg(long)]
        data: PathBuf,
        /// auto, alpaca, sharegpt, messages, text.
        #[arg(long, default_value = "auto")]
        format: String,
        /// Chat template: auto (the model's) or a built-in name.
        #[arg(long, default_value = "auto")]
        template: String,
        /// Score every token (`all`) or only assistant responses (`responses`).
        #[arg(long, default_value = "responses")]
        train_on: String,
        /// bf16: the stored weights; nf4: quantized first (what a QLoRA adapter was trained on).
        #[arg(long, default_value = "bf16")]
        quantization: String,
        #[arg(long, default_value_t = 1024)]
        max_seq_len: usize,
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        /// Print a JSON object instead of a line of text.
        #[arg(long)]
        json: bool,
        /// With --json: every example's token ids, labels and loss (one forward per example).
        #[arg(long)]
        per_example: bool,
    },
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
    Merged {
        /// The run folder (or use --model and --adapter).
        run: Option<PathBuf>,
        /// bf16 or f16 (f32 for exact checks).
        #[arg(long, default_value = "bf16")]
        dtype: String,
        /// Destination folder (must not exist); default `<run>/merged-<dtype>`.
        #[arg(long)]
        to: Option<PathBuf>,
        /// A model folder, with --adapter, instead of a run.
        #[arg(long)]
        model: Option<PathBuf>,
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// With --model: bf16 (stored weights) or nf4 (what a QLoRA adapter was trained on).
        #[arg(long, default_value = "bf16")]
        quantization: String,
        /// Largest shard, e.g. 2GB (the default) or 500MiB.
        #[arg(long)]
        max_shard_size: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        None => studio(None),
        Some(Command::Studio { config }) => studio(config),
        Some(Command::Train {
            config,
            output,
            max_steps,
            device,
            card,
            gpu_mem,
            resume,
            restart,
            allow_changed_data,
            reschedule,
            json,
        }) => train(TrainArgs { config, output, max_steps, device, card, gpu_mem, resume, restart, allow_changed_data, reschedule, json }),
        Some(Command::Plan { config, model, shape, seq, batch, rank, card, gpu_mem, host_mem, json }) => {
            let fits = card_profile(card).and_then(|card| {
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
        Some(Command::Bench { shape, seq, steps, warmup, mode, rank, checkpointing, profile, card, gpu_mem, json }) => {
            bench(shape, seq, steps, warmup, mode, rank, checkpointing, profile, card, gpu_mem, json)
        }
        Some(Command::BenchGenerate { shape, rank, prompt_tokens, new_tokens, json }) => {
            let args = tunestudio::generate::bench::DecodeBenchArgs { shape, rank, prompt_tokens, new_tokens };
            tunestudio::generate::bench::run(&args, &|m| eprintln!("{m}")).map(|r| {
                if json {
                    println!("{}", serde_json::to_string(&r).expect("json"));
                } else {
                    println!(
                        "{} {} NF4 + LoRA r {}: prefill {} tokens {:.0} tokens/s; decode {:.1} tokens/s ({:.2} ms per token)",
                        r.card, r.shape, r.rank, r.prompt_tokens, r.prefill_tokens_per_s, r.decode_tokens_per_s, r.decode_ms_per_token
                    );
                }
            })
        }
        Some(Command::Inspect { model, json }) => tunestudio::commands::inspect::run(&model, json),
        Some(Command::Preflight { config, card, json }) => {
            card_profile(card).and_then(|card| tunestudio::commands::preflight::run(&config, card, json))
        }
        Some(Command::Eval {
            model,
            adapter,
            data,
            format,
            template,
            train_on,
            quantization,
            max_seq_len,
            batch_size,
            json,
            per_example,
        }) => eval(EvalArgs { model, adapter, data, format, template, train_on, quantization, max_seq_len, batch_size, json, per_example }),
        Some(Command::Generate(args)) => tunestudio::commands::generate::run(&args),
        Some(Command::Chat(args)) => tunestudio::commands::chat::run(&args),
        Some(Command::Export { what: ExportCommand::Adapter { run, to } }) => {
            tunestudio::export::run::export_adapter(&run, to.as_deref()).map(|d| println!("adapter written to {}", d.display()))
        }
        Some(Command::Export { what: ExportCommand::Gguf(args) }) => tunestudio::commands::export_gguf::run(&args),
        Some(Command::Export { what: ExportCommand::Merged { run, dtype, to, model, adapter, quantization, max_shard_size, json } }) => {
            export_merged(run, dtype, to, model, adapter, quantization, max_shard_size, json)
        }
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
    Err(Error::op(
        "the studio window",
        "this build has none (built without the `gui` feature); try `tunestudio train assets/demo/run.toml`",
    ))
}

#[allow(clippy::too_many_arguments)]
fn bench(
    shape: String,
    seq: usize,
    steps: usize,
    warmup: usize,
    mode: String,
    rank: usize,
    checkpointing: Option<String>,
    profile: bool,
    card: Option<String>,
    gpu_mem: Option<u64>,
    json: bool,
) -> Result<()> {
    use tunestudio::bench::{BenchArgs, BenchMode};
    use tunestudio::config::CheckpointPolicy;
    let mode = match mode.as_str() {
        "speed" => BenchMode::Speed,
        "memory" => BenchMode::Memory,
        other => return Err(Error::arg("--mode", format!("`{other}`: use speed or memory"))),
    };
    let checkpointing = match checkpointing.as_deref() {
        None => None,
        Some("auto") => Some(CheckpointPolicy::Auto),
        Some("none") => Some(CheckpointPolicy::None),
        Some("layer") => Some(CheckpointPolicy::Layer),
        Some("offload") => Some(CheckpointPolicy::Offload),
        Some(other) => return Err(Error::arg("--checkpointing", format!("`{other}`: use auto, none, layer or offload"))),
    };
    let card = card_profile(card)?;
    let args = BenchArgs { shape, seq, steps, warmup, mode, rank, checkpointing, profile, card, gpu_mem_bytes: gpu_mem };
    let r = tunestudio::bench::run(&args, &|m| eprintln!("{m}"))?;
    if json {
        println!("{}", serde_json::to_string(&r).expect("json"));
        return Ok(());
    }
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    match &r.card_profile {
        Some(p) => println!("card          {} (profile {p}, {:.1} GiB), attention {}", r.card, r.card_memory_gib, r.attention),
        None => println!("card          {}, attention {}", r.card, r.attention),
    }
    println!(
        "run           {} seq {} r {} {:?} (checkpointing {:?}, {} of the layers' activations kept)",
        r.shape, r.seq, r.rank, r.mode, r.checkpointing, r.kept_layers
    );
    println!("step          median {:.1} ms over {} steps → {:.0} tokens/s", r.median_step_ms, r.steps, r.tokens_per_s);
    println!(
        "memory        driver peak {:.2} GiB, arena peak {:.2} GiB (+ context {:.2} GiB); plan {:.2} GiB",
        gib(r.peak_driver_bytes),
        gib(r.peak_arena_bytes),
        gib(r.context_bytes),
        gib(r.plan_peak_bytes)
    );
    println!(
        "MFU           {:.1}% ({:.1} TFLOP per step against the measured {:.0} TFLOP/s GEMM rate)",
        100.0 * r.mfu,
        r.model_tflop_per_step,
        r.gemm_tflops
    );
    println!("first step    {:.1} s after start (set-up {:.1} s)", r.first_step_s, r.setup_s);
    Ok(())
}

/// The card profile `--card` names.
fn card_profile(name: Option<String>) -> Result<Option<&'static tunestudio::backend::card::CardProfile>> {
    name.map(|n| tunestudio::backend::card::profile_named(&n).map_err(|e| Error::arg("--card", e))).transpose()
}

fn parse_size(s: &str) -> std::result::Result<u64, String> {
    tunestudio::util::parse_bytes(s)
}

struct TrainArgs {
    config: Option<PathBuf>,
    output: Option<PathBuf>,
    max_steps: Option<u64>,
    device: Option<DeviceChoice>,
    card: Option<String>,
    gpu_mem: Option<u64>,
    resume: Option<PathBuf>,
    restart: Option<PathBuf>,
    allow_changed_data: bool,
    reschedule: bool,
    json: bool,
}

fn train(a: TrainArgs) -> Result<()> {
    let json = a.json;
    let card = card_profile(a.card.clone())?;
    let mut cfg = match (&a.config, &a.resume, &a.restart) {
        (Some(path), None, _) => RunConfig::load(path)?,
        (Some(_), Some(_), _) => {
            return Err(Error::arg(
                "--resume",
                "it continues a run with its own config.toml: give the run folder alone (and --max-steps to extend it)",
            ));
        }
        (None, Some(_), _) => RunConfig::default(),
        (None, None, Some(dir)) => RunConfig::load(&dir.join(tunestudio::session::checkpoint::CONFIG_FILE))?,
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
        cfg.memory.gpu_mem = Some(tunestudio::config::ByteSize(cap));
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
                    "data     {} rows ({} skipped, {} truncated){}, {} trained tokens, {} steps/epoch",
                    info.dataset.rows_used,
                    info.dataset.rows_skipped,
                    info.dataset.truncated_rows,
                    if info.dataset.eval_rows > 0 { format!(", {} to evaluate on", info.dataset.eval_rows) } else { String::new() },
                    info.dataset.trained_tokens,
                    info.steps_per_epoch
                );
                eprintln!("lora     {} trainable parameters", tunestudio::util::fmt_count(info.trainable_params as u64));
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
                        tunestudio::util::fmt_duration(m.elapsed_s),
                        tunestudio::util::fmt_duration(m.eta_s),
                        m.eval_loss.map(|l| format!("  eval loss {l:.4}")).unwrap_or_default()
                    );
                }
            }
            Event::Checkpoint { step, dir } => eprintln!("checkpoint at step {step}: {}", dir.display()),
            Event::Paused { step } => eprintln!("paused at step {step}"),
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
    handle.join();
    outcome
}

/// A value of a serde enum given on the command line (`bf16`, `alpaca`, …), named in the error.
fn parse_enum<T: serde::de::DeserializeOwned>(flag: &str, value: &str) -> Result<T> {
    serde_json::from_value(serde_json::Value::String(value.to_ascii_lowercase()))
        .map_err(|_| Error::arg(format!("--{flag}"), format!("`{value}` is not one of the accepted values")))
}

struct EvalArgs {
    model: PathBuf,
    adapter: Option<PathBuf>,
    data: PathBuf,
    format: String,
    template: String,
    train_on: String,
    quantization: String,
    max_seq_len: usize,
    batch_size: usize,
    json: bool,
    per_example: bool,
}

fn eval(a: EvalArgs) -> Result<()> {
    let mut o = tunestudio::eval::EvalOptions::new(a.model, a.data);
    o.adapter = a.adapter;
    o.dataset.format = parse_enum("format", &a.format)?;
    o.dataset.template = a.template;
    o.dataset.train_on = parse_enum("train-on", &a.train_on)?;
    o.quantization = parse_enum("quantization", &a.quantization)?;
    o.max_seq_len = a.max_seq_len;
    o.batch_size = a.batch_size;
    o.per_example = a.per_example && a.json;
    let r = tunestudio::eval::evaluate(&o)?;
    if a.json {
        println!("{}", serde_json::to_string(&r).expect("json"));
    } else {
        println!(
            "loss {:.6}  perplexity {:.4}  over {} tokens in {} rows{}",
            r.mean_loss,
            r.perplexity,
            r.tokens,
            r.rows,
            if r.rows_skipped > 0 { format!(" ({} rows skipped)", r.rows_skipped) } else { String::new() }
        );
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn export_merged(
    run: Option<PathBuf>,
    dtype: String,
    to: Option<PathBuf>,
    model: Option<PathBuf>,
    adapter: Option<PathBuf>,
    quantization: String,
    max_shard_size: Option<String>,
    json: bool,
) -> Result<()> {
    use tunestudio::export::merged::{MergeInput, MergeOptions, export_merged};
    let dtype: tunestudio::export::merged::MergeDtype = dtype.parse().map_err(|e: String| Error::arg("--dtype", e))?;
    let mut opts = MergeOptions { dtype, ..MergeOptions::default() };
    if let Some(s) = max_shard_size {
        opts.max_shard_bytes = tunestudio::util::parse_bytes(&s)
            .and_then(|b| if b > 0 { Ok(b) } else { Err("must be more than 0 bytes".into()) })
            .map_err(|e| Error::arg("--max-shard-size", e))?;
    }
    let (input, default_dest) = match (run, model, adapter) {
        (Some(run), None, None) => (MergeInput::from_run(&run)?, Some(run.join(format!("merged-{}", format!("{dtype:?}").to_lowercase())))),
        (None, Some(model), Some(adapter)) => {
            let q = parse_enum("quantization", &quantization)?;
            (MergeInput::from_adapter(&model, &adapter, q)?, None)
        }
        _ => return Err(Error::arg("--run/--model/--adapter", "give a run folder, or --model and --adapter (not both)")),
    };
    let dest = to.or(default_dest).ok_or_else(|| Error::arg("--to", "it is needed with --model and --adapter"))?;
    let s = export_merged(&input, &dest, &opts)?;
    if json {
        println!("{}", serde_json::to_string(&s).expect("json"));
    } else {
        println!(
            "merged model written to {} ({} tensors, {} linears merged, {} shard{}, {})",
            s.dest.display(),
            s.tensors,
            s.merged_linears,
            s.shards.len(),
            if s.shards.len() == 1 { "" } else { "s" },
            tunestudio::util::fmt_bytes(s.total_bytes)
        );
    }
    Ok(())
}
