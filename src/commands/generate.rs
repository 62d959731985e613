//! `tunestudio generate`: answer one prompt with a model (a run folder, or a model folder with an
//! optional adapter), streaming the text, or one JSON object with `--json`. `--compare` answers
//! with the fine-tuned and the base model side by side in one batched pass.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use serde_json::json;

use crate::config::{DeviceChoice, Quantization};
use crate::error::{Error, Result};
use crate::generate::{Answer, LoadOptions, Prompt, Request, SamplingParams, StreamEvent};
use crate::model::chat_template::Message;

/// Which model answers: the flags `generate` and `chat` share.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// A model folder, or a run folder (its model, adapter, quantization and template).
    pub model: PathBuf,
    /// A PEFT adapter folder to answer with (with a model folder).
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// bf16 (stored weights) or nf4 (the base a QLoRA adapter was trained against); a run folder
    /// uses its own.
    #[arg(long, value_enum)]
    pub quantization: Option<Quantization>,
    /// Chat template: auto (the model's) or a built-in name (llama-3, chatml, alpaca, mistral).
    #[arg(long)]
    pub template: Option<String>,
    /// cpu, cuda or auto.
    #[arg(long)]
    pub device: Option<DeviceChoice>,
    /// Tokens per conversation (prompt and answers); at most the model's context.
    #[arg(long, default_value_t = 4096)]
    pub context: usize,
}

/// Sampling flags (defaults: temperature 0.7, top-k 50, top-p 0.95, seed 0, 256 new tokens).
#[derive(Debug, Clone, clap::Args)]
pub struct SamplingArgs {
    /// 0 is greedy (always the most likely token).
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Keep the k most likely tokens (0: all).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Keep the most likely tokens up to this probability mass (1: all).
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Keep tokens at least this fraction as likely as the best (0: all).
    #[arg(long)]
    pub min_p: Option<f32>,
    /// Penalize tokens already in the conversation (1: off).
    #[arg(long)]
    pub repetition_penalty: Option<f32>,
    #[arg(long)]
    pub seed: Option<u64>,
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// A string that ends the answer (repeatable); end-of-turn tokens always do.
    #[arg(long = "stop")]
    pub stop: Vec<String>,
    /// Keep generating past end-of-turn tokens, up to --max-new-tokens (benchmarks, checks).
    #[arg(long)]
    pub ignore_eos: bool,
}

impl SamplingArgs {
    pub fn params(&self) -> SamplingParams {
        let d = SamplingParams::default();
        SamplingParams {
            temperature: self.temperature.unwrap_or(d.temperature),
            top_k: self.top_k.unwrap_or(d.top_k),
            top_p: self.top_p.unwrap_or(d.top_p),
            min_p: self.min_p.unwrap_or(d.min_p),
            repetition_penalty: self.repetition_penalty.unwrap_or(d.repetition_penalty),
            seed: self.seed.unwrap_or(d.seed),
            max_new_tokens: self.max_new_tokens.unwrap_or(d.max_new_tokens),
        }
    }
}

#[derive(Debug, Clone, clap::Args)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The user's message.
    #[arg(long)]
    pub prompt: String,
    /// A system message before it.
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Answer as the base model (without the adapter).
    #[arg(long, conflicts_with = "compare")]
    pub base: bool,
    /// Answer with the fine-tuned and the base model side by side (same prompt and seed).
    #[arg(long)]
    pub compare: bool,
    /// Print one JSON object: text, tokens, prompt_tokens, tokens_per_s (per model with --compare).
    #[arg(long)]
    pub json: bool,
}

/// What `ModelArgs` ask to load; `slots` conversations at once.
pub fn load_options(a: &ModelArgs, slots: usize) -> Result<LoadOptions> {
    let is_run = a.model.join(crate::session::checkpoint::CONFIG_FILE).is_file();
    let mut o = if is_run {
        if a.adapter.is_some() {
            return Err(Error::arg(
                "--adapter",
                format!("{} is a run folder, which brings its own adapter; give --adapter with a model folder", a.model.display()),
            ));
        }
        LoadOptions::from_run(&a.model)?
    } else {
        LoadOptions { adapter: a.adapter.clone(), ..LoadOptions::new(a.model.clone()) }
    };
    if let Some(q) = a.quantization {
        o.quantization = q;
    }
    if let Some(t) = &a.template {
        o.template = t.clone();
    }
    if let Some(d) = a.device {
        o.device = d;
    }
    o.context = a.context;
    o.slots = slots;
    Ok(o)
}

/// The messages of a one-shot prompt.
pub fn messages(system: Option<&str>, prompt: &str) -> Vec<Message> {
    let mut m = Vec::new();
    if let Some(s) = system.filter(|s| !s.trim().is_empty()) {
        m.push(Message::new("system", s));
    }
    m.push(Message::new("user", prompt));
    m
}

fn answer_json(a: &Answer) -> serde_json::Value {
    json!({
        "text": a.text,
        "tokens": a.tokens,
        "prompt_tokens": a.prompt_tokens,
        "tokens_per_s": a.tokens_per_s,
        "finish": a.finish,
        "prefill_s": a.prefill_secs,
        "decode_s": a.decode_secs,
    })
}

pub fn run(a: &GenerateArgs) -> Result<()> {
    let slots = if a.compare { 2 } else { 1 };
    let opts = load_options(&a.model, slots)?;
    let mut chat = crate::generate::open(&opts)?;
    if (a.compare || a.base) && !chat.has_adapter() {
        return Err(Error::arg("--compare/--base", "they need an adapter: give a run folder or --adapter"));
    }
    let params = a.sampling.params();
    let prompt = Prompt::Chat(messages(a.system.as_deref(), &a.prompt));
    let mut reqs =
        vec![Request { prompt, adapter: !a.base, params, stop_strings: a.sampling.stop.clone(), ignore_eos: a.sampling.ignore_eos }];
    if a.compare {
        reqs.push(Request { adapter: false, ..reqs[0].clone() });
    }
    let cancel = AtomicBool::new(false);
    let stream = !a.json && !a.compare;
    let mut out = std::io::stdout().lock();
    let answers = chat.generate(&reqs, &cancel, &mut |e| {
        if let (true, StreamEvent::Token { text, .. }) = (stream, &e) {
            let _ = out.write_all(text.as_bytes());
            let _ = out.flush();
        }
    })?;
    drop(out);
    if a.json {
        let v = if a.compare {
            json!({"fine_tuned": answer_json(&answers[0]), "base": answer_json(&answers[1])})
        } else {
            answer_json(&answers[0])
        };
        println!("{v}");
        return Ok(());
    }
    if a.compare {
        for (label, ans) in [("fine-tuned", &answers[0]), ("base", &answers[1])] {
            println!("── {label} ──");
            println!("{}", ans.text);
        }
    } else {
        println!();
    }
    let first = &answers[0];
    eprintln!("{}", summary(first, &chat.device().name, model_label(&a.model.model)));
    Ok(())
}

fn model_label(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| p.display().to_string())
}

/// `12 tokens (stop) in 0.41 s, 29.3 tokens/s, prompt 23 tokens in 0.05 s, on CPU (f32, 2 threads)`.
pub fn summary(a: &Answer, device: &str, model: String) -> String {
    format!(
        "{model}: {} tokens ({:?}), {:.1} tokens/s; prompt {} tokens in {:.2} s; on {device}",
        a.tokens.len(),
        a.finish,
        a.tokens_per_s,
        a.prompt_tokens,
        a.prefill_secs
    )
}
