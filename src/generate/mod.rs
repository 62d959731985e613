//! Generation: a model (and adapter) loaded for answering, chat templates rendered with
//! `add_generation_prompt`, sampling, stop rules and tokens streamed as they are made. The CLI
//! (`generate`, `chat`), the studio's Chat page and the samples during training all go through
//! [`Generator`]; the forward pass itself is `engine::infer`.
//!
//! One generator answers several requests at once in one batched pass per token: the base and the
//! fine-tuned model side by side are two requests, one with the adapter and one without, over one
//! copy of the weights. Each request uses the cache slot of its index; a slot keeps the tokens it
//! holds, so the next turn of a conversation only runs its new tokens.

pub mod bench;
pub mod conversation;
pub mod sample;
pub mod stream;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use serde::Serialize;

use crate::adapter::{complete_token_rows, load_peft};
use crate::backend::cpu::CpuBackend;
use crate::backend::{Backend, DeviceInfo};
use crate::checkpoint;
use crate::config::{DeviceChoice, Quantization};
use crate::engine::infer::{InferAdapter, InferOptions, Inference};
use crate::error::{Error, Result};
use crate::model::chat_template::{ChatTemplate, Message};
use crate::model::tokenizer::TokenizerBundle;
use crate::model::{ModelSpec, WeightStore};
pub use sample::{Sampler, SamplingParams};
pub use stream::{FinishReason, StopRules, TextStream};

/// What to load: a model folder, optionally an adapter, and how.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadOptions {
    pub model: PathBuf,
    /// A PEFT adapter folder (a run's `adapter/`, or an exported one), or a run's checkpoint
    /// folder (`checkpoints/step-N/`: answers as the run did at that step, while it trains).
    pub adapter: Option<PathBuf>,
    /// `nf4` answers with the function a QLoRA adapter was trained against; `bf16` with the stored
    /// weights.
    pub quantization: Quantization,
    /// `auto` (the model's chat template) or a built-in name, as `dataset.template`.
    pub template: String,
    pub device: DeviceChoice,
    /// Conversations answered at once (2 for side by side).
    pub slots: usize,
    /// Tokens per conversation (prompt and answers).
    pub context: usize,
}

impl LoadOptions {
    pub fn new(model: impl Into<PathBuf>) -> Self {
        LoadOptions {
            model: model.into(),
            adapter: None,
            quantization: Quantization::Bf16,
            template: "auto".into(),
            device: DeviceChoice::Auto,
            slots: 1,
            context: 4096,
        }
    }

    /// A run folder's model, newest adapter, quantization and template. The newest checkpoint
    /// is at least as new as `adapter/` (the session saves both at the end, only checkpoints
    /// before it), so a run that is training or paused answers as of its last checkpoint.
    pub fn from_run(run_dir: &Path) -> Result<Self> {
        let steps = checkpoint::list(run_dir);
        let adapter = match steps.last() {
            Some(&step) => checkpoint::step_dir(run_dir, step),
            None => run_dir.join(checkpoint::ADAPTER_DIR),
        };
        Self::from_run_at(run_dir, &adapter)
    }

    /// A run folder's model, quantization and template with one of its adapters: `adapter/` or a
    /// folder of `checkpoints/`.
    pub fn from_run_at(run_dir: &Path, adapter: &Path) -> Result<Self> {
        let cfg_path = run_dir.join(checkpoint::CONFIG_FILE);
        if !cfg_path.exists() {
            return Err(Error::file(run_dir, "is not a run folder (no config.toml); give the folder `tunestudio train` printed"));
        }
        let cfg = crate::RunConfig::load(&cfg_path)?;
        if !adapter.exists() {
            return Err(Error::file(adapter, "is missing: the run has not saved a checkpoint or its adapter yet"));
        }
        let adapter = adapter.to_path_buf();
        Ok(LoadOptions {
            adapter: Some(adapter),
            quantization: cfg.model.quantization,
            template: cfg.dataset.template.clone(),
            device: cfg.train.device,
            ..LoadOptions::new(cfg.model.path.clone())
        })
    }
}

