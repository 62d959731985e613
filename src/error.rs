//! One error type for the whole crate. Every variant names what the user must look at: a file,
//! a line, a tensor, a config field, a flag, an op or a card, so the CLI can print it on one line
//! and the studio can show it. There is no variant for a bare message.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be used: missing, unreadable, corrupt, or of the wrong shape.
    #[error("{}: {msg}", path.display())]
    File { path: PathBuf, msg: String },

    /// A specific line or row of a text file (dataset rows, TOML lines) is wrong.
    #[error("{}:{line}: {msg}", path.display())]
    Line { path: PathBuf, line: usize, msg: String },

    /// A config value is invalid; `field` is the dotted TOML path (`lora.r`).
    #[error("config field `{field}`: {msg}")]
    Config { field: String, msg: String },

    /// A tensor in a checkpoint or model file is missing or has the wrong shape or dtype.
    #[error("tensor `{name}`{}: {msg}", path.as_ref().map(|p| format!(" in {}", p.display())).unwrap_or_default())]
    Tensor { name: String, path: Option<PathBuf>, msg: String },

    /// A shape contract between engine and backend was broken (a bug, not a user error).
    #[error("shape mismatch in {op}: expected {expected}, got {got}")]
    Shape { op: &'static str, expected: String, got: String },

    /// The device ran out of memory; `advice` says what to change.
    #[error("out of memory {during}: {advice}")]
    OutOfMemory { during: String, advice: String },

    /// A GPU that cannot run the CUDA engine, or an operation this card cannot run: names the
    /// card, what it lacks and what to do.
    #[error("the CUDA engine cannot run on {card}: {msg}")]
    Card { card: String, msg: String },

    /// No usable CUDA device (no driver, no card, library missing).
    #[error("no CUDA device: {0}")]
    NoCuda(String),

    /// A CUDA call failed.
    #[error("CUDA {op}: {msg}")]
    Cuda { op: String, msg: String },

    /// Training produced a non-finite loss or gradient.
    #[error("non-finite {what} at step {step}: {advice}")]
    NonFinite { what: String, step: u64, advice: String },

    /// The run was stopped by the user (not a failure; used to unwind cleanly).
    #[error("stopped by the user")]
    Stopped,

    /// A run diverged (the guard's checks on loss and gradient norm); `why` says what was seen
    /// and what to change.
    #[error("the run diverged at step {step}: {why}")]
    Diverged { step: u64, why: String },

    /// A training run ended in failure, reported by the session thread as text (its `Event::Failed`).
    #[error("{}{msg}", run_dir.as_ref().map(|d| format!("the run in {} failed: ", d.display())).unwrap_or_default())]
    RunFailed { run_dir: Option<PathBuf>, msg: String },

    /// A command-line argument is wrong or missing: `arg` names the flag (`--mode`) or the
    /// arguments that go together (`--model/--adapter`); `msg` says what to give.
    #[error("{arg}: {msg}")]
    Arg { arg: String, msg: String },

    /// A token id outside the model's vocabulary (`during`: where it came from).
    #[error("token id {id} is outside the vocabulary of {vocab} tokens ({during}): the tokenizer or adapter is not this model's")]
    Vocab { id: i64, vocab: usize, during: String },

    /// An adapter that does not fit the model it is loaded onto.
    #[error("the adapter does not match the model: {msg}; load it with the base model it was trained on")]
    Adapter { msg: String },

    /// A checkpoint whose optimizer state does not fit the run resuming from it.
    #[error("the checkpoint does not match the run: {msg}; resume with the run's own config.toml, or start over with --restart")]
    Checkpoint { msg: String },

    /// A chat template that does not compile or render; `origin` says whose template it is.
    #[error("chat template ({origin}): {msg}")]
    Template { origin: String, msg: String },

    /// An operation the user asked for that cannot be done as asked (generation, evaluation, an
    /// export, the studio window); `msg` says what to change.
    #[error("{op}: {msg}")]
    Op { op: String, msg: String },

    /// A contract inside TuneStudio was broken: not the user's doing, nothing for them to change.
    #[error("internal error in {op}: {msg} (a TuneStudio bug: please report it with the command that ran)")]
    Bug { op: String, msg: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn file(path: impl AsRef<Path>, msg: impl std::fmt::Display) -> Self {
        Error::File { path: path.as_ref().to_path_buf(), msg: msg.to_string() }
    }
    pub fn line(path: impl AsRef<Path>, line: usize, msg: impl std::fmt::Display) -> Self {
        Error::Line { path: path.as_ref().to_path_buf(), line, msg: msg.to_string() }
    }
    pub fn config(field: impl Into<String>, msg: impl std::fmt::Display) -> Self {
        Error::Config { field: field.into(), msg: msg.to_string() }
    }
    pub fn tensor(name: impl Into<String>, path: Option<&Path>, msg: impl std::fmt::Display) -> Self {
        Error::Tensor { name: name.into(), path: path.map(Path::to_path_buf), msg: msg.to_string() }
    }
    pub fn arg(arg: impl Into<String>, msg: impl std::fmt::Display) -> Self {
        Error::Arg { arg: arg.into(), msg: msg.to_string() }
    }
    pub fn op(op: impl Into<String>, msg: impl std::fmt::Display) -> Self {
        Error::Op { op: op.into(), msg: msg.to_string() }
    }
    pub fn bug(op: impl Into<String>, msg: impl std::fmt::Display) -> Self {
        Error::Bug { op: op.into(), msg: msg.to_string() }
    }
    pub fn vocab(id: impl Into<i64>, vocab: usize, during: impl Into<String>) -> Self {
        Error::Vocab { id: id.into(), vocab, during: during.into() }
    }
}

/// Attach a path to I/O errors on the way up.
pub trait IoContext<T> {
    fn with_path(self, path: impl AsRef<Path>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn with_path(self, path: impl AsRef<Path>) -> Result<T> {
        self.map_err(|e| Error::file(path, e))
    }
}
