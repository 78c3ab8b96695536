//! The engine layer: turns a model and many requests into vLLM. A `Scheduler` picks each
//! step's work (decodes first, then prefill chunks, under a token budget, preempting by
//! recomputation when blocks run out), the `KvCacheManager` hands out paged-cache blocks
//! (reference-counted, with automatic prefix caching), the model runs one forward for the
//! whole batch, the `Sampler` picks tokens with vLLM's `SamplingParams` semantics and the
//! `Detokenizer` turns them into text incrementally. `LLM` is the offline API on top.

pub mod detokenizer;
pub mod engine;
pub mod kv_manager;
pub mod llm;
pub mod params;
pub mod sampler;
pub mod scheduler;

pub use engine::{CompletionOutput, EngineError, LLMEngine, Prompt, RequestOutput};
pub use llm::{ChatMessage, EngineArgs, LLM};
pub use params::SamplingParams;