/// One request: a conversation to answer, with or without the adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub prompt: Prompt,
    /// Answer as the fine-tuned model (`false`: as the base, when an adapter is loaded).
    pub adapter: bool,
    pub params: SamplingParams,
    /// Strings that end the answer (not shown).
    pub stop_strings: Vec<String>,
    /// Keep going past end tokens (benchmarks and token-for-token checks of a fixed length).
    pub ignore_eos: bool,
}

/// What to answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// A conversation, rendered with the chat template and `add_generation_prompt`.
    Chat(Vec<Message>),
    /// Token ids as they are (checks against other tools).
    Tokens(Vec<u32>),
}

/// Reported while answering, in order, from the generating thread.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    /// Request `index`'s prompt is in the cache; `cached` of its tokens were reused.
    Prefilled {
        index: usize,
        prompt_tokens: usize,
        cached: usize,
    },
    /// A token of request `index` and the text it adds (may be empty while a character or a
    /// possible stop string is incomplete); `id` is `None` for text held back until the end.
    Token {
        index: usize,
        id: Option<u32>,
        text: String,
    },
    Finished {
        index: usize,
        reason: FinishReason,
    },
}

/// One finished answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Answer {
    pub text: String,
    /// The generated ids (an end token that stopped it included).
    pub tokens: Vec<u32>,
    pub prompt_tokens: usize,
    pub finish: FinishReason,
    /// Seconds until the first token, and of the rest.
    pub prefill_secs: f64,
    pub decode_secs: f64,
    /// Generated tokens per second after the first (the decode rate).
    pub tokens_per_s: f64,
}

/// Whether `dir` is one of a run's checkpoints (rather than a PEFT adapter folder).
pub fn is_checkpoint(dir: &Path) -> bool {
    dir.join("state.json").is_file() && dir.join("optimizer.safetensors").is_file()
}

/// The LoRA (and trained token rows) of a PEFT adapter folder or of a run's checkpoint, whose
/// LoRA settings are the run's (`checkpoints/step-N/../../config.toml`).
fn load_adapter(dir: &Path, spec: &ModelSpec, store: &WeightStore) -> Result<InferAdapter> {
    let (lora, weights, rows) = if is_checkpoint(dir) {
        let run_dir = dir.parent().and_then(Path::parent).unwrap_or(dir);
        let cfg_path = run_dir.join(checkpoint::CONFIG_FILE);
        if !cfg_path.is_file() {
            return Err(Error::file(dir, "is a checkpoint outside its run folder (no ../../config.toml for its LoRA settings)"));
        }
        let cfg = crate::RunConfig::load(&cfg_path)?;
        let c = checkpoint::load(dir)?;
        (cfg.lora, c.weights, c.token_rows)
    } else {
        let a = load_peft(dir, spec)?;
        (a.lora, a.weights, a.token_rows)
    };
    let token_rows = rows.as_ref().map(|r| complete_token_rows(r, spec, store)).transpose()?;
    Ok(InferAdapter { lora, weights, token_rows })
}

/// A loaded model that answers, on any backend.
pub struct Generator<B: Backend> {
    infer: Inference<B>,
    tok: TokenizerBundle,
    template: ChatTemplate,
    stop_ids: Vec<u32>,
    /// The tokens each slot's cache holds.
    cached: Vec<Vec<u32>>,
}

