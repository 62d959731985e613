//! What leaves a run: the PEFT adapter (`adapter`), the merged 16-bit model (`merged`), a GGUF
//! file for llama.cpp and Ollama built from the merged weights (`gguf`), and what they read from a
//! run folder (`run`).

pub mod gguf;
pub mod merged;
pub mod run;
