//! `tunestudio eval`: mean per-token loss and perplexity of a model (optionally with a PEFT
//! adapter) over a dataset, through the same engine forward that training runs. It is the handle
//! by which exports are checked against other tools: the numbers are the mean over exactly the
//! tokens training would learn from (assistant responses, or everything for raw text).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::adapter::{complete_token_rows, load_peft};
use crate::backend::LossSum;
use crate::backend::cpu::CpuBackend;
use crate::config::{DatasetConfig, LoraConfig, Quantization};
use crate::data::Batch;
use crate::engine::lora::LoraWeights;
use crate::engine::{EngineOptions, Trainer};
use crate::error::Result;
use crate::model::{ModelSpec, WeightStore};

#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub model: PathBuf,
    pub adapter: Option<PathBuf>,
    /// Path, format, template and `train_on` decide which tokens are scored, as in training.
    pub dataset: DatasetConfig,
    pub max_seq_len: usize,
    /// Examples per forward (memory is sized for `batch_size × max_seq_len` rows).
    pub batch_size: usize,
    /// `bf16` uses the stored 16-bit weights (or bnb's dequantization of a pre-quantized
    /// checkpoint); `nf4` quantizes them first, which is the function a QLoRA adapter was trained
    /// against.
    pub quantization: Quantization,
    /// Report every example's tokens, labels and loss (for comparing with other tools).
    pub per_example: bool,
}

