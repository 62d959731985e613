//! TuneStudio: QLoRA fine-tuning of Llama-family models, with a CPU reference backend and a CUDA
//! backend behind one `Backend` trait, a training session on a background thread, a CLI and a
//! studio window. ARCHITECTURE.md is the map.

pub mod adapter;
#[cfg(feature = "gui")]
pub mod app;
pub mod assets;
pub mod backend;
pub mod bench;
pub mod checkpoint;
pub mod commands;
pub mod config;
pub mod data;
pub mod device;
pub mod engine;
pub mod error;
pub mod eval;
pub mod export;
pub mod generate;
pub mod model;
pub mod preflight;
pub mod prepare;
pub mod quant;
pub mod session;
pub mod util;

pub use config::RunConfig;
pub use error::{Error, Result};
