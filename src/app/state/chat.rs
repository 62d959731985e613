//! The Chat page's state: which model answers (a run at one of its checkpoints, or the Model
//! page's folder and adapter), the conversation as shown (turns, streamed answers, speeds), the
//! system message and sampling settings; and the chat worker, a thread of its own that holds the
//! loaded model (`generate::Chat`) and answers one command at a time, posting `ChatEvent`s as
//! tokens come. The frame never waits for it, and the training thread never shares with it: a
//! run that is paused (or finished) answers as of its newest checkpoint.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crossbeam_channel::{Receiver, Sender, unbounded};

use crate::config::{DeviceChoice, Quantization, RunConfig};
use crate::generate::conversation::{Answerers, Conversation};
use crate::generate::{self, FinishReason, LoadOptions, Request, SamplingParams, StreamEvent};
use crate::session::checkpoint;

use crate::app::jobs::{Load, guarded};

/// Tokens a conversation may hold (prompt and answers); the model's own limit when smaller.
pub const CONTEXT: usize = 4096;

/// Which model answers.
#[derive(Debug, Clone, PartialEq)]
pub enum ChatSource {
    /// A run folder at one of its checkpoints (`None`: the newest; its `adapter/` when it has
    /// no checkpoint).
    Run { dir: PathBuf, step: Option<u64> },
    /// A model folder, with an adapter or without (the Model page's).
    Folder { model: PathBuf, adapter: Option<PathBuf>, quantization: Quantization, template: String, device: DeviceChoice },
}

impl ChatSource {
    /// The Model page's model and adapter.
    pub fn from_config(c: &RunConfig) -> Self {
        ChatSource::Folder {
            model: c.model.path.clone(),
            adapter: c.model.adapter.clone(),
            quantization: c.model.quantization,
            template: c.dataset.template.clone(),
            device: c.train.device,
        }
    }

    /// What to load; reads the run's config, so it runs on the worker.
    pub fn load_options(&self) -> crate::Result<LoadOptions> {
        let mut o = match self {
            ChatSource::Run { dir, step: None } => LoadOptions::from_run(dir)?,
            ChatSource::Run { dir, step: Some(s) } => LoadOptions::from_run_at(dir, &checkpoint::step_dir(dir, *s))?,
            ChatSource::Folder { model, adapter, quantization, template, device } => LoadOptions {
                adapter: adapter.clone(),
                quantization: *quantization,
                template: template.clone(),
                device: *device,
                ..LoadOptions::new(model.clone())
            },
        };
        o.slots = 2;
        o.context = CONTEXT;
        Ok(o)
    }

    /// "run-3 at step 40", "Llama-3.2-1B + my-adapter".
    pub fn label(&self) -> String {
        let leaf = |p: &Path| p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| p.display().to_string());
        match self {
            ChatSource::Run { dir, step: None } => format!("{} at its newest checkpoint", leaf(dir)),
            ChatSource::Run { dir, step: Some(s) } => format!("{} at step {s}", leaf(dir)),
            ChatSource::Folder { model, adapter: Some(a), .. } => format!("{} + {}", leaf(model), leaf(a)),
            ChatSource::Folder { model, adapter: None, .. } => format!("{} without an adapter", leaf(model)),
        }
    }
}

/// What the worker loaded.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedModel {
    pub source: ChatSource,
    pub device: String,
    pub has_adapter: bool,
    /// The adapter folder answered with (a checkpoint's when from a run).
    pub adapter: Option<PathBuf>,
    pub load_secs: f64,
}

/// One answer as shown.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AnswerView {
    /// "fine-tuned", "base".
    pub who: &'static str,
    pub text: String,
    pub prompt_tokens: usize,
    /// Prompt tokens found in the cache from the turn before.
    pub cached_tokens: usize,
    pub tokens: usize,
    pub tokens_per_s: f64,
    /// Seconds to the first token.
    pub first_token_secs: f64,
    pub finish: Option<FinishReason>,
}

impl AnswerView {
    /// "42 tokens · 31.5 tokens/s · end of turn".
    pub fn stats(&self) -> String {
        let mut s = format!("{} tokens", self.tokens);
        if self.tokens_per_s > 0.0 {
            s.push_str(&format!(" · {:.1} tokens/s", self.tokens_per_s));
        }
        if let Some(f) = self.finish {
            s.push_str(&format!(" · {}", finish_words(f)));
        }
        s
    }
}

