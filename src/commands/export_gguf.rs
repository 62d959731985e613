//! `tunestudio export gguf`: a run (or a model folder and an adapter) as one GGUF file for
//! llama.cpp, Ollama and LM Studio, with an Ollama Modelfile beside it.

use std::path::{Path, PathBuf};

use crate::config::Quantization;
use crate::error::{Error, Result};
use crate::export::gguf::{GgufOptions, GgufQuant, export_gguf};
use crate::export::merged::MergeInput;

use super::generate::SamplingArgs;

#[derive(Debug, Clone, clap::Args)]
pub struct ExportGgufArgs {
    /// The run folder (or use --model and --adapter).
    pub run: Option<PathBuf>,
    /// The quantization, by llama.cpp's names.
    #[arg(long, value_enum, default_value_t = GgufQuant::Q8_0)]
    pub quant: GgufQuant,
    /// The .gguf file to write (must not exist); default `<run>/gguf-<quant>/<run name>-<quant>.gguf`.
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
    /// Chat template written into the file: auto (the run's, or the model's) or a built-in name.
    #[arg(long)]
    pub template: Option<String>,
    /// Sampling settings written into the Modelfile.
    #[command(flatten)]
    pub sampling: SamplingArgs,
    #[arg(long)]
    pub json: bool,
}

fn name_of(p: &Path) -> String {
    p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "model".into())
}

pub fn run(a: &ExportGgufArgs) -> Result<()> {
    let quant = a.quant;
    let (input, template, name, default_dest) = match (&a.run, &a.model, &a.adapter) {
        (Some(run), None, None) => {
            let cfg = crate::RunConfig::load(&run.join(crate::session::checkpoint::CONFIG_FILE)).ok();
            let template = cfg.map(|c| c.dataset.template).unwrap_or_else(|| "auto".into());
            let name = name_of(run);
            let dest = run.join(format!("gguf-{}", quant.name())).join(format!("{name}-{}.gguf", quant.name()));
            (MergeInput::from_run(run)?, template, name, Some(dest))
        }
        (None, Some(model), Some(adapter)) => (
            MergeInput::from_adapter(model, adapter, a.quantization)?,
            "auto".into(),
            format!("{}+{}", name_of(model), name_of(adapter)),
            None,
        ),
        _ => return Err(Error::arg("--run/--model/--adapter", "give a run folder, or --model and --adapter (not both)")),
    };
    let dest = a.to.clone().or(default_dest).ok_or_else(|| Error::arg("--to", "FILE.gguf is needed with --model and --adapter"))?;
    let opts = GgufOptions { quant, template: a.template.clone().unwrap_or(template), sampling: a.sampling.params(), name };
    // A progress line only on a terminal (a log would get a line per step).
    let live = !a.json && std::io::IsTerminal::is_terminal(&std::io::stderr());
    let last = std::sync::atomic::AtomicUsize::new(usize::MAX);
    let progress = |done: usize, all: usize| {
        let tenth = done * 10 / all.max(1);
        if live && last.swap(tenth, std::sync::atomic::Ordering::Relaxed) != tenth {
            eprint!("\r{}% of {all} tensors", tenth * 10);
        }
    };
    let s = export_gguf(&input, &dest, &opts, &progress)?;
    if live {
        eprintln!();
    }
    for w in &s.warnings {
        eprintln!("warning: {w}");
    }
    if a.json {
        println!("{}", serde_json::to_string(&s).expect("json"));
    } else {
        let types: Vec<String> = s.types.iter().map(|(t, n)| format!("{t} ×{n}")).collect();
        println!(
            "GGUF written to {} ({}, {} tensors: {}; {} linears merged; pre-tokenizer {})",
            s.path.display(),
            crate::util::fmt_bytes(s.bytes),
            s.tensors,
            types.join(", "),
            s.merged_linears,
            s.pre_tokenizer
        );
        println!(
            "Ollama: cd {} && ollama create NAME -f {}",
            dest.parent().map(|p| p.display().to_string()).unwrap_or_default(),
            name_of(&s.modelfile)
        );
    }
    Ok(())
}
