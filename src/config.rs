//! `RunConfig`: everything a training run needs, as one serde type read from and written to TOML.
//! The GUI edits it, the CLI loads it, the session validates it once and the engine takes only a
//! validated copy. Defaults follow Unsloth's notebooks where they are sensible.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct RunConfig {
    pub model: ModelConfig,
    pub dataset: DatasetConfig,
    pub lora: LoraConfig,
    pub optim: OptimConfig,
    pub schedule: ScheduleConfig,
    pub train: TrainConfig,
    pub memory: MemoryConfig,
    pub output: OutputConfig,
    /// Left out of the saved TOML while it is the default (off, no prompts), so the configs of
    /// runs that do not sample read as before.
    #[serde(skip_serializing_if = "SamplesConfig::is_default")]
    pub samples: SamplesConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Quantization {
    /// Base linears stored as NF4 with double quantization (QLoRA).
    #[default]
    Nf4,
    /// Base linears kept in 16 bits (plain LoRA).
    Bf16,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// A Hugging Face model folder (config.json, *.safetensors, tokenizer.json).
    pub path: PathBuf,
    pub quantization: Quantization,
    /// An existing PEFT LoRA adapter to continue training from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapter: Option<PathBuf>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig { path: PathBuf::new(), quantization: Quantization::Nf4, adapter: None }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DatasetFormat {
    /// Detect from the first records.
    #[default]
    Auto,
    /// `instruction`, `input`, `output`, optional `system`.
    Alpaca,
    /// `conversations` of `{from, value}`.
    Sharegpt,
    /// `messages` of `{role, content}` (OpenAI).
    Messages,
    /// Raw `text`, trained on everything.
    Text,
    /// Explicit column mapping (`dataset.columns`).
    Columns,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TrainOn {
    /// Only assistant responses contribute to the loss.
    #[default]
    Responses,
    /// Every token (prompt included) contributes to the loss.
    All,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct ColumnMapping {
    /// Columns joined (with a blank line) into the user turn.
    pub prompt: Vec<String>,
    pub response: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatasetConfig {
    pub path: PathBuf,
    pub format: DatasetFormat,
    pub columns: ColumnMapping,
    /// `auto` uses the model's chat template; otherwise a built-in one by name
    /// (`llama-3`, `chatml`, `qwen3`, `gemma`, `alpaca`, `mistral`).
    pub template: String,
    /// Extra variables for the chat template, as `apply_chat_template(**kwargs)` passes them:
    /// `enable_thinking = false` trains Qwen3's non-thinking mode (its empty <think> block is
    /// then part of the prompt).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub template_kwargs: BTreeMap<String, toml::Value>,
    pub train_on: TrainOn,
    /// Pack several examples into each sequence (attention kept within each example).
    pub packing: bool,
    /// Refuse to start when more than this fraction of rows cannot be used.
    pub max_bad_fraction: f64,
    /// Fix untrained token rows that the data uses (mean of trained rows, trained with the adapter).
    pub fix_untrained_tokens: bool,
    /// Rows longer than `train.max_seq_len`: `truncate` (keep the start) or `drop`.
    #[serde(default)]
    pub long_rows: LongRows,
    /// Size and SHA-256 of the dataset file, written by a run into its `config.toml`: a resume
    /// refuses a file that no longer matches (unless told to go on with the new data).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fingerprint: Option<Fingerprint>,
    /// Rows held out to measure the loss on data the run does not train on: a fraction of the
    /// dataset's rows (`0.1`), or the path of a file read like the dataset (`"eval.jsonl"`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_split: Option<EvalSplit>,
}

/// Where the evaluation rows come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EvalSplit {
    /// This fraction of the dataset's rows, drawn with `train.seed` (0 < f ≤ 0.5).
    Fraction(f64),
    /// A file of its own, in the dataset's format.
    File(PathBuf),
}

impl Default for DatasetConfig {
    fn default() -> Self {
        DatasetConfig {
            path: PathBuf::new(),
            format: DatasetFormat::Auto,
            columns: ColumnMapping::default(),
            template: "auto".into(),
            template_kwargs: BTreeMap::new(),
            train_on: TrainOn::Responses,
            packing: false,
            max_bad_fraction: 0.1,
            fix_untrained_tokens: true,
            long_rows: LongRows::Truncate,
            fingerprint: None,
            eval_split: None,
        }
    }
}

/// What to do with a row longer than `max_seq_len` tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LongRows {
    /// Keep the first `max_seq_len` tokens (TRL's default); counted in `truncated_rows`.
    #[default]
    Truncate,
    /// Leave the row out; it is listed among the skipped rows.
    Drop,
}

/// The size and SHA-256 of a dataset file: what a run records so that a resume can tell whether
/// it would continue on the same data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fingerprint {
    pub bytes: u64,
    pub sha256: String,
}

