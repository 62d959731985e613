//! `tunestudio eval`: its flags, and the loss and perplexity as a line of text or JSON.

use std::path::PathBuf;

use crate::config::{DatasetFormat, Quantization, TrainOn};
use crate::error::Result;

#[derive(Debug, Clone, clap::Args)]
pub struct EvalArgs {
    /// A Hugging Face model folder (also a `*-bnb-4bit` one).
    pub model: PathBuf,
    /// A PEFT LoRA adapter folder to apply.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// The dataset (JSONL/JSON/…); the tokens scored are those training would learn from.
    #[arg(long)]
    pub data: PathBuf,
    /// The dataset's record format (auto: detected from the first records).
    #[arg(long, value_enum, default_value_t = DatasetFormat::Auto)]
    pub format: DatasetFormat,
    /// Chat template: auto (the model's) or a built-in name.
    #[arg(long, default_value = "auto")]
    pub template: String,
    /// Score every token (`all`) or only assistant responses (`responses`).
    #[arg(long, value_enum, default_value_t = TrainOn::Responses)]
    pub train_on: TrainOn,
    /// bf16: the stored weights; nf4: quantized first (what a QLoRA adapter was trained on).
    #[arg(long, value_enum, default_value_t = Quantization::Bf16)]
    pub quantization: Quantization,
    #[arg(long, default_value_t = 1024)]
    pub max_seq_len: usize,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Print a JSON object instead of a line of text.
    #[arg(long)]
    pub json: bool,
    /// With --json: every example's token ids, labels and loss (one forward per example).
    #[arg(long)]
    pub per_example: bool,
}

pub fn run(a: EvalArgs) -> Result<()> {
    let mut o = crate::eval::EvalOptions::new(a.model, a.data);
    o.adapter = a.adapter;
    o.dataset.format = a.format;
    o.dataset.template = a.template;
    o.dataset.train_on = a.train_on;
    o.quantization = a.quantization;
    o.max_seq_len = a.max_seq_len;
    o.batch_size = a.batch_size;
    o.per_example = a.per_example && a.json;
    let r = crate::eval::evaluate(&o)?;
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
