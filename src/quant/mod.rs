//! Quantization formats: NF4 with double quantization, byte-for-byte the bitsandbytes layout.

pub mod nf4;