impl Fingerprint {
    /// Read the whole file once (buffered; a few seconds for a gigabyte).
    pub fn of_file(path: &std::path::Path) -> Result<Self> {
        use sha2::Digest;
        use std::io::Read;
        let mut f = std::fs::File::open(path).map_err(|e| Error::file(path, e))?;
        let mut hasher = sha2::Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        let mut bytes = 0u64;
        loop {
            let n = f.read(&mut buf).map_err(|e| Error::file(path, e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            bytes += n as u64;
        }
        let sha256 = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
        Ok(Fingerprint { bytes, sha256 })
    }
}

impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} bytes, sha256 {}…", self.bytes, &self.sha256[..self.sha256.len().min(12)])
    }
}

/// The seven linears of a Llama decoder layer that LoRA can adapt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Target {
    pub const ALL: [Target; 7] = [Target::Q, Target::K, Target::V, Target::O, Target::Gate, Target::Up, Target::Down];

    /// The Hugging Face module name (`q_proj`, …).
    pub fn hf_name(self) -> &'static str {
        match self {
            Target::Q => "q_proj",
            Target::K => "k_proj",
            Target::V => "v_proj",
            Target::O => "o_proj",
            Target::Gate => "gate_proj",
            Target::Up => "up_proj",
            Target::Down => "down_proj",
        }
    }

    /// `self_attn` or `mlp`: the parent module in Hugging Face names.
    pub fn hf_parent(self) -> &'static str {
        match self {
            Target::Q | Target::K | Target::V | Target::O => "self_attn",
            Target::Gate | Target::Up | Target::Down => "mlp",
        }
    }

    pub fn short(self) -> &'static str {
        match self {
            Target::Q => "q",
            Target::K => "k",
            Target::V => "v",
            Target::O => "o",
            Target::Gate => "gate",
            Target::Up => "up",
            Target::Down => "down",
        }
    }

    pub fn from_hf_name(name: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.hf_name() == name || t.short() == name)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f64,
    pub dropout: f64,
    pub targets: Vec<Target>,
    /// Scale by α/√r instead of α/r.
    pub rslora: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig { r: 16, alpha: 16.0, dropout: 0.0, targets: Target::ALL.to_vec(), rslora: false }
    }
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        if self.rslora { self.alpha / (self.r as f64).sqrt() } else { self.alpha / self.r as f64 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Clip the global gradient norm to this; 0 disables clipping.
    pub max_grad_norm: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig { lr: 2e-4, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.001, max_grad_norm: 1.0 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    #[default]
    Linear,
    Cosine,
    Constant,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ScheduleConfig {
    pub kind: ScheduleKind,
    /// Warm-up length in optimizer steps; used when `warmup_ratio` is 0.
    pub warmup_steps: u64,
    /// Warm-up as a fraction of the total steps; overrides `warmup_steps` when > 0.
    pub warmup_ratio: f64,
    /// The optimizer steps the schedule spans; unset: the run's own length. A run extended on
    /// resume (`--max-steps`) keeps its original span here unless it is re-planned
    /// (`--reschedule`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<u64>,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        ScheduleConfig { kind: ScheduleKind::Linear, warmup_steps: 5, warmup_ratio: 0.0, steps: None }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DeviceChoice {
    /// CUDA when a usable GPU is present, else the CPU.
    #[default]
    Auto,
    Cpu,
    #[value(alias = "gpu")]
    Cuda,
}

impl std::str::FromStr for DeviceChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" | "gpu" => Ok(DeviceChoice::Cuda),
            _ => Err(Error::config("train.device", format!("`{s}` is not one of auto, cpu, cuda"))),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub batch_size: usize,
    pub grad_accum: usize,
    pub max_seq_len: usize,
    pub epochs: f64,
    /// Stop after this many optimizer steps (overrides `epochs` when set).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_steps: Option<u64>,
    pub seed: u64,
    /// Write a checkpoint every N optimizer steps; 0: no step-based checkpoints.
    pub save_every: u64,
    /// Also write a checkpoint after every this many minutes of training, so a crash or kill
    /// loses little; 0: off. A run also checkpoints whenever it stops.
    pub save_every_minutes: f64,
    /// Stop a run that diverges (gradient norm stuck at 0, loss stuck at the uniform guess or
    /// rising far above its best) as failed, keeping its last checkpoint.
    pub stop_on_divergence: bool,
    pub device: DeviceChoice,
    /// With `dataset.eval_split`: measure the evaluation loss every N optimizer steps and after
    /// the last; 0: about ten times over the run.
    pub eval_every: u64,
    /// With `dataset.eval_split`: keep only the checkpoint of the best evaluation loss and the
    /// newest one (to resume from), instead of the newest two and the best.
    pub keep_only_best: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            batch_size: 2,
            grad_accum: 4,
            max_seq_len: 2048,
            epochs: 1.0,
            max_steps: None,
            seed: 3407,
            save_every: 0,
            save_every_minutes: 10.0,
            stop_on_divergence: true,
            device: DeviceChoice::Auto,
            eval_every: 0,
            keep_only_best: false,
        }
    }
}

