//! The model layer of vllm-apple: weight file formats and (next) model forwards.

pub mod config;
pub mod decoder;
pub mod dequant;
pub mod gguf;
pub mod load;
pub mod resolve;
pub mod runner;
pub mod safetensors_dir;
pub mod tokenizer;
