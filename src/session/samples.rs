//! Samples during training (`[samples]` of the config): a few prompts answered every N steps by
//! the weights being trained, written to `samples.jsonl` in the run folder and reported as
//! `Event::Samples`.
//!
//! They are answered by generation's engine (`generate::Generator`) on a backend and buffers of
//! their own, from a copy of the Trainer's LoRA weights: the Trainer is only read, so the run's
//! RNG (dropout masks keyed by the micro-batch counter), optimizer state and activations are those
//! of a run without samples, and so is its loss curve (`tests/session.rs` holds them equal byte
//! for byte). Answers are greedy, so they change only because the weights do.

use std::path::Path;
use std::sync::atomic::AtomicBool;

use serde::{Deserialize, Serialize};

use crate::adapter::complete_token_rows;
use crate::backend::Backend;
use crate::config::RunConfig;
use crate::data::Example;
use crate::engine::Trainer;
use crate::engine::infer::{InferAdapter, Inference};
use crate::engine::plan::SamplerSize;
use crate::error::{Error, IoContext, Result};
use crate::generate::{Generator, Prompt, Request, SamplingParams};
use crate::model::chat_template::Message;
use crate::model::tokenizer::TokenizerBundle;
use crate::model::{ModelSpec, WeightStore};
use crate::util::write_atomic;

pub const SAMPLES_FILE: &str = "samples.jsonl";

/// One answer of one prompt at one step (a line of `samples.jsonl`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub step: u64,
    /// The prompt as shown: the typed text, or a dataset row's rendered conversation up to its answer.
    pub prompt: String,
    pub completion: String,
}

/// A prompt to answer and how it is shown.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplePrompt {
    pub shown: String,
    pub prompt: Prompt,
}

/// The prompts of a run: the typed ones as one user message each; otherwise the first
/// `samples.count` rows of `rows` (the held-out rows, else the training rows) up to their first
/// trained token, which is where the template's generation prompt ends.
pub fn prompts(cfg: &RunConfig, rows: &[Example], tok: &TokenizerBundle) -> Result<Vec<SamplePrompt>> {
    if cfg.samples.every == 0 {
        return Ok(Vec::new());
    }
    if !cfg.samples.prompts.is_empty() {
        return Ok(cfg
            .samples
            .prompts
            .iter()
            .map(|p| SamplePrompt { shown: p.clone(), prompt: Prompt::Chat(vec![Message::new("user", p.as_str())]) })
            .collect());
    }
    let mut out = Vec::new();
    for e in rows {
        if out.len() == cfg.samples.count {
            break;
        }
        let cut = e.labels.iter().position(|&l| l >= 0).unwrap_or(e.input_ids.len());
        // A row whose first token is already trained has no prompt to answer.
        if cut == 0 {
            continue;
        }
        let ids = e.input_ids[..cut].to_vec();
        out.push(SamplePrompt { shown: tok.decode(&ids, false)?, prompt: Prompt::Tokens(ids) });
    }
    Ok(out)
}

/// The sampler of a run: its prompts, and the generator once built (on the first samples).
pub struct Sampler<B: Backend> {
    prompts: Vec<SamplePrompt>,
    max_new_tokens: usize,
    generator: Option<Generator<B>>,
}

impl<B: Backend> Sampler<B> {
    pub fn new(prompts: Vec<SamplePrompt>, max_new_tokens: usize) -> Self {
        Sampler { prompts, max_new_tokens, generator: None }
    }

    pub fn is_empty(&self) -> bool {
        self.prompts.is_empty()
    }

    /// Answer every prompt with the Trainer's weights now, greedily. The generator is built on
    /// the first call (`backend` makes its backend; the base weights are read from `store`) and
    /// then only given the new LoRA weights; trained token rows, which change its tables, rebuild it.
    pub fn answer(
        &mut self,
        trainer: &Trainer<B>,
        cfg: &RunConfig,
        spec: &ModelSpec,
        store: &WeightStore,
        backend: &dyn Fn() -> Result<B>,
    ) -> Result<Vec<Sample>> {
        let weights = trainer.lora_weights()?;
        let rows = trainer.token_rows()?;
        match (&mut self.generator, &rows) {
            (Some(g), None) => g.replace_lora(&weights)?,
            _ => {
                // Drop the old one first: its buffers are not needed while the new one loads.
                self.generator = None;
                let tok = TokenizerBundle::load(&cfg.model.path)?;
                let template = tok.resolve_template(&cfg.dataset.template)?;
                let token_rows = rows.as_ref().map(|r| complete_token_rows(r, spec, store)).transpose()?;
                let adapter = InferAdapter { lora: cfg.lora.clone(), weights, token_rows };
                // Sized as the memory plan counts it (`plan::sampler_buffers`): a cache slot per prompt.
                let size = SamplerSize::of(cfg).ok_or_else(|| Error::bug("samples", "a sampler without [samples]"))?;
                let opts = size.infer_options(spec, cfg.model.quantization);
                let infer = Inference::new(backend()?, spec.clone(), store, opts, Some(&adapter))?;
                self.generator = Some(Generator::from_parts(infer, tok, template));
            }
        }
        let g = self.generator.as_mut().expect("built above");
        let cancel = AtomicBool::new(false);
        // Every prompt in one batched pass per token, each in its own cache slot (greedy answers
        // do not depend on what else is in the batch: `tests/generate.rs`).
        let reqs: Vec<Request> = self
            .prompts
            .iter()
            .map(|p| Request {
                prompt: p.prompt.clone(),
                adapter: true,
                params: SamplingParams::greedy(self.max_new_tokens),
                stop_strings: vec![],
                ignore_eos: false,
            })
            .collect();
        let answers = g.generate(&reqs, &cancel, &mut |_| {})?;
        Ok(self
            .prompts
            .iter()
            .zip(answers)
            .map(|(p, a)| Sample { step: trainer.step, prompt: p.shown.clone(), completion: a.text })
            .collect())
    }
}

/// The memory the samples take, as the plan counts it under its `samples` term (one function:
/// `plan::sampler_buffers`, whose sizes the sampler's `Inference` is allocated from).
pub fn planned_bytes(plan: &crate::engine::plan::MemoryPlan) -> u64 {
    plan.terms.get(crate::engine::plan::Term::Samples.name()).copied().unwrap_or(0)
}

pub fn append(run_dir: &Path, samples: &[Sample]) -> Result<()> {
    use std::io::Write;
    let p = run_dir.join(SAMPLES_FILE);
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&p).with_path(&p)?;
    let text: String = samples.iter().map(|s| serde_json::to_string(s).expect("json") + "\n").collect();
    f.write_all(text.as_bytes()).with_path(&p)
}

/// Every sample written so far (lines that do not parse are skipped: a line cut by a kill).
pub fn read(run_dir: &Path) -> Vec<Sample> {
    std::fs::read_to_string(run_dir.join(SAMPLES_FILE)).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
}

/// On resume from `step`: drop the samples of later steps, which the resumed run answers again.
pub fn truncate(run_dir: &Path, step: u64) -> Result<()> {
    let p = run_dir.join(SAMPLES_FILE);
    if !p.exists() {
        return Ok(());
    }
    let kept: String = read(run_dir).iter().filter(|s| s.step <= step).map(|s| serde_json::to_string(s).expect("json") + "\n").collect();
    write_atomic(&p, kept.as_bytes())
}