pub fn finish_words(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "end of turn",
        FinishReason::StopString => "stop string",
        FinishReason::Length => "token limit",
        FinishReason::Context => "context full",
        FinishReason::Cancelled => "stopped",
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TurnView {
    pub user: String,
    pub who: Answerers,
    pub answers: Vec<AnswerView>,
}

/// The Chat page.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatState {
    /// The run chosen in the picker (`None`: the Model page's folder and adapter).
    pub run: Option<PathBuf>,
    /// The checkpoint of that run (`None`: the newest).
    pub step: Option<u64>,
    /// Answer with the fine-tuned and the base model side by side.
    pub side_by_side: bool,
    pub system: String,
    pub params: SamplingParams,
    /// Stop strings, one per line.
    pub stop: String,
    pub input: String,
    pub turns: Vec<TurnView>,
    /// What the worker holds (or is loading).
    pub model: Load<LoadedModel>,
    /// The source of the last load asked for.
    pub requested: Option<ChatSource>,
    /// A turn is being answered.
    pub answering: bool,
    /// Why the last turn failed (shown beside the input until the next one).
    pub error: Option<String>,
    /// Send the typed message once the model being loaded is ready.
    pub send_when_loaded: bool,
    pub conversation: Conversation,
}

impl Default for ChatState {
    fn default() -> Self {
        ChatState {
            run: None,
            step: None,
            side_by_side: false,
            system: String::new(),
            params: SamplingParams { max_new_tokens: 256, ..SamplingParams::default() },
            stop: String::new(),
            input: String::new(),
            turns: Vec::new(),
            model: Load::Empty,
            requested: None,
            answering: false,
            error: None,
            send_when_loaded: false,
            conversation: Conversation::default(),
        }
    }
}

impl ChatState {
    /// The source the picker names.
    pub fn source(&self, config: &RunConfig) -> ChatSource {
        match &self.run {
            Some(dir) => ChatSource::Run { dir: dir.clone(), step: self.step },
            None => ChatSource::from_config(config),
        }
    }

    pub fn stop_strings(&self) -> Vec<String> {
        self.stop.lines().filter(|l| !l.is_empty()).map(unescape).collect()
    }

    /// Who answers the next turn.
    pub fn answerers(&self) -> Answerers {
        let adapter = self.model.ready().is_some_and(|m| m.has_adapter);
        if self.side_by_side && adapter { Answerers::Both } else { Answerers::Tuned }
    }

    /// Begin a turn: the requests to send, with the turn shown empty until tokens come. `None`
    /// when there is nothing to send or a turn is under way.
    pub fn begin_turn(&mut self) -> Option<Vec<Request>> {
        let user = self.input.trim().to_string();
        if user.is_empty() || self.answering {
            return None;
        }
        let system = Some(self.system.clone()).filter(|s| !s.trim().is_empty());
        if system != self.conversation.system {
            // A new system message starts a new conversation.
            self.conversation = Conversation::new(system);
            self.turns.clear();
        }
        let who = self.answerers();
        let reqs = self.conversation.requests(&user, who, &self.params, &self.stop_strings());
        let names: &[&'static str] = if who == Answerers::Both { &["fine-tuned", "base"] } else { &[""] };
        self.turns.push(TurnView { user, who, answers: names.iter().map(|&who| AnswerView { who, ..Default::default() }).collect() });
        self.input.clear();
        self.answering = true;
        self.error = None;
        Some(reqs)
    }

    /// Fold a worker's event into the conversation.
    pub fn apply(&mut self, e: ChatEvent) {
        match e {
            // A load asked for before another: the newer one follows.
            ChatEvent::Loaded { source, .. } if self.requested.as_ref() != Some(&source) => {}
            ChatEvent::Loaded { result, .. } => {
                if result.is_err() {
                    self.send_when_loaded = false;
                }
                self.model = match result {
                    Ok(m) => {
                        // Another model: the turns shown were not its.
                        if self.model.ready().map(|old| &old.source) != Some(&m.source) {
                            self.turns.clear();
                            self.conversation.clear();
                        }
                        Load::Ready(*m)
                    }
                    Err(e) => Load::Failed(e),
                };
            }
            ChatEvent::Stream(s) => {
                let Some(turn) = self.turns.last_mut() else { return };
                match s {
                    StreamEvent::Prefilled { index, prompt_tokens, cached } => {
                        if let Some(a) = turn.answers.get_mut(index) {
                            a.prompt_tokens = prompt_tokens;
                            a.cached_tokens = cached;
                        }
                    }
                    StreamEvent::Token { index, id, text } => {
                        if let Some(a) = turn.answers.get_mut(index) {
                            a.text.push_str(&text);
                            a.tokens += usize::from(id.is_some());
                        }
                    }
                    StreamEvent::Finished { index, reason } => {
                        if let Some(a) = turn.answers.get_mut(index) {
                            a.finish = Some(reason);
                        }
                    }
                }
            }
            ChatEvent::Answered(r) => {
                self.answering = false;
                let Some(turn) = self.turns.last_mut() else { return };
                match r {
                    Ok(done) => {
                        // The text shown is what streamed (the tests hold it to the answer's).
                        for (a, d) in turn.answers.iter_mut().zip(&done) {
                            a.tokens = d.tokens;
                            a.tokens_per_s = d.tokens_per_s;
                            a.first_token_secs = d.first_token_secs;
                            a.finish = Some(d.finish);
                        }
                        let texts: Vec<String> = done.iter().map(|d| d.text.clone()).collect();
                        self.conversation.push(&turn.user, turn.who, &texts);
                    }
                    Err(e) => {
                        // The turn is not kept: its question goes back to the input.
                        let turn = self.turns.pop().expect("checked");
                        if self.input.is_empty() {
                            self.input = turn.user;
                        }
                        self.error = Some(e);
                    }
                }
            }
        }
    }

    /// Start a new conversation (the model stays loaded).
    pub fn clear(&mut self) {
        self.turns.clear();
        self.conversation.clear();
    }

    /// The conversation as text, for the clipboard.
    pub fn transcript(&self) -> String {
        let mut out = String::new();
        if let Some(s) = &self.conversation.system {
            out.push_str(&format!("System: {s}\n\n"));
        }
        for t in &self.turns {
            out.push_str(&format!("User: {}\n\n", t.user));
            for a in &t.answers {
                let who = if a.who.is_empty() { "Assistant".to_string() } else { format!("Assistant ({})", a.who) };
                out.push_str(&format!("{who}: {}\n\n", a.text));
            }
        }
        out.trim_end().to_string()
    }
}

/// `\n` and `\t` in a stop string typed on one line.
fn unescape(s: &str) -> String {
    s.replace("\\n", "\n").replace("\\t", "\t")
}

/// A finished answer's numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct AnswerDone {
    pub text: String,
    pub tokens: usize,
    pub tokens_per_s: f64,
    pub first_token_secs: f64,
    pub finish: FinishReason,
}