impl EvalOptions {
    pub fn new(model: PathBuf, data: PathBuf) -> Self {
        EvalOptions {
            model,
            adapter: None,
            dataset: DatasetConfig { path: data, max_bad_fraction: 1.0, ..DatasetConfig::default() },
            max_seq_len: 1024,
            batch_size: 8,
            quantization: Quantization::Bf16,
            per_example: false,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ExampleLoss {
    /// The row in the dataset file (1-based).
    pub row: usize,
    pub input_ids: Vec<u32>,
    /// Hugging Face alignment: `labels[i]` is the label of `input_ids[i]`, −100 when not scored.
    pub labels: Vec<i32>,
    pub loss_sum: f64,
    pub tokens: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub model: PathBuf,
    pub adapter: Option<PathBuf>,
    pub quantization: Quantization,
    pub rows: usize,
    pub rows_skipped: usize,
    /// Scored tokens (targets).
    pub tokens: usize,
    pub loss_sum: f64,
    /// Mean per-token cross-entropy, in nats.
    pub mean_loss: f64,
    pub perplexity: f64,
    /// Trained token rows the adapter carried (PEFT trainable tokens), if any.
    pub token_rows: usize,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub examples: Vec<ExampleLoss>,
}

/// A model (and adapter) loaded for scoring token sequences, on the CPU reference backend (f32).
pub struct Scorer {
    trainer: Trainer<CpuBackend<f32>>,
    pad_id: u32,
    batch_size: usize,
    max_len: usize,
    /// Trained token rows the adapter carried (PEFT trainable tokens).
    pub token_rows: usize,
}

impl Scorer {
    /// Memory is sized for `batch_size` sequences of up to `max_len` tokens.
    pub fn open(
        model: &Path,
        adapter: Option<&Path>,
        quantization: Quantization,
        batch_size: usize,
        max_len: usize,
        pad_id: u32,
    ) -> Result<Self> {
        let spec = ModelSpec::from_dir(model)?;
        let store = WeightStore::open(model)?;
        let adapter = adapter.map(|a| load_peft(a, &spec)).transpose()?;
        let (lora, weights) = match &adapter {
            Some(a) => (a.lora.clone(), a.weights.clone()),
            None => (
                LoraConfig { r: 1, targets: vec![], ..LoraConfig::default() },
                LoraWeights { rank: 1, layers: vec![BTreeMap::new(); spec.num_layers] },
            ),
        };
        // Dropout belongs to training; a forward for scoring must be deterministic.
        let lora = LoraConfig { dropout: 0.0, ..lora };
        let engine = EngineOptions {
            lora,
            optim: Default::default(),
            quantization,
            batch_size: batch_size.max(1),
            max_seq_len: max_len.max(1),
            checkpointing: crate::config::CheckpointPolicy::Layer,
            seed: 0,
            mlp_chunk_rows: 0,
            saved_attention: crate::engine::plan::SavedAttention::Off,
            cached_weight_layers: 0,
            hold_mlp_weights: false,
        };
        let mut trainer = Trainer::new(CpuBackend::<f32>::new(), spec.clone(), &store, engine, Some(&weights))?;
        let mut token_rows = 0;
        if let Some(rows) = adapter.as_ref().and_then(|a| a.token_rows.as_ref()) {
            token_rows = rows.ids.len();
            trainer.set_token_rows(&complete_token_rows(rows, &spec, &store)?)?;
        }
        Ok(Scorer { trainer, pad_id, batch_size: batch_size.max(1), max_len: max_len.max(1), token_rows })
    }

    /// Loss sum and scored-token count of each batch of up to `batch_size` sequences
    /// (`labels[i]` is the label of `ids[i]`, −100 when not scored).
    pub fn score(&mut self, seqs: &[(&[u32], &[i32])]) -> Result<Vec<LossSum>> {
        if let Some(long) = seqs.iter().find(|s| s.0.len() > self.max_len) {
            return Err(crate::error::Error::bug(
                "Scorer::score",
                format!("a sequence of {} tokens is longer than the scorer's {}", long.0.len(), self.max_len),
            ));
        }
        seqs.chunks(self.batch_size).map(|c| self.trainer.evaluate(&Batch::from_examples(c, self.pad_id, None))).collect()
    }
}

impl Scorer {
    /// The logits of one sequence, `[len, vocab]` (checks against transformers' forward).
    pub fn logits(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        let labels = vec![crate::data::batch::IGNORE_INDEX; ids.len()];
        self.trainer.logits(&Batch::from_examples(&[(ids, &labels)], self.pad_id, None))
    }
}

/// Evaluate a dataset on the CPU reference backend (f32).
pub fn evaluate(opts: &EvalOptions) -> Result<EvalReport> {
    // The run's own stages (`crate::prepare`): the folder read whole, the dataset as a run reads
    // it (`max_bad_fraction` 1 by default: every usable row is scored).
    let model = crate::prepare::Model::open(&opts.model)?;
    let tok = &model.tok;
    let data = crate::prepare::dataset(&opts.dataset, tok, opts.max_seq_len, crate::prepare::Purpose::Train)?;
    let batch_size = if opts.per_example { 1 } else { opts.batch_size.max(1) };
    let longest = data.examples.iter().map(|e| e.input_ids.len()).max().unwrap_or(1);
    let mut scorer = Scorer::open(&opts.model, opts.adapter.as_deref(), opts.quantization, batch_size, longest, tok.pad_id())?;
    let pairs: Vec<(&[u32], &[i32])> = data.examples.iter().map(|e| (e.input_ids.as_slice(), e.labels.as_slice())).collect();
    let parts = scorer.score(&pairs)?;
    let total = parts.iter().fold(LossSum::default(), |a, l| LossSum { sum: a.sum + l.sum, count: a.count + l.count });
    let examples = if opts.per_example {
        data.examples
            .iter()
            .zip(&parts)
            .map(|(e, l)| ExampleLoss {
                row: e.row,
                input_ids: e.input_ids.clone(),
                labels: e.labels.clone(),
                loss_sum: l.sum,
                tokens: l.count,
            })
            .collect()
    } else {
        Vec::new()
    };
    let mean = if total.count == 0 { f64::NAN } else { total.sum / total.count as f64 };
    Ok(EvalReport {
        model: opts.model.clone(),
        adapter: opts.adapter.clone(),
        quantization: opts.quantization,
        rows: data.examples.len(),
        rows_skipped: data.report.rows_skipped.len(),
        tokens: total.count,
        loss_sum: total.sum,
        mean_loss: mean,
        perplexity: mean.exp(),
        token_rows: scorer.token_rows,
        examples,
    })
}
