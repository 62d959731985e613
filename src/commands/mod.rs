//! What the CLI subcommands print: each turns library results into text or JSON.

pub mod inspect;
pub mod plan;
