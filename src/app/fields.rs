//! Every `RunConfig` field as the studio names it: `FIELDS` is the single place a field's label
//! and help live (tooltips add the default read from `RunConfig::default()`, so they cannot drift
//! from the code), and `Problems` maps a dotted field name to what is wrong with it. Below every
//! panel: the Hyperparameters, Model and Dataset panels, the field rows of `widgets` and the
//! reason Start is disabled all read it.

use std::collections::BTreeMap;

use crate::config::RunConfig;
use crate::error::Error;

pub struct FieldDoc {
    /// The dotted TOML name, as `problems()` reports it.
    pub key: &'static str,
    pub label: &'static str,
    pub help: &'static str,
}

const fn f(key: &'static str, label: &'static str, help: &'static str) -> FieldDoc {
    FieldDoc { key, label, help }
}

/// Every field of `RunConfig` (`tests::every_config_field_is_documented` holds this to the type).
pub const FIELDS: &[FieldDoc] = &[
    f("model.path", "Model folder", "A Hugging Face model folder: config.json, *.safetensors (single or sharded) and tokenizer.json."),
    f(
        "model.quantization",
        "Base weights",
        "How the frozen base linears are stored: NF4 with double quantization (QLoRA, ~4× smaller) or 16-bit (plain LoRA, faster, more memory).",
    ),
    f(
        "model.adapter",
        "Continue from adapter",
        "An existing PEFT LoRA adapter to start from instead of a fresh one; its rank, alpha and targets replace the ones below.",
    ),
    f("dataset.path", "Dataset file", "JSONL, JSON, CSV/TSV, Parquet or plain text; one training example per row."),
    f("dataset.format", "Record format", "How a row becomes a conversation. Auto looks at the first rows; Columns uses the mapping below."),
    f("dataset.columns.prompt", "Prompt columns", "Columns joined (blank line between) into the user turn, for the Columns format."),
    f("dataset.columns.response", "Response column", "The column that holds the assistant's answer, for the Columns format."),
    f("dataset.columns.system", "System column", "An optional column with a system prompt, for the Columns format."),
    f("dataset.template", "Chat template", "auto uses the model's own chat template; or pick a built-in one by name."),
    f(
        "dataset.train_on",
        "Train on",
        "responses: only the assistant's text contributes to the loss (usual for instruction tuning); all: every token does.",
    ),
    f(
        "dataset.packing",
        "Packing",
        "Put several short examples into one sequence (attention stays within each example): fewer padding tokens, faster epochs.",
    ),
    f(
        "dataset.max_bad_fraction",
        "Max unusable rows",
        "Refuse to start when more than this fraction of the rows cannot be used (each skipped row is listed with its reason).",
    ),
    f(
        "dataset.fix_untrained_tokens",
        "Fix untrained tokens",
        "When the data uses token rows the base model never trained (all zero), start them at the mean of the trained rows and train them with the adapter; otherwise the run refuses to start (the loss would become NaN).",
    ),
    f(
        "dataset.long_rows",
        "Rows over max length",
        "truncate keeps the first max-sequence-length tokens; drop leaves the row out (listed among skipped rows).",
    ),
    f(
        "dataset.eval_split",
        "Evaluation rows",
        "Rows the run does not train on, to measure the loss on data it has not seen: a fraction of the dataset's rows (0.1 holds out a tenth, drawn with the seed), or a file of its own in the dataset's format. A falling training loss with a rising evaluation loss is overfitting.",
    ),
    f("lora.r", "LoRA rank (r)", "Rank of the low-rank update: more capacity and memory as it grows. 8–64 is usual."),
    f("lora.alpha", "LoRA alpha", "Scale of the update: the adapter's output is multiplied by alpha / r (or alpha / √r with rsLoRA)."),
    f("lora.dropout", "LoRA dropout", "Dropout on the adapter's input during training; 0 is the usual choice for short fine-tunes."),
    f("lora.targets", "Target linears", "Which linears of each decoder layer get an adapter; all seven is the QLoRA paper's choice."),
    f("lora.rslora", "rsLoRA scaling", "Scale by alpha / √r instead of alpha / r, which keeps high ranks from learning slower."),
    f("optim.lr", "Learning rate", "Peak AdamW learning rate (after warm-up)."),
    f("optim.beta1", "Adam β1", "Decay of the gradient's running mean."),
    f("optim.beta2", "Adam β2", "Decay of the squared gradient's running mean."),
    f("optim.eps", "Adam ε", "Added to the denominator for numerical safety."),
    f("optim.weight_decay", "Weight decay", "Decoupled (AdamW) weight decay on the adapter weights."),
    f("optim.max_grad_norm", "Max gradient norm", "Clip the global gradient norm to this; 0 turns clipping off."),
    f("schedule.kind", "LR schedule", "How the learning rate falls after warm-up: linear to zero, cosine to zero, or constant."),
    f(
        "schedule.warmup_steps",
        "Warm-up steps",
        "Optimizer steps over which the learning rate rises from zero; used when the warm-up ratio is 0.",
    ),
    f("schedule.warmup_ratio", "Warm-up ratio", "Warm-up as a fraction of all steps; overrides warm-up steps when above 0."),
    f(
        "schedule.steps",
        "Schedule length",
        "The optimizer steps the learning-rate schedule spans; unset: the whole run. A run extended on resume keeps its original length here.",
    ),
    f("train.batch_size", "Batch size", "Sequences per micro-batch: the main memory knob after sequence length."),
    f("train.grad_accum", "Gradient accumulation", "Micro-batches per optimizer step; the effective batch is batch size × this."),
    f("train.max_seq_len", "Max sequence length", "Tokens per sequence; longer rows are truncated or dropped (see the Dataset panel)."),
    f("train.epochs", "Epochs", "Passes over the dataset (fractions allowed); ignored when a step limit is set."),
    f("train.max_steps", "Step limit", "Stop after this many optimizer steps instead of counting epochs."),
    f("train.seed", "Seed", "Seeds the adapter's initialisation, dropout and the data order; the same seed reproduces a run on the CPU."),
    f(
        "train.save_every",
        "Checkpoint every",
        "Write a resumable checkpoint every N optimizer steps; 0 (off) writes only the final one (Save now writes one at any time).",
    ),
    f(
        "train.save_every_minutes",
        "Checkpoint every (minutes)",
        "Also write a checkpoint after this many minutes of training, so a crash loses little; 0 turns it off.",
    ),
    f(
        "train.eval_every",
        "Evaluate every",
        "With evaluation rows: measure their loss every N optimizer steps and after the last; 0 (auto) does it about ten times over the run. Each evaluation is a forward pass over every evaluation row.",
    ),
    f(
        "train.keep_only_best",
        "Keep only the best checkpoint",
        "With evaluation rows: keep the checkpoint of the lowest evaluation loss and the newest one (to resume from), instead of the newest two and the best.",
    ),
    f(
        "train.stop_on_divergence",
        "Stop on divergence",
        "Stop the run as failed, keeping its last checkpoint, when the gradient norm stays at 0, the loss climbs to a uniform guess, or the loss rises far above its best.",
    ),
    f(
        "train.device",
        "Device",
        "auto trains on a CUDA GPU when there is one, else on the CPU; a GPU the engine cannot start on is shown before Start, with the CPU as a choice.",
    ),
    f(
        "samples.every",
        "Samples every",
        "Answer the sample prompts with the weights being trained every N optimizer steps and after the last (greedy, on a copy of the adapter, so the run is unchanged); shown on the Training page and written to samples.jsonl in the run folder. They answer on a copy of the model with a cache for every prompt: the memory budget shows it as \"samples during training\" (on a GPU, a second copy of the model on the card). 0 turns samples off.",
    ),
    f(
        "samples.prompts",
        "Sample prompts",
        "One prompt per line, each sent as a user message through the chat template. Empty: the first rows of the evaluation set (else of the dataset), up to their answer.",
    ),
    f("samples.count", "Sample rows", "How many dataset rows to answer when no prompt is typed."),
    f("samples.max_new_tokens", "Sample length", "The longest sample answer, in tokens."),
    f(
        "memory.checkpointing",
        "Activation checkpointing",
        "What the backward pass keeps: auto picks the fastest policy that fits; none keeps everything; layer keeps layer inputs and recomputes; offload keeps them in host memory.",
    ),
    f(
        "memory.gpu_mem",
        "GPU memory cap",
        "A hard limit on the GPU memory the run may use, CUDA context included: the plan targets it and the allocator never goes past it. Leave room for other programs on a shared card.",
    ),
    f("dataset.fingerprint.bytes", "Dataset size", "Written by a run: the dataset file's size when the run started; a resume checks it."),
    f(
        "dataset.fingerprint.sha256",
        "Dataset SHA-256",
        "Written by a run: the dataset file's SHA-256 when the run started; a resume checks it.",
    ),
    f("output.dir", "Runs folder", "The folder that holds one folder per run (metrics, checkpoints, the adapter)."),
    f("output.run_name", "Run name", "The run's folder name; empty picks <model>-<date>-<time>."),
];

