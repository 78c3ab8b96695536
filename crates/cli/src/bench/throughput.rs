//! `vllm-apple bench throughput`: continuous-batching throughput at batch 1, 2, 4, ... in the
//! seed's format (generated tok/s and the scaling over batch 1), for a real model (GGUF or
//! Hugging Face folder) or dummy weights from a config.json.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Args as ClapArgs;
use vllm_apple_engine::engine::EngineConfig;
use vllm_apple_engine::{EngineArgs, LLMEngine, Prompt, SamplingParams};
use vllm_apple_model::config::ModelConfig;
use vllm_apple_model::decoder::DecoderModel;
use vllm_apple_ops::kernels::attention::AttentionOptions;
use vllm_apple_ops::{ContextOptions, DType, GpuContext};

#[derive(ClapArgs)]
pub struct Args {
    /// A GGUF file or Hugging Face folder.
    #[arg(long, conflicts_with = "config")]
    model: Option<String>,
    /// A Hugging Face config.json: random weights of that shape (load_format dummy).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Weight dtype (dummy weights and GGUF): float16, bfloat16 or float32.
    #[arg(long, default_value = "float16")]
    dtype: String,
    /// Batch sizes (concurrent requests).
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16,32,64")]
    batch: Vec<usize>,
    /// Prompt tokens per request.
    #[arg(long, default_value_t = 32)]
    prompt: usize,
    /// Generated tokens per request (eos ignored).
    #[arg(long, default_value_t = 64)]
    tokens: usize,
    /// KV-cache blocks of 16 tokens (default: enough for the largest batch).
    #[arg(long)]
    blocks: Option<usize>,
    /// Sampling temperature (0: greedy). Temperature alone is drawn on the GPU.
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Nucleus sampling (1: off).
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    /// Repetition penalty (1: off), applied to the logits on the GPU.
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Logprobs per token (the raw logits rows come back and the host samples).
    #[arg(long)]
    logprobs: Option<usize>,
    /// Record each decode step only after the previous one's tokens are back.
    #[arg(long)]
    no_async_scheduling: bool,
}

