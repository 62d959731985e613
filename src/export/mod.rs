//! What leaves a run: the PEFT adapter (`adapter`), the merged 16-bit model (`merged`), and what
//! both read from a run folder (`run`).

pub mod adapter;
pub mod merged;
pub mod run;
