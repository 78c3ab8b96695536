//! `vllm-apple generate`: prompts in (arguments or a file, one per line), completions out,
//! all batched through the engine, with throughput at the end.

use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args as ClapArgs;
use vllm_apple_engine::llm::ChatMessage;
use vllm_apple_engine::{EngineArgs, Prompt, SamplingParams, LLM};
use vllm_apple_ops::{ContextOptions, GpuContext};

/// Where scripts/fetch-assets.sh puts the embedded default model.
const DEFAULT_MODEL: &str = ".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf";

#[derive(ClapArgs)]
pub struct Args {
    /// A GGUF file, a Hugging Face folder (config.json + safetensors + tokenizer.json), or a
    /// hub id such as Qwen/Qwen3-0.6B (from the local Hugging Face cache, downloaded
    /// into it when online).
    #[arg(long, default_value = DEFAULT_MODEL)]
    model: String,
    /// Tokens to generate per prompt.
    #[arg(long, default_value_t = 64)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// 0 disables.
    #[arg(long, default_value_t = 0)]
    top_k: i32,
    /// Seed of the sampling (per request: the same seed gives the same text).
    #[arg(long)]
    seed: Option<u64>,
    /// Apply the model's chat template (each prompt as one user message).
    #[arg(long)]
    chat: bool,
    /// Print one JSON object per prompt (prompt and completion, text and token ids).
    #[arg(long)]
    json: bool,
    /// Weight dtype on the GPU: auto (the checkpoint's own for Hugging Face folders,
    /// float16 for GGUF), float16, bfloat16 or float32.
    #[arg(long, default_value = "auto")]
    dtype: String,
    /// `auto` loads the weights; `dummy` makes random ones of the model's shape on the GPU.
    #[arg(long, default_value = "auto")]
    load_format: String,
    /// Context length (default: the model's).
    #[arg(long)]
    max_model_len: Option<usize>,
    #[arg(long, default_value_t = 0.85)]
    gpu_memory_utilization: f64,
    #[arg(long, default_value_t = 64)]
    max_num_seqs: usize,
    /// Turn automatic prefix caching off.
    #[arg(long)]
    no_enable_prefix_caching: bool,
    /// Record each decode step only after the previous one's tokens are back (async
    /// scheduling, on by default, records the next step while the GPU runs this one).
    #[arg(long)]
    no_async_scheduling: bool,
    /// A file with one prompt per line (added after the prompts given as arguments).
    #[arg(long)]
    prompts_file: Option<String>,
    prompts: Vec<String>,
}

pub fn run(opts: &ContextOptions, args: Args) -> Result<()> {
    let mut prompts = args.prompts.clone();
    if let Some(f) = &args.prompts_file {
        let text = std::fs::read_to_string(f).with_context(|| format!("--prompts-file {f}"))?;
        prompts.extend(
            text.lines()
                .filter(|l| !l.trim().is_empty())
                .map(str::to_string),
        );
    }
    if prompts.is_empty() {
        bail!("no prompts: give them as arguments or with --prompts-file");
    }
    let engine_args = EngineArgs {
        model: args.model.clone(),
        dtype: args.dtype.clone(),
        max_model_len: args.max_model_len,
        gpu_memory_utilization: args.gpu_memory_utilization,
        // No more sequences than prompts: the KV cache is sized for them.
        max_num_seqs: args.max_num_seqs.min(prompts.len()),
        enable_prefix_caching: !args.no_enable_prefix_caching,
        async_scheduling: !args.no_async_scheduling,
        load_format: args.load_format.clone(),
        seed: args.seed.unwrap_or(0),
        ..EngineArgs::default()
    };
    let ctx = GpuContext::new(opts)?;
    let device = ctx.info.name.clone();
    let mut llm = LLM::with_context(ctx, engine_args).with_context(|| {
        if args.model == DEFAULT_MODEL {
            "the default model is fetched by scripts/fetch-assets.sh".to_string()
        } else {
            format!("--model {}", args.model)
        }
    })?;
    let params = SamplingParams {
        temperature: args.temperature,
        top_p: args.top_p,
        top_k: args.top_k,
        seed: args.seed,
        max_tokens: Some(args.max_tokens),
        ..SamplingParams::default()
    };
    let t0 = Instant::now();
    let outs = if args.chat {
        let convs: Vec<Vec<ChatMessage>> = prompts
            .iter()
            .map(|p| {
                vec![ChatMessage {
                    role: "user".into(),
                    content: p.clone(),
                }]
            })
            .collect();
        llm.chat(&convs, &[params], &serde_json::Map::new())?
    } else {
        llm.generate(
            prompts.iter().cloned().map(Prompt::Text).collect(),
            &[params],
        )?
    };
    let secs = t0.elapsed().as_secs_f64();
    let generated: usize = outs.iter().map(|o| o.outputs[0].token_ids.len()).sum();
    for (prompt, o) in prompts.iter().zip(&outs) {
        let c = &o.outputs[0];
        if args.json {
            let obj = serde_json::json!({
                "prompt": o.prompt,
                "prompt_token_ids": o.prompt_token_ids,
                "completion": c.text,
                "completion_token_ids": c.token_ids,
                "finish_reason": c.finish_reason.map(|f| f.as_str()),
            });
            println!("{obj}");
        } else {
            println!("{prompt}\n=> {}", c.text);
        }
    }
    eprintln!(
        "[{} prompts, {generated} tokens generated in {secs:.2} s: {:.1} tok/s on {device}]",
        outs.len(),
        generated as f64 / secs.max(1e-9)
    );
    Ok(())
}