pub fn run(opts: &ContextOptions, args: Args) -> Result<()> {
    if args.batch.is_empty() || args.batch.contains(&0) || args.tokens == 0 || args.prompt == 0 {
        bail!("--batch, --prompt and --tokens must be positive");
    }
    let ctx = GpuContext::new(opts)?;
    let max_batch = *args.batch.iter().max().unwrap_or(&1);
    let len = args.prompt + args.tokens;
    let blocks = args.blocks.unwrap_or(max_batch * len.div_ceil(16) + 1);
    let t0 = Instant::now();
    let mut engine = match (&args.model, &args.config) {
        (Some(model), None) => EngineArgs {
            model: model.clone(),
            dtype: args.dtype.clone(),
            max_model_len: Some(len + 1),
            max_num_seqs: max_batch,
            num_gpu_blocks_override: Some(blocks),
            async_scheduling: !args.no_async_scheduling,
            ..EngineArgs::default()
        }
        .build(ctx.clone())?,
        (None, Some(path)) => {
            let Some(dtype) = DType::parse_float(&args.dtype) else {
                bail!(
                    "--dtype {}: expected float16, bfloat16 or float32",
                    args.dtype
                );
            };
            let cfg = ModelConfig::from_hf_config(&std::fs::read_to_string(path)?)?;
            let model = DecoderModel::dummy(&ctx, cfg, dtype, 1)?;
            dummy_engine(
                ctx.clone(),
                model,
                len + 1,
                max_batch,
                blocks,
                !args.no_async_scheduling,
            )?
        }
        _ => bail!("give --model PATH or --config config.json"),
    };
    println!(
        "model: {} ({} layers, {:.2} GB of weights), loaded in {:.1} s; device {} ({:?})",
        args.model.clone().unwrap_or_else(|| format!(
            "{} (dummy)",
            args.config
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        )),
        engine.model.cfg.layers,
        engine.model.weight_bytes() as f64 / 1e9,
        t0.elapsed().as_secs_f64(),
        ctx.info.name,
        ctx.info.backend
    );
    let params = SamplingParams {
        max_tokens: Some(args.tokens),
        ignore_eos: true,
        temperature: args.temperature,
        top_p: args.top_p,
        repetition_penalty: args.repetition_penalty,
        logprobs: args.logprobs,
        ..SamplingParams::greedy()
    };
    params.validate().map_err(anyhow::Error::msg)?;
    let how = if params.is_greedy() {
        format!(
            "greedy ({} argmax)",
            if params.needs_logits() { "host" } else { "GPU" }
        )
    } else {
        format!(
            "temperature {}, top_p {}, repetition_penalty {} ({} sampling)",
            args.temperature,
            args.top_p,
            args.repetition_penalty,
            if params.sampled_on_gpu() {
                "GPU"
            } else {
                "CPU"
            }
        )
    };
    println!(
        "{} prompt tokens + {} generated per request, {how}, eos ignored",
        args.prompt, args.tokens
    );
    println!(
        "{:>6} {:>12} {:>9} {:>10}",
        "batch", "tok/s", "scaling", "seconds"
    );
    let vocab = engine.model.cfg.vocab as u32;
    // Warm-up at every batch size: each compiles its own kernel variants (GEMVs are
    // specialised by token count; a first compile took ~20 ms of host time per step of the
    // first batch-16 round on the H100), and the pool fills.
    let warm = SamplingParams {
        max_tokens: Some(2),
        ..params.clone()
    };
    for &b in &args.batch {
        run_batch_with(&mut engine, b, args.prompt, &warm, vocab, 0)?;
    }
    let mut base = None;
    let mut rows = Vec::new();
    for (round, &b) in args.batch.iter().enumerate() {
        let before = engine.stats();
        let secs = run_batch_with(
            &mut engine,
            b,
            args.prompt,
            &params,
            vocab,
            round as u32 + 1,
        )?;
        let tok_s = (b * args.tokens) as f64 / secs;
        let base_tok_s = *base.get_or_insert(tok_s);
        println!(
            "{b:>6} {tok_s:>12.1} {:>8.2}x {secs:>10.2}",
            tok_s / base_tok_s
        );
        let after = engine.stats();
        let steps = (after.steps - before.steps).max(1) as f64;
        let ms = |a: f64, b: f64| 1e3 * (a - b) / steps;
        rows.push((
            b,
            ms(after.prepare_seconds, before.prepare_seconds),
            ms(after.gpu_seconds, before.gpu_seconds),
            ms(after.finish_seconds, before.finish_seconds),
        ));
    }
    println!("per engine step (ms): host before submit / submit + GPU / host after");
    for (b, prep, gpu, fin) in rows {
        println!("{b:>6} {prep:>8.2} {gpu:>8.2} {fin:>8.2}");
    }
    let s = engine.stats();
    println!(
        "steps {}, preemptions {}, prefix-cache hit rate {:.1}%",
        s.steps,
        s.preemptions,
        100.0 * s.prefix_cache.hit_rate()
    );
    Ok(())
}

fn dummy_engine(
    ctx: Arc<GpuContext>,
    model: DecoderModel,
    max_model_len: usize,
    max_batch: usize,
    blocks: usize,
    async_scheduling: bool,
) -> Result<LLMEngine> {
    Ok(LLMEngine::new(
        ctx,
        model,
        None,
        EngineConfig {
            max_model_len,
            max_num_seqs: max_batch,
            max_num_batched_tokens: 2048,
            block_size: 16,
            num_blocks: blocks,
            enable_prefix_caching: false,
            seed: 0,
            attention: AttentionOptions::from_env()?,
            async_scheduling,
        },
    )?)
}

/// Seconds to finish `b` requests of distinct random prompts, all added at once.
fn run_batch_with(
    engine: &mut LLMEngine,
    b: usize,
    prompt: usize,
    params: &SamplingParams,
    vocab: u32,
    salt: u32,
) -> Result<f64> {
    for i in 0..b {
        let ids: Vec<u32> = (0..prompt as u32)
            .map(|j| (j.wrapping_mul(7919) ^ (i as u32 * 104_729 + salt * 15_485_863)) % vocab)
            .collect();
        engine.add_request(
            &format!("bench-{salt}-{i}"),
            Prompt::Ids(ids),
            params.clone(),
        )?;
    }
    let t0 = Instant::now();
    while engine.has_unfinished() {
        engine.step()?;
    }
    Ok(t0.elapsed().as_secs_f64())
}