/// The end tokens of a model: the tokenizer's EOS and generation_config's list, config.json's
/// EOS ids, and the chat template's end of turn.
pub fn stop_ids(tok: &TokenizerBundle, spec: &ModelSpec, template: &ChatTemplate) -> Vec<u32> {
    let mut ids: Vec<u32> = tok.stop_ids().to_vec();
    ids.extend(&spec.eos_token_ids);
    ids.extend(tok.eos_id());
    ids.extend(crate::model::tokenizer::end_of_turn_token_in(tok, template));
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The sizes a generator of `opts` is built with for `spec` (its context within the model's).
pub fn infer_options(spec: &ModelSpec, opts: &LoadOptions) -> InferOptions {
    let context = opts.context.min(spec.max_position_embeddings.max(1)).max(1);
    InferOptions { chunk_rows: 512.min(context), ..InferOptions::new(opts.quantization, opts.slots.max(1), context) }
}

/// The device memory a generator of `opts` takes on a card, from the list it is allocated from
/// (`plan::infer_buffers`: weights, cache, workspace, logits) and the scratch of its own CUDA
/// backend; an adapter's LoRA copies and token rows, a few MiB, are left out (not read yet).
pub fn device_bytes(spec: &ModelSpec, opts: &LoadOptions) -> u64 {
    use crate::engine::plan::{self, BackendKind, Term};
    // The term is the plan's name for a sampler's buffers; only their bytes are used here.
    let bufs = plan::infer_buffers(spec, &infer_options(spec, opts), None, 0, BackendKind::Cuda, Term::Samples);
    let scratch = plan::cuda_creation_scratch(spec, opts.quantization);
    bufs.iter().chain(&scratch).map(|b| b.footprint(BackendKind::Cuda)).sum()
}

/// Whether a generator that needs `need` bytes fits the `free` bytes of `card` (a run paused on
/// it keeps its memory, and the chat must share the card with it): an error that says both and
/// what to do when it does not. Unknown free memory passes.
pub fn check_room(need: u64, free: Option<u64>, card: &str) -> Result<()> {
    let fmt = crate::util::fmt_bytes;
    match free {
        Some(free) if need > free => Err(Error::OutOfMemory {
            during: format!("loading the model for answering on {card}"),
            advice: format!(
                "it needs about {} and {} is free (a run on the card, even paused, keeps its memory): stop the run, answer on the CPU (device cpu), or shorten the context",
                fmt(need),
                fmt(free)
            ),
        }),
        _ => Ok(()),
    }
}

impl<B: Backend> Generator<B> {
    pub fn open(backend: B, opts: &LoadOptions) -> Result<Self> {
        let spec = ModelSpec::from_dir(&opts.model)?;
        let store = WeightStore::open(&opts.model)?;
        let tok = TokenizerBundle::load(&opts.model)?;
        let template = tok.resolve_template(&opts.template)?;
        let adapter = opts.adapter.as_deref().map(|dir| load_adapter(dir, &spec, &store)).transpose()?;
        let io = infer_options(&spec, opts);
        let infer = Inference::new(backend, spec.clone(), &store, io, adapter.as_ref())?;
        let stop_ids = stop_ids(&tok, &spec, &template);
        Ok(Generator { infer, tok, template, stop_ids, cached: vec![Vec::new(); io.slots] })
    }

    /// Wrap an inference model already built (tests, random weights).
    pub fn from_parts(infer: Inference<B>, tok: TokenizerBundle, template: ChatTemplate) -> Self {
        let stop_ids = stop_ids(&tok, infer.spec(), &template);
        let slots = infer.options().slots;
        Generator { infer, tok, template, stop_ids, cached: vec![Vec::new(); slots] }
    }

    pub fn tokenizer(&self) -> &TokenizerBundle {
        &self.tok
    }

    pub fn template(&self) -> &ChatTemplate {
        &self.template
    }

    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    pub fn inference(&self) -> &Inference<B> {
        &self.infer
    }

    pub fn has_adapter(&self) -> bool {
        self.infer.has_adapter()
    }

    pub fn slots(&self) -> usize {
        self.infer.options().slots
    }

    pub fn context(&self) -> usize {
        self.infer.options().capacity
    }

    /// The token ids of a prompt: a conversation rendered with `add_generation_prompt` and
    /// tokenized without adding special tokens (the template writes them), as `transformers`'
    /// `apply_chat_template(..., tokenize=True)` does.
    pub fn prompt_ids(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        match prompt {
            Prompt::Tokens(t) => Ok(t.clone()),
            Prompt::Chat(messages) => {
                let r = self.template.render(messages, true).map_err(|e| Error::op("rendering the prompt", e))?;
                self.tok.encode(&r.text, false)
            }
        }
    }

    /// Answer with other LoRA weights of the same shape from now on (`Inference::replace_lora`);
    /// the cached conversations are forgotten.
    pub fn replace_lora(&mut self, weights: &crate::engine::lora::LoraWeights) -> Result<()> {
        self.infer.replace_lora(weights)?;
        self.cached.iter_mut().for_each(Vec::clear);
        Ok(())
    }

    /// Forget what every slot holds.
    pub fn reset(&mut self) -> Result<()> {
        for s in 0..self.cached.len() {
            self.infer.truncate(s, 0)?;
            self.cached[s].clear();
        }
        Ok(())
    }

    /// The next-token logits after `prompt` in slot 0, from an empty cache, with the adapter on
    /// or off (checks of the forward against the training one and transformers').
    pub fn logits_after(&mut self, prompt: &[u32], adapter: bool) -> Result<Vec<f32>> {
        self.reset()?;
        self.infer.set_adapter(0, adapter)?;
        let logits = self.infer.forward(&[(0, prompt)])?.pop().expect("one entry");
        // The cache now holds a prompt that `cached` does not list: drop it.
        self.reset()?;
        Ok(logits)
    }

    /// Answer every request (request `i` in cache slot `i`), reporting through `on` as tokens
    /// come. `cancel` stops every answer at the next token.
    pub fn generate(&mut self, reqs: &[Request], cancel: &AtomicBool, on: &mut dyn FnMut(StreamEvent)) -> Result<Vec<Answer>> {
        if reqs.is_empty() {
            return Ok(Vec::new());
        }
        if reqs.len() > self.slots() {
            return Err(Error::op(
                "generation",
                format!("{} requests at once, but the model was loaded for {}: load it with more slots", reqs.len(), self.slots()),
            ));
        }
        for r in reqs {
            r.params.validate()?;
        }
        let start = Instant::now();
        let mut states = Vec::with_capacity(reqs.len());
        for (slot, r) in reqs.iter().enumerate() {
            let ids = self.prompt_ids(&r.prompt)?;
            if ids.is_empty() {
                return Err(Error::op("generation", "the prompt is empty after rendering the chat template: give a message"));
            }
            if ids.len() >= self.context() {
                return Err(Error::op(
                    "generation",
                    format!(
                        "the prompt has {} tokens, the context holds {}: shorten the conversation (or clear it) or load with a longer context",
                        ids.len(),
                        self.context()
                    ),
                ));
            }
            let adapter = r.adapter && self.infer.has_adapter();
            if adapter != self.infer.adapter_on(slot) {
                self.infer.set_adapter(slot, adapter)?;
                self.cached[slot].clear();
            }
            // Reuse the cached prefix, but run at least the last prompt token (its logits start
            // the answer).
            let keep = self.cached[slot].iter().zip(&ids).take_while(|(a, b)| a == b).count().min(ids.len() - 1);
            self.infer.truncate(slot, keep)?;
            self.cached[slot].truncate(keep);
            states.push(State::new(r, ids, keep, &self.stop_ids));
        }
        // Prefill, one request at a time (each may be long; chunks bound the workspace).
        let mut logits = Vec::with_capacity(reqs.len());
        for (slot, st) in states.iter().enumerate() {
            let new = &st.prompt[st.reused..];
            logits.push(self.infer.forward(&[(slot, new)])?.pop().expect("one entry"));
            self.cached[slot].extend_from_slice(new);
            on(StreamEvent::Prefilled { index: slot, prompt_tokens: st.prompt.len(), cached: st.reused });
        }
        let prefill_secs = start.elapsed().as_secs_f64();
        let mut first_token_at = None;
        loop {
            // Pick a token for every live request from its logits.
            let mut step = Vec::new();
            for (slot, st) in states.iter_mut().enumerate() {
                if st.finish.is_some() {
                    continue;
                }
                let l = logits.get_mut(slot).expect("logits per request");
                let id = st.choose(l);
                first_token_at.get_or_insert_with(Instant::now);
                let (text, stop_string) = st.text.push(&self.tok, id)?;
                st.tokens.push(id);
                on(StreamEvent::Token { index: slot, id: Some(id), text });
                let reason = if stop_string {
                    Some(FinishReason::StopString)
                } else if !st.ignore_eos && st.stop_ids.contains(&id) {
                    Some(FinishReason::Stop)
                } else if st.tokens.len() >= st.params.max_new_tokens {
                    Some(FinishReason::Length)
                } else if cancel.load(Ordering::Relaxed) {
                    Some(FinishReason::Cancelled)
                } else if self.cached[slot].len() + 1 >= self.context() {
                    Some(FinishReason::Context)
                } else {
                    None
                };
                match reason {
                    Some(r) => st.end(r, first_token_at, on, slot),
                    None => step.push((slot, id)),
                }
            }
            if step.is_empty() {
                break;
            }
            let entries: Vec<(usize, [u32; 1])> = step.iter().map(|&(s, id)| (s, [id])).collect();
            let refs: Vec<(usize, &[u32])> = entries.iter().map(|(s, t)| (*s, t.as_slice())).collect();
            let out = self.infer.forward(&refs)?;
            for ((slot, id), l) in step.into_iter().zip(out) {
                self.cached[slot].push(id);
                logits[slot] = l;
            }
        }
        Ok(states
            .into_iter()
            .map(|st| {
                let decode_secs = st.decode_secs;
                let n = st.tokens.len();
                Answer {
                    text: st.text.text().to_string(),
                    prompt_tokens: st.prompt.len(),
                    finish: st.finish.unwrap_or(FinishReason::Cancelled),
                    prefill_secs,
                    decode_secs,
                    tokens_per_s: if n > 1 && decode_secs > 0.0 { (n - 1) as f64 / decode_secs } else { 0.0 },
                    tokens: st.tokens,
                }
            })
            .collect())
    }
}

/// One request while it is answered.
struct State {
    prompt: Vec<u32>,
    reused: usize,
    params: SamplingParams,
    sampler: Sampler,
    stop_ids: Vec<u32>,
    ignore_eos: bool,
    text: TextStream,
    tokens: Vec<u32>,
    history: Vec<u32>,
    finish: Option<FinishReason>,
    decode_secs: f64,
}

impl State {
    fn new(r: &Request, prompt: Vec<u32>, reused: usize, stop_ids: &[u32]) -> Self {
        State {
            history: prompt.clone(),
            prompt,
            reused,
            params: r.params.clone(),
            sampler: Sampler::new(r.params.clone()),
            stop_ids: stop_ids.to_vec(),
            ignore_eos: r.ignore_eos,
            text: TextStream::new(&r.stop_strings),
            tokens: Vec::new(),
            finish: None,
            decode_secs: 0.0,
        }
    }

    fn choose(&mut self, logits: &mut [f32]) -> u32 {
        let id = self.sampler.next(logits, &self.history);
        self.history.push(id);
        id
    }

    fn end(&mut self, reason: FinishReason, first: Option<Instant>, on: &mut dyn FnMut(StreamEvent), index: usize) {
        let rest = self.text.finish();
        if !rest.is_empty() {
            on(StreamEvent::Token { index, id: None, text: rest });
        }
        self.decode_secs = first.map_or(0.0, |f| f.elapsed().as_secs_f64());
        self.finish = Some(reason);
        on(StreamEvent::Finished { index, reason });
    }
}

/// A generator on whichever backend was chosen, for callers that do not care which.
pub trait Chat: Send {
    fn generate(&mut self, reqs: &[Request], cancel: &AtomicBool, on: &mut dyn FnMut(StreamEvent)) -> Result<Vec<Answer>>;
    fn prompt_ids(&self, prompt: &Prompt) -> Result<Vec<u32>>;
    fn tokenizer(&self) -> &TokenizerBundle;
    fn device(&self) -> DeviceInfo;
    fn has_adapter(&self) -> bool;
    fn reset(&mut self) -> Result<()>;
}

impl<B: Backend> Chat for Generator<B> {
    fn generate(&mut self, reqs: &[Request], cancel: &AtomicBool, on: &mut dyn FnMut(StreamEvent)) -> Result<Vec<Answer>> {
        Generator::generate(self, reqs, cancel, on)
    }
    fn prompt_ids(&self, prompt: &Prompt) -> Result<Vec<u32>> {
        Generator::prompt_ids(self, prompt)
    }
    fn tokenizer(&self) -> &TokenizerBundle {
        &self.tok
    }
    fn device(&self) -> DeviceInfo {
        self.infer.backend().device()
    }
    fn has_adapter(&self) -> bool {
        Generator::has_adapter(self)
    }
    fn reset(&mut self) -> Result<()> {
        Generator::reset(self)
    }
}

/// Load for generation on the chosen device (`auto`: CUDA when usable, else the CPU in f32). On
/// a card, the model must fit what is free there first ([`check_room`]): the studio's chat shares
/// the card with a run that holds its planned memory, paused or not.
pub fn open(opts: &LoadOptions) -> Result<Box<dyn Chat>> {
    let on_card = |be: crate::backend::cuda::CudaBackend| -> Result<Box<dyn Chat>> {
        let d = be.device();
        check_room(device_bytes(&ModelSpec::from_dir(&opts.model)?, opts), d.free_memory_bytes, &d.name)?;
        Ok(Box::new(Generator::open(be, opts)?))
    };
    match opts.device {
        DeviceChoice::Cpu => Ok(Box::new(Generator::open(CpuBackend::<f32>::new(), opts)?)),
        DeviceChoice::Cuda => on_card(crate::backend::cuda::CudaBackend::new()?),
        DeviceChoice::Auto => match crate::backend::cuda::CudaBackend::new() {
            Ok(be) => on_card(be),
            Err(_) => Ok(Box::new(Generator::open(CpuBackend::<f32>::new(), opts)?)),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 13: the chat loads beside a run that keeps its memory on the card: what it needs is
    /// the plan's list for its sizes, and a card without that much free is refused up front with
    /// both numbers and what to do, not by an out-of-memory error half-way through loading.
    #[test]
    fn the_chat_checks_the_room_on_the_card_from_the_plans_list() {
        let spec = ModelSpec::llama3_8b();
        let mut o = LoadOptions { quantization: Quantization::Nf4, slots: 2, context: 4096, ..LoadOptions::new("m") };
        let need = device_bytes(&spec, &o);
        // NF4 8B: about 5.5 GB of weights and embeddings, 2 x 4096 positions of cache (1 GiB in bf16).
        let cache = 2 * 32 * 2 * 4096 * spec.kv_dim() as u64 * 2;
        assert!(need > (5u64 << 30) + cache && need < (7u64 << 30) + cache, "{need}");
        o.context = 1024;
        assert!(device_bytes(&spec, &o) < need - cache / 2, "a shorter context takes less");
        assert!(check_room(need, Some(need), "card").is_ok());
        assert!(check_room(need, None, "card").is_ok(), "unknown free memory is not refused");
        let e = check_room(need, Some(need / 2), "NVIDIA L4").unwrap_err().to_string();
        assert!(e.contains("NVIDIA L4") && e.contains("stop the run") && e.contains("device cpu"), "{e}");
        assert!(e.contains(&crate::util::fmt_bytes(need)) && e.contains(&crate::util::fmt_bytes(need / 2)), "{e}");
    }
}
