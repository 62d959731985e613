//! The CLI subcommands: each one's flags (`clap::Args`, flattened into main's parser) and what it
//! prints, turning library results into text or JSON.

pub mod bench;
pub mod chat;
pub mod eval;
pub mod export;
pub mod export_gguf;
pub mod generate;
pub mod inspect;
pub mod plan;
pub mod preflight;
pub mod train;

use crate::backend::card::{CardProfile, profile_named};
use crate::error::{Error, Result};

/// The card profile `--card` names.
pub fn card_profile(name: Option<String>) -> Result<Option<&'static CardProfile>> {
    name.map(|n| profile_named(&n).map_err(|e| Error::arg("--card", e))).transpose()
}

/// A size with its unit (`24GiB`, `500MB`), for clap's `value_parser`.
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    crate::util::parse_bytes(s)
}
