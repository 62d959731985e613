//! What leaves a run: the PEFT adapter (`adapter`), the merged 16-bit model (`merged`), a GGUF
//! file for llama.cpp and Ollama built from the merged weights (`gguf`), what they read from a
//! run folder (`run`), and the run's list of its exports (`history`).

pub mod gguf;
pub mod history;
pub mod merged;
pub mod run;