impl TrainConfig {
    /// Optimizer steps of the whole run: `max_steps`, else `epochs` × steps per epoch (at least one).
    pub fn total_steps(&self, steps_per_epoch: u64) -> u64 {
        self.max_steps.unwrap_or_else(|| ((self.epochs * steps_per_epoch as f64).ceil() as u64).max(1))
    }

    /// Whether a run of `total_steps` evaluates after `step` (given an evaluation set): every
    /// `eval_every` steps (0: about ten times over the run) and after the last.
    pub fn evaluates_at(&self, step: u64, total_steps: u64) -> bool {
        let every = if self.eval_every == 0 { total_steps.div_ceil(10).max(1) } else { self.eval_every };
        step == total_steps || step.is_multiple_of(every)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CheckpointPolicy {
    /// Chosen by the memory plan: the fastest policy that fits.
    #[default]
    Auto,
    /// Keep every activation the backward needs (fastest, most memory).
    None,
    /// Keep each decoder layer's input on the device, recompute the rest in the backward.
    Layer,
    /// Keep layer inputs in pinned host memory, prefetched during the backward.
    Offload,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
pub struct MemoryConfig {
    pub checkpointing: CheckpointPolicy,
    /// A hard cap on the GPU memory the run may use, its CUDA context included (`"24GiB"`): the
    /// plan targets it and the allocator refuses to go past it. `None`: the whole card.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_mem: Option<ByteSize>,
}

/// A size in bytes, written in TOML as `"24GiB"`, `"1.5 GB"` or a plain number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn bytes(self) -> u64 {
        self.0
    }
}

impl std::fmt::Display for ByteSize {
    /// Exact: whole GiB or MiB where the value is one, else bytes (so a saved config reads back equal).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.0;
        if b > 0 && b.is_multiple_of(1 << 30) {
            write!(f, "{}GiB", b >> 30)
        } else if b > 0 && b.is_multiple_of(1 << 20) {
            write!(f, "{}MiB", b >> 20)
        } else {
            write!(f, "{b}")
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        // A whole GiB or MiB reads best as text; any other size as a plain number of bytes,
        // which reads back exactly (text needs a unit).
        let b = self.0;
        if b > 0 && b.is_multiple_of(1 << 20) { s.serialize_str(&self.to_string()) } else { s.serialize_u64(b) }
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Bytes(b) => Ok(ByteSize(b)),
            Raw::Text(t) => crate::util::parse_bytes(&t).map(ByteSize).map_err(serde::de::Error::custom),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutputConfig {
    /// The folder that holds run folders.
    pub dir: PathBuf,
    /// The run folder's name inside `dir`; empty picks `<model>-<date>-<time>`.
    pub run_name: String,
}

impl Default for OutputConfig {
    fn default() -> Self {
        OutputConfig { dir: PathBuf::from("runs"), run_name: String::new() }
    }
}

/// Samples during training: a few prompts answered by the weights being trained, so the user sees
/// the answers change while the loss falls (issue 13). They are generated by the same engine as
/// the Chat page (greedy, on a copy of the adapter), written to `samples.jsonl` in the run folder
/// and shown on the Training page; they never change the run (its RNG, optimizer or activations).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplesConfig {
    /// Answer the prompts every N optimizer steps and after the last; 0: off.
    pub every: u64,
    /// Prompts, each sent as one user message through the chat template. Empty: the first
    /// `count` held-out rows (the training rows without an evaluation set), up to their answer.
    pub prompts: Vec<String>,
    /// How many dataset rows to take when `prompts` is empty.
    pub count: usize,
    /// The longest answer, in tokens.
    pub max_new_tokens: usize,
}

impl Default for SamplesConfig {
    fn default() -> Self {
        SamplesConfig { every: 0, prompts: Vec::new(), count: 2, max_new_tokens: 48 }
    }
}

impl SamplesConfig {
    pub fn is_default(&self) -> bool {
        *self == SamplesConfig::default()
    }

