//! Datasets: file formats, chat-template rendering with label masks, batching and packing.

pub mod batch;
pub use batch::Batch;
