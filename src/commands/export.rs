//! `tunestudio export adapter` and `export merged`: their flags, and what they wrote as text or
//! JSON. (`export gguf` is `export_gguf`.)

use std::path::{Path, PathBuf};

use crate::config::Quantization;
use crate::error::{Error, Result};
use crate::export::merged::{MergeDtype, MergeInput, MergeOptions, export_merged};

/// The run's PEFT adapter, written to `to` (or `<run>/adapter` again).
pub fn run_adapter(run: &Path, to: Option<&Path>) -> Result<()> {
    let d = crate::export::run::export_adapter(run, to)?;
    println!("adapter written to {}", d.display());
    Ok(())
}

#[derive(Debug, Clone, clap::Args)]
pub struct ExportMergedArgs {
    /// The run folder (or use --model and --adapter).
    pub run: Option<PathBuf>,
    /// The dtype of the merged weights (f32 for exact checks, not to ship).
    #[arg(long, value_enum, default_value_t = MergeDtype::Bf16)]
    pub dtype: MergeDtype,
    /// Destination folder (must not exist); default `<run>/merged-<dtype>`.
    #[arg(long)]
    pub to: Option<PathBuf>,
    /// A model folder, with --adapter, instead of a run.
    #[arg(long)]
    pub model: Option<PathBuf>,
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// With --model: bf16 (stored weights) or nf4 (what a QLoRA adapter was trained on).
    #[arg(long, value_enum, default_value_t = Quantization::Bf16)]
    pub quantization: Quantization,
    /// Largest shard, e.g. 2GB (the default) or 500MiB.
    #[arg(long)]
    pub max_shard_size: Option<String>,
    #[arg(long)]
    pub json: bool,
}

pub fn run_merged(a: &ExportMergedArgs) -> Result<()> {
    let dtype = a.dtype;
    let mut opts = MergeOptions { dtype, ..MergeOptions::default() };
    if let Some(s) = &a.max_shard_size {
        opts.max_shard_bytes = crate::util::parse_bytes(s)
            .and_then(|b| if b > 0 { Ok(b) } else { Err("must be more than 0 bytes".into()) })
            .map_err(|e| Error::arg("--max-shard-size", e))?;
    }
    let (input, default_dest) = match (&a.run, &a.model, &a.adapter) {
        (Some(run), None, None) => (MergeInput::from_run(run)?, Some(run.join(format!("merged-{}", dtype.name())))),
        (None, Some(model), Some(adapter)) => (MergeInput::from_adapter(model, adapter, a.quantization)?, None),
        _ => return Err(Error::arg("--run/--model/--adapter", "give a run folder, or --model and --adapter (not both)")),
    };
    let dest = a.to.clone().or(default_dest).ok_or_else(|| Error::arg("--to", "it is needed with --model and --adapter"))?;
    let s = export_merged(&input, &dest, &opts)?;
    if a.json {
        println!("{}", serde_json::to_string(&s).expect("json"));
    } else {
        println!(
            "merged model written to {} ({} tensors, {} linears merged, {} shard{}, {})",
            s.dest.display(),
            s.tensors,
            s.merged_linears,
            s.shards.len(),
            if s.shards.len() == 1 { "" } else { "s" },
            crate::util::fmt_bytes(s.total_bytes)
        );
    }
    Ok(())
}