    /// What is wrong with these settings, each naming its field and saying what to do. Off
    /// (`every = 0`), the others are not checked: they are kept for when samples are turned on.
    pub fn problems(&self) -> Vec<Error> {
        let mut out = Vec::new();
        if self.every > MAX_SAMPLES_EVERY {
            out.push(Error::config(
                "samples.every",
                format!("is {}: give a number of steps up to {MAX_SAMPLES_EVERY}, or 0 to turn samples off", self.every),
            ));
        }
        if self.every == 0 {
            return out;
        }
        if !(1..=MAX_SAMPLE_TOKENS).contains(&self.max_new_tokens) {
            out.push(Error::config(
                "samples.max_new_tokens",
                format!("is {}: give the longest answer in tokens, 1 to {MAX_SAMPLE_TOKENS}", self.max_new_tokens),
            ));
        }
        if self.prompts.is_empty() && !(1..=MAX_SAMPLE_PROMPTS).contains(&self.count) {
            out.push(Error::config(
                "samples.count",
                format!(
                    "is {}: answer 1 to {MAX_SAMPLE_PROMPTS} dataset rows, type prompts in samples.prompts, or set samples.every = 0 to turn samples off",
                    self.count
                ),
            ));
        }
        if self.prompts.len() > MAX_SAMPLE_PROMPTS {
            out.push(Error::config(
                "samples.prompts",
                format!("has {} prompts: keep at most {MAX_SAMPLE_PROMPTS} (each is answered at every sample step)", self.prompts.len()),
            ));
        }
        if let Some(i) = self.prompts.iter().position(|p| p.trim().is_empty()) {
            out.push(Error::config("samples.prompts", format!("prompt {} is empty: remove it or write one", i + 1)));
        }
        out
    }