pub fn doc(key: &str) -> &'static FieldDoc {
    static UNKNOWN: FieldDoc = FieldDoc { key: "", label: "?", help: "" };
    FIELDS.iter().find(|d| d.key == key).unwrap_or(&UNKNOWN)
}

/// The default value of a field as a person would type it, read from `RunConfig::default()`.
pub fn default_text(key: &str) -> String {
    // Every field's tooltip asks on every frame: serialize the defaults once.
    static DEFAULTS: std::sync::OnceLock<Option<toml::Value>> = std::sync::OnceLock::new();
    let Some(root) = DEFAULTS.get_or_init(|| toml::Value::try_from(RunConfig::default()).ok()) else { return "?".into() };
    let mut v = Some(root);
    for part in key.split('.') {
        v = v.and_then(|x| x.get(part));
    }
    match v {
        None => "none".into(),
        Some(toml::Value::String(s)) if s.is_empty() => "empty".into(),
        Some(toml::Value::String(s)) => s.clone(),
        Some(toml::Value::Array(a)) if a.is_empty() => "empty".into(),
        Some(toml::Value::Array(a)) => {
            a.iter().map(|x| x.as_str().map(str::to_string).unwrap_or_else(|| x.to_string())).collect::<Vec<_>>().join(", ")
        }
        Some(other) => other.to_string(),
    }
}

