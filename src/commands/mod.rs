//! What the CLI subcommands print: each turns library results into text or JSON.

pub mod chat;
pub mod export_gguf;
pub mod generate;
pub mod inspect;
pub mod plan;
pub mod preflight;