    /// Whether a run of `total_steps` answers the prompts after `step`.
    pub fn due_at(&self, step: u64, total_steps: u64) -> bool {
        self.every > 0 && (step == total_steps || step.is_multiple_of(self.every))
    }
}

/// The limits of `[samples]`: samples slow the run down by as many generations per sample step.
pub const MAX_SAMPLES_EVERY: u64 = 100_000_000;
pub const MAX_SAMPLE_PROMPTS: usize = 16;
pub const MAX_SAMPLE_TOKENS: usize = 4096;

/// The allowed ranges of the settings that plans search over (`plan::largest_fitting`).
pub const MAX_LORA_R: usize = 1024;
pub const MAX_BATCH_SIZE: usize = 4096;
pub const MIN_SEQ_LEN: usize = 8;
pub const MAX_SEQ_LEN: usize = 1 << 20;

/// Remove `.` and `name/..` pairs lexically, so `assets/demo/../../runs` prints as `runs`.
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir if matches!(out.components().next_back(), Some(std::path::Component::Normal(_))) => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    if out.as_os_str().is_empty() { PathBuf::from(".") } else { out }
}

fn check_range(field: &str, value: f64, lo: f64, hi: f64, lo_open: bool) -> Result<()> {
    let ok = value.is_finite() && (if lo_open { value > lo } else { value >= lo }) && value <= hi;
    if ok {
        return Ok(());
    }
    let open = if lo_open { "(" } else { "[" };
    Err(Error::config(field, format!("{value} is outside the allowed range {open}{lo}, {hi}]")))
}

fn check_int(field: &str, value: u64, lo: u64, hi: u64) -> Result<()> {
    if (lo..=hi).contains(&value) {
        Ok(())
    } else {
        Err(Error::config(field, format!("{value} is outside the allowed range [{lo}, {hi}]")))
    }
}

impl RunConfig {
    pub fn from_toml_str(text: &str, origin: &Path) -> Result<Self> {
        let config: RunConfig = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            let msg = e.message().trim().to_string();
            match line {
                Some(line) => Error::line(origin, line, msg),
                None => Error::file(origin, msg),
            }
        })?;
        Ok(config)
    }

    /// Load a TOML file; relative paths inside it are resolved against the file's folder (never
    /// the working directory), so a config means the same files wherever it is used from.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_path(path)?;
        let mut config = Self::from_toml_str(&text, path)?;
        let base = path.parent().unwrap_or(Path::new(""));
        config.resolve_paths(base);
        Ok(config)
    }

    /// Make every relative path (model, adapter, dataset, output folder) absolute by joining it
    /// to `base`, itself taken from the working directory when relative.
    pub fn resolve_paths(&mut self, base: &Path) {
        let base =
            std::path::absolute(if base.as_os_str().is_empty() { Path::new(".") } else { base }).unwrap_or_else(|_| base.to_path_buf());
        let fix = |p: &mut PathBuf| {
            if !p.as_os_str().is_empty() && p.is_relative() {
                *p = normalize(&base.join(&*p));
            }
        };
        fix(&mut self.model.path);
        fix(&mut self.dataset.path);
        fix(&mut self.output.dir);
        if let Some(a) = self.model.adapter.as_mut() {
            fix(a);
        }
    }

    /// [`resolve_paths`](Self::resolve_paths) against the working directory: what a relative path
    /// given on the command line means.
    pub fn make_absolute(&mut self) {
        self.resolve_paths(Path::new("."));
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("RunConfig always serializes")
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        crate::util::write_atomic(path, self.to_toml().as_bytes())
    }

    /// Write to `path`, keeping what a person wrote in the file there: comments, blank lines, key
    /// order, and the spelling of every value that did not change (`2e-4` stays `2e-4`, a relative
    /// path that still names the same place stays relative). Only changed values are rewritten,
    /// keys the config no longer has are removed and new ones added at the end of their table. A
    /// missing or unreadable file is written as `save` would.
    pub fn save_keeping_comments(&self, path: &Path) -> Result<()> {
        let new: toml_edit::DocumentMut = self.to_toml().parse().expect("RunConfig's own TOML parses");
        let Some(mut doc) = std::fs::read_to_string(path).ok().and_then(|t| t.parse::<toml_edit::DocumentMut>().ok()) else {
            return self.save(path);
        };
        let base = path.parent().unwrap_or(Path::new(""));
        merge_toml(doc.as_table_mut(), new.as_table(), base);
        crate::util::write_atomic(path, doc.to_string().as_bytes())
    }

    /// Check every value; the first problem is returned with its field name and allowed range.
    pub fn validate(&self) -> Result<()> {
        self.problems().into_iter().next().map_or(Ok(()), Err)
    }

    /// All problems at once (the studio marks each field in place).
    pub fn problems(&self) -> Vec<Error> {
        let mut out = Vec::new();
        if self.model.path.as_os_str().is_empty() {
            out.push(Error::config("model.path", "is empty: choose a Hugging Face model folder"));
        }
        if self.dataset.path.as_os_str().is_empty() {
            out.push(Error::config("dataset.path", "is empty: choose a dataset file"));
        }
        out.extend(self.setting_problems());
        out
    }

    /// The problems of every setting but the model and dataset paths: what `tunestudio plan`
    /// checks, which plans from a shape without files.
    pub fn setting_problems(&self) -> Vec<Error> {
        let mut out = Vec::new();
        let mut push = |r: Result<()>| {
            if let Err(e) = r {
                out.push(e)
            }
        };
        push(check_int("lora.r", self.lora.r as u64, 1, MAX_LORA_R as u64));
        push(check_range("lora.alpha", self.lora.alpha, 0.0, 1e6, true));
        push(check_range("lora.dropout", self.lora.dropout, 0.0, 0.9, false));
        if self.lora.targets.is_empty() {
            push(Err(Error::config("lora.targets", "is empty: pick at least one of q, k, v, o, gate, up, down")));
        }
        let mut seen = std::collections::BTreeSet::new();
        for t in &self.lora.targets {
            if !seen.insert(*t) {
                push(Err(Error::config("lora.targets", format!("`{}` is listed twice", t.short()))));
            }
        }
        push(check_range("optim.lr", self.optim.lr, 0.0, 1.0, true));
        push(check_range("optim.beta1", self.optim.beta1, 0.0, 0.999999, false));
        push(check_range("optim.beta2", self.optim.beta2, 0.0, 0.999999, false));
        push(check_range("optim.eps", self.optim.eps, 0.0, 1e-2, true));
        push(check_range("optim.weight_decay", self.optim.weight_decay, 0.0, 1.0, false));
        push(check_range("optim.max_grad_norm", self.optim.max_grad_norm, 0.0, 1e6, false));
        push(check_int("schedule.warmup_steps", self.schedule.warmup_steps, 0, 1_000_000));
        push(check_range("schedule.warmup_ratio", self.schedule.warmup_ratio, 0.0, 1.0, false));
        if let Some(s) = self.schedule.steps {
            push(check_int("schedule.steps", s, 1, 100_000_000));
        }
        push(check_range("train.save_every_minutes", self.train.save_every_minutes, 0.0, 1e6, false));
        push(check_int("train.batch_size", self.train.batch_size as u64, 1, MAX_BATCH_SIZE as u64));
        push(check_int("train.grad_accum", self.train.grad_accum as u64, 1, 4096));
        push(check_int("train.max_seq_len", self.train.max_seq_len as u64, MIN_SEQ_LEN as u64, MAX_SEQ_LEN as u64));
        if self.train.max_steps.is_none() {
            push(check_range("train.epochs", self.train.epochs, 0.0, 10_000.0, true));
        }
        if let Some(s) = self.train.max_steps {
            push(check_int("train.max_steps", s, 1, 100_000_000));
        }
        push(check_range("dataset.max_bad_fraction", self.dataset.max_bad_fraction, 0.0, 1.0, false));
        for e in self.samples.problems() {
            push(Err(e));
        }
        if let Some(cap) = self.memory.gpu_mem {
            // Below 1 GiB not even the CUDA context and the kernels' scratch fit.
            if cap.bytes() < (1 << 30) {
                push(Err(Error::config("memory.gpu_mem", format!("{cap} is below 1GiB, which the CUDA context and scratch alone take"))));
            }
        }
        match &self.dataset.eval_split {
            Some(EvalSplit::Fraction(f)) => push(check_range("dataset.eval_split", *f, 0.0, 0.5, true)),
            Some(EvalSplit::File(p)) if p.as_os_str().is_empty() => {
                push(Err(Error::config("dataset.eval_split", "is an empty path: give a fraction such as 0.1 or an evaluation file")))
            }
            _ => {}
        }
        push(check_int("train.eval_every", self.train.eval_every, 0, 100_000_000));
        out
    }
}

