//! What leaves a run: the PEFT adapter (and, through the interop work, merged weights and GGUF).

pub mod adapter;