pub fn tooltip(key: &str) -> String {
    format!("{}\n\nDefault: {}\nIn run.toml: {key}", doc(key).help, default_text(key))
}

/// Problems by dotted field name (`lora.r`), as `RunConfig::problems` names them; a problem
/// that names no field is kept under the empty key.
pub type Problems = BTreeMap<String, Vec<String>>;

/// The config's own checks, by field.
pub fn config_problems(config: &RunConfig) -> Problems {
    let mut out = Problems::new();
    for e in config.problems() {
        match e {
            Error::Config { field, msg } => out.entry(field).or_default().push(msg),
            other => out.entry(String::new()).or_default().push(other.to_string()),
        }
    }
    out
}

/// The first problem as one line, naming the field the way the panels label it.
pub fn first_problem(problems: &Problems) -> Option<String> {
    // Walk FIELDS so the reason shown is the first field on screen, not the first alphabetically.
    for d in FIELDS {
        if let Some(m) = problems.get(d.key) {
            return Some(format!("{} ({}): {}", d.label, d.key, m[0]));
        }
    }
    problems.iter().next().map(|(k, m)| if k.is_empty() { m[0].clone() } else { format!("{k}: {}", m[0]) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Leaf keys of a TOML table, dotted.
    fn leaves(prefix: &str, v: &toml::Value, out: &mut Vec<String>) {
        match v {
            toml::Value::Table(t) => {
                for (k, x) in t {
                    let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    leaves(&key, x, out);
                }
            }
            _ => out.push(prefix.to_string()),
        }
    }

    #[test]
    fn every_config_field_is_documented() {
        // Optional fields are left out of the TOML when unset: set them so they show up.
        let mut c = RunConfig::default();
        c.model.adapter = Some("a".into());
        c.train.max_steps = Some(1);
        c.dataset.columns.system = Some("s".into());
        c.memory.gpu_mem = Some(crate::config::ByteSize(24 << 30));
        c.schedule.steps = Some(1);
        c.dataset.fingerprint = Some(crate::config::Fingerprint { bytes: 1, sha256: "0".into() });
        c.dataset.eval_split = Some(crate::config::EvalSplit::Fraction(0.1));
        // `[samples]` is left out while it is the default.
        c.samples.every = 1;
        c.samples.prompts = vec!["p".into()];
        let mut keys = Vec::new();
        leaves("", &toml::Value::try_from(&c).unwrap(), &mut keys);
        keys.sort();
        let mut documented: Vec<String> = FIELDS.iter().map(|d| d.key.to_string()).collect();
        documented.sort();
        assert_eq!(keys, documented);
        for d in FIELDS {
            assert!(!d.help.is_empty() && !d.label.is_empty(), "{}", d.key);
        }
    }

    #[test]
    fn tooltips_carry_the_default() {
        assert!(tooltip("lora.r").contains("Default: 16"));
        assert!(tooltip("optim.lr").contains("Default: 0.0002"));
        assert!(tooltip("lora.targets").contains("q, k, v, o, gate, up, down"));
        assert!(tooltip("train.max_steps").contains("Default: none"));
        assert!(tooltip("output.run_name").contains("Default: empty"));
    }

    #[test]
    fn first_problem_follows_screen_order_and_names_the_field() {
        let mut c = RunConfig::default();
        c.model.path = "m".into();
        c.dataset.path = "d".into();
        c.lora.r = 0;
        c.optim.lr = -1.0;
        let p = config_problems(&c);
        let first = first_problem(&p).unwrap();
        assert!(first.starts_with("LoRA rank (r) (lora.r): 0 is outside"), "{first}");
        assert!(p.contains_key("optim.lr"));
    }
}