/// Bring `old` (a table of a file being saved over) to the values of `new`, leaving every entry
/// whose value is unchanged as it was written, with its comments.
fn merge_toml(old: &mut toml_edit::Table, new: &toml_edit::Table, base: &Path) {
    use toml_edit::Item;
    let gone: Vec<String> = old.iter().map(|(k, _)| k.to_string()).filter(|k| !new.contains_key(k)).collect();
    for k in gone {
        old.remove(&k);
    }
    for (k, n) in new.iter() {
        match (old.get_mut(k), n) {
            (Some(Item::Table(o)), Item::Table(n)) => merge_toml(o, n, base),
            (Some(Item::Value(o)), Item::Value(n)) => {
                if !same_toml_value(o, n, base) {
                    let decor = o.decor().clone();
                    *o = n.clone();
                    *o.decor_mut() = decor;
                }
            }
            (Some(o), n) => *o = n.clone(),
            (None, n) => {
                old.insert(k, n.clone());
            }
        }
    }
}

/// Whether two TOML values mean the same (`16` and `16.0` do; so do a relative path in a file in
/// `base` and the absolute path it names).
fn same_toml_value(a: &toml_edit::Value, b: &toml_edit::Value, base: &Path) -> bool {
    use toml_edit::Value as V;
    match (a, b) {
        (V::String(x), V::String(y)) => {
            let (x, y) = (Path::new(x.value()), Path::new(y.value()));
            x == y || (x.is_relative() && !x.as_os_str().is_empty() && normalize(&base.join(x)) == normalize(y))
        }
        (V::Integer(x), V::Integer(y)) => x.value() == y.value(),
        (V::Float(x), V::Float(y)) => x.value() == y.value(),
        (V::Integer(i), V::Float(f)) | (V::Float(f), V::Integer(i)) => *i.value() as f64 == *f.value(),
        (V::Boolean(x), V::Boolean(y)) => x.value() == y.value(),
        (V::Array(x), V::Array(y)) => x.len() == y.len() && x.iter().zip(y.iter()).all(|(a, b)| same_toml_value(a, b, base)),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip_through_toml() {
        let mut c = RunConfig::default();
        c.model.path = "m".into();
        c.dataset.path = "d.jsonl".into();
        let back = RunConfig::from_toml_str(&c.to_toml(), Path::new("x.toml")).unwrap();
        assert_eq!(c, back);
        c.validate().unwrap();
    }

    /// Chat-template variables (Qwen3's non-thinking mode) read from and written to TOML.
    #[test]
    fn template_kwargs_round_trip() {
        let c = RunConfig::from_toml_str(
            "[dataset]\ntemplate = \"auto\"\n[dataset.template_kwargs]\nenable_thinking = false\n",
            Path::new("run.toml"),
        )
        .unwrap();
        assert_eq!(c.dataset.template_kwargs.get("enable_thinking"), Some(&toml::Value::Boolean(false)));
        let back = RunConfig::from_toml_str(&c.to_toml(), Path::new("run.toml")).unwrap();
        assert_eq!(back.dataset.template_kwargs, c.dataset.template_kwargs);
        assert!(!RunConfig::default().to_toml().contains("template_kwargs"), "empty: not written");
    }

    #[test]
    fn unsloth_defaults() {
        let c = RunConfig::default();
        assert_eq!(c.lora.r, 16);
        assert_eq!(c.lora.alpha, 16.0);
        assert_eq!(c.lora.dropout, 0.0);
        assert_eq!(c.optim.lr, 2e-4);
        assert_eq!(c.optim.weight_decay, 0.001);
        assert_eq!(c.schedule.kind, ScheduleKind::Linear);
        assert_eq!(c.schedule.warmup_steps, 5);
        assert_eq!(c.train.seed, 3407);
    }

    #[test]
    fn out_of_range_names_field_and_range() {
        let mut c = RunConfig::default();
        c.model.path = "m".into();
        c.dataset.path = "d".into();
        c.lora.r = 0;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("lora.r") && e.contains("[1, 1024]"), "{e}");
        c.lora.r = 8;
        c.optim.lr = -1.0;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("optim.lr") && e.contains("(0, 1]"), "{e}");
    }

    #[test]
    fn eval_split_is_a_fraction_or_a_file_and_is_checked() {
        let c = RunConfig::from_toml_str("[dataset]\neval_split = 0.1\n[train]\neval_every = 20\n", Path::new("run.toml")).unwrap();
        assert_eq!(c.dataset.eval_split, Some(EvalSplit::Fraction(0.1)));
        assert_eq!(c.train.eval_every, 20);
        let c = RunConfig::from_toml_str("[dataset]\neval_split = \"held.jsonl\"\n", Path::new("run.toml")).unwrap();
        assert_eq!(c.dataset.eval_split, Some(EvalSplit::File("held.jsonl".into())));
        let mut c = RunConfig::default();
        c.model.path = "m".into();
        c.dataset.path = "d".into();
        for bad in [0.0, 0.6, f64::NAN] {
            c.dataset.eval_split = Some(EvalSplit::Fraction(bad));
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("dataset.eval_split") && e.contains("(0, 0.5]"), "{e}");
        }
        c.dataset.eval_split = Some(EvalSplit::File(PathBuf::new()));
        assert!(c.validate().unwrap_err().to_string().contains("empty path"));
        // About ten evaluations by default, and always one after the last step.
        let t = TrainConfig::default();
        let at: Vec<u64> = (1..=25).filter(|&s| t.evaluates_at(s, 25)).collect();
        assert_eq!(at, vec![3, 6, 9, 12, 15, 18, 21, 24, 25]);
        let t = TrainConfig { eval_every: 10, ..t };
        assert_eq!((1..=25).filter(|&s| t.evaluates_at(s, 25)).collect::<Vec<_>>(), vec![10, 20, 25]);
    }

    #[test]
    fn samples_are_checked_naming_the_field_and_left_out_of_the_toml_while_default() {
        let mut c = RunConfig::default();
        c.model.path = "m".into();
        c.dataset.path = "d".into();
        // Off by default, and then not written: the configs of runs without samples read as before.
        assert_eq!(c.samples.every, 0);
        assert!(!c.to_toml().contains("samples"), "{}", c.to_toml());
        // Off, the other settings are kept as they are, not checked.
        c.samples.count = 0;
        c.validate().unwrap();

        let problem = |c: &RunConfig| c.validate().unwrap_err().to_string();
        c.samples.every = 10;
        let e = problem(&c);
        assert!(e.contains("samples.count") && e.contains("samples.prompts") && e.contains("samples.every = 0"), "{e}");
        c.samples.count = 2;
        c.samples.max_new_tokens = 0;
        let e = problem(&c);
        assert!(e.contains("samples.max_new_tokens") && e.contains("1 to 4096"), "{e}");
        c.samples.max_new_tokens = 32;
        c.samples.prompts = vec!["Hi".into(), "  ".into()];
        let e = problem(&c);
        assert!(e.contains("samples.prompts") && e.contains("prompt 2 is empty"), "{e}");
        c.samples.prompts = vec!["Hi".into(); 17];
        let e = problem(&c);
        assert!(e.contains("samples.prompts") && e.contains("at most 16"), "{e}");
        c.samples.prompts = vec!["Hi".into()];
        c.samples.every = MAX_SAMPLES_EVERY + 1;
        let e = problem(&c);
        assert!(e.contains("samples.every") && e.contains("0 to turn samples off"), "{e}");
        c.samples.every = 10;
        c.validate().unwrap();

        // On, they are written, and read back the same.
        let text = c.to_toml();
        assert!(text.contains("[samples]") && text.contains("every = 10"), "{text}");
        assert_eq!(RunConfig::from_toml_str(&text, Path::new("run.toml")).unwrap(), c);
        // A misspelt key is refused with its line.
        let e = RunConfig::from_toml_str("[samples]\nevery = 5\nprompt = [\"x\"]\n", Path::new("run.toml")).unwrap_err().to_string();
        assert!(e.starts_with("run.toml:3:") && e.contains("prompt"), "{e}");
        // Due every N steps and after the last.
        let at: Vec<u64> = (1..=25).filter(|&s| c.samples.due_at(s, 25)).collect();
        assert_eq!(at, vec![10, 20, 25]);
        assert!(!(1..=25).any(|s| SamplesConfig::default().due_at(s, 25)));
    }

    #[test]
    fn unknown_field_is_refused_with_line() {
        let e = RunConfig::from_toml_str("[lora]\nr = 8\nrank = 4\n", Path::new("run.toml")).unwrap_err();
        let s = e.to_string();
        assert!(s.starts_with("run.toml:3:") && s.contains("rank"), "{s}");
    }

    #[test]
    fn memory_cap_reads_sizes_and_writes_them_back_exactly() {
        let c = RunConfig::from_toml_str("[memory]\ngpu_mem = \"24GiB\"\n", Path::new("run.toml")).unwrap();
        assert_eq!(c.memory.gpu_mem, Some(ByteSize(24 << 30)));
        assert!(c.to_toml().contains("gpu_mem = \"24GiB\""), "{}", c.to_toml());
        for b in [24u64 << 30, 1536 << 20, (1 << 30) + 7] {
            let mut c = RunConfig::default();
            c.memory.gpu_mem = Some(ByteSize(b));
            assert_eq!(RunConfig::from_toml_str(&c.to_toml(), Path::new("x.toml")).unwrap().memory.gpu_mem, Some(ByteSize(b)));
        }
        let n = RunConfig::from_toml_str("[memory]\ngpu_mem = 2147483648\n", Path::new("run.toml")).unwrap();
        assert_eq!(n.memory.gpu_mem, Some(ByteSize(2 << 30)));
        let e = RunConfig::from_toml_str("[memory]\ngpu_mem = \"lots\"\n", Path::new("run.toml")).unwrap_err().to_string();
        assert!(e.starts_with("run.toml:2") && e.contains("lots"), "{e}");
        let mut small = RunConfig::default();
        small.model.path = "m".into();
        small.dataset.path = "d".into();
        small.memory.gpu_mem = Some(ByteSize(512 << 20));
        let e = small.validate().unwrap_err().to_string();
        assert!(e.contains("memory.gpu_mem") && e.contains("512MiB"), "{e}");
    }

    #[test]
    fn saving_over_a_file_keeps_its_comments_and_unchanged_spelling() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("model")).unwrap();
        let path = dir.path().join("run.toml");
        let text = "# My run: Llama on the support tickets.\n\n[model]\npath = \"model\" # the base\n\n[lora]\n# rank 8 was too small\nr = 16\nalpha = 32 # twice r\n\n[optim]\nlr = 2e-4\n\n[train]\nmax_steps = 60\n";
        std::fs::write(&path, text).unwrap();
        let mut c = RunConfig::load(&path).unwrap();
        assert!(c.model.path.is_absolute() || c.model.path.ends_with("model"));
        // As the studio holds it: paths absolute; then edited.
        c.model.path = dir.path().join("model");
        c.lora.r = 32;
        c.train.max_steps = None;
        c.save_keeping_comments(&path).unwrap();
        let saved = std::fs::read_to_string(&path).unwrap();
        for kept in [
            "# My run: Llama on the support tickets.",
            "path = \"model\" # the base",
            "# rank 8 was too small",
            "alpha = 32 # twice r",
            "lr = 2e-4",
        ] {
            assert!(saved.contains(kept), "{kept:?} kept in:\n{saved}");
        }
        assert!(saved.contains("r = 32"), "the edit is written:\n{saved}");
        assert!(!saved.contains("max_steps"), "an unset field is removed:\n{saved}");
        assert!(saved.contains("[dataset]") && saved.contains("epochs = 1.0"), "fields the file lacked are added:\n{saved}");
        let mut back = RunConfig::load(&path).unwrap();
        back.model.path = dir.path().join("model");
        assert_eq!(back, c, "the file reads back as the config that was saved");
        // A file that is not TOML is replaced by a plain save.
        std::fs::write(&path, "not = [toml").unwrap();
        c.save_keeping_comments(&path).unwrap();
        assert_eq!(RunConfig::from_toml_str(&std::fs::read_to_string(&path).unwrap(), &path).unwrap(), c);
    }

    #[test]
    fn bad_enum_value_is_refused() {
        let e = RunConfig::from_toml_str("[schedule]\nkind = \"step\"\n", Path::new("run.toml")).unwrap_err();
        assert!(e.to_string().contains("run.toml:2"), "{e}");
    }
}