/// What the chat worker posts.
#[derive(Debug, Clone, PartialEq)]
pub enum ChatEvent {
    Loaded { source: ChatSource, result: Result<Box<LoadedModel>, String> },
    Stream(StreamEvent),
    Answered(Result<Vec<AnswerDone>, String>),
}

/// What the chat worker is asked to do, in order.
#[derive(Debug)]
pub enum ChatCommand {
    Load(ChatSource),
    Answer(Vec<Request>),
}

/// The chat worker: a thread holding the loaded model. Dropping the handle ends the thread once
/// its current command is done.
pub struct ChatWorker {
    commands: Sender<ChatCommand>,
    cancel: Arc<AtomicBool>,
}

impl ChatWorker {
    /// Start the thread; its events come out of the receiver.
    pub fn start() -> (Self, Receiver<ChatEvent>) {
        let (ctx, crx) = unbounded();
        let (etx, erx) = unbounded();
        let cancel = Arc::new(AtomicBool::new(false));
        let c = Arc::clone(&cancel);
        let _ = std::thread::Builder::new().name("studio-chat".into()).spawn(move || serve(&crx, &etx, &c));
        (ChatWorker { commands: ctx, cancel }, erx)
    }

    pub fn send(&self, c: ChatCommand) {
        if matches!(c, ChatCommand::Answer(_)) {
            self.cancel.store(false, Ordering::SeqCst);
        }
        let _ = self.commands.send(c);
    }

    /// Stop the answer under way at its next token (what it said so far is kept).
    pub fn stop(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }
}

