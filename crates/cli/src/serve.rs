//! `vllm-apple serve MODEL`: the OpenAI-compatible server, with vLLM's flags.

use anyhow::{Context, Result};
use clap::Args as ClapArgs;
use vllm_apple_engine::EngineArgs;
use vllm_apple_ops::{ContextOptions, GpuContext};

#[derive(ClapArgs)]
pub struct Args {
    /// A GGUF file, a Hugging Face folder, or a hub id (from the local Hugging Face cache,
    /// downloaded into it when online).
    model: String,
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Clients must send `Authorization: Bearer KEY` (also read from VLLM_API_KEY).
    #[arg(long, env = "VLLM_API_KEY")]
    api_key: Option<String>,
    /// The model name clients use (default: the model argument).
    #[arg(long)]
    served_model_name: Option<String>,
    /// Where the tokenizer comes from, when not the model's own.
    #[arg(long)]
    tokenizer: Option<String>,
    #[arg(long)]
    max_model_len: Option<usize>,
    #[arg(long, default_value = "auto")]
    dtype: String,
    #[arg(long, default_value_t = 0.9)]
    gpu_memory_utilization: f64,
    #[arg(long, default_value_t = 256)]
    max_num_seqs: usize,
    #[arg(long)]
    max_num_batched_tokens: Option<usize>,
    /// Automatic prefix caching (on by default, as in vLLM v1).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    enable_prefix_caching: bool,
    /// Turn prefix caching off.
    #[arg(long)]
    no_enable_prefix_caching: bool,
    /// Record each decode step only after the previous one's tokens are back (async
    /// scheduling, on by default, records the next step while the GPU runs this one).
    #[arg(long)]
    no_async_scheduling: bool,
    #[arg(long, default_value = "auto")]
    load_format: String,
    /// A Jinja chat template (a file, or the template itself) replacing the model's.
    #[arg(long)]
    chat_template: Option<String>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Use exactly this many KV-cache blocks (instead of sizing from memory).
    #[arg(long)]
    num_gpu_blocks_override: Option<usize>,
}

pub fn run(opts: &ContextOptions, args: Args) -> Result<()> {
    let ctx = GpuContext::new(opts)?;
    let mut engine = EngineArgs {
        model: args.model.clone(),
        tokenizer: args.tokenizer.clone(),
        dtype: args.dtype.clone(),
        max_model_len: args.max_model_len,
        gpu_memory_utilization: args.gpu_memory_utilization,
        max_num_seqs: args.max_num_seqs,
        max_num_batched_tokens: args.max_num_batched_tokens,
        enable_prefix_caching: args.enable_prefix_caching && !args.no_enable_prefix_caching,
        async_scheduling: !args.no_async_scheduling,
        load_format: args.load_format.clone(),
        seed: args.seed,
        num_gpu_blocks_override: args.num_gpu_blocks_override,
        ..EngineArgs::default()
    }
    .build(ctx)
    .with_context(|| format!("loading {}", args.model))?;
    if let Some(t) = &args.chat_template {
        let template = match std::fs::read_to_string(t) {
            Ok(text) => text,
            Err(_) if t.contains("{%") || t.contains("{{") => t.clone(),
            Err(e) => return Err(e).with_context(|| format!("--chat-template {t}")),
        };
        match engine.tokenizer.as_mut() {
            Some(tok) => tok.chat_template = Some(template),
            None => anyhow::bail!("--chat-template: this model has no tokenizer"),
        }
    }
    let name = args.served_model_name.unwrap_or(args.model);
    let addr = format!("{}:{}", args.host, args.port);
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(vllm_apple_server::serve(engine, &addr, name, args.api_key))
        .with_context(|| format!("serving on {addr}"))
}
