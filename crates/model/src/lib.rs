//! The model layer of vllm-apple: weight file formats and (next) model forwards.

pub mod dequant;
pub mod gguf;