fn serve(commands: &Receiver<ChatCommand>, events: &Sender<ChatEvent>, cancel: &AtomicBool) {
    let mut chat: Option<Box<dyn generate::Chat>> = None;
    for c in commands.iter() {
        match c {
            ChatCommand::Load(source) => {
                // The old model goes first: two on one card may not fit.
                chat = None;
                let t0 = std::time::Instant::now();
                let r = guarded(|| {
                    let o = source.load_options()?;
                    let c = generate::open(&o)?;
                    Ok((o, c))
                });
                let result = r.map(|(o, c)| {
                    let m = LoadedModel {
                        source: source.clone(),
                        device: c.device().name,
                        has_adapter: c.has_adapter(),
                        adapter: o.adapter,
                        load_secs: t0.elapsed().as_secs_f64(),
                    };
                    chat = Some(c);
                    Box::new(m)
                });
                let _ = events.send(ChatEvent::Loaded { source, result });
            }
            ChatCommand::Answer(reqs) => {
                let r = match chat.as_mut() {
                    None => Err("no model is loaded".to_string()),
                    Some(c) => guarded(|| {
                        let answers = c.generate(&reqs, cancel, &mut |e| {
                            let _ = events.send(ChatEvent::Stream(e));
                        })?;
                        Ok(answers
                            .into_iter()
                            .map(|a| AnswerDone {
                                tokens: a.tokens.len(),
                                tokens_per_s: a.tokens_per_s,
                                first_token_secs: a.prefill_secs,
                                finish: a.finish,
                                text: a.text,
                            })
                            .collect())
                    }),
                };
                let _ = events.send(ChatEvent::Answered(r));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loaded(source: &ChatSource, adapter: bool) -> ChatEvent {
        ChatEvent::Loaded {
            source: source.clone(),
            result: Ok(Box::new(LoadedModel {
                source: source.clone(),
                device: "CPU".into(),
                has_adapter: adapter,
                adapter: None,
                load_secs: 0.1,
            })),
        }
    }

    fn token(index: usize, text: &str) -> ChatEvent {
        ChatEvent::Stream(StreamEvent::Token { index, id: Some(7), text: text.into() })
    }

    fn done(text: &str) -> AnswerDone {
        AnswerDone { text: text.into(), tokens: 2, tokens_per_s: 10.0, first_token_secs: 0.1, finish: FinishReason::Stop }
    }

    #[test]
    fn tokens_stream_into_their_answer_and_the_turn_is_kept() {
        let mut c = ChatState::default();
        let src = ChatSource::Run { dir: "r".into(), step: None };
        c.requested = Some(src.clone());
        c.apply(loaded(&src, true));
        c.side_by_side = true;
        c.input = "  Hi  ".into();
        let reqs = c.begin_turn().unwrap();
        assert_eq!(reqs.len(), 2);
        assert!(c.input.is_empty() && c.answering);
        assert!(c.begin_turn().is_none(), "one turn at a time");
        for e in [token(0, "Hel"), token(1, "Yo"), token(0, "lo")] {
            c.apply(e);
        }
        assert_eq!(c.turns[0].answers[0].text, "Hello");
        assert_eq!(c.turns[0].answers[1].text, "Yo");
        assert_eq!(c.turns[0].answers[0].tokens, 2);
        c.apply(ChatEvent::Answered(Ok(vec![done("Hello"), done("Yo")])));
        assert!(!c.answering);
        assert_eq!(c.conversation.turns(), 1);
        assert_eq!(c.turns[0].answers[1].stats(), "2 tokens · 10.0 tokens/s · end of turn");
        assert_eq!(c.transcript(), "User: Hi\n\nAssistant (fine-tuned): Hello\n\nAssistant (base): Yo");
    }

    #[test]
    fn a_failed_answer_gives_the_question_back_and_a_stale_load_is_ignored() {
        let mut c = ChatState::default();
        let old = ChatSource::Run { dir: "old".into(), step: None };
        let new = ChatSource::Run { dir: "new".into(), step: Some(4) };
        c.requested = Some(new.clone());
        c.model = Load::Loading;
        c.apply(loaded(&old, true));
        assert!(c.model.is_loading(), "the load asked for later is still coming");
        c.apply(loaded(&new, false));
        assert_eq!(c.model.ready().unwrap().source, new);
        c.side_by_side = true;
        c.input = "Why?".into();
        assert_eq!(c.begin_turn().unwrap().len(), 1, "without an adapter there is nothing to compare");
        c.apply(ChatEvent::Answered(Err("out of memory".into())));
        assert!(c.turns.is_empty() && !c.answering);
        assert_eq!(c.input, "Why?");
        assert_eq!(c.error.as_deref(), Some("out of memory"));
        // A failed load clears a pending send.
        c.send_when_loaded = true;
        c.apply(ChatEvent::Loaded { source: new.clone(), result: Err("no such folder".into()) });
        assert!(!c.send_when_loaded);
        assert_eq!(c.model, Load::Failed("no such folder".into()));
    }

    #[test]
    fn a_new_system_message_starts_a_new_conversation() {
        let mut c = ChatState { input: "a".into(), ..Default::default() };
        c.begin_turn().unwrap();
        c.apply(ChatEvent::Answered(Ok(vec![done("b")])));
        c.system = "Be terse.".into();
        c.input = "c".into();
        let reqs = c.begin_turn().unwrap();
        assert_eq!(c.turns.len(), 1);
        match &reqs[0].prompt {
            generate::Prompt::Chat(m) => assert_eq!(m.len(), 2, "system + the new question only"),
            p => panic!("{p:?}"),
        }
        assert_eq!(c.stop_strings(), Vec::<String>::new());
        c.stop = "###\n\\nUser:".into();
        assert_eq!(c.stop_strings(), vec!["###".to_string(), "\nUser:".to_string()]);
    }
}
